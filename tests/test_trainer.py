"""The trainer: tokenizer refusal, loss wiring, checkpoint + exact resume, eval metrics."""

from __future__ import annotations

import pytest
import torch

from labelgen.contract.configs import load_config
from students.config import TrainConfig
from students.trainer import TokenizerMismatchError, Trainer


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
    from labelgen.tiny import build_tokenizer

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
    batch = {k: torch.from_numpy(v) for k, v in next(iter(trainer.train_stream)).items()}
    parts = trainer.losses(batch)
    assert parts["kd"].item() == 0.0 and parts["loss"].item() == pytest.approx(parts["ce"].item())


def test_sampled_kd_needs_draws_and_trains_with_them(fake_labels, teacher_dir, corpus_dir, tmp_path):
    from conftest import make_spec
    from fakes import FakeTeacher
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
    batch = {k: torch.from_numpy(v) for k, v in next(iter(trainer.train_stream)).items()}
    parts = trainer.losses(batch)
    assert parts["kd"].item() > 0 and parts["loss"].item() == pytest.approx(parts["kd"].item())
    parts["loss"].backward()
