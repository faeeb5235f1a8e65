"""Memory-bounded KD + CE: the loss fused with the output projection, chunked over tokens.

The student's full-vocabulary logits dominate training memory (N tokens × V × 4 B:
8k tokens at V=128k is 4 GiB per copy, and a loss keeps several copies for backward).
``chunked_kd_loss`` computes exactly ``alpha · kd_loss + (1 - alpha) · CE`` on the logits
``hidden @ W.T (+ b)`` without ever holding them for more than ``chunk_tokens`` tokens:
a custom autograd function runs, per chunk, the projection, the loss and its gradient
(as Liger's fused linear cross-entropy does), accumulates ``d loss / d hidden`` and
``d loss / d W`` and frees the chunk's logits; backward only scales the stored gradients.
No logits are recomputed, so it costs about the same arithmetic as the plain path.

Only positions the mask selects are projected (prompt tokens cost nothing), and the
mean is over the total mask weight of the whole batch, as in the plain path.
``unchunked_kd_loss`` is the plain reference with the same signature.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from students.loss_kinds import LOSS_KINDS
from students.losses import bucket_divergence, check_kd_args, sampled_cross_entropy

__all__ = ["CHUNKED_KINDS", "chunked_kd_loss", "unchunked_kd_loss"]

CHUNKED_KINDS = LOSS_KINDS
"""``kind`` values: the top-k + tail divergences, and ``sampled`` (random-draw labels);
defined in :mod:`students.loss_kinds`."""


def _check(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    alpha: float,
    temperature: float,
    chunk_tokens: int,
    beta: float,
    skew: float,
    labels: tuple[torch.Tensor | None, torch.Tensor | None],
) -> None:
    if kind not in CHUNKED_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; valid kinds: {', '.join(CHUNKED_KINDS)}")
    check_kd_args("forward_kl" if kind == "sampled" else kind, temperature, beta, skew)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (weight of the KD term) must be in [0, 1], got {alpha}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, D) and lm_head_weight (V, D), got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    n = hidden.shape[0]
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"lm_head_bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if targets.shape != (n,) or mask.shape != (n,):
        raise ValueError(
            f"targets and mask must have shape ({n},), got {tuple(targets.shape)} and {tuple(mask.shape)}"
        )
    selected = targets[mask != 0]
    if selected.numel() and not bool(((selected >= 0) & (selected < weight.shape[0])).all()):
        raise ValueError(f"targets of selected positions must be ids in [0, {weight.shape[0]})")
    if alpha > 0:
        first, second = labels
        names = ("draw_ids", "draw_counts") if kind == "sampled" else ("topk_ids", "topk_logprobs")
        if first is None or second is None:
            raise ValueError(f"kind {kind!r} with alpha > 0 needs {names[0]} and {names[1]}")
        if first.ndim != 2 or first.shape != second.shape or first.shape[0] != n:
            raise ValueError(
                f"{names[0]} and {names[1]} must have the same shape ({n}, K), got "
                f"{tuple(first.shape)} and {tuple(second.shape)}"
            )


def _position_losses(
    logits: torch.Tensor,
    labels: tuple[torch.Tensor | None, torch.Tensor | None],
    targets: torch.Tensor,
    kind: str,
    alpha: float,
    temperature: float,
    beta: float,
    skew: float,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(KD (C,) without T², or None when alpha == 0; CE (C,)) for logits (C, V)."""
    kd = None
    if alpha > 0:
        first, second = labels
        assert first is not None and second is not None  # checked in _check
        if kind == "sampled":
            kd = sampled_cross_entropy(logits, first, second, temperature)
        else:
            kd = bucket_divergence(kind, logits, first, second, temperature, beta=beta, skew=skew)
    # CE as logsumexp - logit: unlike cross_entropy it keeps no (C, V) log-softmax for backward.
    logits = logits.float()
    safe = targets.long().clamp(0, logits.shape[-1] - 1)  # out-of-range ids only on unselected rows
    ce = torch.logsumexp(logits, dim=-1) - logits.gather(-1, safe[:, None]).squeeze(-1)
    return kd, ce


