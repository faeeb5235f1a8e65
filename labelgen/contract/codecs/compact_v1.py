"""The ``compact-v1`` top-k codec: ids gap-coded in id order, log-probs in 1/16-nat levels,
and the exact log of the tail mass (byte layout in docs/FORMAT.md)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from labelgen.contract.codecs.base import Codec, check_positions, flat_field, list_array, list_values
from labelgen.contract.errors import FormatError

__all__ = ["CompactV1Codec", "CODEC", "STEP", "encode_arrays", "decode_arrays"]

STEP = 1.0 / 16.0
"""Nats per quantisation level of the log-probs (255 levels)."""

ID_DELTAS = "topk_id_deltas"  # list<int32> [(T-1) * k]: ids ascending per position, as gaps
LOGPROB_Q = "topk_logprob_q"  # list<uint8> [(T-1) * k]: round(-logprob / STEP), same order
TAIL = "topk_tail_logprob"  # list<float32> [T-1]: exact log of the mass outside the top-k


def encode_arrays(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, k) ids/log-probs by rank → (id gaps int32 (N, k), levels uint8 (N, k), tail float32 (N,)).

    Per position the ids are sorted ascending and stored as gaps (the first one absolute);
    log-probs follow the same order as ``round(-lp / STEP)`` clipped to 255 (error at most
    STEP / 2 nats above -15.9). The exact log of the mass outside the top-k is kept as
    float32, so a peaked teacher's small tail survives quantisation.
    """
    order = np.argsort(topk_ids, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids.astype(np.int64), order, 1)
    gaps = np.diff(ids, axis=1, prepend=0).astype(np.int32)
    lps = np.take_along_axis(topk_logprobs.astype(np.float32), order, 1)
    q = np.clip(np.rint(-lps / STEP), 0, 255).astype(np.uint8)
    kept = np.exp(topk_logprobs.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - kept, 0.0, 1.0)).astype(np.float32)
    return gaps, q, tail


def decode_arrays(gaps: np.ndarray, q: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_arrays`: → (N, k) ids and log-probs by rank.

    The dequantised top-k mass is rescaled to ``1 - exp(tail)``, so the stored tail mass
    is exact.

    Raises:
        FormatError: a gap is negative or an id leaves [0, 2**31 - 1) (a corrupt shard).
    """
    ids64 = np.cumsum(gaps, axis=1, dtype=np.int64)
    if gaps.size and (gaps.min() < 0 or ids64.max() >= 2**31 - 1):
        raise FormatError(
            "compact-v1 id gaps are negative or sum past 2**31 - 1 (ids ascend from 0 per position): "
            "the shard is corrupt"
        )
    ids = ids64.astype(np.int32)
    lps = q.astype(np.float64) * -STEP
    kept = np.log(np.exp(lps).sum(axis=1, keepdims=True))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # any float32 tail decodes
        target = np.log1p(-np.exp(tail.astype(np.float64)))[:, None]
    lps = (lps + np.where(np.isfinite(target), target - kept, 0.0)).astype(np.float32)
    order = np.argsort(q, axis=1, kind="stable")  # ascending level = descending log-prob
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)


class CompactV1Codec(Codec):
    """Gap-coded ids, uint8 log-prob levels and a float32 tail per position."""

    name = "compact-v1"
    columns = (ID_DELTAS, LOGPROB_Q, TAIL)
    k_column = ID_DELTAS
    lossless = False
    summary = "ids gap-coded, log-probs in 1/16-nat uint8 levels, exact float32 tail"

    def value_bound(self, k: int) -> tuple[str, float]:
        # One level, plus half a level: renormalising the top-k to the stored tail mass moves
        # every entry when one level flips.
        return "nats", 1.5 * STEP

    def value_bound_text(self) -> str:
        return f"1.5 x {STEP} nats (one 1/16-nat level + half for renormalisation)"

    def fields(self) -> list[pa.Field]:
        return [
            flat_field(ID_DELTAS, pa.int32()),
            flat_field(LOGPROB_Q, pa.uint8()),
            flat_field(TAIL, pa.float32()),
        ]

    def column_encodings(self) -> dict[str, str]:
        return {f"{TAIL}.list.element": "BYTE_STREAM_SPLIT"}

    def encode(
        self, topk_ids: np.ndarray, topk_logprobs: np.ndarray, positions: np.ndarray
    ) -> dict[str, pa.Array]:
        k = topk_ids.shape[1]
        gaps, q, tail = encode_arrays(topk_ids, topk_logprobs)
        return {
            ID_DELTAS: list_array(gaps, positions, k, pa.int32()),
            LOGPROB_Q: list_array(q, positions, k, pa.uint8()),
            TAIL: list_array(tail, positions, 1, pa.float32()),
        }

    def decode(self, table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
        check_positions(table, self.name, k, {ID_DELTAS: k, LOGPROB_Q: k, TAIL: 1})
        gaps = list_values(table, ID_DELTAS).reshape(-1, k)
        levels = list_values(table, LOGPROB_Q).reshape(-1, k)
        return decode_arrays(gaps, levels, list_values(table, TAIL))


CODEC = CompactV1Codec()
