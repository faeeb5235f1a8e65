"""Jobs through the dataset service: submission checks, access, and every state move.

The service runs in-process over real HTTP (uvicorn on loopback, SQLite). Ray is not
started here: the service's cluster is :class:`StandInCluster`, a stand-in with the
interface of :class:`labelgen.cluster.RayJobs` (``submit``, ``state``) whose Ray states
the test sets; the tracker is driven one step at a time through
:func:`labelgen.service.tracker.poll_job`. Everything else is real: the spec checks,
the catalog, the output written by the local runner, its verification and publish.
The path through a real Ray cluster is ``tests/test_cluster.py``'s last test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs `pip install 'labelgen[service]'`")
pytest.importorskip("sqlalchemy", reason="needs `pip install 'labelgen[service]'`")

import sqlalchemy as sa  # noqa: E402

from helpers import make_spec  # noqa: E402
from labelgen.catalog.client import CatalogClient, CatalogError  # noqa: E402
from labelgen.cluster import RayJobState, UnknownJob  # noqa: E402
from labelgen.runner import JobError  # noqa: E402
from labelgen.service import store  # noqa: E402
from labelgen.service.db import Job  # noqa: E402
from labelgen.service.jobs import move_job  # noqa: E402
from labelgen.service.server import ServiceThread  # noqa: E402
from labelgen.service.settings import ServiceSettings  # noqa: E402
from labelgen.service.tracker import JobTracker, hand_to_cluster, poll_job  # noqa: E402

ADMIN = "lgt_" + "j" * 43
RAY = "http://ray-head.invalid:8265"


class StandInCluster:
    """A stand-in for :class:`labelgen.cluster.RayJobs`, with its ``submit`` and ``state``:
    it records what it is given and answers the Ray states the test sets (``PENDING``
    after a submission). ``refuse``: the error ``submit`` raises instead."""

    def __init__(self) -> None:
        self.states: dict[str, RayJobState] = {}
        self.submitted: list[tuple[str, object, dict]] = []
        self.refuse: Exception | None = None

    def submit(self, spec, submission_id: str, metadata: dict | None = None) -> str:
        if self.refuse is not None:
            raise self.refuse
        self.submitted.append((submission_id, spec, dict(metadata or {})))
        self.states[submission_id] = RayJobState("PENDING", "Job has not started yet.")
        return submission_id

    def state(self, job_id: str) -> RayJobState:
        if job_id not in self.states:
            raise UnknownJob(
                f"job {job_id!r}: Request failed with status code 404: Job {job_id} does not exist."
            )
        return self.states[job_id]

    def set(self, job_id: str, status: str, message: str = "") -> None:
        self.states[job_id] = RayJobState(status, message)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, texts) -> Path:
    """A tokenizer and an untrained 2-layer Llama: the fake teacher that labels the jobs'
    output here needs the tokenizer only (conftest's trained teacher is for vLLM)."""
    from labelgen.testing import build_llama, build_tokenizer

    out = tmp_path_factory.mktemp("jobs-teacher")
    build_llama(out, build_tokenizer(out, texts, vocab_size=512), hidden_size=64, num_heads=2)
    return out


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, texts) -> Path:
    """A few dozen texts: a job's output of a shard or two."""
    from labelgen.testing import write_jsonl_corpus

    out = tmp_path_factory.mktemp("jobs-corpus")
    write_jsonl_corpus(out / "a.jsonl", texts[:30], chat_every=6)
    return out


def _service(tmp_path: Path, ray_address: str | None = RAY):
    settings = ServiceSettings(
        db_url=f"sqlite:///{tmp_path / 'catalog.sqlite'}",
        signing_key="k",
        bootstrap_token=ADMIN,
        ray_address=ray_address,
        track_jobs=False,  # the tests drive the tracker by hand
    )
    return ServiceThread(settings)


@pytest.fixture
def svc(tmp_path):
    with _service(tmp_path) as service:
        service.cluster = StandInCluster()
        service.app.state.job_cluster = service.cluster
        yield service
    service.app.state.sessions.kw["bind"].dispose()