class _FusedChunkedLoss(torch.autograd.Function):
    """Forward computes the loss and its input gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        spec: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, w_pos, labels, targets = spec["rows"], spec["weights"], spec["labels"], spec["targets"]
        alpha, temperature, total = spec["alpha"], spec["temperature"], spec["total"]
        kd_scale = alpha * temperature**2 / total
        ce_scale = (1.0 - alpha) / total
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_any = spec["grad_enabled"] and (need_h or need_w or need_b)
        need_h, need_w, need_b = need_h and need_any, need_w and need_any, need_b and need_any
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = spec["chunk_tokens"]
        for start in range(0, rows.numel(), chunk):
            idx = rows[start : start + chunk]
            h = hidden.index_select(0, idx)  # (C, D)
            w = w_pos[start : start + chunk]  # (C,)
            logits = F.linear(h, weight, bias).requires_grad_(need_any)  # (C, V), input dtype
            with torch.set_grad_enabled(need_any):
                first, second = (x.index_select(0, idx) if x is not None else None for x in labels)
                kd, ce = _position_losses(
                    logits,
                    (first, second),
                    targets.index_select(0, idx),
                    spec["kind"],
                    alpha,
                    temperature,
                    spec["beta"],
                    spec["skew"],
                )
                ce_part = (ce * w).sum()
                chunk_loss = ce_scale * ce_part
                if kd is not None:
                    kd_part = (kd * w).sum()
                    chunk_loss = chunk_loss + kd_scale * kd_part
                    kd_sum += kd_part.detach()
                ce_sum += ce_part.detach()
            del kd, ce
            if not need_any:
                continue
            (grad_logits,) = torch.autograd.grad(chunk_loss, logits)  # (C, V)
            del logits, chunk_loss
            if grad_h is not None:
                grad_h.index_copy_(0, idx, grad_logits @ weight)
            if grad_w is not None and grad_logits.dtype == torch.float32:
                grad_w.addmm_(grad_logits.t(), h)  # in place: no (V, D) temporary
            elif grad_w is not None:
                grad_w += (grad_logits.t() @ h).float()
            if grad_b is not None:
                grad_b += grad_logits.float().sum(0)
            del grad_logits
        # Held on ctx (not save_for_backward) so backward can hand them over without a copy.
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None,
        )
        del grad_w, grad_b
        kd_value = kd_sum * temperature**2 / total
        ce_value = ce_sum / total
        loss = alpha * kd_value + (1.0 - alpha) * ce_value
        ctx.mark_non_differentiable(kd_value, ce_value)
        return loss, kd_value, ce_value

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("chunked_kd_loss supports one backward per forward (no retain_graph reuse)")
        if not bool((grad_loss == 1.0).all()):  # loss.backward() passes 1: nothing to scale
            grads = tuple(g.mul_(grad_loss.to(g.dtype)) if g is not None else None for g in grads)
        return (*grads, None)


def chunked_kd_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    lm_head_bias: torch.Tensor | None = None,
    draw_ids: torch.Tensor | None = None,
    draw_counts: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``alpha · KD × T² + (1 - alpha) · CE`` on logits ``hidden @ W.T (+ b)``, in token chunks.

    Same value and gradients (w.r.t. ``hidden``, ``lm_head_weight`` and ``lm_head_bias``)
    as ``unchunked_kd_loss``, with at most ``chunk_tokens`` rows of logits alive at once.
    The gradients are computed during the forward call; only ``loss`` carries them
    (``kd`` and ``ce`` are detached, for logging). No double backward.

    Args:
        hidden: (N, D) final hidden states (after the final norm) at the label positions.
        lm_head_weight: (V, D) output projection (tied embeddings work: pass the shared weight).
        topk_ids: (N, K) teacher top-k ids (None allowed for ``sampled`` or alpha == 0).
        topk_logprobs: (N, K) raw teacher log-probs (None likewise).
        targets: (N,) real next-token ids for the CE term.
        mask: (N,) 1/True where the position counts (float weights allowed).
        kind: one of ``CHUNKED_KINDS`` (``KD_KINDS`` plus ``sampled``).
        alpha: weight of the KD term in [0, 1]; CE gets 1 - alpha. alpha == 0 skips the KD.
        temperature: softening T of both sides; the KD term is multiplied by T².
        chunk_tokens: rows of logits computed at once (memory ≈ chunk_tokens × V × ~24 B).
        beta: ``jsd`` mixture weight of the teacher.
        skew: ``skew_kl`` / ``skew_reverse_kl`` mixing weight.
        lm_head_bias: (V,) output bias, if the head has one.
        draw_ids: (N, U) ``sampled`` only: unique drawn ids (count 0 = padding).
        draw_counts: (N, U) ``sampled`` only: their counts.

    Returns:
        ``{"loss", "kd", "ce"}`` scalars (float32); all zero, ``loss`` with a graph, when the
        mask selects nothing; ``kd`` is zero when alpha == 0.
    """
    labels = (draw_ids, draw_counts) if kind == "sampled" else (topk_ids, topk_logprobs)
    _check(
        hidden,
        lm_head_weight,
        lm_head_bias,
        targets,
        mask,
        kind,
        alpha,
        temperature,
        chunk_tokens,
        beta,
        skew,
        labels,
    )
    weights = mask.to(torch.float32)
    rows = torch.nonzero(weights != 0).squeeze(1)  # only selected positions are projected
    spec = {
        "rows": rows,
        "weights": weights.index_select(0, rows),
        "labels": labels if alpha > 0 else (None, None),
        "targets": targets,
        "kind": kind,
        "alpha": float(alpha),
        "temperature": float(temperature),
        "beta": float(beta),
        "skew": float(skew),
        "total": weights.sum().clamp(min=1.0),
        "chunk_tokens": int(chunk_tokens),
        "grad_enabled": torch.is_grad_enabled(),
    }
    loss, kd, ce = _FusedChunkedLoss.apply(hidden, lm_head_weight, lm_head_bias, spec)
    return {"loss": loss, "kd": kd, "ce": ce}


