"""KD losses over stored top-k teacher labels (with the tail bucket) and dense logits.

The teacher's stored top-k log-probs define a distribution over k+1 categories: the
k stored tokens plus one *tail* bucket holding the rest of the vocabulary, whose
mass ``1 - sum(exp(topk))`` is exact because the values are raw (temperature 1).
The student's distribution is projected onto the same k+1 categories (its tail is
a log-sum-exp over every logit outside the teacher's top-k), so every divergence here
is an exact divergence between two (k+1)-category distributions. Without the tail
term, truncated top-k "KL" is biased and can be clamped to zero for peaked teachers.

Temperature T: both distributions are bucketed at T=1 and then softened as ``p^(1/T)``
renormalised over the k+1 categories, the tail treated as one category on *both* sides
(the teacher's softened tail is unknown: only its total mass is stored). Treating the
two sides alike keeps "student = teacher" the minimum (zero loss, zero gradient) at any
T; softening the student over the full vocabulary before bucketing would not. With K = V
this is exactly the dense ``softmax(z/T)``. The ``*_loss`` functions multiply by T² so
the gradient scale does not shrink with T (Hinton et al.); the per-position
``*_divergence`` functions do not.

Divergences (``KD_KINDS``; p = teacher, q = student; formulas in docs/LOSSES.md):
``forward_kl`` KL(p‖q), ``reverse_kl`` KL(q‖p), ``jsd`` generalized JSD(beta) as in GKD
and TRL (beta weights the teacher; beta=0 is forward KL, beta=1 reverse KL),
``skew_kl`` KL(p‖skew·p + (1-skew)·q) and ``skew_reverse_kl`` KL(q‖(1-skew)·p + skew·q)
(DistiLLM), ``tvd`` ½Σ|p - q|.

Numerics: all math in float32 whatever the input dtype; 0·log 0 = 0; a category that
the *reference* side of a log ratio gives exactly zero mass (an empty teacher tail, a
-inf logit) counts as mass eps(float32) ≈ 1.2e-7, the resolution of ``1 - Σp``, so
mode-seeking divergences stay finite. Gradients are finite for finite logits, with
masked positions and with ids outside the student's vocabulary (their mass goes to the
tail).

Shapes: N label positions, V student vocabulary, K stored top-k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from students.loss_kinds import DIVERGENCES

__all__ = [
    "KD_KINDS",
    "check_kd_args",
    "teacher_bucket_logprobs",
    "student_bucket_logprobs",
    "bucket_logprobs",
    "categorical_divergence",
    "bucket_divergence",
    "dense_divergence",
    "kd_loss",
    "dense_kd_loss",
    "multi_teacher_kd",
    "bucket_kl",
    "topk_forward_kl",
    "masked_cross_entropy",
    "sampled_cross_entropy",
    "sampled_kd",
]

KD_KINDS = DIVERGENCES
"""The divergences ``kind`` may name (``sampled`` KD is the separate ``sampled_kd``);
defined in :mod:`students.loss_kinds`."""

_NEG_INF = float("-inf")
# A finite stand-in for log 0: exp() of it is exactly 0 in float32, and unlike -inf it
# keeps 0 * inf (and so nan) out of both the values and the gradients.
_ZERO_LOG = -1e4
# Log-mass given to a zero-mass category on the reference side of a log ratio.
_LOG_FLOOR = math.log(torch.finfo(torch.float32).eps)


def check_kd_args(kind: str, temperature: float = 1.0, beta: float = 0.5, skew: float = 0.1) -> None:
    """Raise ValueError naming the bad argument (unknown kind, T <= 0, beta or skew out of range)."""
    if kind not in KD_KINDS:
        raise ValueError(f"unknown KD loss kind {kind!r}; valid kinds: {', '.join(KD_KINDS)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (jsd mixture weight) must be in [0, 1], got {beta}")
    if not 0.0 <= skew < 1.0:
        raise ValueError(f"skew (skew KL mixing weight) must be in [0, 1), got {skew}")


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
    """Student log-probs over the teacher's k+1 buckets, softened by ``temperature``.

    The buckets are formed at T=1 and then softened as ``q^(1/T)`` renormalised over the
    k+1 buckets, exactly like ``teacher_bucket_logprobs`` (see the module docstring).

    Args:
        student_logits: (N, V) logits.
        topk_ids: (N, K) teacher top-k ids (int64); invalid ones are ignored.
        valid: (N, K) bool.
        temperature: T > 0.

    Returns:
        (N, K+1) log-probs: log q(id_i) for each stored id, then log q(tail).
    """
    logits = student_logits.float()
    log_z = torch.logsumexp(logits, dim=-1, keepdim=True)
    safe_ids = torch.where(valid, topk_ids, torch.zeros_like(topk_ids))
    top = logits.gather(-1, safe_ids) - log_z
    top = top.masked_fill(~valid, _NEG_INF)
    # Tail: log-sum-exp over the logits outside the (valid) top-k set.
    # (a max-reduce, not scatter: invalid entries all point at id 0 and must not clobber it;
    # uint8, not float: this is a full (N, V) tensor)
    hits = torch.zeros(logits.shape, dtype=torch.uint8, device=logits.device)
    hits.scatter_reduce_(-1, safe_ids, valid.to(torch.uint8), reduce="amax")
    tail = torch.logsumexp(logits.masked_fill(hits > 0, _NEG_INF), dim=-1, keepdim=True) - log_z
    buckets = torch.cat([top, tail], dim=-1)
    if temperature != 1.0:
        buckets = torch.log_softmax(buckets / temperature, dim=-1)
    return buckets


def _drop_impossible_tail(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Where the top-k covers the student's whole vocabulary there is no tail: the teacher's
    tail is then float32 rounding of ``1 - sum(p)``; drop it and renormalise. (N, K+1)."""
    no_tail = torch.isneginf(log_q[:, -1:])
    tail = log_p[:, -1:].masked_fill(no_tail, _NEG_INF)
    return torch.log_softmax(torch.cat([log_p[:, :-1], tail], dim=-1), dim=-1)


