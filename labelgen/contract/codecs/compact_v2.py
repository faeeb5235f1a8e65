"""The ``compact-v2`` top-k codec: id gaps as a head byte plus packed low bits, sqrt(p) in
uniform-KL levels, float16 log tail mass; one binary value per row (docs/FORMAT.md has the
byte layout and the measurements behind each choice)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from labelgen.contract.codecs.base import Codec, binary_parts, check_positions, offsets_of
from labelgen.contract.errors import FormatError

__all__ = ["CompactV2Codec", "CODEC", "KL_BUDGET", "sqrt_step", "encode_columns", "decode_columns"]

ID_HEAD = "topk_v2_id_head"  # binary [(T-1) * k] bytes: 8 * (bit length - 1) + next 3 bits
ID_BITS = "topk_v2_id_bits"  # binary: each id gap's remaining low bits, MSB first
SQRT_Q = "topk_v2_sqrt_q"  # binary [(T-1) * k] bytes: round(sqrt(p) / step), id order
TAIL = "topk_v2_tail"  # binary [2 * (T-1)] bytes: float16 log tail mass, byte planes split

# Mean KL(exact || stored) per position that compact-v2's value step aims at (the contract
# asks for <= 1e-3). Quantising u = sqrt(p) with step d costs about 2 * d**2 / 12 nats per
# entry whatever p is (sqrt is the map under which the KL is locally uniform), so k entries
# cost about k * d**2 / 6 and the step follows from k alone.
KL_BUDGET = 5e-4
_ZERO = 0.25  # level 0 (p < step**2 / 4) decodes to sqrt(p) = _ZERO * step
# Decoding tables over the 256 id head bytes h = 8 * c + m (c = bit length - 1 of the gap,
# m = up to 3 bits after its leading 1): low bits that follow, the gap without them, validity.
_HEAD_C = np.arange(256) >> 3
_HEAD_NBITS = _HEAD_C - np.minimum(_HEAD_C, 3)
_HEAD_BASE = (np.int64(1) << _HEAD_C) | ((np.arange(256) & 7) << _HEAD_NBITS)
_HEAD_VALID = (_HEAD_C <= 30) & ((np.arange(256) & 7) >> np.minimum(_HEAD_C, 3) == 0)


def sqrt_step(k: int) -> float:
    """compact-v2 quantisation step of sqrt(p) for top-``k`` labels.

    ``sqrt(6 * KL_BUDGET / k)``, floored at 1/255 so that p = 1 still fits a byte (from
    k = 196 on; the expected KL then grows as ``k * 2.6e-6`` nats).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return max(float(np.sqrt(6.0 * KL_BUDGET / k)), 1.0 / 255.0)