def _org(svc) -> dict[str, CatalogClient]:
    """Teams nlp and vision; clients for an nlp writer, an nlp reader, a vision writer, the admin."""
    admin = CatalogClient(svc.address, token=ADMIN)
    clients = {"admin": admin}
    svc.tokens = {}
    for team in ("nlp", "vision"):
        admin.create_team(team)
    for name, team, role in (
        ("writer", "nlp", "writer"),
        ("reader", "nlp", "reader"),
        ("other", "vision", "writer"),
    ):
        admin.set_member(team, name, role)
        svc.tokens[name] = admin.create_token("t", user=name)["token"]
        clients[name] = CatalogClient(svc.address, token=svc.tokens[name])
    return clients


def _spec(teacher_dir, corpus_dir, out: Path | str, **sections) -> str:
    import yaml

    return yaml.safe_dump(make_spec(teacher_dir, corpus_dir, str(out), **sections), sort_keys=False)


def _refused(call) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        call()
    return info.value


def _poll(svc, job_id: int, at: dt.datetime | None = None) -> str | None:
    return poll_job(svc.app.state.sessions, svc.settings, svc.cluster, job_id, at=at)


def _label(spec_text: str) -> None:
    """Run the job as its Ray driver would, on this machine (fake teacher: fast, no vLLM)."""
    from fakes import FakeTeacher
    from labelgen.runner import run_job
    from labelgen.spec import load_spec_text

    spec = load_spec_text(spec_text)
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))


def test_every_problem_of_a_spec_is_reported_at_once_and_nothing_is_recorded(svc, tmp_path):
    clients = _org(svc)
    bad = "teacher: {model: 3}\ncorpus: {sources: []}\nlabels: {k: 0}\noutput: {url: /x, shard_mib: -1}\n"
    error = _refused(lambda: clients["writer"].submit_job("nlp/web", bad))
    assert error.status == 400 and error.code == "bad_spec", error
    for problem in (
        "teacher.model must be a string",
        "labels.k must be >= 1",
        "output.shard_mib must be > 0",
    ):
        assert problem in error.message, error.message
    assert "4 problem(s)" in error.message or "problem(s)" in error.message
    error = _refused(lambda: clients["writer"].submit_job("nlp/web", "teacher: [unclosed"))
    assert error.status == 400 and "not valid YAML" in error.message
    assert clients["writer"].list_jobs() == [] and svc.cluster.submitted == []


def test_overwrite_and_bad_storage_are_refused(svc, teacher_dir, corpus_dir, tmp_path):
    writer = _org(svc)["writer"]
    spec = _spec(teacher_dir, corpus_dir, tmp_path / "out", output={"overwrite": True})
    error = _refused(lambda: writer.submit_job("nlp/web", spec))
    assert error.status == 400 and error.code == "overwrite_refused" and "output.overwrite" in error.message
    spec = _spec(teacher_dir, corpus_dir, "ftp://host/out")
    assert _refused(lambda: writer.submit_job("nlp/web", spec)).status == 400
    body = {"dataset": "nlp/web@3", "spec": _spec(teacher_dir, corpus_dir, tmp_path / "o"), "aliases": []}
    error = _refused(lambda: writer.request("POST", "/v1/jobs", body))
    assert error.status == 400 and "team/name" in error.message
    assert svc.cluster.submitted == []


def test_an_output_overlapping_a_version_or_a_live_job_is_refused(svc, teacher_dir, corpus_dir, tmp_path):
    clients = _org(svc)
    writer, other = clients["writer"], clients["other"]
    published = tmp_path / "published"
    _label(_spec(teacher_dir, corpus_dir, published))
    writer.publish("nlp/web", str(published))
    for url, relation in (
        (published, "is"),
        (published / "more", "lies inside"),
        (tmp_path, "contains"),
    ):
        error = _refused(lambda url=url: writer.submit_job("nlp/next", _spec(teacher_dir, corpus_dir, url)))
        assert error.status == 409 and error.code == "output_in_use", error
        assert f"{relation} the storage of nlp/web@1" in error.message
    # Another team's version: refused as foreign storage (publishing's rule), without its name.
    error = _refused(lambda: other.submit_job("vision/x", _spec(teacher_dir, corpus_dir, published / "in")))
    assert error.status == 403 and error.code == "foreign_storage"

    live = tmp_path / "jobs" / "a"
    first = writer.submit_job("nlp/a", _spec(teacher_dir, corpus_dir, live))
    assert first["state"] == "running"
    error = _refused(lambda: writer.submit_job("nlp/b", _spec(teacher_dir, corpus_dir, live / "b")))
    assert error.status == 409 and f"job {first['id']}" in error.message
    error = _refused(lambda: other.submit_job("vision/b", _spec(teacher_dir, corpus_dir, live)))
    assert error.status == 409 and "another team" in error.message and "nlp/a" not in error.message
    # Once the job has failed, the same spec may be submitted again: it resumes that output.
    svc.cluster.set(first["ray_job_id"], "FAILED", "exit code 1")
    assert _poll(svc, first["id"]) == "failed"
    again = writer.submit_job("nlp/a", _spec(teacher_dir, corpus_dir, live))
    assert again["state"] == "running" and again["id"] != first["id"]


