"""One stored sequence against its re-scored labels: top-k (up to ties), target, hidden states.

The tie rule: the stored top-k ids must be the teacher's top-k, except where the
teacher's own values make the k-th place a tie. A stored id outside the re-scored top-k
is accepted only if the teacher's log-prob of it is within tolerance of the k-th value,
and a re-scored top-k id missing from the stored ones only if its log-prob is within
tolerance of the k-th value; everything else is a wrong id. Values are compared id by id
(the order among near-equal values does not matter): exactly for a lossless codec; for
a lossy one against the re-scored top-k passed through the same codec
(:mod:`labelgen.audit.tolerances`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from labelgen.audit.draws import draw_classes
from labelgen.audit.reference import RefRow
from labelgen.audit.rows import StoredRow
from labelgen.audit.tolerances import Tolerance
from labelgen.contract.codecs import get_codec

__all__ = ["Failure", "RowResult", "compare_row", "CHECK_ORDER"]

CHECK_ORDER = ("integrity", "tokenizer", "teacher", "topk", "target", "hidden", "draws")
"""The report's checks, in the order a failure is looked for."""


@dataclass(frozen=True)
class Failure:
    check: str
    position: int | None
    """Label position (top-k, target) or token position (hidden); None: the whole row."""
    reason: str


@dataclass
class RowResult:
    """What one sequence's comparison found."""

    positions: int
    """Label positions compared."""
    failures: list[Failure] = field(default_factory=list)
    """At most one per check: its first bad position."""
    worst_topk: float = 0.0
    """Largest |stored - teacher| over compared top-k log-probs (nats)."""
    worst_target: float = 0.0
    worst_hidden: float | None = None
    """Largest relative error of a hidden vector; None without hidden states."""
    hidden_vectors: int = 0
    draw_observed: np.ndarray | None = None  # (P, C) draw class counts
    draw_probs: np.ndarray | None = None  # (P, C) their probabilities

    def first(self) -> Failure | None:
        """The failure at the earliest position (ties: :data:`CHECK_ORDER`)."""
        if not self.failures:
            return None
        return min(
            self.failures,
            key=lambda f: (f.position if f.position is not None else -1, CHECK_ORDER.index(f.check)),
        )


def _first_bad(excess: np.ndarray) -> int | None:
    """First index (row-major) where ``excess`` is over 1 or NaN, None if none."""
    bad = ~(excess <= 1.0)
    if not bad.any():
        return None
    return int(np.flatnonzero(bad.reshape(-1))[0])


def _lookup(ids: np.ndarray, top_ids: np.ndarray, top_lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found (P, n) bool, log-probs (P, n), NaN where not found) of ``ids`` among ``top_ids``."""
    match = ids[:, :, None] == top_ids[:, None, :]  # (P, n, K')
    found = match.any(axis=2)
    values = np.where(found, np.take_along_axis(top_lps, match.argmax(axis=2), 1), np.nan)
    return found, values


def _through_codec(codec_name: str, ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, k) re-scored top-k → the same encoded and decoded with the dataset's codec."""
    codec = get_codec(codec_name)
    if codec.lossless:
        return ids, lps
    columns = codec.encode(ids.astype(np.int32), lps.astype(np.float32), np.array([ids.shape[0]], np.int64))
    table = pa.table(columns)
    return codec.decode(table, ids.shape[1])


