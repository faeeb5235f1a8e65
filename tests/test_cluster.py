"""Labeling on a local Ray cluster with real vLLM replicas, and the Ray Jobs CLI.

One module-scoped local cluster (2 CPUs, dashboard on 127.0.0.1 for the Jobs API)
serves the tests; a moto S3 server on loopback holds the corpus and the labels of
the first. Each compares its dataset row for row with the local runner on the same spec:

- the Ray executor with 2 replicas, one of them killed after its unit's first
  commit: the unit is retried on a new replica, no row lost or doubled;
- ``labelgen submit`` / ``status`` / ``logs`` / ``stop``: the driver is stopped after
  a commit and the job resubmitted; it resumes from the committed shards;
- a big jsonl and a big Parquet file split into work units (``corpus.unit_mib``),
  labeled by 2 replicas at once with the fake teacher (fast: no vLLM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

import s3_server
from helpers import dataset_rows, make_spec, unit_facts, write_spec
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import COMMITS_DIR, MANIFEST_NAME
from labelgen.progress import PROGRESS_NAME
from labelgen.spec import JobSpec
from s3_server import upload_dir

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray", reason="needs `pip install 'labelgen[ray]'`")

s3_endpoint = s3_server.s3_endpoint  # fixtures
bucket = s3_server.bucket
UNITS = 4


def cli(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "labelgen.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and out.returncode != 0:
        raise AssertionError(f"labelgen {' '.join(args)} failed:\n{out.stdout}\n{out.stderr[-4000:]}")
    return out


def spec_dict(teacher_dir, corpus: str, out: str, **cluster) -> dict:
    raw = make_spec(
        teacher_dir,
        "unused",
        out,
        output={"shard_mib": 0.5, "row_group_mib": 0.1},
        cluster={"progress_every_s": 1.0, **cluster},
    )
    raw["corpus"]["sources"] = [corpus]
    return raw


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, texts) -> Path:
    """Four jsonl sources (four work units, ~90k tokens each), one with bad records.

    Big enough that a job is still running seconds after its first commit, when the
    tests kill a replica or stop the driver.
    """
    from labelgen.testing import write_jsonl_corpus

    out = tmp_path_factory.mktemp("small-corpus")
    per = len(texts) // UNITS
    for unit in range(UNITS):
        chunk = texts[unit * per : (unit + 1) * per] * 3
        write_jsonl_corpus(out / f"u{unit}.jsonl", chunk, chat_every=5, seed=unit)
    with (out / "u3.jsonl").open("ab") as f:
        f.write(b'{"text": broken\n{"text": ""}\n')
    return out


@pytest.fixture(scope="module")
def reference(teacher_dir, small_corpus, tmp_path_factory) -> str:
    """The small corpus labeled by the local runner (`labelgen run`, real vLLM)."""
    work = tmp_path_factory.mktemp("reference")
    out = str(work / "labels")
    spec = write_spec(work / "job.yaml", spec_dict(teacher_dir, f"{small_corpus}/*.jsonl", out))
    cli("run", str(spec), "--no-progress")
    m = read_manifest(out)
    assert len(m.units) == UNITS and len(m.shards) >= 2 * UNITS, "each unit must span several shards"
    return out


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint):
    """A local Ray cluster with the Jobs API on 127.0.0.1; job drivers find `labelgen` on PATH."""
    saved_path = os.environ["PATH"]
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{saved_path}"
    port = s3_server._free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    address = f"http://127.0.0.1:{port}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 60
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    try:
        yield address
    finally:
        ray.shutdown()
        os.environ["PATH"] = saved_path


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_ray_replicas_match_the_local_runner_and_survive_a_killed_replica(
    ray_cluster, teacher_dir, small_corpus, reference, bucket
):
    from labelgen.cluster import replica_name, run_job_ray

    upload_dir(small_corpus, f"{bucket}/corpus")
    out = f"{bucket}/labels"
    spec = load_config(JobSpec, spec_dict(teacher_dir, f"{bucket}/corpus/*.jsonl", out, replicas=2))
    fs, root = fsspec.core.url_to_fs(out)
    first_commit = f"{root}/{COMMITS_DIR}/part-00000-00000.json"
    unit_done = f"{root}/{COMMITS_DIR}/unit-00000.json"
    killed: dict[str, bool] = {}

    def kill_replica_0_mid_unit() -> None:
        def committed() -> bool:
            fs.invalidate_cache()
            return fs.exists(first_commit)

        try:
            _wait_for(committed, 400, "unit 0's first commit")
        except AssertionError:
            return
        killed["mid_unit"] = not fs.exists(unit_done)
        ray.kill(ray.get_actor(replica_name(spec, 0)), no_restart=True)
        killed["done"] = True

    killer = threading.Thread(target=kill_replica_0_mid_unit, daemon=True)
    killer.start()
    logs: list[str] = []
    manifest = run_job_ray(spec, log=logs.append)
    killer.join(timeout=5)
    text = "\n".join(logs)
    assert killed == {"mid_unit": True, "done": True}, f"replica 0 was not killed mid-unit:\n{text}"
    assert "replica 0 died while labeling unit 0" in text and "unit 0 (u0.jsonl) → replica" in text
    assert "attempt 2" in text
    progress = json.loads(fs.cat_file(f"{root}/{PROGRESS_NAME}"))
    assert progress["state"] == "done" and progress["retries"] == 1
    assert progress["units_done"] == UNITS and progress["rejected"] == 2
    ref = read_manifest(reference)
    a, b = dataset_rows(reference), dataset_rows(out)
    assert len(a) == len(b) and len({r["sample_id"] for r in b}) == len(b), "rows lost or doubled"
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x == y, f"row {x['sample_id']} differs between the local and the Ray run"
    assert [(s.path, s.rows) for s in manifest.shards] == [(s.path, s.rows) for s in ref.shards]
    assert manifest.rejected == ref.rejected and manifest.teacher["engine"] == "vllm"


def test_submit_status_logs_stop_and_resubmit_resumes(
    ray_cluster, teacher_dir, small_corpus, reference, tmp_path
):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address = ray_cluster
    client = JobSubmissionClient(address)
    out = tmp_path / "labels"
    spec = write_spec(
        tmp_path / "job.yaml", spec_dict(teacher_dir, f"{small_corpus}/*.jsonl", str(out), replicas=1)
    )
    job = cli("submit", str(spec), "--address", address).stdout.strip().splitlines()[-1]
    commits = out / COMMITS_DIR
    _wait_for(lambda: list(commits.glob("part-*.json")), 400, "the first committed shard", poll=0.1)

    def running_status() -> str:
        text = cli("status", job, "--address", address).stdout
        return text if "progress [running]" in text else ""

    status = _wait_for(running_status, 60, "a progress line in `labelgen status`", poll=0.5)
    assert f"job {job}: RUNNING" in status and f"output: {out}" in status
    assert "stop requested" in cli("stop", job, "--address", address).stdout
    _wait_for(lambda: client.get_job_status(job) == JobStatus.STOPPED, 60, "the job to stop", poll=0.5)
    assert not (out / MANIFEST_NAME).exists()
    kept = {p.name: p.stat().st_mtime_ns for p in commits.glob("part-*.json")}
    assert kept, "the stopped job committed shards"

    again = cli("submit", str(spec), "--address", address).stdout.strip().splitlines()[-1]
    _wait_for(
        lambda: client.get_job_status(again) in {JobStatus.SUCCEEDED, JobStatus.FAILED},
        400,
        "the resubmitted job",
        poll=0.5,
    )
    logs = cli("logs", again, "--address", address, "--follow", timeout=60).stdout
    assert client.get_job_status(again) == JobStatus.SUCCEEDED, logs[-4000:]
    assert "already labeled" in logs and "progress [done]" in logs and "labeled " in logs
    status = cli("status", again, "--address", address).stdout
    assert "SUCCEEDED" in status and f"units {UNITS}/{UNITS}" in status and "complete" in status
    for name, mtime in kept.items():
        assert (commits / name).stat().st_mtime_ns == mtime, f"{name} was redone instead of resumed"
    assert dataset_rows(str(out)) == dataset_rows(reference)
    missing = cli("status", "raysubmit_nope", "--address", address, check=False)
    assert missing.returncode == 2 and "raysubmit_nope" in missing.stderr


def test_two_replicas_label_the_parts_of_big_sources_like_the_local_runner(
    ray_cluster, teacher_dir, texts, tmp_path
):
    """A big jsonl and a big Parquet file, split into work units (corpus.unit_mib), labeled
    by 2 Ray replicas at once with the fake teacher: exactly the rows of the local runner."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import fakes
    from labelgen.cluster import run_job_ray
    from labelgen.runner import run_job
    from labelgen.testing import write_jsonl_corpus

    corpus = tmp_path / "corpus"
    write_jsonl_corpus(corpus / "big.jsonl", texts[:70], chat_every=6)
    pq.write_table(pa.table({"text": texts[70:160]}), corpus / "big.parquet", row_group_size=9)

    def spec(out: str) -> JobSpec:
        raw = spec_dict(teacher_dir, f"{corpus}/big.*", out, replicas=2)
        raw["corpus"]["unit_mib"] = 0.015  # ~16 KB: 3-4 units per source
        return load_config(JobSpec, raw)

    def factory(s: JobSpec) -> fakes.FakeTeacher:
        return fakes.FakeTeacher(s.labels.k)

    local = run_job(spec(str(tmp_path / "local")), show_progress=False, teacher_factory=factory)
    assert len(local.units) >= 6 and {u.range_kind for u in local.units} == {"bytes", "row_groups"}
    logs: list[str] = []
    ray.cloudpickle.register_pickle_by_value(fakes)  # the replicas cannot import tests/fakes.py
    try:
        manifest = run_job_ray(spec(str(tmp_path / "ray")), teacher_factory=factory, log=logs.append)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(fakes)
    text = "\n".join(logs)
    assert "→ replica 0" in text and "→ replica 1" in text, f"both replicas label units:\n{text}"
    assert "(big.jsonl, part 2/" in text and "(big.parquet, part 1/" in text
    a, b = dataset_rows(str(tmp_path / "local")), dataset_rows(str(tmp_path / "ray"))
    assert len(a) == len(b) and len({r["sample_id"] for r in b}) == len(b), "rows lost or doubled"
    for x, y in zip(a, b, strict=True):
        assert x == y, f"row {x['sample_id']} differs between the local and the Ray run"
    assert [(s.path, s.rows, s.sha256) for s in manifest.shards] == [
        (s.path, s.rows, s.sha256) for s in local.shards
    ]
    assert (
        unit_facts(manifest.units) == unit_facts(local.units)
        and manifest.corpus["sources"] == local.corpus["sources"]
    )