def test_a_service_without_a_cluster_refuses_jobs_naming_the_fix(tmp_path, teacher_dir, corpus_dir):
    with _service(tmp_path, ray_address=None) as service:
        writer = _org(service)["writer"]
        error = _refused(lambda: writer.submit_job("nlp/web", _spec(teacher_dir, corpus_dir, tmp_path / "o")))
        assert error.status == 503 and error.code == "no_cluster"
        assert "labelgen serve --ray-address" in error.message
        assert service.app.state.job_tracker is None
    service.app.state.sessions.kw["bind"].dispose()


def test_who_may_submit_and_see_jobs(svc, teacher_dir, corpus_dir, tmp_path):
    clients = _org(svc)
    spec = _spec(teacher_dir, corpus_dir, tmp_path / "out")
    for who, dataset, status in (
        ("reader", "nlp/web", 403),
        ("other", "nlp/web", 403),
        ("writer", "ghost/web", 404),
    ):
        error = _refused(lambda who=who, dataset=dataset: clients[who].submit_job(dataset, spec))
        assert error.status == status, (who, error)
    assert "writer role" in _refused(lambda: clients["reader"].submit_job("nlp/web", spec)).message
    job = clients["writer"].submit_job("nlp/web", spec, aliases=["stable"])
    assert job["submitter"] == "writer" and job["team"] == "nlp" and job["dataset"] == "web"
    assert job["aliases"] == ["stable"] and job["spec"] == spec and job["version"] is None
    for who in ("writer", "reader", "admin"):  # members of the team, and org admins
        assert clients[who].job(job["id"])["id"] == job["id"]
        assert [j["id"] for j in clients[who].list_jobs()] == [job["id"]]
    assert [j["id"] for j in clients["reader"].list_jobs("nlp")] == [job["id"]]
    hidden = _refused(lambda: clients["other"].job(job["id"]))
    assert hidden.status == 404 and _refused(lambda: clients["other"].job(job["id"] + 100)).message == (
        hidden.message.replace(str(job["id"]), str(job["id"] + 100))
    )
    assert clients["other"].list_jobs() == []
    assert _refused(lambda: clients["other"].list_jobs("nlp")).status == 403
    events = clients["admin"].audit(action="job.submit")
    done = [(e["target"], e["actor"]) for e in events if e["outcome"] == "ok"]
    refused = [(e["actor"], e["status"]) for e in events if e["outcome"] == "refused"]
    assert done == [("nlp/web", "writer")] and ("reader", 403) in refused and ("other", 403) in refused


