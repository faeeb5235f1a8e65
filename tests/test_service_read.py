"""Students read through the service: ``labelgen://HOST:PORT/team/name@N`` on the real parts.

A dataset on moto's S3 server (loopback) is read with presigned URLs, one on the local
filesystem through the service's signed byte-range route; both give exactly the rows the
storage URL gives directly. A shard changed after publish fails the reader naming it.
Eight concurrent readers lose no row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs `pip install 'labelgen[service]'`")

import s3_server  # noqa: E402
from labelgen.contract.dataset import read_manifest  # noqa: E402
from labelgen.service.app import ServiceSettings  # noqa: E402
from labelgen.service.server import ServiceThread  # noqa: E402
from students.stream import LabelStream, row_group_refs  # noqa: E402

s3_endpoint = s3_server.s3_endpoint  # fixtures
bucket = s3_server.bucket

ADMIN = "lgt_" + "r" * 43


@pytest.fixture
def service(tmp_path, monkeypatch):
    monkeypatch.setenv("LABELGEN_TOKEN", ADMIN)
    settings = ServiceSettings(db_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}", bootstrap_token=ADMIN)
    with ServiceThread(settings) as svc:
        from labelgen.catalog.client import CatalogClient

        client = CatalogClient(svc.address, token=ADMIN)
        client.create_team("nlp")
        svc.client = client
        yield svc


@pytest.fixture
def local_copy(fake_labels, tmp_path) -> str:
    out = tmp_path / "labels"
    shutil.copytree(fake_labels, out)
    return str(out)


def batches(url: str, **kw) -> list[dict]:
    m = read_manifest(url)
    stream = LabelStream(url, m, row_group_refs(m), 4, shuffle=True, seed=3, loop=False, **kw)
    return list(stream)


def assert_same(xs: list[dict], ys: list[dict]) -> None:
    assert len(xs) == len(ys) and xs
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def fresh_fs() -> None:
    """Forget cached labelgen:// listings (each test has its own service)."""
    import fsspec

    fsspec.filesystem("labelgen").clear_instance_cache()


def test_a_filesystem_dataset_streamed_by_the_service_reads_the_same_rows(service, local_copy):
    fresh_fs()
    version = service.client.publish("nlp/web", local_copy)
    url = f"labelgen://{service.address}/nlp/web@{version['version']}"
    assert_same(batches(url), batches(local_copy))
    assert_same(batches(f"labelgen://{service.address}/nlp/web@latest"), batches(local_copy))
    events = service.client.audit(limit=1000)
    assert {"publish", "read"} <= {e["action"] for e in events}


def test_a_shard_changed_after_publish_fails_the_reader_naming_it(service, local_copy):
    fresh_fs()
    service.client.publish("nlp/web", local_copy)
    manifest = json.loads((Path(local_copy) / "manifest.json").read_text())
    shard = manifest["shards"][-1]["path"]
    with open(Path(local_copy) / shard, "r+b") as f:  # same size, one byte changed
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(Exception, match=shard.split("/")[-1]) as info:
        batches(f"labelgen://{service.address}/nlp/web@1")
    assert "sha256" in str(info.value)
    fresh_fs()
    (Path(local_copy) / "manifest.json").write_text(json.dumps({**manifest, "created_at": "tampered"}))
    with pytest.raises(Exception, match="manifest.json"):  # a whole-file read is checked by the client
        read_manifest(f"labelgen://{service.address}/nlp/web@1")


def digest(url: str) -> str:
    """sha256 over every array of every batch a seeded shuffled epoch of ``url`` gives."""
    h = hashlib.sha256()
    for batch in batches(url):
        for key in sorted(batch):
            h.update(key.encode() + np.ascontiguousarray(np.asarray(batch[key])).tobytes())
    return h.hexdigest()


