"""Paths stay inside their dataset: every shard, hidden-shard and commit-record path a
record holds is a relative dataset path (``check_dataset_path``), refused with a
FormatError naming it by the writer's records, the manifest and commit-log parsers and
every reader, before any file outside the dataset root is opened."""

from __future__ import annotations

import json
import re

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

from labelgen.contract.commits import CommitLog
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import (
    FormatError,
    Manifest,
    ShardRecord,
    UnitRecord,
    check_dataset_path,
    dataset_file,
)
from labelgen.summary import inspect_dataset
from students.interop import shard_files
from students.shards import RowGroupRef, ShardReader
from students.stream import LabelStream

ESCAPES = ["../../../../etc/hostname", "/etc/hostname", "shards/../../x", "s3://other-bucket/x"]
BAD = [
    *ESCAPES,
    "",
    "shards//part.parquet",
    "shards/",
    "./shards/part.parquet",
    "shards\\..\\..\\x",
    "C:/x",
    "shards/%2e%2e/x",
    "shards/part?x=1",
    "shards/part\x00.parquet",
    "shards/part\n.parquet",
    "x" * 2000,
]
GOOD = ["shards/part-00000-00000.parquet", "hidden/part-00012-00003.parquet", "a/b=c/d+e_f.parquet"]


def _record(path: str = "shards/part-00000-00000.parquet", **fields) -> dict:
    record = {
        "path": path,
        "unit": 0,
        "index": 0,
        "rows": 3,
        "tokens": 30,
        "label_positions": 27,
        "row_groups": 1,
        "bytes": 100,
        "sha256": "ab",
        "first_sequence": 0,
        "next_sequence": 3,
    }
    return {**record, **fields}