def test_two_replicas_run_a_generation_job_like_the_local_runner(
    ray_cluster, teacher_dir, tokenizer, texts, tmp_path
):
    """A generation job (fake teacher: samples from its fake distribution by each request's
    seed) on 2 Ray replicas: the samples, labels and counts of the local runner."""
    import fakes
    from helpers import generated_rows
    from labelgen.cluster import run_job_ray
    from labelgen.runner import run_job

    corpus = tmp_path / "prompts"
    corpus.mkdir()
    for name, chunk in (("a", texts[:20]), ("b", texts[20:40])):
        with (corpus / f"{name}.jsonl").open("w") as f:
            for text in chunk:
                f.write(json.dumps({"prompt": " ".join(text.split()[:5])}) + "\n")

    def spec(out: str) -> JobSpec:
        raw = spec_dict(teacher_dir, f"{corpus}/*.jsonl", out, replicas=2)
        raw["generate"] = {
            "n": 3,
            "max_tokens": 12,
            "chat_template": False,
            "batch_prompts": 4,
            "checks": {"finished": False, "dedup": "none", "format": r"(?s).*[aeiou]{2}.*"},
        }
        return load_config(JobSpec, raw)

    def factory(s: JobSpec) -> fakes.FakeGenerator:
        return fakes.FakeGenerator(s.labels.k, tokenizer)

    local = run_job(spec(str(tmp_path / "local")), show_progress=False, teacher_factory=factory)
    logs: list[str] = []
    ray.cloudpickle.register_pickle_by_value(fakes)
    try:
        manifest = run_job_ray(spec(str(tmp_path / "ray")), teacher_factory=factory, log=logs.append)
    finally:
        ray.cloudpickle.unregister_pickle_by_value(fakes)
    text = "\n".join(logs)
    assert "→ replica 0" in text and "→ replica 1" in text, f"both replicas generate:\n{text}"
    assert "prompts 40" in text and "samples 120" in text, text
    for directory in ("generations", "rejected"):
        assert generated_rows(str(tmp_path / "ray"), directory) == generated_rows(
            str(tmp_path / "local"), directory
        )
    assert dataset_rows(str(tmp_path / "ray")) == dataset_rows(str(tmp_path / "local"))
    assert manifest.generation["stats"] == local.generation["stats"]
    assert 0 < manifest.generation["stats"]["kept"] < 120  # the format check rejects some