def test_a_job_moves_from_submitted_to_published_as_its_submitter(svc, teacher_dir, corpus_dir, tmp_path):
    clients = _org(svc)
    out = tmp_path / "labels"
    spec = _spec(teacher_dir, corpus_dir, out)
    job = clients["writer"].submit_job("nlp/web", spec, aliases=["stable"])
    assert job["state"] == "running" and job["output_url"] == str(out)
    ((ray_id, sent, metadata),) = svc.cluster.submitted
    assert ray_id == job["ray_job_id"] and sent.output.url == str(out)
    assert metadata == {"labelgen.catalog_job": str(job["id"])}
    assert _poll(svc, job["id"]) == "running"  # PENDING on Ray, nothing written yet

    svc.cluster.set(ray_id, "RUNNING")
    out.mkdir()
    progress = {"state": "running", "units_done": 1, "units_total": 2, "tokens": 1234, "tokens_per_s": 99.0}
    (out / "_progress.json").write_text(json.dumps(progress))
    assert _poll(svc, job["id"]) == "running"
    assert clients["reader"].job(job["id"])["progress"] == progress

    _label(spec)  # the driver's work: shards, commit records, the manifest last
    svc.cluster.set(ray_id, "SUCCEEDED", "Job finished successfully.")
    assert _poll(svc, job["id"]) == "published"
    view = clients["reader"].job(job["id"])
    assert view["state"] == "published" and view["version"] == "nlp/web@1" and view["error"] == ""
    version = clients["reader"].version("nlp/web@stable")
    assert version["version"] == 1 and version["url"] == str(out) and version["published_by"] == "writer"
    assert version["job_spec"] == spec and sorted(version["aliases"]) == ["latest", "stable"]
    files = clients["reader"].files("nlp/web@1")["files"]
    assert any(f["path"] == "manifest.json" for f in files) and len(files) > 3
    assert _poll(svc, job["id"]) == "published"  # an ended job stays as it is
    actions = [(e["action"], e["actor"]) for e in clients["admin"].audit(team="nlp")]
    assert ("publish", "writer") in actions and ("job.published", "system") in actions


@pytest.mark.parametrize(
    "status, message, state, reason",
    [
        (
            "FAILED",
            "Job entrypoint command failed with exit code 2: bad teacher",
            "failed",
            "exit code 2: bad teacher",
        ),
        ("STOPPED", "Job was intentionally stopped.", "stopped", "intentionally stopped"),
        ("SUCCEEDED", "Job finished successfully.", "failed", "has no manifest.json"),
        (None, "", "failed", "does not know job"),  # the cluster restarted: the id is gone
    ],
)
def test_a_job_that_ends_without_a_dataset_says_why(
    svc, teacher_dir, corpus_dir, tmp_path, status, message, state, reason
):
    writer = _org(svc)["writer"]
    job = writer.submit_job("nlp/web", _spec(teacher_dir, corpus_dir, tmp_path / "out"))
    if status is None:
        del svc.cluster.states[job["ray_job_id"]]
    else:
        svc.cluster.set(job["ray_job_id"], status, message)
    assert _poll(svc, job["id"]) == state
    view = writer.job(job["id"])
    assert view["state"] == state and reason in view["error"] and view["version"] is None
    assert writer.list_datasets() == []


