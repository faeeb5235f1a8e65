"""Object storage: credentials refused in specs, bounded retries, safe publishing on S3.

The S3 tests run against moto's S3 server on loopback (``tests/s3_server.py``) with
the deterministic fake teacher, so they exercise the real s3fs/botocore path quickly.
"""

from __future__ import annotations

import json
import logging

import fsspec
import pytest

import s3_server
from fakes import FakeTeacher
from helpers import dataset_rows, make_spec
from labelgen import credentials
from labelgen.contract import storage
from labelgen.contract.commits import CommitLog
from labelgen.contract.configs import ConfigError, load_config
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import COMMITS_DIR
from labelgen.contract.storage import retry
from labelgen.credentials import check_url, find_secrets, url_problem
from labelgen.runner import run_job
from labelgen.spec import JobSpec
from s3_server import upload_dir

s3_endpoint = s3_server.s3_endpoint  # fixtures
bucket = s3_server.bucket

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


def spec_for(teacher_dir, corpus_url, out_url, **sections) -> JobSpec:
    raw = make_spec(teacher_dir, "unused", out_url, **sections)
    raw["corpus"]["sources"] = [corpus_url]
    return load_config(JobSpec, raw)


# -- credentials -------------------------------------------------------------------------


def test_urls_with_credentials_are_refused_without_echoing_the_secret(tmp_path):
    teacher_dir = corpus_dir = tmp_path  # validation only: nothing is read
    assert url_problem("s3://bucket/labels") is None and url_problem("/data/x.jsonl") is None
    assert "embeds credentials" in url_problem(f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/x")
    assert "signature" in url_problem("https://host/c.jsonl?X-Amz-Signature=abc&X-Amz-Credential=k")
    with pytest.raises(credentials.CredentialError, match="output.url"):
        check_url("gs://user:pw@bucket/x", "output.url")
    raw = make_spec(teacher_dir, corpus_dir, f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/labels")
    raw["corpus"]["sources"].append("https://example.com/c.jsonl?sig=abc")
    raw["teacher"]["engine_args"]["hf_token"] = "hf_" + "x" * 34
    with pytest.raises(ConfigError) as info:
        load_config(JobSpec, raw)
    text = str(info.value)
    assert "output.url" in text and "embeds credentials" in text
    assert "corpus.sources[1]" in text and "teacher.engine_args.hf_token" in text
    assert "from the environment" in text
    assert SECRET not in text and "x" * 34 not in text, "an error message must not repeat the secret"
    http_out = make_spec(teacher_dir, corpus_dir, "https://example.com/labels")
    with pytest.raises(ConfigError, match="output.url.*read-only over HTTP"):
        load_config(JobSpec, http_out)
    broken = make_spec(teacher_dir, corpus_dir, "s3://[bucket/labels")  # urlsplit raises ValueError
    with pytest.raises(ConfigError, match=r"output.url 's3://\[bucket/labels' is not a valid URL"):
        load_config(JobSpec, broken)


def test_find_secrets_ignores_ordinary_fields():
    spec_like = {"packing": {"min_tokens": 2}, "teacher": {"tokenizer": "/m", "max_model_len": 9}}
    assert list(find_secrets(spec_like)) == []
    bad = {"a": {"aws_secret_access_key": "x"}, "b": ["AKIAIOSFODNN7EXAMPLE"], "c": {"sessionToken": "y"}}
    assert sorted(find_secrets(bad)) == ["a.aws_secret_access_key", "b[0]", "c.sessionToken"]


# -- retries -----------------------------------------------------------------------------


def test_retry_backs_off_logs_and_gives_up(caplog):
    calls, delays = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return "ok"

    with caplog.at_level(logging.WARNING, logger="labelgen.contract.storage"):
        assert retry(flaky, "upload x", sleep=delays.append) == "ok"
    assert len(calls) == 3 and len(delays) == 2 and delays[1] > delays[0] > 0
    assert [r.getMessage().split(" failed")[0] for r in caplog.records] == ["upload x", "upload x"]
    assert "retry 1/4" in caplog.records[0].getMessage()

    def down():
        raise OSError("503 slow down")

    delays.clear()
    with pytest.raises(OSError) as info:
        retry(down, "write y", attempts=4, sleep=delays.append)
    assert len(delays) == 3 and "gave up after 4 attempts" in "".join(info.value.__notes__)

    def missing():
        calls.append(1)
        raise FileNotFoundError("nope")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry(missing, "read z", sleep=delays.append)
    assert len(calls) == 1, "a missing file is not retried"


class Flaky:
    """Make every ``every``-th PUT to S3 fail with a transient error (the store stays consistent).

    Patches the cached s3fs instance that the writer gets from ``url_to_fs``.
    """

    def __init__(self, monkeypatch, every: int, only: str = ""):
        self.calls = self.failures = 0
        self.every, self.only = every, only
        fs = fsspec.filesystem("s3")
        assert fsspec.core.url_to_fs("s3://any/where")[0] is fs
        put, pipe = fs.put_file, fs.pipe_file

        def put_file(lpath, rpath, *args, **kwargs):
            self._maybe_fail(rpath)
            return put(lpath, rpath, *args, **kwargs)

        def pipe_file(path, data, *args, **kwargs):
            self._maybe_fail(path)
            return pipe(path, data, *args, **kwargs)

        monkeypatch.setattr(fs, "put_file", put_file)
        monkeypatch.setattr(fs, "pipe_file", pipe_file)
        monkeypatch.setattr(storage, "_sleep", lambda s: None)

    def _maybe_fail(self, path: str) -> None:
        if self.only not in path:
            return
        self.calls += 1
        if self.every == 1 or self.calls % self.every == 0:
            self.failures += 1
            raise ConnectionError(f"injected failure #{self.failures} on {path}")


@pytest.fixture(scope="module")
def local_reference(teacher_dir, corpus_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("reference") / "ds")
    spec = spec_for(teacher_dir, f"{corpus_dir}/*.jsonl", out)
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    return out


@pytest.mark.integration
def test_s3_corpus_and_output_give_the_local_dataset_with_no_secrets(
    teacher_dir, corpus_dir, bucket, local_reference
):
    upload_dir(corpus_dir, f"{bucket}/corpus")
    out = f"{bucket}/labels/run-1"
    spec = spec_for(teacher_dir, f"{bucket}/corpus/*.jsonl", out)
    m = run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert [s["url"] for s in m.corpus["sources"]] == [f"{bucket}/corpus/a.jsonl", f"{bucket}/corpus/b.jsonl"]
    assert dataset_rows(out) == dataset_rows(local_reference)
    ref = read_manifest(local_reference)
    assert [(s.path, s.rows, s.sha256) for s in m.shards] == [(s.path, s.rows, s.sha256) for s in ref.shards]
    assert m.rejected == ref.rejected
    fs, root = fsspec.core.url_to_fs(out)
    for path in fs.find(root):
        if path.endswith((".json", ".yaml")):
            text = fs.cat_file(path).decode()
            assert "testing" not in text and "AWS_" not in text, f"{path} mentions credentials"
            if path.endswith(".json"):
                assert list(find_secrets(json.loads(text))) == [], path
    from students.stream import LabelStream, row_group_refs

    batch = next(iter(LabelStream(out, m, row_group_refs(m), 4, shuffle=False, loop=False)))
    assert batch["topk_ids"].shape[-1] == spec.labels.k


@pytest.mark.integration
def test_transient_store_errors_are_retried_and_the_dataset_is_whole(
    teacher_dir, corpus_dir, bucket, local_reference, monkeypatch, caplog
):
    flaky = Flaky(monkeypatch, every=3)
    spec = spec_for(teacher_dir, f"{corpus_dir}/*.jsonl", f"{bucket}/flaky")
    with caplog.at_level(logging.WARNING, logger="labelgen.contract.storage"):
        run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert flaky.failures >= 5
    assert sum("retry 1/4" in r.getMessage() for r in caplog.records) == flaky.failures
    assert dataset_rows(f"{bucket}/flaky") == dataset_rows(local_reference)


@pytest.mark.integration
def test_a_shard_that_cannot_be_uploaded_is_never_visible_and_a_rerun_finishes(
    teacher_dir, corpus_dir, bucket, local_reference, monkeypatch
):
    out = f"{bucket}/down"
    spec = spec_for(teacher_dir, f"{corpus_dir}/*.jsonl", out)
    with monkeypatch.context() as patch:
        flaky = Flaky(patch, every=1, only="/shards/part-00000-00001")
        with pytest.raises(ConnectionError, match="injected failure"):
            run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
        assert flaky.failures == storage.RETRY_ATTEMPTS
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()
    shards, units = CommitLog(fs, root).committed()
    assert [s.path for s in shards] == ["shards/part-00000-00000.parquet"] and units == {}
    assert not fs.exists(f"{root}/shards/part-00000-00001.parquet")
    assert not fs.exists(f"{root}/{COMMITS_DIR}/part-00000-00001.json")
    with pytest.raises(Exception, match="incomplete"):
        read_manifest(out)
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert dataset_rows(out) == dataset_rows(local_reference)
