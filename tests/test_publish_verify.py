"""The checks a dataset passes before the catalog registers it (labelgen.service.verify)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from fsspec.implementations.local import LocalFileSystem

from labelgen.contract.commits import CommitLog
from labelgen.contract.format import Manifest
from labelgen.service.verify import PublishRefused, card_matches, verify_dataset


@pytest.fixture
def ds(fake_labels, tmp_path) -> Path:
    """A private copy of the fake-teacher dataset, free to damage."""
    return Path(shutil.copytree(fake_labels, tmp_path / "ds"))


def _manifest(ds: Path) -> Manifest:
    return Manifest.from_json((ds / "manifest.json").read_bytes())


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _record_path(ds: Path, index: int = 0) -> Path:
    return ds / CommitLog.record_file(_manifest(ds).shards[index])


def test_a_genuine_dataset_verifies_with_its_files_and_card(ds):
    manifest = _manifest(ds)
    out = verify_dataset(str(ds) + "/", sample_rows=64, threads=3)
    assert out.url == str(ds)
    raw = (ds / "manifest.json").read_bytes()
    assert out.manifest_sha256 == hashlib.sha256(raw).hexdigest() and out.manifest == json.loads(raw)
    assert out.job_spec == (ds / "job-spec.yaml").read_text()
    by_path = {f.path: f for f in out.files}
    assert len(by_path) == len(out.files)
    commit_files = sorted(
        str(p.relative_to(ds)) for p in (ds / CommitLog.record_file(manifest.units[0])).parent.iterdir()
    )
    assert sorted(p for p, f in by_path.items() if f.kind == "commit") == commit_files
    assert {p for p, f in by_path.items() if f.kind == "shard"} == {s.path for s in manifest.shards}
    assert by_path["manifest.json"].kind == "manifest" and by_path["job-spec.yaml"].kind == "spec"
    assert set(by_path) == {
        "manifest.json",
        "job-spec.yaml",
        *commit_files,
        *(s.path for s in manifest.shards),
    }
    for f in out.files:  # sizes and hashes of what is on disk (not _progress.json)
        data = (ds / f.path).read_bytes()
        assert (f.size, f.sha256) == (len(data), hashlib.sha256(data).hexdigest()), f.path
    t, card = manifest.totals, out.card
    assert card["format_version"] == manifest.format_version and card["created_at"] == manifest.created_at
    assert card["teacher"] == {
        "model": manifest.teacher["model"],
        "dtype": manifest.teacher["dtype"],
        "vllm_version": manifest.teacher["vllm_version"],
        "weights": {
            "mode": manifest.teacher["weights"]["mode"],
            "sha256": manifest.teacher["weights"]["sha256"],
        },
    }
    assert card["tokenizer"]["fingerprint"] == manifest.tokenizer["fingerprint"]
    assert card["tokenizer"]["vocab_size"] == manifest.tokenizer["vocab_size"]
    assert (card["k"], card["codec"], card["products"]) == (manifest.k, manifest.codec, manifest.products)
    assert (card["draws"], card["hidden_layers"]) == (0, [])
    assert (card["sequences"], card["tokens"], card["label_positions"], card["bytes"]) == (
        t["rows"],
        t["tokens"],
        t["label_positions"],
        t["bytes"],
    )
    assert card["bytes_per_token"] == pytest.approx(t["bytes"] / t["label_positions"])
    assert card["rejected"] == manifest.rejected and card["spec_sha256"] == manifest.spec_sha256
    stats = card["stats"]
    assert stats["sample_rows"] >= 64 and 0 < stats["top1_mass"] <= 1 and stats["entropy_nats"] > 0
    assert 0 <= stats["tail_mass"] <= 1
    json.dumps(card)  # the catalog stores it as JSON
    assert card_matches(card, k=manifest.k, teacher__model=manifest.teacher["model"])
    assert not card_matches(card, k=manifest.k + 1) and not card_matches(card, teacher__nothing=1)


def test_a_dataset_without_a_manifest_is_refused_as_incomplete(ds):
    (ds / "manifest.json").unlink()
    with pytest.raises(PublishRefused, match="incomplete or still being written") as info:
        verify_dataset(str(ds))
    assert str(ds) in str(info.value) and "8 shard(s) committed" in str(info.value)
    assert "wait for its labeling job" in str(info.value) and info.value.path == "manifest.json"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_shard_is_refused_naming_it(ds, damage):
    shard = _manifest(ds).shards[2].path
    target = ds / shard
    data = bytearray(target.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-100]))
    else:
        target.unlink()
    expected = {"flip": "has sha256", "truncate": f"has {len(data) - 100} bytes", "delete": "is missing"}[
        damage
    ]
    with pytest.raises(PublishRefused, match=f"{shard} {expected}") as info:
        verify_dataset(str(ds))
    assert info.value.path == shard and "(1 file(s))" in str(info.value)


def test_every_bad_shard_is_listed_in_one_refusal(ds):
    shards = [s.path for s in _manifest(ds).shards]
    (ds / shards[5]).unlink()
    (ds / shards[1]).write_bytes(b"x")
    with pytest.raises(PublishRefused) as info:
        verify_dataset(str(ds), threads=2)
    assert "(2 file(s))" in str(info.value) and shards[5] in str(info.value)
    assert info.value.path == shards[1]


def test_a_commit_record_that_disagrees_with_the_manifest_is_refused_naming_it(ds):
    record = _record_path(ds, 3)
    _edit_json(record, lambda r: r.update(sha256="0" * 64))
    name = str(record.relative_to(ds))
    with pytest.raises(PublishRefused, match=f"{name} disagrees with the manifest: sha256 '0000") as info:
        verify_dataset(str(ds))
    assert info.value.path == name


def test_a_missing_commit_record_is_refused_naming_it(ds):
    record = _record_path(ds, 1)
    record.unlink()
    name = str(record.relative_to(ds))
    with pytest.raises(PublishRefused, match=f"{name} .*is missing from the commit log") as info:
        verify_dataset(str(ds))
    assert info.value.path == name


def test_a_hidden_shard_is_hashed_and_listed(ds):
    hidden = "hidden/part-00000-00000.parquet"
    (ds / "hidden").mkdir()
    (ds / hidden).write_bytes(b"hidden states")
    fields = {
        "hidden_path": hidden,
        "hidden_bytes": 13,
        "hidden_sha256": hashlib.sha256(b"hidden states").hexdigest(),
    }
    _edit_json(ds / "manifest.json", lambda m: m["shards"][0].update(fields))
    _edit_json(_record_path(ds, 0), lambda r: r.update(fields))
    assert {f.path: f.kind for f in verify_dataset(str(ds)).files}[hidden] == "hidden"
    (ds / hidden).write_bytes(b"hidden_states")
    with pytest.raises(PublishRefused, match=f"{hidden} has sha256") as info:
        verify_dataset(str(ds))
    assert info.value.path == hidden


def test_a_manifest_of_another_format_version_is_refused(ds):
    _edit_json(ds / "manifest.json", lambda m: m.update(format_version="2.0"))
    with pytest.raises(PublishRefused, match="format version 2.0.*install the labelgen release") as info:
        verify_dataset(str(ds))
    assert info.value.path == "manifest.json"


def test_a_shard_path_outside_the_dataset_is_refused_before_any_open(ds, monkeypatch):
    (ds.parent / "x").write_bytes(b"outside")
    _edit_json(ds / "manifest.json", lambda m: m["shards"][0].update(path="../x"))
    opened: list[str] = []
    real_open, real_cat = LocalFileSystem._open, LocalFileSystem.cat_file

    def spy_open(self, path, *args, **kwargs):
        opened.append(self._strip_protocol(path))
        return real_open(self, path, *args, **kwargs)

    def spy_cat(self, path, *args, **kwargs):
        opened.append(self._strip_protocol(path))
        return real_cat(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", spy_open)
    monkeypatch.setattr(LocalFileSystem, "cat_file", spy_cat)
    with pytest.raises(PublishRefused, match=r"'\.\./x' is not a dataset path"):
        verify_dataset(str(ds))
    assert opened and all(p.startswith(f"{ds}/") for p in opened), opened
