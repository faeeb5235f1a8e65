"""The trainer: tokenizer refusal, loss wiring, checkpoint + exact resume, eval metrics."""

from __future__ import annotations

import json

import pytest
import torch

from labelgen.contract.configs import load_config
from students.compatibility import TokenizerMismatchError
from students.config import TrainConfig
from students.trainer import Trainer


def config(url, teacher_dir, out, **sections) -> TrainConfig:
    data = {
        "model": {
            "tokenizer": str(teacher_dir),
            "init": {
                "model_type": "llama",
                "vocab_size": 512,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "num_key_value_heads": 1,
                "max_position_embeddings": 256,
            },
        },
        "data": {"url": url, "batch_sequences": 4, "holdout_row_groups": 2},
        "optim": {"lr": 1e-3, "max_steps": 6},
        "train": {"output_dir": str(out), "log_every": 2, "eval_every": 0, "eval_batches": 3, "threads": 1},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return load_config(TrainConfig, data)


def test_refuses_labels_from_another_tokenizer(fake_labels, texts, tmp_path):
    from labelgen.testing import build_tokenizer

    other = tmp_path / "other-tok"
    build_tokenizer(other, texts[:50], vocab_size=300)
    trainer = Trainer(config(fake_labels, other, tmp_path / "run"), log=lambda m: None)
    with pytest.raises(TokenizerMismatchError) as info:
        trainer.setup()
    assert "were made with tokenizer" in str(info.value) and str(other) in str(info.value)


def test_checkpoint_resume_matches_uninterrupted_run(fake_labels, teacher_dir, tmp_path):
    constant = {"schedule": "constant"}  # the LR then does not depend on max_steps
    full = Trainer(config(fake_labels, teacher_dir, tmp_path / "full", optim=constant), log=lambda m: None)
    full.setup()
    metrics = full.train()
    assert set(metrics) >= {"kl", "agree", "ce", "teacher_ce"} and metrics["positions"] > 0

    first = config(fake_labels, teacher_dir, tmp_path / "part", optim={**constant, "max_steps": 3})
    part = Trainer(first, log=lambda m: None)
    part.setup()
    part.train()
    logs: list[str] = []
    resumed = Trainer(config(fake_labels, teacher_dir, tmp_path / "part", optim=constant), log=logs.append)
    resumed.setup()
    assert resumed.step == 3 and any("resumed from" in line for line in logs)
    resumed.train()
    assert resumed.step == 6
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_alpha_zero_is_plain_ce(fake_labels, teacher_dir, tmp_path):
    trainer = Trainer(
        config(fake_labels, teacher_dir, tmp_path / "ce", loss={"alpha": 0.0}), log=lambda m: None
    )
    trainer.setup()
    parts = trainer.losses(trainer.next_batch(0))
    assert parts["kd"].item() == 0.0 and parts["loss"].item() == pytest.approx(parts["ce"].item())


def test_sampled_kd_needs_draws_and_trains_with_them(fake_labels, teacher_dir, corpus_dir, tmp_path):
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec

    with pytest.raises(ValueError, match="labels.draws=N"):
        Trainer(
            config(fake_labels, teacher_dir, tmp_path / "a", loss={"kind": "sampled"}), log=lambda m: None
        ).setup()
    url = str(tmp_path / "draws")
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, url, labels={"draws": 8}))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k, draws=8))
    trainer = Trainer(
        config(url, teacher_dir, tmp_path / "b", loss={"kind": "sampled", "alpha": 1.0}), log=lambda m: None
    )
    trainer.setup()
    parts = trainer.losses(trainer.next_batch(0))
    assert parts["kd"].item() > 0 and parts["loss"].item() == pytest.approx(parts["kd"].item())
    parts["loss"].backward()


def metrics(out) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


STAGES = [
    {"name": "ce", "steps": 2, "loss": {"alpha": 0.0}},
    {
        "name": "kd",
        "steps": 4,
        "loss": {"kind": "jsd", "alpha": 0.8, "temperature": 2.0, "temperature_end": 1.0},
    },
]