def unchunked_kd_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    targets: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    lm_head_bias: torch.Tensor | None = None,
    draw_ids: torch.Tensor | None = None,
    draw_counts: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The plain reference for ``chunked_kd_loss``: full (N, V) logits, then the losses.

    Same arguments and result (``chunk_tokens`` is ignored; here ``kd`` and ``ce`` keep
    their graphs too). Memory: several (N, V) float32 tensors live until backward.
    """
    labels = (draw_ids, draw_counts) if kind == "sampled" else (topk_ids, topk_logprobs)
    _check(
        hidden,
        lm_head_weight,
        lm_head_bias,
        targets,
        mask,
        kind,
        alpha,
        temperature,
        chunk_tokens,
        beta,
        skew,
        labels,
    )
    logits = F.linear(hidden, lm_head_weight, lm_head_bias)  # (N, V)
    kd, ce = _position_losses(logits, labels, targets, kind, alpha, temperature, beta, skew)
    weights = mask.to(torch.float32)
    total = weights.sum().clamp(min=1.0)
    selected = weights != 0
    ce_value = (torch.where(selected, ce, 0.0) * weights).sum() / total
    if kd is None:
        kd_value = torch.zeros((), dtype=torch.float32, device=hidden.device)
    else:
        kd_value = (torch.where(selected, kd, 0.0) * weights).sum() / total * temperature**2
    return {"loss": alpha * kd_value + (1.0 - alpha) * ce_value, "kd": kd_value, "ce": ce_value}
