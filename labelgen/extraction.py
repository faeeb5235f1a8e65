"""On-device label extraction inside vLLM's worker (no per-position Python objects).

:class:`LabelExtractor` is a vLLM *worker extension* (``worker_extension_cls``): vLLM
mixes it into its worker class, and the driver calls its methods with
``LLM.collective_rpc``. ``labelgen_install`` replaces the model runner's
prompt-logprobs step (``GPUModelRunner._get_prompt_logprobs_dict``, which the CPU
runner reuses) with :func:`_extract_prompt_labels`: for every request that asked for
prompt logprobs it takes the final hidden states of the request's tokens *in this
step* (the rows ``query_start_loc[req] : +num_scheduled``, so it holds under
continuous batching and chunked prefill), computes their logits in row chunks, and
writes into per-request numpy buffers at the request's absolute positions:

- top-k ids and log-probs and the real next token's log-prob (one log-sum-exp);
- optionally N draws from the teacher distribution at a temperature, as unique ids
  and counts; the uniforms are a counter-based hash of (seed, prompt hash, position,
  draw), so draws do not depend on batching or chunk boundaries;
- optionally hidden states of chosen layers at sampled positions (see below).

**Hidden states.** Two captures, writing the same rows into ``_State.step_layers`` (layer
id -> (num_step_tokens, D), HF numbering: 0 = embeddings, i = the residual stream after
decoder layer i; layer n, after the final norm, is the final hidden states the step
already has), so :func:`_extract_prompt_labels` reads either the same way:

- *aux outputs* (compiled engines): :class:`labelgen.teacher_vllm.VllmTeacher` puts the
  layers into ``additional_config={"labelgen": {"hidden_layers": [...]}}`` (part of vLLM's
  compile-cache hash); :func:`install_aux_patch`, run when vLLM imports this module in the
  worker (before the model runner exists), wraps the V1 runner's
  ``_setup_eagle3_aux_hidden_state_outputs`` so that a model implementing vLLM's
  ``SupportsEagle3`` is told, before its first (compiling) forward, to return those
  layers' residual streams as auxiliary outputs, inside the compiled graph (vLLM's
  EAGLE-3 mechanism); ``labelgen_install`` then wraps the runner's ``_model_forward``
  (outside the compiled region) to keep them for the step. docs/GPU.md section 4.
- *forward hooks* on the decoder layers (eager engines, ``enforce_eager: true``, and
  models without aux outputs). A compiled model never calls them, so ``labelgen_install``
  refuses hidden layers on a compiled engine whose model has no aux outputs.

**Bounded memory.** vLLM's memory profiling does not count this step, so a chunk's
(rows, V) temporaries (logits, their float32 copy, the log-sum-exp's and the draws'
buffers) must stay within ``labels.logits_budget_mib``: :func:`logits_chunk_rows` turns
the budget into rows per chunk, and a step's rows are split into near-equal chunks of
at most that many. Every label of a row is computed from that row alone, so chunking
does not change the labels (on CPU they are bitwise identical, tests/test_extraction.py).

**Tensor and pipeline parallelism.** Only the last pipeline stage has final hidden
states, so only its workers compute logits; under tensor parallelism every worker of
that stage calls ``compute_logits`` for the same chunks (it gathers the vocabulary
shards, a collective), and only tensor rank 0, which always holds the full logits,
records labels and captures hidden states (the residual stream is replicated across
tensor ranks). Aux outputs are set on every tensor rank of the last stage only, and only
for layers of that stage (as with the hooks: ``_check_stage_layers``; vLLM's aux relay
across pipeline stages is not used). Every worker does the runner's bookkeeping.
``labelgen_install`` says which worker records; the driver fetches from that one.

Nothing is returned to vLLM's front end for these requests, so it builds no
per-position objects; ``labelgen_fetch`` hands the finished buffers to the driver.

Supported: vLLM 0.27 – 0.32 (V1 engine, ``GPUModelRunner`` and ``CPUModelRunner``)
with decoder stacks at ``model.model.layers``. vLLM 0.32's V2 model runner (its CUDA
default) has no ``_get_prompt_logprobs_dict``: :class:`labelgen.teacher_vllm.VllmTeacher`
sets ``VLLM_USE_V2_MODEL_RUNNER=0`` unless the user chose otherwise. Imports torch and numpy,
and in :func:`install_aux_patch` the vLLM runner class it patches (the only vLLM import
outside :mod:`labelgen.teacher_vllm`); it runs inside vLLM's worker process.
"""

from __future__ import annotations

import contextlib
import pickle
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelgen.contract.format import token_hash

__all__ = [
    "ExtractionOptions",
    "LabelExtractor",
    "hidden_positions",
    "draw_uniforms",
    "sample_draws",
    "logits_row_bytes",
    "logits_chunk_rows",
    "install_aux_patch",
    "AUX_CONFIG_KEY",
]