def test_stages_switch_loss_and_schedule_temperature_and_resume_exactly(fake_labels, teacher_dir, tmp_path):
    def run(out, steps=None):
        cfg = config(fake_labels, teacher_dir, out, optim={"schedule": "constant", "max_steps": None})
        cfg = load_config(TrainConfig, {**config_dict(cfg), "stages": STAGES})
        trainer = Trainer(cfg, log=lambda m: None)
        trainer.setup()
        if steps is not None:  # stop early, as if killed after a checkpoint
            trainer.cfg = load_config(
                TrainConfig,
                {**config_dict(cfg), "train": {**config_dict(cfg)["train"], "checkpoint_every": 1}},
            )
            while trainer.step < steps:
                _one_step(trainer)
            trainer.save_checkpoint()
            return trainer
        trainer.train()
        return trainer

    full = run(tmp_path / "full")
    logged = [m for m in metrics(tmp_path / "full") if "stage" in m]
    assert [m["stage"] for m in logged] == ["ce", "kd", "kd"]
    assert logged[0]["kd"] == 0.0 and logged[1]["kd"] > 0
    # T moves linearly 2 → 1 over the kd stage's 4 steps: logged at its 2nd and 4th step.
    assert [m["temperature"] for m in logged[1:]] == pytest.approx([2 - 1 / 3, 1.0])
    run(tmp_path / "part", steps=3)  # stops inside the kd stage
    resumed = run(tmp_path / "part")
    assert resumed.step == 6
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def config_dict(cfg: TrainConfig) -> dict:
    from labelgen.contract.configs import config_to_dict

    return config_to_dict(cfg)


def _one_step(trainer: Trainer) -> None:
    index, stage, in_stage = trainer.stage_at(trainer.step)
    trainer.optimizer.zero_grad()
    parts = trainer.losses(trainer.next_batch(index), index, trainer.temperature(stage, in_stage))
    parts["loss"].backward()
    torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.cfg.optim.grad_clip)
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.step += 1


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])  # every kind: tests/test_chunked_loss.py
def test_chunked_loss_matches_the_plain_path(fake_labels, teacher_dir, tmp_path, kind):
    grads = []
    for chunk in (0, 7):
        trainer = Trainer(
            config(
                fake_labels,
                teacher_dir,
                tmp_path / f"{kind}{chunk}",
                loss={"kind": kind, "chunk_tokens": chunk},
            ),
            log=lambda m: None,
        )
        trainer.setup()
        parts = trainer.losses(trainer.next_batch(0))
        parts["loss"].backward()
        assert torch.isfinite(parts["loss"]) and parts["kd"].item() > 0
        grads.append((parts, [p.grad.clone() for p in trainer.model.parameters()]))
    (plain, g_plain), (chunked, g_chunked) = grads
    for key in ("loss", "kd", "ce"):
        torch.testing.assert_close(chunked[key], plain[key], rtol=1e-4, atol=1e-5)
    for a, b in zip(g_chunked, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_stage_and_data_config_errors_name_the_field(fake_labels, teacher_dir, tmp_path):
    from labelgen.contract.configs import ConfigError

    base = config_dict(config(fake_labels, teacher_dir, tmp_path))
    bad = {
        **base,
        "data": {**base["data"], "mixture": [{"url": fake_labels, "weight": 0}]},
        "optim": {**base["optim"], "max_steps": 5},
        "stages": [{"steps": 2, "loss": {"temperature_end": -1}}, {"steps": 0}],
    }
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, bad)
    text = str(info.value)
    for needle in (
        "data.url xor data.mixture",
        "data.mixture[0].weight must be > 0",
        "stages[0].loss.temperature_end must be > 0",
        "stages[1].steps must be >= 1",
    ):
        assert needle in text, text
    ok = {**base, "optim": {**base["optim"], "max_steps": 5}, "stages": [{"steps": 2}, {"steps": 2}]}
    with pytest.raises(ConfigError, match="optim.max_steps is 5 but the stages sum to 4"):
        load_config(TrainConfig, ok)


