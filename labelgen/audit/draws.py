"""The draw test: are the stored random-sampling labels draws from the teacher's distribution?

At each audited position the stored draws (N per position: unique ids and counts) are
put into classes by the re-scored teacher's rank of the drawn id: one class per rank
0..J-1, one for the ranks J..K'-1 the reference returned, and one for every other id
(the "rest", whose probability is 1 minus the returned mass). Per position t the classes
have probabilities pi_t (from the teacher at the draw temperature) and observed counts
o_t, multinomial(N, pi_t) if the draws are genuine.

Positions differ, so the class totals O = sum_t o_t are a sum of independent multinomials:
mean E = N sum_t pi_t, covariance S = N sum_t (diag(pi_t) - pi_t pi_t^T). The statistic
X^2 = (O - E)^T S^+ (O - E) (S^+ the pseudo-inverse; S has rank C - 1 since every o_t
sums to N) is chi-square with rank(S) degrees of freedom as the positions grow (central
limit theorem over positions, so small expected counts per position do not matter).
Pooling with Pearson's diag(E) instead would be conservative; this uses the exact
covariance. The audit fails when the p-value is below
:data:`labelgen.audit.tolerances.DRAW_P_VALUE`; a draw of a class with (numerically) no
probability fails outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["DrawTest", "draw_classes", "pooled_test", "chi2_sf"]

RANK_CLASSES = 8
"""Ranks with a class of their own (the rest of the returned ranks share one)."""
_EMPTY = 1e-12
"""Expected class count below which a class counts as impossible."""


@dataclass(frozen=True)
class DrawTest:
    """The pooled test over every audited position."""

    positions: int
    draws: int
    """Draws per position (N)."""
    statistic: float
    df: int
    p_value: float
    observed: list[float]
    expected: list[float]
    reason: str | None = None
    """Why it failed outright (an impossible draw), None otherwise."""


def draw_classes(
    ref_ids: np.ndarray,
    class_probs: np.ndarray,
    draw_num: np.ndarray,
    draw_ids: np.ndarray,
    draw_counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-position class counts and probabilities of one sequence's stored draws.

    Args:
        ref_ids: (P, K') the reference's ids by rank.
        class_probs: (P, K') their probabilities at the draw temperature.
        draw_num: (P,) unique ids drawn per position; draw_ids / draw_counts: (sum draw_num,).

    Returns:
        (observed (P, C), probs (P, C)) with C = min(K', RANK_CLASSES) + 2 classes (the last
        two: the other returned ranks, everything else).
    """
    p, kk = ref_ids.shape
    j = min(kk, RANK_CLASSES)
    c = j + 2
    rank_class = np.minimum(np.arange(kk), j)  # ranks >= j share class j
    probs = np.zeros((p, c))
    np.add.at(probs, (np.arange(p)[:, None], np.broadcast_to(rank_class, (p, kk))), class_probs)
    probs[:, c - 1] = np.clip(1.0 - probs[:, : c - 1].sum(axis=1), 0.0, 1.0)
    observed = np.zeros((p, c))
    rows = np.repeat(np.arange(p), draw_num.astype(np.int64))
    # rank of each drawn id among the reference's ids at its position (-1: not returned)
    match = ref_ids[rows] == draw_ids[:, None]
    rank = np.where(match.any(axis=1), match.argmax(axis=1), -1)
    cls = np.where(rank >= 0, rank_class[np.maximum(rank, 0)], c - 1)
    np.add.at(observed, (rows, cls), draw_counts.astype(np.float64))
    return observed, probs


def pooled_test(observed: np.ndarray, probs: np.ndarray, n: int) -> DrawTest:
    """The pooled test (module docstring) of (P, C) observed counts against (P, C) probabilities.

    Args:
        observed: (P, C) class counts per position, each row summing to ``n``.
        probs: (P, C) class probabilities per position, each row summing to 1.
        n: draws per position.
    """
    positions = int(observed.shape[0])
    o_tot = observed.sum(axis=0)
    e_tot = n * probs.sum(axis=0)
    impossible = (e_tot < _EMPTY) & (o_tot > 0)
    if impossible.any():
        c = int(np.argmax(impossible))
        return DrawTest(
            positions,
            n,
            math.inf,
            0,
            0.0,
            o_tot.tolist(),
            e_tot.tolist(),
            f"{int(o_tot[c])} draw(s) fell in rank class {c}, where the teacher puts no probability",
        )
    cov = n * (np.diag(probs.sum(axis=0)) - probs.T @ probs)
    values, vectors = np.linalg.eigh(cov)
    keep = values > max(values.max(initial=0.0), 1.0) * 1e-10
    df = int(keep.sum())
    if df == 0:
        return DrawTest(positions, n, 0.0, 0, 1.0, o_tot.tolist(), e_tot.tolist())
    z = vectors[:, keep].T @ (o_tot - e_tot)
    statistic = float((z**2 / values[keep]).sum())
    return DrawTest(positions, n, statistic, df, chi2_sf(statistic, df), o_tot.tolist(), e_tot.tolist())


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square with ``df`` degrees of freedom (regularised upper gamma)."""
    if x <= 0:
        return 1.0
    return _gamma_q(df / 2.0, x / 2.0)


def _gamma_q(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x): a series below a + 1, a continued fraction
    (modified Lentz) above."""
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        denom = a
        for _ in range(100_000):
            denom += 1.0
            term *= x / denom
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(log_front) * h)