SUPPORTED_VLLM = ("0.27", "0.28", "0.29", "0.30", "0.31", "0.32")
AUX_CONFIG_KEY = "labelgen"  # additional_config section: {"hidden_layers": [...]} (VllmTeacher)
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class ExtractionOptions:
    k: int
    draws: int = 0  # random-sampling labels per position (0 = off)
    draw_temperature: float = 1.0
    seed: int = 0
    layers: tuple[int, ...] = ()  # HF numbering: 0 = embeddings, i = output of decoder layer i
    hidden_every: int = 16  # one hidden-state sample every this many positions
    hidden_dtype: str = "float16"
    logits_only: bool = False  # benchmark bound: compute the logits, store nothing
    logits_budget_mib: float = 1024.0  # working memory of one chunk of logits (labels.logits_budget_mib)


def hidden_positions(num_tokens: int, prompt_hash: int, seed: int, every: int) -> np.ndarray:
    """Positions sampled for hidden states: a stride ``every`` with a seeded phase."""
    phase = (prompt_hash ^ (seed * 0x9E3779B97F4A7C15)) % every
    return np.arange(phase, num_tokens, every, dtype=np.int64)


def _splitmix(x):
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic)."""
    import torch

    x = x ^ (x >> 30 & 0x3FFFFFFFF)
    x = x * torch.tensor(-4658895280553007687, dtype=torch.int64)  # 0xBF58476D1CE4E5B9
    x = x ^ (x >> 27 & 0x1FFFFFFFFF)
    x = x * torch.tensor(-7723592293110705685, dtype=torch.int64)  # 0x94D049BB133111EB
    return x ^ (x >> 31 & 0x1FFFFFFFF)


def draw_uniforms(seed: int, prompt_hash: int, positions, draws: int):
    """(n, draws) float64 uniforms in [0, 1), a pure function of (seed, hash, position, draw)."""
    import torch

    key = ((seed * 0x632BE59BD9B4E019) ^ prompt_hash) & _MASK64
    key = key - (1 << 64) if key >= 1 << 63 else key
    pos = positions.to(torch.int64)[:, None] * draws + torch.arange(draws, dtype=torch.int64)[None, :]
    bits = _splitmix(_splitmix(pos ^ key))
    return ((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) * (1.0 / (1 << 53))


_SMALL_VOCAB = 4096  # below this, sample_draws uses a single cumulative sum


def _draw_block(vocab: int, draws: int) -> int:
    """Block width for two-level sampling: about sqrt(V) / 2, a power of two in [8, 256]."""
    width = 8
    while width < 256 and (2 * width) ** 2 <= vocab / 4:
        width *= 2
    del draws
    return width


def sample_draws(logits, uniforms, temperature: float = 1.0, block: int = 0):
    """Inverse-CDF samples from ``softmax(logits / temperature)``, two-level, and log Z.

    One pass takes the row maximum, one writes ``exp(x - max)`` and one sums it per block
    of ``block`` ids; a uniform picks a block by the (small) cumulative block masses, and
    only that block's probabilities are summed to pick the id. Same samples as a full
    cumulative sum over the vocabulary (up to float rounding at id boundaries) without
    a float64 copy and a cumulative sum of the whole vocabulary; the normaliser comes out
    of the same passes, so the caller needs no separate log-sum-exp.

    Args:
        logits: (n, V) float32.
        uniforms: (n, N) float64 in [0, 1).
        temperature: T > 0.
        block: block width (0 = automatic, about sqrt(V) / 2; vocabularies up to 4096 then
            use one cumulative sum, which has less per-call overhead there).

    Returns:
        ((n, N) int64 sampled ids in [0, V), (n, 1) float32 log-normaliser of ``logits / T``).
    """
    import torch

    n, vocab = logits.shape
    draws = uniforms.shape[1]
    x = logits / temperature if temperature != 1.0 else logits
    if vocab <= _SMALL_VOCAB and not block:  # few ids: one cumulative sum has less overhead
        log_z = torch.logsumexp(x, dim=-1, keepdim=True)
        cdf = (x - log_z).double().exp().cumsum(-1)
        samples = torch.searchsorted(cdf, uniforms.to(cdf.device)).clamp_(max=vocab - 1)
        return samples, log_z
    block = block or _draw_block(vocab, draws)
    top = x.amax(dim=-1, keepdim=True)  # (n, 1)
    e = (x - top).exp_()  # (n, V) unnormalised probabilities, max 1
    full = vocab // block
    parts = []
    if full:  # a strided (n, full, block) view of the whole blocks: no copy
        parts.append(e.as_strided((n, full, block), (e.stride(0), block, e.stride(1))).sum(-1))
    if vocab % block:
        parts.append(e[:, full * block :].sum(-1, keepdim=True))
    sums = (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).double()  # (n, nb)
    total = sums.sum(-1, keepdim=True)  # (n, 1), >= 1
    block_cdf = (sums / total).cumsum(-1)  # (n, nb)
    u = uniforms.to(block_cdf.device)
    chosen = torch.searchsorted(block_cdf, u).clamp_(max=block_cdf.shape[1] - 1)  # (n, N)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), torch.zeros_like(u))
    cols = chosen[..., None] * block + torch.arange(block, device=logits.device)  # (n, N, block)
    inside = cols < vocab
    values = e.gather(1, cols.clamp(max=vocab - 1).reshape(n, -1)).reshape(n, draws, block)
    within = (values.double() / total[..., None]).masked_fill(~inside, 0.0).cumsum(-1)  # (n, N, block)
    pick = torch.searchsorted(within, (u - before)[..., None]).squeeze(-1)
    last = inside.sum(-1) - 1  # rounding can leave the residual above the block's sum
    samples = (chosen * block + torch.minimum(pick, last)).clamp_(max=vocab - 1)
    return samples, (top.double() + total.log()).float()


_BLOCK_BYTES = 32  # sample_draws' block pass, per (draw, id in the chosen block); see logits_row_bytes
_DRAW_BYTES = 96  # per draw and row: uniforms and their hashing, samples and their sort


def logits_row_bytes(
    vocab: int, draws: int = 0, temperature: float = 1.0, logits_itemsize: int = 4, tp_size: int = 1
) -> int:
    """Peak bytes one row of logits costs in :func:`_label_rows` (all its temporaries).

    The float32 logits live through the whole chunk; the other (rows, V) buffers come
    and go in phases, so a row costs ``V`` times the largest phase, in bytes per id
    (``s`` = ``logits_itemsize``, the dtype ``compute_logits`` returns):

    - ``compute_logits``: ``s`` (under tensor parallelism, ``s * (2 + 1 / tp)``: the
      local vocabulary shard, the all-gather's buffer and its transposed copy);
    - the float32 copy: ``s + 4`` while converting (nothing when ``s`` is 4:
      ``.float()`` is then a no-op);
    - draws: ``4`` for the float32 logits, ``4`` for ``logits / T`` when ``T != 1``, and
      ``4`` for ``exp(x - max)`` plus ``_BLOCK_BYTES * draws * block / V`` for the
      per-draw block gather (ids int64, mask, values float32, two float64 cumulative
      sums); vocabularies up to 4096 use one float64 cumulative sum instead: ``16``;
    - log-sum-exp (no draws, or ``T != 1``): ``4 + 4`` (``torch.logsumexp`` holds one
      temporary, ``x - max``, exponentiated in place);

    plus ``_DRAW_BYTES`` per draw. Top-k and the target gather add only (rows, k) and
    (rows, 1) tensors. Measured against RSS by ``bench/logits_memory.py``.

    Args:
        vocab: V, the model's vocabulary (``model_config.get_vocab_size()``).
        draws: random-sampling draws per position (0 = off).
        temperature: the draws' temperature.
        logits_itemsize: bytes per element of the logits (2 for bf16/fp16, 4 for fp32).
        tp_size: tensor-parallel size (the all-gather's buffers).
    """
    s = logits_itemsize
    phases = [s * (1.0 if tp_size == 1 else 2.0 + 1.0 / tp_size), 4.0 + (s if s != 4 else 0)]
    if draws:
        scaled = 4.0 if temperature != 1.0 else 0.0
        if vocab <= _SMALL_VOCAB:
            phases.append(4.0 + scaled + 16.0)
        else:
            phases.append(4.0 + scaled + 4.0 + _BLOCK_BYTES * draws * _draw_block(vocab, draws) / vocab)
    if not draws or temperature != 1.0:
        phases.append(4.0 + 4.0)
    return int(vocab * max(phases)) + _DRAW_BYTES * draws


def logits_chunk_rows(
    vocab: int,
    budget_bytes: float,
    draws: int = 0,
    temperature: float = 1.0,
    logits_itemsize: int = 4,
    tp_size: int = 1,
) -> int:
    """Rows of logits per chunk so that one chunk's temporaries fit in ``budget_bytes``.

    ``budget_bytes // logits_row_bytes(...)``, at least 1 (a budget below one row's cost
    is exceeded by that one row). At V = 152,064 and the default 1 GiB: 882 rows without
    draws (8 B per id, float32 or bf16 logits), 723 with 64 draws at T = 1, 513 at T = 0.7.
    """
    row = logits_row_bytes(vocab, draws, temperature, logits_itemsize, tp_size)
    return max(1, int(budget_bytes // row))


def _row_chunks(num_rows: int, max_rows: int) -> list[tuple[int, int]]:
    """Near-equal (start, stop) chunks of at most ``max_rows`` rows covering ``num_rows``.

    Equal sizes leave no one-row tail chunk unless ``max_rows`` < 3, and no tiny last
    matmul."""
    count = -(-num_rows // max_rows)
    bounds = [num_rows * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _logsumexp(x):
    """Row-wise log-sum-exp, (n, V) -> (n, 1), bitwise independent of n on CPU.

    ATen reduces a lone output element in two passes split across threads, so a one-row
    input would round differently from the same row among others (1 ulp at V = 152k);
    a stride-0 second row keeps the row-per-thread order."""
    import torch

    if x.shape[0] == 1:
        return torch.logsumexp(x.expand(2, -1), dim=-1, keepdim=True)[:1]
    return torch.logsumexp(x, dim=-1, keepdim=True)


@dataclass
class _Request:
    ids: np.ndarray  # (T,) int32
    topk_ids: np.ndarray  # (T-1, k) int32
    topk_logprobs: np.ndarray  # (T-1, k) float32
    target_logprobs: np.ndarray  # (T-1,) float32
    # Per prefill chunk, keyed by its first position (a recomputed request restarts at a
    # lower position; chunks from the abandoned attempt are dropped then).
    draws: dict[int, tuple[np.ndarray, ...]] = field(default_factory=dict)  # start -> (num, ids, counts)
    hidden: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # start -> layer -> (P, D)
    hidden_pos: np.ndarray | None = None
    prompt_hash: int = 0
    with_draws: bool = False

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_hash": self.prompt_hash,
            "topk_ids": self.topk_ids,
            "topk_logprobs": self.topk_logprobs,
            "target_logprobs": self.target_logprobs,
        }
        if self.with_draws:
            chunks = [self.draws[start] for start in sorted(self.draws)]  # a chunk per prefill step
            for n, name in enumerate(("draw_num", "draw_ids", "draw_counts")):
                out[name] = np.concatenate([c[n] for c in chunks]) if chunks else np.zeros(0, np.int32)
            assert len(out["draw_num"]) == len(self.ids) - 1
        if self.hidden_pos is not None:
            out["hidden_positions"] = self.hidden_pos
            chunks = [self.hidden[start] for start in sorted(self.hidden)]
            out["hidden"] = {
                layer: np.concatenate([c[layer] for c in chunks]) for layer in (chunks[0] if chunks else {})
            }
        return out


class _State:
    def __init__(self, options: ExtractionOptions):
        self.options = options
        self.partial: dict[str, _Request] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.step_layers: dict[int, Any] = {}  # layer id -> (num_step_tokens, D) this step
        self.active = True
        self.original: Any = None  # the runner's own prompt-logprobs method
        self.hooks: list[Any] = []  # forward-hook handles on decoder layers
        self.aux_layers: tuple[int, ...] = ()  # the model's aux outputs, in order, when they are used
        self.chunk_rows = 1 << 62  # rows of logits per chunk (labelgen_install sets it)
        self.extracts = True  # this worker computes logits: the last pipeline stage
        self.records = True  # this worker keeps labels: tensor rank 0 of that stage


def _unique_counts(samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise unique ids and counts of an (n, N) int64 tensor, vectorised.

    Returns (num (n,) int32, ids (U,) int32, counts (U,) int32), rows in order.
    """
    import torch

    sorted_ids, _ = samples.sort(dim=-1)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    flat_new = new.reshape(-1).numpy()
    starts = np.flatnonzero(flat_new)  # every row starts with a new id, so runs never cross rows
    counts = np.diff(np.append(starts, flat_new.size)).astype(np.int32)
    ids = sorted_ids.reshape(-1).numpy()[starts].astype(np.int32)
    return new.sum(dim=1).numpy().astype(np.int32), ids, counts


def _label_rows(rec: _Request, logits, first: int, opt: ExtractionOptions):
    """Labels of ``logits`` (n, V), rows for positions ``first .. first + n - 1``, into ``rec``.

    Returns the rows' draws as (num (n,), ids (U,), counts (U,)) int32, or None."""
    import torch

    n = logits.shape[0]
    logits = logits.float()  # (n, V); a no-op on float32 logits
    samples = None
    if opt.draws:  # the sampler's passes also give log Z at T = 1
        u = draw_uniforms(opt.seed, rec.prompt_hash, torch.arange(first, first + n), opt.draws)
        samples, log_z = sample_draws(logits, u, opt.draw_temperature)
    if samples is None or opt.draw_temperature != 1.0:
        log_z = _logsumexp(logits)  # (n, 1)
    values, top = logits.topk(opt.k, dim=-1)  # (n, k)
    targets = torch.as_tensor(rec.ids[first + 1 : first + 1 + n], dtype=torch.int64)
    target_lp = logits.gather(-1, targets[:, None].to(logits.device))[:, 0] - log_z[:, 0]
    sl = slice(first, first + n)
    rec.topk_ids[sl] = top.to(torch.int32).cpu().numpy()
    rec.topk_logprobs[sl] = (values - log_z).cpu().numpy()
    rec.target_logprobs[sl] = target_lp.cpu().numpy()
    return None if samples is None else _unique_counts(samples.cpu())


def _new_request(prompt: list[int], opt: ExtractionOptions) -> _Request:
    total = len(prompt)
    ids = np.asarray(prompt, dtype=np.int32)
    rec = _Request(
        ids=ids,
        topk_ids=np.zeros((total - 1, opt.k), np.int32),
        topk_logprobs=np.zeros((total - 1, opt.k), np.float32),
        target_logprobs=np.zeros(total - 1, np.float32),
        prompt_hash=token_hash(ids),
        with_draws=opt.draws > 0,
    )
    if opt.layers:
        rec.hidden_pos = hidden_positions(total, rec.prompt_hash, opt.seed, opt.hidden_every)
    return rec


def _extract_prompt_labels(runner, hidden_states, num_scheduled_tokens) -> dict:
    """Replacement for ``GPUModelRunner._get_prompt_logprobs_dict`` (see module doc).

    Args:
        runner: the model runner (``runner._labelgen_state`` set by ``labelgen_install``).
        hidden_states: (num_step_tokens, D) final hidden states of this step's tokens.
        num_scheduled_tokens: request id -> tokens scheduled for it in this step.

    Returns ``{}``: nothing goes back to vLLM's front end for these requests.
    """
    import torch

    state: _State = runner._labelgen_state
    if not state.active:
        state.step_layers.clear()  # nothing of this step is kept
        return state.original(hidden_states, num_scheduled_tokens)
    opt = state.options
    for req_id in list(runner.num_prompt_logprobs):
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:
            continue  # preempted during prefill; recomputed later
        request = runner.requests[req_id]
        prompt = request.prompt_token_ids
        if prompt is None:
            continue
        total = len(prompt)
        start = request.num_computed_tokens
        num_logits = min(num_tokens, total - 1 - start)
        rec = None
        if state.records:
            rec = state.partial.get(req_id)
            if rec is None:
                rec = state.partial[req_id] = _new_request(prompt, opt)
            for chunks in (rec.draws, rec.hidden):
                for stale in [key for key in chunks if key >= start]:
                    del chunks[stale]
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        if state.extracts and num_logits > 0:
            rows = hidden_states[offset : offset + num_logits]  # (num_logits, D)
            drawn = []
            for lo, hi in _row_chunks(num_logits, state.chunk_rows):
                # Every tensor rank calls compute_logits (it gathers the vocabulary shards);
                # the full logits are certain only on tensor rank 0, the recording one.
                logits = runner.model.compute_logits(rows[lo:hi])  # (hi - lo, V) or None
                if rec is not None and not opt.logits_only:
                    drawn.append(_label_rows(rec, logits, start + lo, opt))
                del logits
            if rec is not None and opt.draws and not opt.logits_only:
                rec.draws[start] = tuple(np.concatenate(parts) for parts in zip(*drawn, strict=True))
        if rec is not None and opt.layers and rec.hidden_pos is not None:
            chunk_end = start + num_tokens
            wanted = rec.hidden_pos[(rec.hidden_pos >= start) & (rec.hidden_pos < chunk_end)]
            if len(wanted):
                picked = torch.as_tensor(wanted - start + offset)
                rec.hidden[start] = {}
                for layer in opt.layers:
                    source = state.step_layers.get(layer)
                    if layer == runner._labelgen_num_layers:
                        source = hidden_states  # HF's last entry is after the final norm
                    values = source[picked.to(source.device)].to(getattr(torch, opt.hidden_dtype)).cpu()
                    rec.hidden[start][layer] = values.float().numpy()
        if start + num_tokens >= total:
            if rec is not None:
                state.done[req_id] = rec.result()
                del state.partial[req_id]
            del runner.num_prompt_logprobs[req_id]
            request.in_progress_prompt_logprobs_cpu = None
    state.step_layers.clear()
    return {}


def parallel_role(runner, model) -> tuple[bool, bool]:
    """(extracts, records) of this worker: whether it computes logits and keeps labels.

    The last pipeline stage (the one whose decoder stack ends at the last layer) computes
    logits; its tensor rank 0 (``lm_head.tp_rank``, which receives the gathered logits
    under both vLLM's gather and all-gather) records. Read from the model and the runner's
    parallel config, so that this module needs no vLLM import."""
    parallel = getattr(runner, "parallel_config", None)
    tp_size = int(getattr(parallel, "tensor_parallel_size", 1))
    pp_size = int(getattr(parallel, "pipeline_parallel_size", 1))
    extracts = True
    if pp_size > 1:
        inner = getattr(model, "model", None)
        end = getattr(inner, "end_layer", None)
        if end is None:
            raise TypeError(
                f"{type(model).__name__} has no model.end_layer, so with pipeline_parallel_size {pp_size} "
                "the extractor cannot tell its last stage; use tensor_parallel_size instead"
            )
        extracts = int(end) == len(_decoder_layers(model))
    records = extracts
    if extracts and tp_size > 1:
        tp_rank = getattr(getattr(model, "lm_head", None), "tp_rank", None)
        if tp_rank is None:
            raise TypeError(
                f"{type(model).__name__} has no lm_head.tp_rank, so with tensor_parallel_size {tp_size} "
                "the extractor cannot tell which worker holds the full logits"
            )
        records = int(tp_rank) == 0
    return extracts, records


class LabelExtractor:
    """vLLM worker extension: ``labelgen_install`` once, then ``labelgen_fetch`` per batch."""

    def labelgen_install(self, options: dict[str, Any]) -> dict[str, Any]:
        """Install (or re-configure) the extractor.

        Returns the model's layer count and vocabulary, whether this worker records labels,
        and its rows of logits per chunk."""
        opt = ExtractionOptions(**{**options, "layers": tuple(options.get("layers", ()))})
        if not opt.logits_budget_mib > 0:
            raise ValueError(f"labels.logits_budget_mib must be > 0, got {opt.logits_budget_mib}")
        if opt.logits_only and (opt.draws or opt.layers):
            raise ValueError(
                f"logits_only (a benchmark bound that stores nothing) cannot have draws ({opt.draws}) or "
                f"hidden layers ({list(opt.layers)}); set draws=0 and no layers"
            )
        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model()
        previous: _State | None = getattr(runner, "_labelgen_state", None)
        state = _State(opt)
        layers = _decoder_layers(model)
        state.extracts, state.records = parallel_role(runner, model)
        if state.extracts:
            _check_stage_layers(opt.layers, getattr(model.model, "start_layer", 0), len(layers))
        vocab = int(runner.model_config.get_vocab_size())
        parallel = getattr(runner, "parallel_config", None)
        state.chunk_rows = logits_chunk_rows(
            vocab,
            opt.logits_budget_mib * (1 << 20),
            opt.draws,
            opt.draw_temperature,
            _logits_dtype(runner.model_config).itemsize,
            int(getattr(parallel, "tensor_parallel_size", 1)),
        )
        capture = "none"
        if state.records:
            capture = hidden_capture(
                opt.layers,
                len(layers),
                getattr(runner, "_labelgen_aux_layers", None),
                _hooks_run(runner),
                getattr(runner, "_labelgen_aux_why_not", None) or "the engine did not set them up",
            )
        if previous is not None:
            for handle in previous.hooks:
                handle.remove()
            state.original = previous.original
        else:
            state.original = runner._get_prompt_logprobs_dict
        runner._labelgen_state = state
        runner._labelgen_num_layers = len(layers)
        if capture == "aux":
            state.aux_layers = tuple(runner._labelgen_aux_layers)
            _wrap_model_forward(runner)
        elif capture == "hooks":
            for layer_id in opt.layers:
                if layer_id == 0:
                    state.hooks.append(layers[0].register_forward_pre_hook(_capture_input(state)))
                elif layer_id < len(layers):
                    hook = _capture_output(state, layer_id)
                    state.hooks.append(layers[layer_id - 1].register_forward_hook(hook))
        runner._get_prompt_logprobs_dict = types.MethodType(_extract_prompt_labels, runner)
        return {
            "layers": len(layers),
            "vocab": vocab,
            "records": state.records,
            "chunk_rows": state.chunk_rows,
            "hidden_capture": capture,
        }

    def labelgen_set_active(self, active: bool) -> bool:
        """Route prompt-logprob requests to the extractor (True) or to vLLM's own path.

        Returns whether the extractor is now active (False where it was never installed)."""
        state: _State | None = getattr(self.model_runner, "_labelgen_state", None)  # type: ignore[attr-defined]
        if state is None:
            return False
        state.active = active
        return active

    def labelgen_fetch(self) -> bytes:
        """Finished requests as one pickle (the RPC layer would turn arrays into lists).

        An empty list on workers that do not record (``labelgen_install``'s ``records``)."""
        state: _State = self.model_runner._labelgen_state  # type: ignore[attr-defined]
        done, state.done = state.done, {}
        return pickle.dumps(list(done.values()), protocol=pickle.HIGHEST_PROTOCOL)


def _logits_dtype(model_config):
    """The dtype ``compute_logits`` returns: the lm_head's (``head_dtype``, vLLM >= 0.31) or the model's."""
    try:
        return model_config.head_dtype
    except AttributeError:
        return model_config.dtype


def stage_lowest_layer(start_layer: int) -> int:
    """The lowest hidden-state layer (HF numbering) a pipeline stage whose first decoder
    layer is ``start_layer`` computes: 0 (the embeddings) on the first stage, else the
    output of its first decoder layer. The stage's layers are this .. num_layers."""
    return start_layer + 1 if start_layer else 0


def _check_stage_layers(layers: tuple[int, ...], start_layer: int, num_layers: int) -> None:
    """Hidden-state layers must be computed on this (the last) pipeline stage.

    HF layer ``i >= 1`` is the output of decoder layer ``i - 1``; layer 0 (the embeddings)
    exists only on the first stage. The stage holds decoder layers ``start_layer ..``."""
    lowest = stage_lowest_layer(start_layer)
    for layer_id in layers:
        if not 0 <= layer_id <= num_layers:
            raise ValueError(f"hidden-state layer {layer_id} is out of range 0..{num_layers}")
        if layer_id < lowest:
            raise ValueError(
                f"hidden-state layer {layer_id} is computed on an earlier pipeline stage: the last "
                f"stage, which extracts labels, holds decoder layers {start_layer}..{num_layers - 1}, "
                f"i.e. hidden.layers {lowest}..{num_layers}; choose layers in that range, or split the "
                "teacher by "
                "tensor_parallel_size instead of pipeline_parallel_size"
            )


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__} has no model.layers; on-device extraction cannot hook it")
    return list(layers)