def test_mixture_of_two_label_datasets(fake_labels, teacher_dir, corpus_dir, tmp_path):
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec
    from students.mixture import MixtureStream

    other = str(tmp_path / "other")
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, other, labels={"k": 4}))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    mixture = {"url": None, "mixture": [{"url": fake_labels, "weight": 3.0}, {"url": other, "weight": 1.0}]}
    trainer = Trainer(config(fake_labels, teacher_dir, tmp_path / "run", data=mixture), log=lambda m: None)
    trainer.setup()
    assert isinstance(trainer.stream(0), MixtureStream)
    seen = [int(trainer.next_batch(0)["dataset"]) for _ in range(24)]
    assert 0 < seen.count(1) < seen.count(0)  # both datasets, weighted 3:1
    trainer.train()
    assert trainer.step == 6


def test_hidden_state_loss_joins_teacher_states_by_row_and_position(teacher_dir, corpus_dir, tmp_path):
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec

    url = str(tmp_path / "hidden")
    spec = load_config(
        JobSpec, make_spec(teacher_dir, corpus_dir, url, hidden={"layers": [1, 2], "dtype": "float32"})
    )
    run_job(
        spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k, layers=(1, 2), dim=8)
    )
    hidden = {"hidden": {"layer_map": {1: 2}, "weight": 0.5, "kind": "mse"}}
    trainer = Trainer(config(url, teacher_dir, tmp_path / "run", loss=hidden), log=lambda m: None)
    trainer.setup()
    batch = trainer.next_batch(0)
    # The fake teacher's vector at (row, t) is token id + layer: the join must land exactly there.
    tokens = batch["input_ids"][batch["hidden_row"], batch["hidden_pos"]].float()
    assert len(tokens) > 0
    torch.testing.assert_close(batch["hidden_layer_2"][:, 0], tokens + 2)
    parts = trainer.losses(batch)
    assert parts["hidden"].item() > 0
    parts["loss"].backward()
    projection = trainer.hidden_heads["0"].projections["1"].weight
    assert projection.grad is not None and projection.grad.abs().sum() > 0
    trainer.train()
    assert (tmp_path / "run" / "final" / "hidden_projections.pt").is_file()
    with pytest.raises(ValueError, match="stores layers"):
        bad = {"hidden": {"layer_map": {1: 5}}}
        Trainer(config(url, teacher_dir, tmp_path / "bad", loss=bad), log=lambda m: None).setup()


def test_follow_mode_trains_while_the_labeling_job_writes(fake_labels, teacher_dir, corpus_dir, tmp_path):
    import threading
    import time
    from pathlib import Path

    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec

    class SlowTeacher(FakeTeacher):
        def label(self, batch):
            time.sleep(0.3)
            return super().label(batch)

    url = tmp_path / "growing"
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, str(url)))
    job = threading.Thread(
        target=run_job,
        args=(spec,),
        kwargs={"show_progress": False, "teacher_factory": lambda s: SlowTeacher(8)},
    )
    job.start()
    try:
        deadline = time.monotonic() + 60
        while not (url / "_commits" / "tokenizer.json").is_file():
            assert time.monotonic() < deadline, "the labeling job never started"
            time.sleep(0.05)
        assert not (url / "manifest.json").exists()
        data = {"follow": True, "poll_seconds": 0.2, "eval_url": fake_labels, "follow_timeout_seconds": 60.0}
        logs: list[str] = []
        trainer = Trainer(config(str(url), teacher_dir, tmp_path / "run", data=data), log=logs.append)
        trainer.setup()
        assert any("following" in line and "still writing" in line for line in logs)
        metrics = trainer.train()
        assert trainer.step == 6 and metrics["positions"] > 0
    finally:
        job.join(timeout=120)
    assert Path(url / "manifest.json").is_file()