def compare_row(stored: StoredRow, ref: RefRow, tol: Tolerance, hidden_dtype: str = "float32") -> RowResult:
    """Compare ``stored`` with ``ref``; see the module docstring for the rules."""
    p, k = stored.topk_ids.shape
    result = RowResult(positions=p)
    if not stored.hash_ok:
        result.failures.append(Failure("integrity", None, "its token_hash is not the hash of its input_ids"))
    if ref.top_ids.shape[0] != p or len(stored.target_logprobs) != p:
        result.failures.append(
            Failure(
                "topk",
                None,
                f"it holds {p} label positions, its {len(stored.input_ids)} tokens give "
                f"{ref.top_ids.shape[0]}",
            )
        )
        result.positions = 0
        return result
    _topk(stored, ref, tol, result)
    _target(stored, ref, tol, result)
    if stored.hidden is not None:
        _hidden(stored, ref, tol, hidden_dtype, result)
    if stored.draw_num is not None and ref.draw_probs is not None:
        result.draw_observed, result.draw_probs = draw_classes(
            ref.top_ids, ref.draw_probs, stored.draw_num, stored.draw_ids, stored.draw_counts
        )
    return result


def _topk(stored: StoredRow, ref: RefRow, tol: Tolerance, result: RowResult) -> None:
    p, k = stored.topk_ids.shape
    ids = stored.topk_ids.astype(np.int64)
    ref_ids = ref.top_ids.astype(np.int64)
    kth = ref.top_logprobs[:, k - 1]  # (P,) the teacher's k-th value
    slack = tol.logprob(kth)
    if ref.stored_logprobs is not None:
        known, values = np.isfinite(ref.stored_logprobs), ref.stored_logprobs.astype(np.float64)
        values = np.where(known, values, -np.inf)
    else:
        known, values = _lookup(ids, ref_ids, ref.top_logprobs)
    in_top, _ = _lookup(ids, ref_ids[:, :k], ref.top_logprobs[:, :k])
    # a stored id outside the teacher's top-k: fine only where it ties with the k-th
    last = ref.top_logprobs[:, -1]
    unknown_tie = (~known) & (last >= kth - slack)[:, None]  # every returned rank ties: cannot tell
    outsider = ~in_top & ~unknown_tie & ~(values >= (kth - slack)[:, None])
    # a teacher top-k id not stored: fine only where it ties with the k-th
    stored_has, _ = _lookup(ref_ids[:, :k], ids, stored.topk_logprobs.astype(np.float64))
    missing = ~stored_has & (ref.top_logprobs[:, :k] > (kth + slack)[:, None])
    first_out = _first_bad(np.where(outsider, 2.0, 0.0))
    first_miss = _first_bad(np.where(missing, 2.0, 0.0))
    candidates = []
    if first_out is not None:
        t, r = divmod(first_out, k)
        value = "below the returned ranks" if not known[t, r] else f"{values[t, r]:.6f}"
        candidates.append(
            (
                t,
                f"stored top-k id {ids[t, r]} (rank {r}) is not the teacher's top-{k}: the teacher's "
                f"log-prob of it is {value}, its k-th is {kth[t]:.6f} (a tie needs them within "
                f"{slack[t]:.3g})",
            )
        )
    if first_miss is not None:
        t, r = divmod(first_miss, k)
        candidates.append(
            (
                t,
                f"the teacher's rank-{r} id {ref_ids[t, r]} (log-prob {ref.top_logprobs[t, r]:.6f}) is "
                f"missing from the stored top-k; the teacher's k-th is {kth[t]:.6f} (a tie needs them "
                f"within {slack[t]:.3g})",
            )
        )
    # values, id by id, where the teacher ranks the id in its top-k too
    dec_ids, dec_lps = _through_codec(tol.codec, ref_ids[:, :k], ref.top_logprobs[:, :k])
    if ref.stored_logprobs is not None and tol.codec_space == "nats" and tol.codec_level == 0.0:
        against, have = values, known
    else:
        have, against = _lookup(ids, dec_ids.astype(np.int64), dec_lps.astype(np.float64))
    stored_lps = stored.topk_logprobs.astype(np.float64)
    excess = np.where(have, tol.topk_excess(stored_lps, np.where(have, against, 0.0)), 0.0)
    excess = np.where(have & ~np.isfinite(stored_lps), np.inf, excess)
    diffs = np.abs(stored_lps - against)[have & np.isfinite(stored_lps)]
    result.worst_topk = float(diffs.max()) if diffs.size else 0.0
    bad = _first_bad(excess)
    if bad is not None:
        t, r = divmod(bad, k)
        candidates.append(
            (
                t,
                f"top-k log-prob of id {ids[t, r]} (rank {r}) is {stored_lps[t, r]:.6f}, the teacher's "
                f"{against[t, r]:.6f}{'' if tol.codec_level == 0 else ' after the codec'} "
                f"(|diff| {abs(stored_lps[t, r] - against[t, r]):.3g}, {excess[t, r]:.3g}x the allowed)",
            )
        )
    if candidates:
        t, reason = min(candidates, key=lambda c: c[0])
        result.failures.append(Failure("topk", t, reason))


