"""On-device label extraction inside vLLM's worker (no per-position Python objects).

:class:`LabelExtractor` is a vLLM *worker extension* (``worker_extension_cls``): vLLM
mixes it into its worker class, and the driver calls its methods with
``LLM.collective_rpc``. ``labelgen_install`` replaces the model runner's
prompt-logprobs step (``GPUModelRunner._get_prompt_logprobs_dict``, which the CPU
runner reuses) with :func:`_extract_prompt_labels`: for every request that asked for
prompt logprobs it takes the final hidden states of the request's tokens *in this
step* (the rows ``query_start_loc[req] : +num_scheduled``, so it holds under
continuous batching and chunked prefill), computes the logits once, and writes into
per-request numpy buffers at the request's absolute positions:

- top-k ids and log-probs and the real next token's log-prob (one log-sum-exp);
- optionally N draws from the teacher distribution at a temperature, as unique ids
  and counts; the uniforms are a counter-based hash of (seed, prompt hash, position,
  draw), so draws do not depend on batching or chunk boundaries;
- optionally hidden states of chosen layers at sampled positions, captured by forward
  hooks on the decoder layers (needs ``enforce_eager=True``: compiled graphs skip
  hooks).

Nothing is returned to vLLM's front end for these requests, so it builds no
per-position objects; ``labelgen_fetch`` hands the finished buffers to the driver.

Supported: vLLM 0.27 – 0.32 (V1 engine, ``GPUModelRunner`` and ``CPUModelRunner``)
with decoder stacks at ``model.model.layers``. Imports torch and numpy only; it runs
inside vLLM's worker process.
"""

from __future__ import annotations

import pickle
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelgen.contract.format import token_hash

__all__ = ["ExtractionOptions", "LabelExtractor", "hidden_positions", "draw_uniforms", "sample_draws"]

SUPPORTED_VLLM = ("0.27", "0.28", "0.29", "0.30", "0.31", "0.32")
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


def _extract_prompt_labels(runner, hidden_states, num_scheduled_tokens) -> dict:
    """Replacement for ``GPUModelRunner._get_prompt_logprobs_dict`` (see module doc)."""
    import torch

    state: _State = runner._labelgen_state
    if not state.active:
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
        rec = state.partial.get(req_id)
        if rec is None:
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
            state.partial[req_id] = rec
        start = request.num_computed_tokens
        for chunks in (rec.draws, rec.hidden):
            for stale in [key for key in chunks if key >= start]:
                del chunks[stale]
        req_idx = runner.input_batch.req_id_to_index[req_id]
        offset = int(runner.query_start_loc.np[req_idx])
        num_logits = min(num_tokens, total - 1 - start)
        if num_logits > 0 and opt.logits_only:
            runner.model.compute_logits(hidden_states[offset : offset + num_logits])
        elif num_logits > 0:
            logits = runner.model.compute_logits(hidden_states[offset : offset + num_logits])
            logits = logits.float()
            samples = None
            if opt.draws:  # the sampler's passes also give log Z at T = 1
                positions = torch.arange(start, start + num_logits)
                u = draw_uniforms(opt.seed, rec.prompt_hash, positions, opt.draws)
                samples, log_z = sample_draws(logits, u, opt.draw_temperature)
            if samples is None or opt.draw_temperature != 1.0:
                log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
            values, top = logits.topk(opt.k, dim=-1)
            targets = torch.as_tensor(rec.ids[start + 1 : start + 1 + num_logits], dtype=torch.int64)
            target_lp = logits.gather(-1, targets[:, None].to(logits.device))[:, 0] - log_z[:, 0]
            sl = slice(start, start + num_logits)
            rec.topk_ids[sl] = top.to(torch.int32).cpu().numpy()
            rec.topk_logprobs[sl] = (values - log_z).cpu().numpy()
            rec.target_logprobs[sl] = target_lp.cpu().numpy()
            if samples is not None:
                samples = samples.cpu()
                rec.draws[start] = _unique_counts(samples)
        if opt.layers and rec.hidden_pos is not None:
            chunk_end = start + num_tokens
            wanted = rec.hidden_pos[(rec.hidden_pos >= start) & (rec.hidden_pos < chunk_end)]
            if len(wanted):
                rows = torch.as_tensor(wanted - start + offset)
                rec.hidden[start] = {}
                for layer in opt.layers:
                    source = state.step_layers.get(layer)
                    if layer == runner._labelgen_num_layers:
                        source = hidden_states  # HF's last entry is after the final norm
                    values = source[rows.to(source.device)].to(getattr(torch, opt.hidden_dtype)).cpu()
                    rec.hidden[start][layer] = values.float().numpy()
        if start + num_tokens >= total:
            state.done[req_id] = rec.result()
            del state.partial[req_id]
            del runner.num_prompt_logprobs[req_id]
            request.in_progress_prompt_logprobs_cpu = None
    state.step_layers.clear()
    return {}


class LabelExtractor:
    """vLLM worker extension: ``labelgen_install`` once, then ``labelgen_fetch`` per batch."""

    def labelgen_install(self, options: dict[str, Any]) -> dict[str, Any]:
        """Install (or re-configure) the extractor; returns the model's layer count and vocab."""
        opt = ExtractionOptions(**{**options, "layers": tuple(options.get("layers", ()))})
        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model()
        previous: _State | None = getattr(runner, "_labelgen_state", None)
        state = _State(opt)
        if previous is not None:
            for handle in previous.hooks:
                handle.remove()
            state.original = previous.original
        else:
            state.original = runner._get_prompt_logprobs_dict
        runner._labelgen_state = state
        layers = _decoder_layers(model)
        runner._labelgen_num_layers = len(layers)
        for layer_id in opt.layers:
            if not 0 <= layer_id <= len(layers):
                raise ValueError(f"hidden-state layer {layer_id} is out of range 0..{len(layers)}")
            if layer_id == 0:
                state.hooks.append(layers[0].register_forward_pre_hook(_capture_input(state)))
            elif layer_id < len(layers):
                hook = _capture_output(state, layer_id)
                state.hooks.append(layers[layer_id - 1].register_forward_hook(hook))
        runner._get_prompt_logprobs_dict = types.MethodType(_extract_prompt_labels, runner)
        return {"layers": len(layers), "vocab": int(runner.model_config.get_vocab_size())}

    def labelgen_set_active(self, active: bool) -> bool:
        """Route prompt-logprob requests to the extractor (True) or to vLLM's own path."""
        self.model_runner._labelgen_state.active = active  # type: ignore[attr-defined]
        return active

    def labelgen_fetch(self) -> bytes:
        """Finished requests as one pickle (the RPC layer would turn arrays into lists)."""
        state: _State = self.model_runner._labelgen_state  # type: ignore[attr-defined]
        done, state.done = state.done, {}
        return pickle.dumps(list(done.values()), protocol=pickle.HIGHEST_PROTOCOL)


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
