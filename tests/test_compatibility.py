"""Dataset-vs-model-vs-loss rules: every problem at once, one case per rule (no model, no I/O)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from labelgen.contract.configs import load_config
from labelgen.contract.format import Manifest
from students.compatibility import (
    CompatibilityError,
    TokenizerMismatchError,
    check_compatibility,
    check_tokenizer,
    compatibility_problems,
)
from students.config import DataConfig, ModelConfig, RunConfig, SourceConfig, TrainConfig

STUDENT = SimpleNamespace(num_hidden_layers=2)  # a student config with no logit scaling


def manifest(**products) -> Manifest:
    return Manifest(
        k=8,
        teacher={},
        tokenizer={"fingerprint": "abc"},
        corpus={},
        spec_sha256="0" * 64,
        shards=[],
        units=[],
        created_at="2025-01-01T00:00:00Z",
        products=products,
    )


DRAWS = {"n": 8, "temperature": 1.5, "seed": 0}
HIDDEN = {"layers": [1, 2], "every": 4, "dtype": "float32", "dim": 8, "seed": 0}


def train_config(**sections) -> TrainConfig:
    data = {
        "model": {"path": "/student"},
        "data": {"url": "/a", "holdout_row_groups": 1},
        "train": {"output_dir": "/out"},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return load_config(TrainConfig, data)


def problems(cfg, manifests=None, model=STUDENT, row_groups=None) -> list[str]:
    manifests = {"/a": manifest()} if manifests is None else manifests
    row_groups = {url: 4 for url in manifests} if row_groups is None else row_groups
    return compatibility_problems(cfg, manifests, model, row_groups)


def test_a_fitting_run_has_no_problems():
    from transformers import LlamaConfig

    cfg = train_config(loss={"chunk_tokens": 64, "hidden": {"layer_map": {2: 2}}})
    assert problems(cfg, {"/a": manifest(hidden=HIDDEN)}, model=LlamaConfig(num_hidden_layers=2)) == []
    check_compatibility(cfg, {"/a": manifest(hidden=HIDDEN)}, STUDENT, {"/a": 4})  # does not raise


def test_every_problem_is_reported_at_once():
    cfg = train_config(
        data={"holdout_row_groups": 3},
        stages=[
            {"name": "s", "steps": 1, "loss": {"kind": "sampled"}},
            {"name": "c", "steps": 1, "loss": {"chunk_tokens": 16}},
            {"name": "h", "steps": 1, "loss": {"hidden": {"layer_map": {1: 5, 9: 1}}}},
        ],
    )
    model = SimpleNamespace(num_hidden_layers=2, final_logit_softcapping=30.0)
    with pytest.raises(CompatibilityError) as info:
        check_compatibility(cfg, {"/a": manifest(hidden=HIDDEN)}, model, {"/a": 3})
    errors = info.value.errors
    for needle in (
        "label with labels.draws=N",
        "stage 'c': loss.chunk_tokens needs logits = hidden @ W",
        "teacher layer(s) [5], but /a stores layers [1, 2]",
        "student layer(s) [9], but the student has 2 layers",
        "data.holdout_row_groups=3 leaves nothing to train on (3 row groups in /a)",
    ):
        assert sum(needle in e for e in errors) == 1, (needle, errors)
    assert len(errors) == 5, errors
    text = str(info.value)
    assert text.startswith("this training run has 5 problem(s):\n  - ")
    assert text.count("\n  - ") == 5 and isinstance(info.value, ValueError)


def test_sampled_loss_needs_a_complete_dataset():
    cfg = train_config(loss={"kind": "sampled"}, data={"holdout_row_groups": 0})
    (only,) = problems(cfg, {"/a": None})
    assert only.startswith("/a is still being written; loss.kind=sampled needs its manifest")


def test_sampled_loss_needs_draws():
    cfg = train_config(loss={"kind": "sampled"})
    (only,) = problems(cfg, {"/a": manifest()})
    assert "stage 'main' uses loss.kind=sampled, but /a has no random-sampling labels" in only
    assert "labels.draws=N" in only
    assert problems(cfg, {"/a": manifest(draws=DRAWS)}) == []


@pytest.mark.parametrize(("temperature", "ok"), [(1.0, True), (1.5, True), (2.0, False)])
def test_sampled_loss_temperature_is_the_draws_own(temperature, ok):
    cfg = train_config(loss={"kind": "sampled", "temperature": temperature})
    found = problems(cfg, {"/a": manifest(draws=DRAWS)})
    if ok:
        assert found == []
    else:
        assert found == [
            "loss.temperature=2.0 but the draws at /a were made at temperature 1.5; "
            "sampled KD uses the draws' temperature"
        ]


@pytest.mark.parametrize("name", ["final_logit_softcapping", "logit_scale", "output_multiplier_scale"])
def test_chunked_loss_refuses_scaled_logits(name):
    cfg = train_config(loss={"chunk_tokens": 32})
    (only,) = problems(cfg, model=SimpleNamespace(num_hidden_layers=2, **{name: 0.5}))
    assert only == (
        f"stage 'main': loss.chunk_tokens needs logits = hidden @ W, but this student's config sets "
        f"{name}=0.5; set loss.chunk_tokens=0"
    )
    assert problems(cfg, model=SimpleNamespace(num_hidden_layers=2, **{name: 1.0})) == []
    assert problems(train_config(), model=SimpleNamespace(num_hidden_layers=2, **{name: 0.5})) == []


def test_gemma2_softcapping_is_seen_on_a_real_transformers_config():
    from transformers import Gemma2Config

    cfg = train_config(loss={"chunk_tokens": 32})
    (only,) = problems(cfg, model=Gemma2Config(num_hidden_layers=2))
    assert "final_logit_softcapping=30.0" in only


def test_teacher_ensemble_needs_complete_datasets():
    # Built directly: the config rules would refuse data.teachers with follow mode first.
    cfg = TrainConfig(
        model=ModelConfig(path="/student"),
        data=DataConfig(url="/a", teachers=[SourceConfig("/t")], holdout_row_groups=0),
        train=RunConfig(output_dir="/out"),
    )
    assert problems(cfg, {"/a": manifest(), "/t": None}) == [
        "data.teachers: /t is still being written; an ensemble needs it complete"
    ]
    assert problems(cfg, {"/a": manifest(), "/t": manifest()}) == []


@pytest.mark.parametrize("found", [manifest(), None], ids=["no product", "still being written"])
def test_hidden_loss_needs_the_product(found):
    cfg = train_config(loss={"hidden": {"layer_map": {1: 2}}}, data={"holdout_row_groups": 0})
    (only,) = problems(cfg, {"/a": found})
    assert only.startswith("stage 'main' has loss.hidden, but /a has no hidden-state samples")


def test_hidden_loss_needs_the_mapped_teacher_layers_stored():
    cfg = train_config(loss={"hidden": {"layer_map": {1: 3, 2: 4, 0: 1}}})
    assert problems(cfg, {"/a": manifest(hidden=HIDDEN)}) == [
        "loss.hidden.layer_map uses teacher layer(s) [3, 4], but /a stores layers [1, 2]; "
        "map to stored layers"
    ]


def test_hidden_loss_needs_one_teacher_hidden_size():
    mixture = {"url": None, "mixture": [{"url": "/a"}, {"url": "/b"}]}
    cfg = train_config(data=mixture, loss={"hidden": {"layer_map": {1: 2}}})
    wide = {**HIDDEN, "dim": 16}
    assert problems(cfg, {"/a": manifest(hidden=HIDDEN), "/b": manifest(hidden=wide)}) == [
        "stage 'main': its datasets' teacher hidden sizes differ ([8, 16])"
    ]


def test_hidden_loss_student_layers_must_exist():
    cfg = train_config(loss={"hidden": {"layer_map": {2: 1, 3: 1, 7: 2}}})
    assert problems(cfg, {"/a": manifest(hidden=HIDDEN)}) == [
        "loss.hidden.layer_map uses student layer(s) [3, 7], but the student has 2 layers "
        "(0 = embeddings .. 2)"
    ]


@pytest.mark.parametrize(
    ("data", "found", "ok"),
    [
        ({"holdout_row_groups": 4}, manifest(), False),
        ({"holdout_row_groups": 5}, manifest(), False),
        ({"holdout_row_groups": 3}, manifest(), True),
        ({"holdout_row_groups": 0}, manifest(), True),
        ({"holdout_row_groups": 4, "eval_url": "/eval"}, manifest(), True),  # the split is not used
        ({"holdout_row_groups": 4}, None, True),  # still being written: no held-out set
    ],
)
def test_holdout_must_leave_row_groups_to_train_on(data, found, ok):
    cfg = train_config(data=data)
    found_problems = problems(cfg, {"/a": found}, row_groups={"/a": 4} if found else {})
    if ok:
        assert found_problems == []
    else:
        n = data["holdout_row_groups"]
        assert found_problems == [
            f"data.holdout_row_groups={n} leaves nothing to train on (4 row groups in /a); "
            "lower it or set data.eval_url"
        ]


def test_a_dataset_shared_by_stages_reports_its_problem_once():
    stages = [{"steps": 1, "loss": {"kind": "sampled"}}, {"steps": 1, "loss": {"kind": "sampled"}}]
    cfg = train_config(stages=stages, data={"holdout_row_groups": 0})
    assert len(problems(cfg, {"/a": None})) == 1  # same message for both stages
    assert len(problems(cfg, {"/a": manifest()})) == 2  # each names its stage


class FakeTokenizer:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


def test_check_tokenizer_refuses_another_fingerprint():
    from labelgen.contract.format import tokenizer_fingerprint

    mine = FakeTokenizer({"a": 0, "b": 1})
    record = {"fingerprint": tokenizer_fingerprint(mine), "path": "/teacher", "vocab_size": 2}
    check_tokenizer(record, mine, "/student-tok", "/a")  # the same tokenizer: fine
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizer(record, FakeTokenizer({"a": 0, "c": 1}), "/student-tok", "/a")
    text = str(info.value)
    assert "the labels at /a were made with tokenizer" in text and "/student-tok" in text
    assert isinstance(info.value, ValueError)


def test_compatibility_imports_no_torch_or_transformers():
    code = (
        "import sys, students.compatibility\n"
        "print(','.join(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