def _binary(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A binary array whose row r is the uint8 bytes ``data[offsets[r]:offsets[r + 1]]``."""
    if offsets[-1] >= 2**31:
        raise ValueError(f"one batch of rows holds {offsets[-1]} bytes in a column; write < 2 GiB at once")
    data = np.ascontiguousarray(data, np.uint8)
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1, buffers)


def encode_columns(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, positions: np.ndarray
) -> dict[str, pa.Array]:
    """compact-v2 encoder: top-k labels of R rows → the codec's four binary columns.

    Args:
        topk_ids: (N, k) int, N = sum(positions); k distinct ids in [0, 2**31 - 1) per
            position, in any order (by rank, as produced).
        topk_logprobs: (N, k) float, their raw log-probs (temperature 1).
        positions: (R,) int, the label positions (T - 1) of each row.

    Returns:
        {column name: pa.BinaryArray with R values} (layout in docs/FORMAT.md).
    """
    ids = np.asarray(topk_ids)
    lps = np.asarray(topk_logprobs, np.float64)
    positions = np.asarray(positions, np.int64).reshape(-1)
    if ids.ndim != 2 or ids.shape != lps.shape:
        raise ValueError(f"topk_ids and topk_logprobs must both be (N, k), got {ids.shape} and {lps.shape}")
    n, k = ids.shape
    if (positions < 0).any() or positions.sum() != n:
        total = positions.sum()
        raise ValueError(f"positions must be >= 0 and sum to N = {n}, got {len(positions)} rows, sum {total}")
    if np.isnan(lps).any():
        raise ValueError("topk_logprobs contain NaN")
    if n and (ids.min() < 0 or ids.max() >= 2**31 - 1):
        raise ValueError(f"top-k ids must lie in [0, 2**31 - 1), got {ids.min()}..{ids.max()}")
    order = np.argsort(ids, axis=1, kind="stable")
    gaps = np.diff(np.take_along_axis(ids.astype(np.int64), order, 1), axis=1, prepend=-1)  # (N, k)
    if n and gaps.min() < 1:
        raise ValueError("top-k ids repeat within a position; each position needs k distinct ids")
    # A gap's head byte holds its bit length - 1 (c) and up to 3 bits after its leading 1;
    # its c - min(c, 3) lowest bits go to the bit stream, each row's back to back, MSB
    # first, zero-padded to a whole byte.
    cls = (np.frexp(gaps.astype(np.float64))[1] - 1).astype(np.int64).ravel()  # floor(log2(gap)), exact
    head_bits = np.minimum(cls, 3)
    nbits = cls - head_bits
    gaps = gaps.ravel()
    head = (cls << 3) | ((gaps >> nbits) & ((1 << head_bits) - 1))
    mant = (gaps & ((np.int64(1) << nbits) - 1)).astype(np.uint64)  # the lowest nbits bits
    field_rows = offsets_of(positions * k)
    bit_sum = np.concatenate([[0], np.cumsum(nbits)])
    byte_offsets = offsets_of((bit_sum[field_rows[1:]] - bit_sum[field_rows[:-1]] + 7) // 8)
    start = bit_sum[:-1] + np.repeat(8 * byte_offsets[:-1] - bit_sum[field_rows[:-1]], positions * k)
    some = nbits > 0  # only these fields have bits in the stream
    start, nbits, mant = start[some], nbits[some], mant[some]
    window = mant << (64 - nbits - (start & 31)).astype(np.uint64)  # field placed in a 64-bit window
    n_words = int(byte_offsets[-1]) // 4 + 2
    word = start >> 5  # fields never overlap, so adding their parts (exact in float64) ORs them
    words = np.bincount(word, (window >> np.uint64(32)).astype(np.float64), n_words)
    words += np.bincount(word + 1, (window & np.uint64(0xFFFFFFFF)).astype(np.float64), n_words)
    stream = words.astype(np.uint32).astype(">u4").view(np.uint8)[: byte_offsets[-1]]
    # Values in the same (id) order: sqrt(p) in steps of sqrt_step(k).
    u = np.exp(np.take_along_axis(lps, order, 1) / 2)
    levels = np.clip(np.rint(u / sqrt_step(k)), 0, 254).astype(np.uint8)
    # The top-1 (the first in id order among exact ties) gets a level of its own, one step
    # up where a smaller entry shares it, so the decoded argmax is the teacher's; ranks
    # below it follow the levels, ties in id order.
    top = np.argmax(u, axis=1)[:, None]
    top_level = np.take_along_axis(levels, top, 1)
    shared = ((levels == top_level) & (u < np.take_along_axis(u, top, 1))).any(axis=1, keepdims=True)
    np.put_along_axis(levels, top, top_level + shared, 1)
    levels = levels.ravel()
    # Tail: float16 log of the mass outside the top-k; per row all low bytes, then all high.
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - np.exp(lps).sum(axis=1), 0.0, 1.0)).astype("<f2").view(np.uint8)
    pos_rows = np.repeat(np.arange(len(positions)), positions)
    pos_starts = offsets_of(positions)
    dest = 2 * pos_starts[pos_rows] + (np.arange(n) - pos_starts[pos_rows])
    planes = np.empty(2 * n, np.uint8)
    planes[dest], planes[dest + positions[pos_rows]] = tail[0::2], tail[1::2]
    return {
        ID_HEAD: _binary(head.astype(np.uint8), field_rows),
        ID_BITS: _binary(stream, byte_offsets),
        SQRT_Q: _binary(levels, field_rows),
        TAIL: _binary(planes, 2 * pos_starts),
    }


def decode_columns(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    """compact-v2 decoder: a table with the codec's columns → (N, k) int32 ids and float32
    log-probs by rank (N = label positions of all rows, in order).

    The first rank is the teacher's top-1; the others follow the decoded values, and
    entries whose values share a level keep id order. The top-k is rescaled so that its
    mass plus the stored tail mass is 1.

    Raises:
        FormatError: the columns disagree on a row's label positions (or with k), a head
            byte or bit stream is malformed, or an id leaves [0, 2**31 - 1).
    """
    positions = check_positions(table, CompactV2Codec.name, k, {ID_HEAD: k, SQRT_Q: k, TAIL: 2})
    head_data, field_rows = binary_parts(table, ID_HEAD)
    lev_data, lev_rows = binary_parts(table, SQRT_Q)
    bit_data, byte_offsets = binary_parts(table, ID_BITS)
    tail_data, tail_rows = binary_parts(table, TAIL)
    # Per head byte (lookup tables): its gap's leading bits and how many low bits follow.
    head = head_data[field_rows[0] : field_rows[-1]]
    if head.size and not _HEAD_VALID[head].all():
        raise FormatError("compact-v2 id head bytes out of range: the shard is corrupt")
    nbits = _HEAD_NBITS[head]
    n = int(positions.sum())
    bit_sum = np.concatenate([[0], np.cumsum(nbits)])
    field_rows = field_rows - field_rows[0]
    row_bits = bit_sum[field_rows]
    if not np.array_equal((row_bits[1:] - row_bits[:-1] + 7) // 8, np.diff(byte_offsets)):
        raise FormatError("compact-v2 id bit streams do not match their head bytes: the shard is corrupt")
    start = bit_sum[:-1] + np.repeat(8 * byte_offsets[:-1] - row_bits[:-1], positions * k)  # absolute bit
    padded = np.zeros(((len(bit_data) + 3) // 4 + 2) * 4, np.uint8)
    padded[: len(bit_data)] = bit_data
    words = padded.view(">u4").astype(np.uint64)
    word = start >> 5
    window = (words[word] << np.uint64(32)) | words[word + 1]
    low = ((window << (start & 31).astype(np.uint64)) >> np.uint64(1)) >> (63 - nbits).astype(np.uint64)
    gaps = (_HEAD_BASE[head] | low.astype(np.int64)).reshape(n, k)
    ids64 = np.cumsum(gaps, axis=1) - 1  # gaps are >= 1: ascending, distinct, >= 0
    if ids64.size and ids64.max() >= 2**31 - 1:
        raise FormatError("compact-v2 id gaps sum past 2**31 - 1: the shard is corrupt")
    ids = ids64.astype(np.int32)
    levels = lev_data[lev_rows[0] : lev_rows[-1]].reshape(n, k)
    step = sqrt_step(k)
    level_lps = 2.0 * np.log(np.maximum(np.arange(256), _ZERO) * step)  # (256,) log-prob per level
    pos_rows = np.repeat(np.arange(len(positions)), positions)
    lo = tail_rows[pos_rows] + (np.arange(n) - offsets_of(positions)[pos_rows])
    hi = lo + positions[pos_rows]
    tail = (tail_data[lo].astype(np.uint16) | (tail_data[hi].astype(np.uint16) << 8)).view("<f2")
    kept = np.log(np.exp(level_lps)[levels].sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # any float16 tail decodes
        target = np.log1p(-np.exp(tail.astype(np.float64)))
    shift = np.where(np.isfinite(target), target - kept, 0.0).astype(np.float32)[:, None]
    lps = level_lps.astype(np.float32)[levels] + shift
    order = np.argsort(255 - levels, axis=1, kind="stable")  # descending level; ties in id order
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)


class CompactV2Codec(Codec):
    """Four binary columns per row: id head bytes, id low bits, sqrt(p) levels, float16 tails."""

    name = "compact-v2"
    columns = (ID_HEAD, ID_BITS, SQRT_Q, TAIL)
    k_column = ID_HEAD
    lossless = False
    summary = "id gaps as head byte + raw low bits, sqrt(p) levels (mean KL ~5e-4), float16 tail"

    def value_bound(self, k: int) -> tuple[str, float]:
        # One sqrt(p) level, plus half a level for the renormalisation to the stored tail.
        return "sqrt_p", 1.5 * sqrt_step(k)

    def value_bound_text(self) -> str:
        return "1.5 x sqrt_step(k) in sqrt(p) (one level + half for renormalisation)"

    def fields(self) -> list[pa.Field]:
        return [pa.field(name, pa.binary(), nullable=False) for name in self.columns]

    def encode(
        self, topk_ids: np.ndarray, topk_logprobs: np.ndarray, positions: np.ndarray
    ) -> dict[str, pa.Array]:
        return encode_columns(topk_ids, topk_logprobs, positions)

    def decode(self, table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
        return decode_columns(table, k)


CODEC = CompactV2Codec()