def test_teacher_ensemble_joins_labels_by_row_and_mixes_the_loss(
    fake_labels, teacher_dir, corpus_dir, tmp_path
):
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec
    from students.losses import kd_loss, multi_teacher_kd
    from students.stream import LabelStream, open_dataset

    other = str(tmp_path / "teacher2")
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, other, labels={"k": 4}))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k, seed=5))
    # Teacher 2's labels of every row, keyed by token hash, read straight from its dataset.
    m2, _, _ = open_dataset(other)
    direct = {}
    for b in LabelStream(other, m2, None, 4, shuffle=False, loop=False):
        for r in range(len(b["token_hash"])):
            direct[int(b["token_hash"][r])] = (b["topk_ids"][r], b["label_mask"][r].sum())

    def trainer_for(weight: float, out: str) -> Trainer:
        data = {"teachers": [{"url": other, "weight": weight}], "teacher_weight": 1.0}
        t = Trainer(config(fake_labels, teacher_dir, tmp_path / out, data=data), log=lambda m: None)
        t.setup()
        return t

    trainer = trainer_for(3.0, "ens")
    batch = trainer.next_batch(0)
    assert batch["topk_ids@1"].shape[-1] == 4 and batch["topk_ids"].shape[-1] == 8
    for r in range(batch["input_ids"].shape[0]):
        ids, positions = direct[int(batch["token_hash"][r])]
        n = int(positions)
        torch.testing.assert_close(batch["topk_ids@1"][r, :n], torch.from_numpy(ids[:n]))
    parts = trainer.losses(batch)
    logits = trainer.model(input_ids=batch["input_ids"]).logits[:, :-1].reshape(-1, 512)
    mask = batch["label_mask"].reshape(-1)
    want = multi_teacher_kd(
        "forward_kl",
        logits,
        [
            (1.0, batch["topk_ids"].reshape(-1, 8), batch["topk_logprobs"].reshape(-1, 8)),
            (3.0, batch["topk_ids@1"].reshape(-1, 4), batch["topk_logprobs@1"].reshape(-1, 4)),
        ],
        mask,
    )
    torch.testing.assert_close(parts["kd"], want)
    single = kd_loss(
        "forward_kl", logits, batch["topk_ids"].reshape(-1, 8), batch["topk_logprobs"].reshape(-1, 8), mask
    )
    assert abs(parts["kd"].item() - single.item()) > 1e-4  # the second teacher changes the loss
    trainer.train()
    assert trainer.step == 6


def test_teacher_ensemble_config_rules(fake_labels, teacher_dir, tmp_path):
    from labelgen.contract.configs import ConfigError

    base = config_dict(config(fake_labels, teacher_dir, tmp_path))
    bad = {
        **base,
        "data": {**base["data"], "teachers": [{"url": "x"}], "follow": True, "eval_url": "y"},
        "loss": {"kind": "sampled"},
    }
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, bad)
    text = str(info.value)
    assert "data.teachers cannot be used with data.follow" in text, text
    assert "loss.kind is not supported with data.teachers" in text, text


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_a_planted_checkpoint_is_refused_and_none_of_its_code_runs(
    fake_labels, teacher_dir, tmp_path, writer
):
    import contextlib
    import pickle
    import re

    from students.trainer import CheckpointError

    marker = tmp_path / "code-ran"

    class Planted:  # unpickling it calls open(marker, "w"): code chosen by whoever wrote the file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    out = tmp_path / "shared-run"
    planted = out / "checkpoint" / "state.pt"
    planted.parent.mkdir(parents=True)
    payload = {"step": 0, "model": Planted(), "data": []}
    if writer == "torch.save":
        torch.save(payload, planted)
    else:
        planted.write_bytes(pickle.dumps(payload, protocol=2))
    trainer = Trainer(config(fake_labels, teacher_dir, out), log=lambda m: None)
    with pytest.raises(
        CheckpointError, match=rf"{re.escape(str(planted))} is not a checkpoint this trainer wrote"
    ):
        trainer.setup()  # resume is on and the file is there
    assert not marker.exists()
    with contextlib.suppress(RuntimeError):  # a raw pickle runs, then fails torch's magic number
        torch.load(planted, weights_only=False)  # what loading used to do
    assert marker.exists()


def test_checkpoints_load_as_data_only(fake_labels, teacher_dir, tmp_path):
    from students.trainer import CHECKPOINT_FORMAT, read_checkpoint

    trainer = Trainer(config(fake_labels, teacher_dir, tmp_path / "run", optim={"max_steps": 1}), log=print)
    trainer.setup()
    _one_step(trainer)
    trainer.step = 1
    path = trainer.save_checkpoint()
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects in it
    assert state["format"] == CHECKPOINT_FORMAT and isinstance(state["data"], str)
    assert read_checkpoint(path)["step"] == 1
    resumed = Trainer(config(fake_labels, teacher_dir, tmp_path / "run", optim={"max_steps": 1}), log=print)
    resumed.setup()
    assert resumed.step == 1 and resumed._data_states == {0: json.loads(state["data"])[0][1]}