def test_a_job_submitted_through_the_service_ends_as_a_published_verified_version(
    ray_cluster, teacher_dir, texts, tmp_path
):
    """``POST /v1/jobs`` on a service whose cluster is this one (tracker polling every
    second): the job runs ``labelgen run-ray`` with real vLLM on Ray, and its output is
    published for its submitter once the manifest lands, verified file by file."""
    pytest.importorskip("fastapi", reason="needs `pip install 'labelgen[service]'`")
    import yaml

    from labelgen.catalog.client import CatalogClient
    from labelgen.service.server import ServiceThread
    from labelgen.service.settings import ServiceSettings
    from labelgen.service.verify import verify_dataset
    from labelgen.testing import write_jsonl_corpus

    corpus = tmp_path / "corpus"
    write_jsonl_corpus(corpus / "a.jsonl", texts[:16], chat_every=5)
    out = tmp_path / "labels"
    spec = yaml.safe_dump(spec_dict(teacher_dir, f"{corpus}/*.jsonl", str(out), replicas=1), sort_keys=False)
    admin_token = "lgt_" + "r" * 43
    settings = ServiceSettings(
        db_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        signing_key="k",
        bootstrap_token=admin_token,
        ray_address=ray_cluster,
        job_poll_s=1.0,
    )
    started = time.monotonic()
    with ServiceThread(settings) as svc:
        admin = CatalogClient(svc.address, token=admin_token)
        admin.create_team("nlp")
        admin.set_member("nlp", "alice", "writer")
        alice = CatalogClient(svc.address, token=admin.create_token("t", user="alice")["token"])
        job = alice.submit_job("nlp/web", spec, aliases=["stable"])
        assert job["state"] == "running" and job["ray_job_id"].startswith(f"labelgen-job-{job['id']}-"), job

        def ended() -> dict | None:
            view = alice.job(job["id"])
            return view if view["state"] not in ("submitting", "running", "publishing") else None

        view = _wait_for(ended, 600, "the job to end", poll=1.0)
        elapsed = time.monotonic() - started
        assert view["state"] == "published", view
        assert view["version"] == "nlp/web@1" and view["error"] == "" and view["progress"]["state"] == "done"
        version = alice.version("nlp/web@stable")
        assert version["version"] == 1 and version["url"] == str(out) and version["published_by"] == "alice"
        assert version["job_spec"] == spec
        listed = {f["path"]: (f["size"], f["sha256"]) for f in alice.files("nlp/web@1")["files"]}
        again = verify_dataset(str(out))  # the files, checked again now, are those published
        assert again.manifest_sha256 == version["manifest_sha256"]
        assert listed == {f.path: (f.size, f.sha256) for f in again.files}
        assert any(path.startswith("shards/") for path in listed)
        jobs = alice.list_jobs("nlp")
        assert [(j["id"], j["state"], j["version"]) for j in jobs] == [(job["id"], "published", "nlp/web@1")]
    svc.app.state.sessions.kw["bind"].dispose()
    print(f"\njob through the service: submitted → published in {elapsed:.1f} s")