def _capture_input(state: _State):
    def hook(module, args):
        state.step_layers[0] = args[1]  # (positions, hidden_states, residual): the embeddings

    return hook


def _capture_output(state: _State, layer_id: int):
    def hook(module, args, output):
        hidden, residual = output
        state.step_layers[layer_id] = hidden + residual  # the residual stream after the layer

    return hook


# --------------------------------------------------------------------------- aux outputs


def hidden_capture(
    layers: tuple[int, ...],
    num_layers: int,
    aux_layers: tuple[int, ...] | None,
    hooks_run: bool,
    why_no_aux: str = "",
) -> str:
    """How the recording worker gets hidden states: ``"hooks"``, ``"aux"`` or ``"none"``.

    ``"none"``: no layer needs capturing (none asked for, or only layer ``num_layers``,
    the final hidden states). Forward hooks wherever they run (an eager engine, the
    behaviour labelgen always had there); otherwise the model's aux outputs, if the
    worker set them up at start-up for every layer asked for (:func:`install_aux_patch`).

    Raises:
        ValueError: hidden layers on a compiled engine without such aux outputs.
    """
    needed = sorted({int(layer) for layer in layers} - {num_layers})
    if not needed:
        return "none"
    if hooks_run:
        return "hooks"
    missing = [layer for layer in needed if layer not in (aux_layers or ())]
    if not missing:
        return "aux"
    reason = (
        f"the engine set up aux outputs for layers {list(aux_layers)} only"
        if aux_layers is not None
        else why_no_aux
    )
    raise ValueError(
        f"hidden.layers {list(layers)}: layers {missing} need the model's aux hidden-state outputs on a "
        f"compiled engine (forward hooks do not run in compiled graphs), and {reason}; set "
        "teacher.engine_args.enforce_eager: true"
    )


