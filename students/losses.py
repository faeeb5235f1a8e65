"""KD losses over stored top-k teacher labels, with the tail bucket.

The teacher's stored top-k log-probs define a distribution over k+1 categories: the
k stored tokens plus one *tail* bucket holding the rest of the vocabulary, whose
mass ``1 - sum(exp(topk))`` is exact because the values are raw (temperature 1).
The student's distribution is projected onto the same k+1 categories (its tail is
a log-sum-exp over every logit outside the teacher's top-k), so the KL is an exact
KL between two (k+1)-category distributions. Without the tail term, truncated
top-k "KL" is biased and can be clamped to zero for peaked teachers.

Temperature T: both distributions are softened as ``p^(1/T)`` renormalised over the
k+1 categories (the tail treated as one category); the loss is scaled by T² so its
gradient scale does not shrink with T (Hinton et al.).

Shapes: N label positions, V student vocabulary, K stored top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "teacher_bucket_logprobs",
    "student_bucket_logprobs",
    "bucket_kl",
    "topk_forward_kl",
    "masked_cross_entropy",
    "sampled_kd",
]

_NEG_INF = float("-inf")


def teacher_bucket_logprobs(
    topk_logprobs: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Teacher log-probs over k+1 buckets (top-k, then tail), softened by ``temperature``.

    Args:
        topk_logprobs: (N, K) raw teacher log-probs.
        valid: (N, K) bool; False entries (ids the student vocabulary lacks) go to the tail.
        temperature: T > 0.

    Returns:
        (N, K+1) log-probs, rows sum to 1 in probability space.
    """
    lp = topk_logprobs.float().masked_fill(~valid, _NEG_INF)
    kept = torch.logsumexp(lp, dim=-1, keepdim=True)  # log of stored (valid) mass
    # Quantised labels can round the stored mass above 1: renormalise (tail then empty).
    lp = lp - kept.clamp(min=0.0)
    kept = kept.clamp(max=0.0)
    # log(1 - exp(kept)), stable; clamp so a mass that rounds to >= 1 gives an empty tail.
    tail = torch.log1p(-kept.clamp(max=-1e-12).exp()).clamp(min=-1e4)
    tail = torch.where(kept >= -1e-7, torch.full_like(tail, _NEG_INF), tail)
    buckets = torch.cat([lp, tail], dim=-1)
    if temperature != 1.0:
        buckets = torch.log_softmax(buckets / temperature, dim=-1)
    return buckets


def student_bucket_logprobs(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Student log-probs over the teacher's k+1 buckets at temperature ``temperature``.

    Args:
        student_logits: (N, V) logits.
        topk_ids: (N, K) teacher top-k ids (int64); invalid ones are ignored.
        valid: (N, K) bool.
        temperature: T > 0.

    Returns:
        (N, K+1) log-probs: log q(id_i) for each stored id, then log q(tail).
    """
    logits = student_logits.float() / temperature
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    safe_ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids))
    top = logits.gather(-1, safe_ids) - log_z
    top = top.masked_fill(~valid, _NEG_INF)
    # Tail: log-sum-exp over the logits outside the (valid) top-k set.
    # (scatter_add, not scatter: invalid entries all point at id 0 and must not clobber it)
    hits = torch.zeros_like(logits).scatter_add_(-1, safe_ids, valid.to(logits.dtype))
    tail = torch.logsumexp(logits.masked_fill(hits > 0, _NEG_INF), dim=-1, keepdim=True) - log_z
    return torch.cat([top, tail], dim=-1)


def _drop_impossible_tail(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Where the top-k covers the student's whole vocabulary there is no tail: the teacher's
    tail is then float32 rounding of ``1 - sum(p)``; drop it and renormalise. (N, K+1)."""
    no_tail = torch.isneginf(log_q[:, -1:])
    tail = log_p[:, -1:].masked_fill(no_tail, _NEG_INF)
    return torch.log_softmax(torch.cat([log_p[:, :-1], tail], dim=-1), dim=-1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (N,) values over mask (N,); zero (with a graph) when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def bucket_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position KL(teacher || student) over the stored top-k plus the tail bucket.

    Args:
        student_logits: (N, V) student logits at the label positions.
        topk_ids: (N, K) teacher top-k ids.
        topk_logprobs: (N, K) raw teacher log-probs (temperature 1).
        temperature: softening T applied to both sides (no T² here).

    Returns:
        (N,) sum_b p_b (log p_b - log q_b) over the K+1 buckets.
    """
    topk_ids = topk_ids.long()
    valid = topk_ids < student_logits.shape[-1]
    log_p = teacher_bucket_logprobs(topk_logprobs, valid, temperature)
    log_q = student_bucket_logprobs(student_logits, topk_ids, valid, temperature)
    log_p = _drop_impossible_tail(log_p, log_q)
    p = log_p.exp()
    # Buckets with p == 0 contribute nothing (and must not produce 0 * inf = nan).
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def topk_forward_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Forward KL(teacher || student) over the stored top-k plus the tail bucket, × T².

    Args:
        student_logits: (N, V) student logits at the label positions.
        topk_ids: (N, K) teacher top-k ids.
        topk_logprobs: (N, K) raw teacher log-probs (temperature 1).
        mask: (N,) 1 for positions that count (training targets), 0 otherwise.
        temperature: softening T applied to both sides.

    Returns:
        Scalar: mean over masked positions of the bucket KL, times T². Zero when the
        mask selects nothing.
    """
    kl = bucket_kl(student_logits, topk_ids, topk_logprobs, temperature)
    return _masked_mean(kl, mask) * temperature**2


def masked_cross_entropy(
    student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Hard-label CE on the real next tokens.

    Args:
        student_logits: (N, V).
        targets: (N,) next-token ids.
        mask: (N,) 1 where the position counts.

    Returns:
        Scalar mean CE over masked positions (zero when none).
    """
    ce = F.cross_entropy(student_logits.float(), targets.long(), reduction="none")
    return _masked_mean(ce, mask)


def sampled_kd(
    student_logits: torch.Tensor,
    draw_ids: torch.Tensor,
    draw_counts: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Random-sampling KD (Sparse Logit Sampling): cross-entropy to the teacher's draws.

    The teacher's distribution at the draw temperature T is estimated by N draws per
    position, p̂(i) = count_i / N, with E[p̂] = p_T. The loss ``-Σ p̂(i) log q_T(i)`` is
    linear in p̂, so its expectation is exactly the full-vocabulary cross-entropy
    ``H(p_T, q_T) = KL(p_T || q_T) + H(p_T)``; H(p_T) does not depend on the student, so
    the gradient is an unbiased estimate of the full KL gradient. Multiplied by T².

    Args:
        student_logits: (N, V).
        draw_ids: (N, U) unique drawn ids per position (padding: any id with count 0).
        draw_counts: (N, U) how often each was drawn (0 = padding).
        mask: (N,) 1 where the position counts.
        temperature: the draw temperature (apply the same T to the student).

    Returns:
        Scalar mean over masked positions; zero when none is selected.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = draw_ids.long().clamp(max=student_logits.shape[-1] - 1)
    counts = draw_counts.float() * (draw_ids < student_logits.shape[-1])
    weights = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
    ce = -(weights * log_q.gather(-1, ids)).sum(-1)
    return _masked_mean(ce, mask) * temperature**2