def _check_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> None:
    if student_logits.ndim != 2 or topk_ids.ndim != 2 or topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            "expected student_logits (N, V) and topk_ids, topk_logprobs (N, K); got "
            f"{tuple(student_logits.shape)}, {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}"
        )
    if topk_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"student_logits has {student_logits.shape[0]} positions but topk_ids has {topk_ids.shape[0]}"
        )


def bucket_logprobs(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probs over the same k+1 buckets, both softened by T.

    Ids outside ``[0, V)`` (padding, or a teacher vocabulary larger than the student's)
    are not categories of their own: their teacher mass goes to the tail bucket.

    Args:
        student_logits: (N, V) student logits at the label positions (any float dtype).
        topk_ids: (N, K) teacher top-k ids.
        topk_logprobs: (N, K) raw teacher log-probs (temperature 1).
        temperature: T > 0.

    Returns:
        (log_p, log_q), each (N, K+1) float32: teacher, student; -inf marks an empty bucket.
    """
    _check_topk(student_logits, topk_ids, topk_logprobs)
    topk_ids = topk_ids.long()
    valid = (topk_ids >= 0) & (topk_ids < student_logits.shape[-1])
    log_p = teacher_bucket_logprobs(topk_logprobs, valid, temperature)
    log_q = student_bucket_logprobs(student_logits, topk_ids, valid, temperature)
    return _drop_impossible_tail(log_p, log_q), log_q


def _sanitize(log_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(finite log-probs with zeros at ``_ZERO_LOG``, bool zero-mass flags), same shape."""
    zero = log_x <= _ZERO_LOG
    return torch.where(zero, _ZERO_LOG, log_x), zero


def _kl(log_a: torch.Tensor, a_zero: torch.Tensor, log_b: torch.Tensor, b_zero: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ a (log a - log b) over the last dim, from sanitised log-probs; (...,)."""
    log_b = torch.where(b_zero, _LOG_FLOOR, log_b)
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(a_zero, 0.0, terms).sum(-1)


def _log_mix(w_a: float, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """log(w_a·a + (1-w_a)·b) for 0 < w_a < 1, from sanitised log-probs (stays finite)."""
    return torch.logaddexp(log_a + math.log(w_a), log_b + math.log1p(-w_a))


def categorical_divergence(
    kind: str, log_p: torch.Tensor, log_q: torch.Tensor, *, beta: float = 0.5, skew: float = 0.1
) -> torch.Tensor:
    """A divergence between teacher p and student q given as log-probs over the last dim.

    Args:
        kind: one of ``KD_KINDS``.
        log_p: (..., C) teacher log-probs (-inf allowed for zero mass).
        log_q: (..., C) student log-probs (-inf allowed for zero mass).
        beta: ``jsd`` only, the teacher's weight in the mixture m = beta·p + (1-beta)·q;
            JSD = beta·KL(p‖m) + (1-beta)·KL(q‖m); beta=0 gives KL(p‖q), beta=1 KL(q‖p)
            (TRL's convention: the limits of JSD(beta)/beta and JSD(beta)/(1-beta)).
        skew: ``skew_kl`` / ``skew_reverse_kl`` only, the mixing weight alpha of DistiLLM.

    Returns:
        (...,) float32 divergence per row; no temperature scaling.
    """
    check_kd_args(kind, 1.0, beta, skew)
    lp, p0 = _sanitize(log_p.float())
    lq, q0 = _sanitize(log_q.float())
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0) or (kind == "skew_kl" and skew == 0.0):
        return _kl(lp, p0, lq, q0)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0) or (kind == "skew_reverse_kl" and skew == 0.0):
        return _kl(lq, q0, lp, p0)
    m0 = p0 & q0
    if kind == "jsd":
        lm = _log_mix(beta, lp, lq)
        return beta * _kl(lp, p0, lm, m0) + (1.0 - beta) * _kl(lq, q0, lm, m0)
    if kind == "skew_kl":
        return _kl(lp, p0, _log_mix(skew, lp, lq), m0)
    if kind == "skew_reverse_kl":
        return _kl(lq, q0, _log_mix(1.0 - skew, lp, lq), m0)
    return 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)  # tvd


def bucket_divergence(
    kind: str,
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence between teacher and student over the stored top-k + tail.

    Args:
        kind: one of ``KD_KINDS``.
        student_logits: (N, V) student logits at the label positions.
        topk_ids: (N, K) teacher top-k ids.
        topk_logprobs: (N, K) raw teacher log-probs (temperature 1).
        temperature: softening T applied to both sides (no T² here).
        beta: ``jsd`` mixture weight of the teacher (see ``categorical_divergence``).
        skew: ``skew_kl`` / ``skew_reverse_kl`` mixing weight.

    Returns:
        (N,) float32 divergence over the K+1 buckets.
    """
    check_kd_args(kind, temperature, beta, skew)
    log_p, log_q = bucket_logprobs(student_logits, topk_ids, topk_logprobs, temperature)
    return categorical_divergence(kind, log_p, log_q, beta=beta, skew=skew)


def dense_divergence(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence between full-vocabulary teacher and student distributions.

    Args:
        kind: one of ``KD_KINDS``.
        student_logits: (N, V) student logits.
        teacher_logits: (N, V) teacher logits over the same vocabulary (-inf: impossible token).
        temperature: both sides are ``softmax(logits / T)`` (no T² here).
        beta, skew: as in ``bucket_divergence``.

    Returns:
        (N,) float32 divergence.
    """
    check_kd_args(kind, temperature, beta, skew)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (N, V)"
        )
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return categorical_divergence(kind, log_p, log_q, beta=beta, skew=skew)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (N,) values weighted by mask (N,) (bool or float weights); masked positions
    contribute nothing, even if their values are not finite; zero (with a graph) when the
    mask selects nothing."""
    if mask.shape != values.shape:
        raise ValueError(
            f"mask must have shape {tuple(values.shape)} (one per position), got {tuple(mask.shape)}"
        )
    weights = mask.to(values.dtype)
    picked = torch.where(weights != 0, values, torch.zeros_like(values))
    return (picked * weights).sum() / weights.sum().clamp(min=1.0)


def kd_loss(
    kind: str,
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """The KD term over stored top-k labels: masked mean of ``bucket_divergence`` × T².

    Args:
        kind: one of ``KD_KINDS``.
        student_logits: (N, V) student logits at the label positions.
        topk_ids: (N, K) teacher top-k ids.
        topk_logprobs: (N, K) raw teacher log-probs (temperature 1).
        mask: (N,) 1/True where the position counts (float weights allowed).
        temperature: softening T on both sides; the result is multiplied by T².
        beta: ``jsd`` mixture weight of the teacher.
        skew: ``skew_kl`` / ``skew_reverse_kl`` mixing weight.

    Returns:
        Scalar float32; zero (with a graph) when the mask selects nothing.
    """
    div = bucket_divergence(kind, student_logits, topk_ids, topk_logprobs, temperature, beta=beta, skew=skew)
    return _masked_mean(div, mask) * temperature**2


def dense_kd_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """The KD term against full teacher logits: masked mean of ``dense_divergence`` × T².

    Args:
        kind: one of ``KD_KINDS``.
        student_logits: (N, V).
        teacher_logits: (N, V).
        mask: (N,) 1/True where the position counts.
        temperature, beta, skew: as in ``kd_loss``.

    Returns:
        Scalar float32; zero (with a graph) when the mask selects nothing.
    """
    div = dense_divergence(kind, student_logits, teacher_logits, temperature, beta=beta, skew=skew)
    return _masked_mean(div, mask) * temperature**2


def multi_teacher_kd(
    kind: str,
    student_logits: torch.Tensor,
    teachers: Sequence[tuple[float, torch.Tensor, torch.Tensor]],
    mask: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> torch.Tensor:
    """Weighted multi-teacher KD: ``Σ_j w_j · kd_loss(kind, student, teacher_j)``, Σ w_j = 1.

    Each teacher keeps its own k+1 buckets (the teachers' top-k sets differ, so their
    distributions are not mixed into one); the loss is the weighted average of the
    per-teacher divergences. Weights are normalised to sum to 1, so one teacher of any
    weight gives exactly ``kd_loss``. All teachers must share the student's tokenizer.

    Args:
        kind: one of ``KD_KINDS``.
        student_logits: (N, V).
        teachers: non-empty list of ``(weight, topk_ids (N, K_j), topk_logprobs (N, K_j))``;
            weights finite, >= 0, not all 0; K_j may differ between teachers.
        mask: (N,) 1/True where the position counts.
        temperature, beta, skew: as in ``kd_loss``.

    Returns:
        Scalar float32 (× T²); zero (with a graph) when the mask selects nothing.
    """
    if not teachers:
        raise ValueError("multi_teacher_kd needs at least one (weight, topk_ids, topk_logprobs) teacher")
    weights = []
    for index, entry in enumerate(teachers):
        if len(entry) != 3:
            raise ValueError(
                f"teachers[{index}] must be (weight, topk_ids, topk_logprobs), got {len(entry)} items"
            )
        weight = float(entry[0])
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"teachers[{index}] weight must be finite and >= 0, got {entry[0]}")
        weights.append(weight)
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"teacher weights must not all be 0, got {weights}")
    div = torch.zeros(student_logits.shape[0], dtype=torch.float32, device=student_logits.device)
    for weight, (_, ids, lps) in zip(weights, teachers, strict=True):
        if weight > 0:
            one = bucket_divergence(kind, student_logits, ids, lps, temperature, beta=beta, skew=skew)
            div = div + (weight / total) * one
    return _masked_mean(div, mask) * temperature**2


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
    return bucket_divergence("forward_kl", student_logits, topk_ids, topk_logprobs, temperature)


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
    return kd_loss("forward_kl", student_logits, topk_ids, topk_logprobs, mask, temperature)


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


def sampled_cross_entropy(
    student_logits: torch.Tensor, draw_ids: torch.Tensor, draw_counts: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-position cross-entropy to the teacher's random draws, ``-Σ p̂(i) log q_T(i)``.

    Args:
        student_logits: (N, V).
        draw_ids: (N, U) unique drawn ids per position (padding: any id with count 0;
            ids outside the student's vocabulary are dropped).
        draw_counts: (N, U) how often each was drawn (0 = padding).
        temperature: the draw temperature (applied to the student; no T² here).

    Returns:
        (N,) float32; zero where a position has no draws.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    in_vocab = (draw_ids >= 0) & (draw_ids < student_logits.shape[-1])
    ids = torch.where(in_vocab, draw_ids.long(), 0)
    counts = draw_counts.float() * in_vocab
    weights = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
    return -(weights * log_q.gather(-1, ids)).sum(-1)


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
    ce = sampled_cross_entropy(student_logits, draw_ids, draw_counts, temperature)
    return _masked_mean(ce, mask) * temperature**2