def _hooks_run(runner) -> bool:
    """Whether forward hooks on the decoder layers run: no torch.compile and no CUDA graphs.

    A runner without a vLLM config (the tests' fakes) counts as eager."""
    config = getattr(runner, "vllm_config", None)
    compilation = getattr(config, "compilation_config", None)
    if compilation is None or getattr(getattr(config, "model_config", None), "enforce_eager", False):
        return True
    graphs = getattr(compilation, "cudagraph_mode", None)
    graphs_on = graphs is not None and getattr(graphs, "name", str(graphs)) != "NONE"
    return int(getattr(compilation, "mode", 0) or 0) == 0 and not graphs_on


def configured_aux_layers(vllm_config) -> tuple[int, ...]:
    """``additional_config["labelgen"]["hidden_layers"]`` of an engine's config (() if unset)."""
    extra = getattr(vllm_config, "additional_config", None)
    section = extra.get(AUX_CONFIG_KEY) if isinstance(extra, dict) else None
    layers = section.get("hidden_layers") if isinstance(section, dict) else None
    return tuple(int(layer) for layer in layers or ())


def setup_aux_layers(runner) -> tuple[int, ...] | None:
    """Set the model's aux hidden-state outputs for labelgen's layers; the aux tuple, or None.

    Called in place of the runner's ``_setup_eagle3_aux_hidden_state_outputs`` (end of
    ``load_model``, before the first forward compiles the model). None, after vLLM's own
    method, where labelgen sets nothing; ``runner._labelgen_aux_why_not`` then says why,
    for ``labelgen_install``'s error. On the last pipeline stage the aux layers are that
    stage's (``start_layer < i < n``, and 0 on a single stage); earlier stages get none.
    """
    wanted = configured_aux_layers(getattr(runner, "vllm_config", None))
    if not wanted:
        runner._labelgen_aux_why_not = (
            "the engine was started without additional_config.labelgen.hidden_layers"
        )
        return None
    if getattr(runner, "use_aux_hidden_state_outputs", False):
        runner._labelgen_aux_why_not = "a speculative-decoding drafter already uses the model's aux outputs"
        return None
    model = runner.get_model()
    if not (getattr(model, "supports_eagle3", False) and hasattr(model, "set_aux_hidden_state_layers")):
        runner._labelgen_aux_why_not = (
            f"{type(model).__name__} has no aux hidden-state outputs (it is not one of vLLM's "
            "SupportsEagle3 models)"
        )
        return None
    if not hasattr(getattr(model, "model", None), "_maybe_add_hidden_state"):
        # vLLM 0.32's EagleModelMixin numbers aux outputs as labelgen does (0 = embeddings,
        # i = after layer i, absolute under pipeline parallelism); stacks with their own
        # aux code (DeepSeek-V2/V3, older vLLMs) number them otherwise, or fail on layer 0.
        runner._labelgen_aux_why_not = (
            f"{type(model).__name__}'s decoder stack does not use vLLM's EagleModelMixin, whose layer "
            "numbering labelgen relies on"
        )
        return None
    try:
        extracts, _ = parallel_role(runner, model)
        num_layers = len(_decoder_layers(model))
    except TypeError as exc:
        runner._labelgen_aux_why_not = str(exc)
        return None
    if not extracts:
        runner._labelgen_aux_why_not = "an earlier pipeline stage keeps no hidden states"
        return None
    start = int(getattr(model.model, "start_layer", 0) or 0)
    lowest = stage_lowest_layer(start)  # layer num_layers is the final hidden states: no aux output
    aux = tuple(sorted({layer for layer in wanted if lowest <= layer < num_layers}))
    if aux:
        try:
            model.set_aux_hidden_state_layers(aux)
        except (AssertionError, AttributeError) as exc:  # a SupportsEagle3 model without EagleModelMixin
            runner._labelgen_aux_why_not = f"{type(model).__name__} refused aux layers {list(aux)} ({exc})"
            return None
        runner.use_aux_hidden_state_outputs = True
    runner._labelgen_aux_layers = aux
    return aux


