"""Student runs on the catalog: metrics in and out, access, and the trainer's side of it.

The service runs over real HTTP on loopback (uvicorn on a thread, as in test_service.py;
SQLite, and PostgreSQL as an integration test). The trainer tests train a tiny student
by KD from a ``labelgen://`` version and read back what it reported; ``data.require``
is checked against a real unsigned (then signed) version.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs `pip install 'labelgen[service]'`")
pytest.importorskip("sqlalchemy", reason="needs `pip install 'labelgen[service]'`")

import torch  # noqa: E402
from test_trainer import config as student_config  # noqa: E402
from test_trainer import config_dict  # noqa: E402

from labelgen.catalog.client import CatalogClient, CatalogError  # noqa: E402
from labelgen.contract.configs import ConfigError, load_config  # noqa: E402
from labelgen.service.app import ServiceSettings  # noqa: E402
from labelgen.service.runs import MAX_CONFIG_CHARS, MAX_METRIC_RECORDS  # noqa: E402
from labelgen.service.server import ServiceThread  # noqa: E402
from students.config import TrainConfig  # noqa: E402
from students.distributed import Dist  # noqa: E402
from students.lineage import DataTrustError, Lineage, check_trust  # noqa: E402
from students.trainer import Trainer  # noqa: E402

ADMIN = "lgt_" + "r" * 43
TRAIN_NAMES = {"loss", "kd", "ce", "kl", "top1", "lr", "temperature", "tok_per_s"}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def service(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("LABELGEN_CONFIG_DIR", str(tmp_path / "config"))  # no stored credentials
    monkeypatch.delenv("LABELGEN_TOKEN", raising=False)
    settings = ServiceSettings(db_url=db_url, signing_key="test-key", bootstrap_token=ADMIN)
    with ServiceThread(settings) as svc:
        yield svc
    svc.app.state.sessions.kw["bind"].dispose()


@pytest.fixture
def org(service, fake_labels, tmp_path) -> dict:
    """nlp/web@1 (published by the admin, shared with team vision); users alice (nlp
    writer), rita (nlp reader), vera (vision reader), sam (speech writer)."""
    admin = CatalogClient(service.address, token=ADMIN)
    for team in ("nlp", "vision", "speech"):
        admin.create_team(team)
    users = {"alice": ("nlp", "writer"), "rita": ("nlp", "reader"), "vera": ("vision", "reader")}
    users["sam"] = ("speech", "writer")
    clients = {"admin": admin}
    for user, (team, role) in users.items():
        admin.set_member(team, user, role)
        token = admin.create_token(name="t", user=user)["token"]
        clients[user] = CatalogClient(service.address, token=token)
    data = tmp_path / "labels"
    shutil.copytree(fake_labels, data)
    admin.publish("nlp/web", str(data))
    admin.share("nlp/web", "vision")
    return clients


def refused(fn, *args) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        fn(*args)
    return info.value


# --------------------------------------------------------------------------- the API


def test_metrics_round_trip_in_step_order(org):
    alice = org["alice"]
    run = alice.report_run("nlp/web@1", "runs/kd-1", {"loss": {"kind": "forward_kl"}, "lr": 1e-3})
    assert run["ref"] == "nlp/web@1"
    records = [{"step": 20, "kd": 1.5, "ce": 4.0}, {"step": 10, "kd": 2.5, "ce": 4.5, "lr": 1e-3}]
    assert alice.report_metrics(run["id"], records) == {"stored": 2}
    assert alice.report_metrics(run["id"], [{"step": 30, "kd": 1, "top1": 0.5}]) == {"stored": 1}
    view = alice.run(run["id"])
    assert {k: view[k] for k in ("id", "ref", "team", "name", "user")} == {
        "id": run["id"],
        "ref": "nlp/web@1",
        "team": "nlp",
        "name": "runs/kd-1",
        "user": "alice",
    }
    assert view["config"] == {"loss": {"kind": "forward_kl"}, "lr": 1e-3} and view["created_at"]
    assert view["metrics"] == [
        {"step": 10, "ce": 4.5, "kd": 2.5, "lr": 1e-3},
        {"step": 20, "ce": 4.0, "kd": 1.5},
        {"step": 30, "kd": 1, "top1": 0.5},
    ]
    assert [r["id"] for r in alice.version("nlp/web@1")["runs"]] == [run["id"]]
    events = org["admin"].audit(action="run.metrics")
    assert [(e["target"], e["detail"]["stored"]) for e in events] == [
        (f"run:{run['id']}", 1),
        (f"run:{run['id']}", 2),
    ]


def test_a_resent_step_is_ignored_and_a_changed_one_is_409(org):
    alice = org["alice"]
    run = alice.report_run("nlp/web@1", "runs/a", {})["id"]
    first = [{"step": 1, "kd": 2.0}, {"step": 2, "kd": 1.0}]
    assert alice.report_metrics(run, first) == {"stored": 2}
    assert alice.report_metrics(run, first) == {"stored": 0}  # a retried request
    assert alice.report_metrics(run, [*first, {"step": 3, "kd": 0.5}]) == {"stored": 1}
    error = refused(alice.report_metrics, run, [{"step": 4, "kd": 0.1}, {"step": 2, "kd": 1.25}])
    assert error.status == 409 and "step 2" in error.message and "other values" in error.message
    assert [m["step"] for m in alice.run(run)["metrics"]] == [1, 2, 3]  # step 4 not stored either
    error = refused(alice.report_metrics, run, [{"step": 9, "kd": 1.0}, {"step": 9, "kd": 2.0}])
    assert error.status == 400 and "step 9" in error.message


@pytest.mark.parametrize(
    "records, says",
    [
        ([{"step": -1, "kd": 1.0}], "records[0].step must be an integer"),
        ([{"step": "3", "kd": 1.0}], "records[0].step must be an integer"),
        ([{"step": True, "kd": 1.0}], "records[0].step must be an integer"),
        ([{"step": 1, "kd": 1.0}, {"step": 2, "KD": 1.0}], "metric name 'KD'"),
        ([{"step": 1, "kd": "high"}], "kd must be a finite number"),
        ([{"step": 1, "kd": float("nan")}], "kd must be a finite number"),
        ([{"step": 1}], "holds no metric"),
        ([[1, 2]], "records[0] must be an object"),
        ([{"step": 1, **{f"m{i}": 1.0 for i in range(65)}}], "at most 64 per step"),
        ([{"step": i, "kd": 1.0} for i in range(MAX_METRIC_RECORDS + 1)], "at most 10000"),
    ],
)
def test_malformed_metrics_are_400_naming_the_record(org, records, says):
    alice = org["alice"]
    run = alice.report_run("nlp/web@1", "runs/a", {})["id"]
    body = {"records": records}  # as sent, past the client's own shaping
    error = refused(alice.request, "POST", f"/v1/runs/{run}/metrics", body)
    assert error.status == 400 and says in error.message, error.message
    assert alice.run(run)["metrics"] == []


def test_runs_are_seen_by_the_versions_readers_only(org):
    alice, vera, sam, rita = org["alice"], org["vera"], org["sam"], org["rita"]
    run = alice.report_run("nlp/web@1", "runs/a", {"seed": 1})["id"]
    alice.report_metrics(run, [{"step": 1, "kd": 2.0}])
    # Another team's user: the same 404 as for a run that does not exist.
    for fn, args in ((sam.run, (run,)), (sam.report_metrics, (run, [{"step": 2, "kd": 1.0}]))):
        error = refused(fn, *args)
        assert (error.status, error.code) == (404, "no_run") and "nlp" not in error.message
    assert refused(sam.run, 987654).status == 404
    # Readers of the dataset, in its team or a team it is shared with, see the run...
    assert vera.run(run)["metrics"] == rita.run(run)["metrics"] == [{"step": 1, "kd": 2.0}]
    # ... but only its own user (or an organisation admin) adds to it.
    for other in (vera, rita):
        error = refused(other.report_metrics, run, [{"step": 2, "kd": 1.0}])
        assert error.status == 403 and "alice's run" in error.message
    assert org["admin"].report_metrics(run, [{"step": 2, "kd": 1.0}]) == {"stored": 1}
    # A reader of a shared dataset reports and feeds a run of their own.
    own = vera.report_run("nlp/web@1", "runs/vision-student", {})["id"]
    assert vera.report_metrics(own, [{"step": 5, "ce": 3.0}]) == {"stored": 1}
    # Unshared: the run is gone for team vision.
    org["admin"].unshare("nlp/web", "vision")
    assert refused(vera.run, own).status == 404
    assert refused(sam.report_run, "nlp/web@1", "runs/x", {}).status == 403


def test_a_run_config_over_the_cap_is_refused_not_cut(org):
    alice = org["alice"]
    big = {"notes": "x" * (MAX_CONFIG_CHARS - 100)}
    run = alice.report_run("nlp/web@1", "runs/big", big)["id"]
    assert alice.run(run)["config"] == big  # kept whole
    error = refused(alice.report_run, "nlp/web@1", "runs/bigger", {"notes": "x" * MAX_CONFIG_CHARS})
    assert (error.status, error.code) == (400, "config_too_large") and "100,000" in error.message
    assert [r["name"] for r in alice.version("nlp/web@1")["runs"]] == ["runs/big"]


# --------------------------------------------------------------------------- the trainer


def _trainer_config(url: str, teacher_dir, out: Path, **sections) -> TrainConfig:
    sections.setdefault("optim", {"max_steps": 6})
    sections.setdefault("train", {"log_every": 2, "eval_every": 0, "eval_batches": 2})
    return student_config(url, teacher_dir, out, **sections)


def test_a_kd_run_reports_itself_and_its_metrics(org, service, teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LABELGEN_TOKEN", org["alice"]._token)
    url = f"labelgen://{service.address}/nlp/web@1"
    cfg = _trainer_config(url, teacher_dir, tmp_path / "run", loss={"alpha": 0.8, "temperature": 2.0})
    logs: list[str] = []
    trainer = Trainer(cfg, log=logs.append)
    trainer.setup()
    trainer.train()
    assert trainer.lineage is not None
    assert trainer.lineage.counts == {"sent": 3, "refused": 0, "unreachable": 0}
    (listed,) = org["alice"].version("nlp/web@1")["runs"]
    assert listed["user"] == "alice" and listed["name"] == str((tmp_path / "run").resolve())
    run = org["alice"].run(listed["id"])
    assert run["config"]["loss"]["alpha"] == 0.8
    assert [m["step"] for m in run["metrics"]] == [2, 4, 6]
    for m in run["metrics"]:
        assert set(m) >= TRAIN_NAMES and m["temperature"] == 2.0 and 0 <= m["top1"] <= 1 and m["kl"] > 0
    assert {"eval_kl", "eval_agree", "eval_ce"} <= set(run["metrics"][-1])  # the final evaluation
    # The same numbers as metrics.jsonl (numbers only: the stage's name stays in the file).
    written: dict[int, dict] = {}
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        written.setdefault(record.pop("step"), {}).update(record)
    for m in run["metrics"]:
        want = {k: v for k, v in written[m["step"]].items() if not isinstance(v, str)}
        assert {k: v for k, v in m.items() if k != "step"} == pytest.approx(want)
    assert any(f"reported run {listed['id']}" in line for line in logs)
    assert any("| kl " in line and "| top1 " in line for line in logs)


def test_kl_and_top1_are_the_teachers_measures_on_both_loss_paths(fake_labels, teacher_dir, tmp_path):
    from students.losses import bucket_kl

    trainer = Trainer(_trainer_config(fake_labels, teacher_dir, tmp_path / "a"), log=lambda m: None)
    trainer.setup()
    batch = trainer.next_batch(0)
    plain = trainer.losses(batch, watch=True)
    assert "kl" not in trainer.losses(batch)  # only when asked
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"]).logits[:, :-1]
        flat = logits.reshape(-1, logits.shape[-1]).float()
        k = batch["topk_ids"].shape[-1]
        ids, lps = batch["topk_ids"].reshape(-1, k), batch["topk_logprobs"].reshape(-1, k)
        mask = batch["label_mask"].reshape(-1).bool()
        kl = bucket_kl(flat, ids, lps)[mask].mean()
        top1 = (flat.argmax(-1) == ids[:, 0])[mask].float().mean()
    torch.testing.assert_close(plain["kl"], kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain["top1"], top1)
    chunked_cfg = _trainer_config(fake_labels, teacher_dir, tmp_path / "b", loss={"chunk_tokens": 7})
    chunked = Trainer(chunked_cfg, log=lambda m: None)
    chunked.setup()
    chunked.model.load_state_dict(trainer.model.state_dict())
    fused = chunked.losses(batch, watch=True)
    torch.testing.assert_close(fused["kl"], plain["kl"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused["top1"], plain["top1"])


def test_lineage_never_stops_training_and_says_each_problem_once(org, service, tmp_path, monkeypatch):
    alice = org["alice"]
    monkeypatch.setenv("LABELGEN_TOKEN", alice._token)
    url = f"labelgen://{service.address}/nlp/web@1"
    logs: list[str] = []
    lineage = Lineage([url, "/a/local/path"], "runs/l", {"seed": 0}, log=logs.append, timeout=5, retry_s=3600)
    (run,) = lineage.report().values()
    # A refusal: the service already holds step 2 with other values (its batch is dropped).
    alice.report_metrics(run, [{"step": 2, "kd": 9.0}])
    lineage.add({"step": 2, "kd": 1.0, "stage": "kd", "bad": math.nan})
    lineage.flush()
    lineage.add({"step": 4, "kd": 0.5})
    lineage.flush()
    assert lineage.counts == {"sent": 1, "refused": 1, "unreachable": 0}
    assert [m["step"] for m in alice.run(run)["metrics"]] == [2, 4]
    assert alice.run(run)["metrics"][1] == {"step": 4, "kd": 0.5}
    # Unreachable: records wait (no new try before retry_s), then are counted at close.
    service.server.should_exit = True
    service.thread.join(timeout=30)
    for step in (6, 8):
        lineage.add({"step": step, "kd": 0.25})
        lineage.flush()
    assert lineage.close() == {"sent": 1, "refused": 1, "unreachable": 2}
    said = [line for line in logs if "said once" in line]
    assert len(said) == 2 and "refused" in said[0] and "step 2" in said[0] and "cannot send" in said[1]
    assert any("1 records sent, 1 refused, 2 not delivered" in line for line in logs)


def test_require_signed_refuses_an_unsigned_version_then_trains_once_signed(
    org, service, teacher_dir, tmp_path, monkeypatch
):
    from labelgen.catalog.trust import sign_version
    from labelgen.contract.signatures import new_key

    alice = org["alice"]
    monkeypatch.setenv("LABELGEN_TOKEN", alice._token)
    url = f"labelgen://{service.address}/nlp/web@1"
    out = tmp_path / "run"
    cfg = _trainer_config(url, teacher_dir, out, data={"require": ["signed"]}, optim={"max_steps": 2})
    with pytest.raises(DataTrustError) as info:
        Trainer(cfg, log=lambda m: None).setup()
    message = str(info.value)
    assert "data.require=[signed]" in message and "nlp/web@1" in message and "signature" in message
    assert not out.exists() and alice.version("nlp/web@1")["runs"] == []  # stopped before anything
    key = new_key("laptop")
    alice.register_key("nlp", key.public.hex, "laptop")
    sign_version(alice, "nlp/web@1", key)
    logs: list[str] = []
    trainer = Trainer(cfg, log=logs.append)
    trainer.setup()
    assert any("nlp/web@1): signed, as data.require asks" in line for line in logs)
    trainer.train()
    assert trainer.step == 2
    with pytest.raises(DataTrustError, match="audit"):
        both = _trainer_config(url, teacher_dir, tmp_path / "b", data={"require": ["signed", "audited"]})
        Trainer(both, log=lambda m: None).setup()


def test_require_on_a_plain_path_is_refused_naming_it(fake_labels, teacher_dir, tmp_path):
    cfg = _trainer_config(fake_labels, teacher_dir, tmp_path / "run", data={"require": "audited"})
    with pytest.raises(DataTrustError) as info:
        Trainer(cfg, log=lambda m: None).setup()
    message = str(info.value)
    assert fake_labels in message and "not read through the dataset service" in message
    assert "labelgen publish" in message and "data.require=[audited]" in message


def test_data_require_is_validated_with_the_field_and_the_fix(fake_labels, teacher_dir, tmp_path):
    base = config_dict(_trainer_config(fake_labels, teacher_dir, tmp_path / "run"))
    assert load_config(TrainConfig, base).data.trust_needs == ()
    for given, needs in ((["signed", "audited", "signed"], ("signed", "audited")), ("signed", ("signed",))):
        cfg = load_config(TrainConfig, {**base, "data": {**base["data"], "require": given}})
        assert cfg.data.trust_needs == needs
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, {**base, "data": {**base["data"], "require": ["signed", "notarised"]}})
    assert "data.require[1] must be one of signed, audited, got 'notarised'" in str(info.value)
    assert "data.require=[signed, audited]" in str(info.value)
    with pytest.raises(ConfigError, match="data.require must be one of signed, audited"):
        load_config(TrainConfig, {**base, "data": {**base["data"], "require": "trusted"}})


# --------------------------------------------------------------------------- two ranks


def _rank(rank: int, port: int, urls: list[str], out: str) -> None:
    os.environ.update(
        {"WORLD_SIZE": "2", "RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    dist = Dist()
    dist.init(torch.device("cpu"))
    try:
        check_trust(urls, ["signed"], dist, log=lambda m: None)
        said = "trained"
    except DataTrustError as exc:
        said = str(exc)
    Path(out, f"rank{rank}.txt").write_text(said)
    torch.distributed.destroy_process_group()


def test_under_ddp_rank_zero_asks_and_every_rank_stops_with_its_message(tmp_path, fake_labels):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Rank 1 is given nothing to check: that it stops anyway, with rank 0's words, shows the
    # verdict came from rank 0.
    mp.spawn(_worker, args=(port, fake_labels, str(tmp_path)), nprocs=2, join=True)
    first, second = (Path(tmp_path, f"rank{r}.txt").read_text() for r in range(2))
    assert first == second and fake_labels in first and "not read through the dataset service" in first


def _worker(rank: int, port: int, url: str, out: str) -> None:
    _rank(rank, port, [url] if rank == 0 else [], out)