def test_a_publish_refusal_fails_the_job_with_its_reason(svc, teacher_dir, corpus_dir, tmp_path):
    clients = _org(svc)
    writer, admin = clients["writer"], clients["admin"]
    out = tmp_path / "labels"
    spec = _spec(teacher_dir, corpus_dir, out)
    job = writer.submit_job("nlp/web", spec)
    _label(spec)
    shard = sorted((out / "shards").glob("*.parquet"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1  # one bit of a stored label flipped after the commit
    shard.write_bytes(bytes(data))
    svc.cluster.set(job["ray_job_id"], "SUCCEEDED")
    assert _poll(svc, job["id"]) == "failed"
    error = writer.job(job["id"])["error"]
    assert "not published as nlp/web" in error and shard.name in error and "sha256" in error

    # The submitter's rights are those at publish time: a writer demoted meanwhile publishes nothing.
    out2 = tmp_path / "labels2"
    spec2 = _spec(teacher_dir, corpus_dir, out2)
    job2 = writer.submit_job("nlp/web", spec2)
    _label(spec2)
    admin.set_member("nlp", "writer", "reader")
    svc.cluster.set(job2["ray_job_id"], "SUCCEEDED")
    assert _poll(svc, job2["id"]) == "failed"
    error = admin.job(job2["id"])["error"]
    assert "writer may not publish nlp/web" in error and admin.list_datasets() == []


def test_submission_failures_and_a_job_stuck_in_submitting(svc, teacher_dir, corpus_dir, tmp_path):
    clients = _org(svc)
    writer = clients["writer"]
    svc.cluster.refuse = JobError(
        "cannot reach the Ray cluster's job server at 'http://ray-head.invalid:8265'"
    )
    job = writer.submit_job("nlp/web", _spec(teacher_dir, corpus_dir, tmp_path / "a"))
    assert job["state"] == "failed" and "not submitted to the Ray cluster: cannot reach" in job["error"]
    svc.cluster.refuse = None

    # Recorded, never handed to Ray (the process died between the two): failed after 10 minutes.
    sessions = svc.app.state.sessions

    def record(out: Path) -> dict:
        with sessions.begin() as session:
            caller = store.authenticate(session, svc.tokens["writer"])
            spec = _spec(teacher_dir, corpus_dir, out)
            return store.Catalog(session, caller).record_job("nlp/web", spec, [], settings=svc.settings)

    stuck = record(tmp_path / "b")
    created = dt.datetime.fromisoformat(stuck["created_at"]).replace(tzinfo=None)
    assert _poll(svc, stuck["id"], at=created + dt.timedelta(minutes=9)) == "submitting"
    assert _poll(svc, stuck["id"], at=created + dt.timedelta(minutes=10, seconds=1)) == "failed"
    assert "did not reach the Ray cluster within 10 minutes" in writer.job(stuck["id"])["error"]

    # Handed to Ray, but the route stopped before it said so: the tracker finds it running.
    found = record(tmp_path / "c")
    svc.cluster.set(found["ray_job_id"], "RUNNING")
    assert _poll(svc, found["id"]) == "running"
    # ... and the route, coming back late, neither submits it again nor moves it back.
    assert hand_to_cluster(sessions, svc.cluster, found["id"]) == "running"
    assert svc.cluster.submitted == [] and writer.job(found["id"])["state"] == "running"


def test_state_moves_are_conditional(svc, teacher_dir, corpus_dir, tmp_path):
    writer = _org(svc)["writer"]
    job = writer.submit_job("nlp/web", _spec(teacher_dir, corpus_dir, tmp_path / "a"))
    sessions = svc.app.state.sessions
    with sessions.begin() as session:
        assert move_job(session, job["id"], "running", "stopped", error="stopped by hand")
    with sessions.begin() as session:  # a second writer that still believes it running changes nothing
        assert not move_job(session, job["id"], "running", "failed", error="late")
    svc.cluster.set(job["ray_job_id"], "FAILED", "late")
    assert _poll(svc, job["id"]) == "stopped"
    assert writer.job(job["id"])["error"] == "stopped by hand"


def test_one_tracker_per_catalog_and_a_bad_poll_does_not_end_it(svc, teacher_dir, corpus_dir, tmp_path):
    writer = _org(svc)["writer"]
    sessions, settings = svc.app.state.sessions, svc.settings
    fast = ServiceSettings(**{**settings.__dict__, "job_poll_s": 0.05})
    first = JobTracker(sessions, fast, lambda: svc.cluster)
    second = JobTracker(sessions, fast, lambda: svc.cluster)
    assert first.take_lease() and first.take_lease()  # renewed by its holder
    assert not second.take_lease() and second.poll_once() == 0
    first.stop()  # gives the lease up
    assert second.take_lease() and not first.take_lease()
    second.stop()

    broken = writer.submit_job("nlp/a", _spec(teacher_dir, corpus_dir, tmp_path / "a"))
    fine = writer.submit_job("nlp/b", _spec(teacher_dir, corpus_dir, tmp_path / "b"))

    class Flaky(StandInCluster):
        def state(self, job_id: str) -> RayJobState:
            if job_id == broken["ray_job_id"]:
                raise RuntimeError("a bug in the cluster client")
            return super().state(job_id)

    flaky = Flaky()
    flaky.states = dict(svc.cluster.states)
    flaky.set(fine["ray_job_id"], "FAILED", "out of memory")
    tracker = JobTracker(sessions, fast, lambda: flaky)
    tracker.start()
    try:
        deadline = time.monotonic() + 20
        while writer.job(fine["id"])["state"] != "failed":
            assert time.monotonic() < deadline, "the tracker did not move the second job on"
            time.sleep(0.05)
        assert tracker._thread is not None and tracker._thread.is_alive()
        assert writer.job(broken["id"])["state"] == "running"
    finally:
        tracker.stop()
    with sessions() as session:
        assert (
            session.scalar(sa.select(Job.error).where(Job.id == fine["id"]))
            == "the Ray job failed: out of memory"
        )


def test_labelgen_submit_and_jobs_through_the_service(
    svc, teacher_dir, corpus_dir, tmp_path, capsys, monkeypatch
):
    from labelgen.catalog.job_commands import submit_through_service
    from labelgen.cli import main
    from labelgen.spec import load_spec

    writer = _org(svc)["writer"]
    monkeypatch.setenv("LABELGEN_TOKEN", svc.tokens["writer"])
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(_spec(teacher_dir, corpus_dir, tmp_path / "unused"))
    out = tmp_path / "labels"
    code = main(
        [
            "submit",
            str(spec_file),
            f"output.url={out}",
            "labels.k=4",
            "--service",
            svc.address,
            "--dataset",
            "nlp/web",
        ]
        + ["--alias", "stable"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    job_id = int(captured.out.strip())
    assert f"/ui/jobs/{job_id}" in captured.err and "jobs show" in captured.err
    job = writer.job(job_id)
    assert job["output_url"] == str(out) and job["aliases"] == ["stable"] and "k: 4" in job["spec"]

    assert main(["jobs", "list", "--service", svc.address]) == 0
    listed = capsys.readouterr().out
    assert str(job_id) in listed and "nlp/web" in listed and "running" in listed
    assert main(["jobs", "show", str(job_id), "--json", "--service", svc.address]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id

    _label(job["spec"])
    svc.cluster.set(job["ray_job_id"], "SUCCEEDED")
    assert _poll(svc, job_id) == "published"
    assert main(["jobs", "show", str(job_id), "--follow", "--service", svc.address]) == 0
    shown = capsys.readouterr().out
    assert "published" in shown and "version:  nlp/web@1" in shown

    # Checked here first, with the rules of `labelgen validate`: a bad spec never leaves the machine.
    def validated(path: str, overrides: list[str]) -> str:
        return load_spec(path, overrides).to_yaml()

    args = argparse.Namespace(
        spec=str(spec_file), overrides=["labels.k=0"], service=svc.address, dataset="nlp/web", alias=[]
    )
    from labelgen.contract.configs import ConfigError

    with pytest.raises(ConfigError, match="labels.k must be >= 1"):
        submit_through_service(args, resolve=validated)
    assert len(writer.list_jobs()) == 1
    # Without the local check the service refuses it all the same (exit 2, its message).
    code = main(["submit", str(spec_file), "labels.k=0", "--service", svc.address, "--dataset", "nlp/web"])
    assert code == 2 and "labels.k must be >= 1" in capsys.readouterr().err
    assert main(["submit", str(spec_file), "--service", svc.address]) == 2
    assert "--dataset team/name" in capsys.readouterr().err


def test_serve_flags_and_the_tracker_started_with_the_server(tmp_path, teacher_dir, corpus_dir, monkeypatch):
    from labelgen.service.server import settings_from_env

    db = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    monkeypatch.setenv("LABELGEN_RAY_ADDRESS", "http://head:8265")
    settings = settings_from_env(db, job_poll_s=0.5)
    assert settings.ray_address == "http://head:8265" and settings.job_poll_s == 0.5 and settings.track_jobs
    assert settings_from_env(db, ray_address="http://other:8265").ray_address == "http://other:8265"
    with pytest.raises(ValueError, match="--ray-address 'head:8265' must be the URL"):
        settings_from_env(db, ray_address="head:8265")
    with pytest.raises(ValueError, match="--job-poll"):
        settings_from_env(db, job_poll_s=0)

    live = ServiceSettings(
        db_url=db, signing_key="k", bootstrap_token=ADMIN, ray_address=RAY, job_poll_s=0.05
    )
    service = ServiceThread(live)
    cluster = StandInCluster()
    service.app.state.job_cluster = cluster
    tracker = service.app.state.job_tracker
    with service:
        assert tracker._thread is not None and tracker._thread.is_alive()
        writer = _org(service)["writer"]
        job = writer.submit_job("nlp/web", _spec(teacher_dir, corpus_dir, tmp_path / "out"))
        cluster.set(job["ray_job_id"], "STOPPED", "Job was intentionally stopped.")
        deadline = time.monotonic() + 20
        while writer.job(job["id"])["state"] != "stopped":
            assert time.monotonic() < deadline, "the server's tracker did not move the job on"
            time.sleep(0.05)
    assert not tracker._thread.is_alive()
    service.app.state.sessions.kw["bind"].dispose()