def _manifest_json(**shard_fields) -> str:
    manifest = Manifest(
        k=4,
        teacher={"model": "m"},
        tokenizer={"fingerprint": "f"},
        corpus={},
        spec_sha256="s",
        shards=[ShardRecord(**_record())],
        units=[UnitRecord(0, "file:///c.jsonl", 3, 30, 1, {"empty_text": 2}, "cd")],
        created_at="now",
    )
    data = json.loads(manifest.to_json())
    data["shards"][0].update(shard_fields)
    return json.dumps(data)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every local path fsspec opens or reads whole during the test."""
    seen: list[str] = []
    real_open, real_cat = LocalFileSystem._open, LocalFileSystem.cat_file

    def spy_open(self, path, *args, **kwargs):
        seen.append(self._strip_protocol(path))
        return real_open(self, path, *args, **kwargs)

    def spy_cat(self, path, *args, **kwargs):
        seen.append(self._strip_protocol(path))
        return real_cat(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", spy_open)
    monkeypatch.setattr(LocalFileSystem, "cat_file", spy_cat)
    return seen


@pytest.mark.parametrize("path", GOOD)
def test_dataset_paths_the_writer_makes_are_accepted(path):
    assert check_dataset_path(path, "t") == path
    assert dataset_file("s3://bucket/ds/", path) == f"s3://bucket/ds/{path}"
    assert ShardRecord(**_record(path, hidden_path=path)).path == path


@pytest.mark.parametrize("path", BAD)
def test_paths_that_could_leave_the_dataset_are_refused_naming_them(path):
    expected = re.escape(repr(path)[:200])
    with pytest.raises(FormatError, match=f"where: {expected}.*is not a dataset path"):
        check_dataset_path(path, "where")
    with pytest.raises(FormatError, match=expected):
        dataset_file("/data/ds", path)
    with pytest.raises(FormatError, match=f"field 'path': {expected}"):  # the writer builds these
        ShardRecord(**_record(path))
    if path:  # an empty hidden_path means "no hidden shard"
        with pytest.raises(FormatError, match=f"field 'hidden_path': {expected}"):
            ShardRecord(**_record(hidden_path=path))
    with pytest.raises(FormatError, match=expected):
        RowGroupRef(path, 0)


def test_a_non_string_path_is_refused():
    with pytest.raises(FormatError, match="is a int, not a string"):
        check_dataset_path(5, "where")


@pytest.mark.parametrize("field", ["path", "hidden_path"])
@pytest.mark.parametrize("path", ESCAPES)
def test_a_manifest_whose_shard_path_leaves_the_dataset_is_refused_before_any_open(
    tmp_path, opened, path, field
):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "manifest.json").write_text(_manifest_json(**{field: path}))
    (tmp_path / "x").write_text("outside the dataset")
    url = str(root)
    named = f"shards\\[0\\] field '{field}': {re.escape(repr(path))}"
    with pytest.raises(FormatError, match=named):
        read_manifest(url)
    with pytest.raises(FormatError, match=named):
        LabelStream(url, None, None, 4, follow=True)  # reads the manifest when constructed
    with pytest.raises(FormatError, match=named):
        inspect_dataset(url)
    with pytest.raises(FormatError, match=named):
        shard_files(url)
    assert opened and all(p == f"{root}/manifest.json" for p in opened), opened


@pytest.mark.parametrize("path", ESCAPES)
def test_readers_refuse_escaping_paths_they_are_handed(tmp_path, opened, path):
    root = tmp_path / "ds"
    root.mkdir()
    record = ShardRecord(**_record())
    with pytest.raises(FormatError, match=re.escape(repr(path))):
        ShardReader(str(root), {path: record}, 4)  # a record keyed by another path
    reader = ShardReader(str(root), {record.path: record}, 4, verify="off")
    forged = object.__new__(RowGroupRef)  # bypasses RowGroupRef's own check
    object.__setattr__(forged, "shard", path)
    object.__setattr__(forged, "row_group", 0)
    for read in (reader.read, lambda ref: reader.open_verified(ref.shard)):
        with pytest.raises(FormatError, match=re.escape(repr(path))):
            read(forged)
    assert opened == []


@pytest.mark.parametrize("field", ["path", "hidden_path"])
@pytest.mark.parametrize("path", ESCAPES)
def test_commit_records_with_escaping_paths_are_refused(tmp_path, opened, path, field):
    root = tmp_path / "ds"
    (root / "_commits").mkdir(parents=True)
    (root / "_commits" / "part-00000-00000.json").write_text(json.dumps(_record(**{field: path})))
    log = CommitLog.at(str(root))
    named = f"part-00000-00000.json field '{field}': {re.escape(repr(path))}"
    for read in (log.shards, log.committed, lambda: log.shards(0)):
        with pytest.raises(FormatError, match=named):
            read()
    follower = LabelStream(str(root), None, None, 4, follow=True, prefetch=0, poll_interval=0.01)
    with pytest.raises(FormatError, match=named):
        next(iter(follower))
    assert all(p.startswith(f"{root}/") for p in opened), opened  # records and the manifest only


def test_a_commit_record_must_carry_the_name_its_writer_gives_it(tmp_path):
    root = tmp_path / "ds"
    (root / "_commits").mkdir(parents=True)
    moved = _record("shards/part-00000-00007.parquet", index=7)
    (root / "_commits" / "part-00000-00000.json").write_text(json.dumps(moved))
    with pytest.raises(FormatError, match="part-00000-00000.json holds the record of part-00000-00007.json"):
        CommitLog.at(str(root)).shards()
    (root / "_commits" / "part-00000-00000.json").unlink()
    unit = {"unit": 3, "source": "s", "sequences": 1, "tokens": 2, "shards": 1}
    (root / "_commits" / "unit-00000.json").write_text(json.dumps(unit))
    with pytest.raises(FormatError, match="unit-00000.json holds the record of unit-00003.json"):
        CommitLog.at(str(root)).units()


def test_the_commit_log_reads_only_its_own_directory(tmp_path, monkeypatch):
    import labelgen.contract.commits as commits

    fs, root = fsspec.core.url_to_fs(str(tmp_path / "ds"))
    log = CommitLog(fs, root)
    log.write_shard(ShardRecord(**_record()))
    real = commits.list_fresh
    (tmp_path / "ds" / "_commits" / "deeper").mkdir()
    (tmp_path / "ds" / "_commits" / "deeper" / "part-00000-00001.json").write_text("{")
    nested = f"{root}/_commits/deeper/part-00000-00001.json"  # as a recursive key listing has it

    monkeypatch.setattr(commits, "list_fresh", lambda *a: [*real(*a), nested])
    assert [s.path for s in log.shards()] == ["shards/part-00000-00000.parquet"]  # deeper keys skipped
    monkeypatch.setattr(commits, "list_fresh", lambda *a: [*real(*a), f"{root}/part-00000-00002.json"])
    with pytest.raises(FormatError, match=r"returned '.*/ds/part-00000-00002.json', outside it"):
        log.shards()