@pytest.mark.integration
def test_an_s3_dataset_read_with_presigned_urls_gives_the_s3_rows_and_trains(
    service, fake_labels, bucket, teacher_dir, tmp_path
):
    fresh_fs()
    direct = f"{bucket}/labels/web"
    s3, root = fsspec.core.url_to_fs(direct)
    s3.put(f"{fake_labels}/", root, recursive=True)
    s3.invalidate_cache()
    version = service.client.publish("nlp/web", direct, aliases=["stable"])
    files = service.client.files("nlp/web@stable")
    for f in files["files"]:  # presigned: the bytes never pass through the service
        assert "Signature" in f["url"] and "/v1/blobs/" not in f["url"], f["url"]
    served = f"labelgen://{service.address}/nlp/web@{version['version']}"
    # The reader runs without bucket credentials (only the service holds them).
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_service_read as t; print(t.digest({served!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == digest(direct)
    # A student trains from the served URL, and the version lists it as a run.
    trainer = student(
        f"labelgen://{service.address}/nlp/web@stable", teacher_dir, tmp_path / "student", eval_every=4
    )
    final = trainer.train()
    assert final and all(np.isfinite(v) for v in final.values())  # held-out metrics of the last eval
    runs = service.client.version("nlp/web@1")["runs"]
    assert [r["name"] for r in runs] == [str((tmp_path / "student").resolve())]


def test_eight_concurrent_readers_lose_no_row(service, local_copy):
    fresh_fs()
    service.client.publish("nlp/web", local_copy)
    url = f"labelgen://{service.address}/nlp/web@1"
    m = read_manifest(url)
    refs = row_group_refs(m)
    want = sorted(int(h) for b in batches(local_copy) for h in np.asarray(b["token_hash"]).view(np.uint64))
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            stream = LabelStream(url, m, refs, 4, shuffle=True, seed=i, loop=False)
            results[i] = sorted(int(h) for b in stream for h in np.asarray(b["token_hash"]).view(np.uint64))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 8 and all(rows == want for rows in results.values())


def student(url_or_data, teacher_dir, out, **train) -> object:
    """A set-up 4-step trainer of the trainer tests' tiny student on a URL (or a data section)."""
    from test_trainer import config

    from students.trainer import Trainer

    data = url_or_data if isinstance(url_or_data, dict) else {"url": url_or_data}
    cfg = config(data.get("url"), teacher_dir, out, data=data, optim={"max_steps": 4}, train=train)
    trainer = Trainer(cfg, log=lambda m: None)
    trainer.setup()
    return trainer


def test_mixtures_and_ensembles_read_through_the_service(
    service, local_copy, teacher_dir, corpus_dir, tmp_path
):
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.contract.configs import load_config
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec
    from students.mixture import MixtureStream

    fresh_fs()
    other = str(tmp_path / "other")
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, other, labels={"k": 4}))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k, seed=5))
    service.client.publish("nlp/web", local_copy)
    service.client.publish("nlp/other", other)
    web, second = (f"labelgen://{service.address}/nlp/{name}@1" for name in ("web", "other"))
    mixture = {"url": None, "mixture": [{"url": web, "weight": 3.0}, {"url": second, "weight": 1.0}]}
    trainer = student(mixture, teacher_dir, tmp_path / "mix")
    assert isinstance(trainer.stream(0), MixtureStream)
    assert {int(trainer.next_batch(0)["dataset"]) for _ in range(24)} == {0, 1}
    trainer.train()
    assert trainer.step == 4
    trainer = student(
        {"url": web, "teachers": [{"url": second, "weight": 1.0}]}, teacher_dir, tmp_path / "ens"
    )
    assert trainer.next_batch(0)["topk_ids@1"].shape[-1] == 4  # the second teacher's labels, joined by row
    trainer.train()
    assert trainer.step == 4
    assert {r["name"] for r in service.client.version("nlp/other@1")["runs"]} == {
        str((tmp_path / "mix").resolve()),
        str((tmp_path / "ens").resolve()),
    }