def install_aux_patch() -> bool:
    """Make vLLM's V1 model runner set up labelgen's aux hidden-state outputs; idempotent.

    Wraps ``GPUModelRunner._setup_eagle3_aux_hidden_state_outputs`` (the CPU runner
    inherits and calls it too) with :func:`setup_aux_layers`, falling back to vLLM's own
    method where labelgen sets nothing. Runs at this module's import in the worker (vLLM
    imports the worker extension before it builds the runner). Returns whether the patch
    is in place: False, and nothing changes, where vLLM's runner module does not import.
    """
    try:
        # The one vLLM import outside labelgen.teacher_vllm (tests/test_structure.py): the
        # runner class this worker extension patches, in vLLM's own worker process.
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as cls
    except Exception:  # noqa: BLE001 - no vLLM, or a build without the V1 GPU runner: no aux outputs
        return False
    original = getattr(cls, "_setup_eagle3_aux_hidden_state_outputs", None)
    if original is None:
        return False
    if getattr(original, "_labelgen_aux", False):
        return True

    def setup(self) -> None:
        if setup_aux_layers(self) is None:
            original(self)

    setup._labelgen_aux = True  # type: ignore[attr-defined]
    cls._setup_eagle3_aux_hidden_state_outputs = setup
    return True


def _wrap_model_forward(runner) -> None:
    """Keep the model's aux outputs of each forward in ``step_layers``; once per runner.

    ``_model_forward`` runs the (compiled) model; the wrapper is plain Python around it.
    On a tuple ``(final hidden states, [aux per layer])`` the aux tensors go to the current
    state's ``aux_layers``, in order; other outputs (``IntermediateTensors``) pass through."""
    if getattr(runner, "_labelgen_model_forward", None) is not None:
        return
    forward = runner._model_forward
    runner._labelgen_model_forward = forward

    def model_forward(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        state: _State | None = getattr(runner, "_labelgen_state", None)
        if state is not None and state.aux_layers and isinstance(out, tuple):
            for layer, tensor in zip(state.aux_layers, out[1], strict=True):
                state.step_layers[layer] = tensor
        return out

    runner._model_forward = model_forward


# vLLM imports this module in each worker process (the worker extension) before it builds the
# model runner. Only where vLLM is loaded already: elsewhere (the driver before its engine,
# unit tests) importing this module must not import vLLM; VllmTeacher calls the patch itself
# before it starts an engine, for workers forked from the driver or run in its process.
if "vllm" in sys.modules:
    with contextlib.suppress(Exception):  # never let the patch break an import of this module
        install_aux_patch()