def _target(stored: StoredRow, ref: RefRow, tol: Tolerance, result: RowResult) -> None:
    got = stored.target_logprobs.astype(np.float64)
    want = ref.target_logprobs.astype(np.float64)
    excess = np.abs(got - want) / tol.logprob(want)
    diffs = np.abs(got - want)
    result.worst_target = float(np.nanmax(diffs)) if diffs.size else 0.0
    bad = _first_bad(excess)
    if bad is not None:
        token = int(stored.input_ids[bad + 1])
        result.failures.append(
            Failure(
                "target",
                bad,
                f"target log-prob (of token {token}) is {got[bad]:.6f}, the teacher's {want[bad]:.6f} "
                f"(|diff| {abs(got[bad] - want[bad]):.3g}, allowed {tol.logprob(want[bad]):.3g})",
            )
        )


def _hidden(stored: StoredRow, ref: RefRow, tol: Tolerance, hidden_dtype: str, result: RowResult) -> None:
    assert stored.hidden is not None and stored.hidden_positions is not None
    positions = stored.hidden_positions
    if ref.hidden is None or ref.hidden_positions is None:
        result.failures.append(
            Failure("hidden", None, "the reference returned no hidden states for this row")
        )
        return
    if not np.array_equal(positions, ref.hidden_positions):
        result.failures.append(
            Failure(
                "hidden",
                int(positions[0]) if len(positions) else None,
                f"hidden states are stored at positions {positions[:6].tolist()}..., the teacher's job "
                f"samples {np.asarray(ref.hidden_positions)[:6].tolist()}...",
            )
        )
        return
    if len(positions) and (positions.max() >= len(stored.input_ids) or positions.min() < 0):
        result.failures.append(
            Failure("hidden", int(positions.max()), "a hidden-state position lies outside the sequence")
        )
        return
    allowed = tol.hidden(hidden_dtype)
    worst, first = 0.0, None
    for layer in sorted(stored.hidden):
        mine, theirs = stored.hidden[layer].astype(np.float64), ref.hidden.get(layer)
        if theirs is None or theirs.shape != mine.shape:
            shape = None if theirs is None else theirs.shape
            result.failures.append(
                Failure("hidden", None, f"layer {layer}: stored {mine.shape}, the teacher's {shape}")
            )
            return
        theirs = theirs.astype(np.float64)
        rel = np.linalg.norm(mine - theirs, axis=1) / np.maximum(np.linalg.norm(theirs, axis=1), 1e-12)
        rel = np.where(np.isfinite(rel), rel, np.inf)
        worst = max(worst, float(rel.max(initial=0.0)))
        bad = _first_bad(rel / allowed)
        if bad is not None and (first is None or positions[bad] < first[0]):
            first = (
                int(positions[bad]),
                f"layer {layer} at token position {int(positions[bad])}: relative error {rel[bad]:.3g} "
                f"(allowed {allowed:.3g})",
            )
        result.hidden_vectors += len(positions)
    result.worst_hidden = worst
    if first is not None:
        result.failures.append(Failure("hidden", first[0], "hidden state of " + first[1]))
