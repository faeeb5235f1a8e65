"""The label format: the one contract between the teacher side and the student side.

A label dataset is a directory (local path or any fsspec URL) holding::

    manifest.json                      written last; its presence means "complete"
    job-spec.yaml                      the resolved job spec that produced it
    shards/part-UUUUU-SSSSS.parquet    label shards (unit U, shard S), zero-padded
    hidden/part-UUUUU-SSSSS.parquet    hidden-state samples of the same rows (optional)
    _commits/part-UUUUU-SSSSS.json     one record per committed shard (for followers/resume)
    _commits/unit-UUUUU.json           one record per finished work unit

One Parquet row holds one token sequence of length T. Every column is a flat,
non-nullable list (never a list of lists): per-position arrays of width k are
flattened row-major and reshaped with numpy on read. (The compact-v2 top-k codec
stores its columns as one binary value per row instead; see docs/FORMAT.md.)

Position convention: label position t (0 <= t < T-1) holds the teacher's
distribution over token t+1 given tokens 0..t, so it lines up with a causal
student's logits at position t. (vLLM's ``prompt_logprobs`` entry t+1.)

Values are raw log-probabilities at temperature 1. The mass outside the stored
top-k is exact: ``1 - sum(exp(topk_logprobs))``.

This module imports only the standard library, numpy, pyarrow and fsspec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SPEC_NAME",
    "TOKENIZER_RECORD",
    "SHARDS_DIR",
    "COMMITS_DIR",
    "FormatError",
    "Columns",
    "label_schema",
    "CODECS",
    "COMPACT_STEP",
    "V2_KL_BUDGET",
    "v2_sqrt_step",
    "encode_topk",
    "encode_topk_v2",
    "decode_topk_v2",
    "encode_topk_columns",
    "decode_topk_table",
    "topk_column_names",
    "decode_topk",
    "hidden_schema",
    "HIDDEN_DIR",
    "shard_name",
    "ShardRecord",
    "UnitRecord",
    "Manifest",
    "token_hash",
    "tokenizer_fingerprint",
    "read_manifest",
    "check_format_version",
    "join_url",
    "list_fresh",
]

FORMAT_NAME = "labelgen"
FORMAT_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
SPEC_NAME = "job-spec.yaml"
TOKENIZER_RECORD = "tokenizer.json"  # under COMMITS_DIR: the job's tokenizer, before any shard
SHARDS_DIR = "shards"
HIDDEN_DIR = "hidden"
COMMITS_DIR = "_commits"


class FormatError(ValueError):
    """A label dataset is missing, incomplete, corrupt or of an unsupported version."""


class Columns:
    """Column names of a label shard, with their per-row lengths."""

    SAMPLE_ID = "sample_id"  # string: "<source>#<record>.<chunk>" of the sequence's first token
    TOKEN_HASH = "token_hash"  # uint64: token_hash(input_ids), to join other products safely
    NUM_TOKENS = "num_tokens"  # int32: T
    INPUT_IDS = "input_ids"  # list<int32> [T]
    LABEL_MASK = "label_mask"  # list<uint8> [T-1]: 1 where token t+1 is a training target
    TOPK_IDS = "topk_ids"  # list<int32> [(T-1) * k], sorted by rank per position
    TOPK_LOGPROBS = "topk_logprobs"  # list<float32> [(T-1) * k], descending per position
    TARGET_LOGPROBS = "target_logprobs"  # list<float32> [T-1]: log p(token t+1)
    # Compact top-k codec ("compact-v1") replaces TOPK_IDS / TOPK_LOGPROBS with:
    TOPK_ID_DELTAS = "topk_id_deltas"  # list<int32> [(T-1) * k]: ids ascending per position, gaps
    TOPK_LOGPROB_Q = "topk_logprob_q"  # list<uint8> [(T-1) * k]: round(-logprob / step), same order
    TOPK_TAIL = "topk_tail_logprob"  # list<float32> [T-1]: exact log of the mass outside the top-k
    # Compact top-k codec "compact-v2" (docs/FORMAT.md has the byte layout): one binary value per row.
    V2_ID_HEAD = "topk_v2_id_head"  # binary [(T-1) * k] bytes: 8 * (bit length - 1) + next 3 bits
    V2_ID_BITS = "topk_v2_id_bits"  # binary: each id gap's remaining low bits, MSB first
    V2_SQRT_Q = "topk_v2_sqrt_q"  # binary [(T-1) * k] bytes: round(sqrt(p) / step), id order
    V2_TAIL = "topk_v2_tail"  # binary [2 * (T-1)] bytes: float16 log tail mass, byte planes split
    # Random-sampling labels (product "draws"): per position t, DRAW_NUM[t] unique ids.
    DRAW_NUM = "draw_num"  # list<uint8> [T-1]
    DRAW_IDS = "draw_ids"  # list<int32> [sum draw_num], ascending per position
    DRAW_COUNTS = "draw_counts"  # list<uint8> [sum draw_num]: times each id was drawn
    # Hidden-state shards (product "hidden"), one row per sequence:
    HIDDEN_POSITIONS = "positions"  # list<int32> [P]: sampled token positions
    HIDDEN_LAYER = "layer_{}"  # binary: P x D little-endian float16/bfloat16/float32


def _flat(name: str, value: pa.DataType) -> pa.Field:
    return pa.field(name, pa.list_(pa.field("element", value, nullable=False)), nullable=False)


def hidden_schema(layers: Iterable[int]) -> pa.Schema:
    """Arrow schema of a hidden-state shard for the given layer ids."""
    return pa.schema(
        [
            pa.field(Columns.SAMPLE_ID, pa.string(), nullable=False),
            pa.field(Columns.TOKEN_HASH, pa.uint64(), nullable=False),
            _flat(Columns.HIDDEN_POSITIONS, pa.int32()),
            *[pa.field(Columns.HIDDEN_LAYER.format(i), pa.binary(), nullable=False) for i in layers],
        ],
        metadata={b"labelgen.format_version": FORMAT_VERSION.encode()},
    )


CODECS = ("plain", "compact-v1", "compact-v2")
COMPACT_STEP = 1.0 / 16.0  # nats per quantisation level of compact-v1 log-probs (255 levels)


def encode_topk(topk_ids: np.ndarray, topk_logprobs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """compact-v1: (n, k) ids/log-probs by rank → (id gaps int32, levels uint8, tail float32).

    Per position the ids are sorted ascending and stored as gaps (the first one absolute);
    log-probs follow the same order as ``round(-lp / COMPACT_STEP)`` clipped to 255 (error
    at most COMPACT_STEP / 2 nats above -15.9). The exact log of the mass outside the
    top-k is kept as float32, so a peaked teacher's small tail survives quantisation.
    """
    order = np.argsort(topk_ids, axis=1, kind="stable")
    ids = np.take_along_axis(topk_ids.astype(np.int64), order, 1)
    gaps = np.diff(ids, axis=1, prepend=0).astype(np.int32)
    lps = np.take_along_axis(topk_logprobs.astype(np.float32), order, 1)
    q = np.clip(np.rint(-lps / COMPACT_STEP), 0, 255).astype(np.uint8)
    kept = np.exp(topk_logprobs.astype(np.float64)).sum(axis=1)
    with np.errstate(divide="ignore"):
        tail = np.log(np.clip(1.0 - kept, 0.0, 1.0)).astype(np.float32)
    return gaps, q, tail


def decode_topk(gaps: np.ndarray, q: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_topk`: → (n, k) ids and log-probs by rank.

    The dequantised top-k mass is rescaled to ``1 - exp(tail)``, so the stored tail
    mass is exact.
    """
    ids = np.cumsum(gaps, axis=1, dtype=np.int64).astype(np.int32)
    lps = q.astype(np.float64) * -COMPACT_STEP
    kept = np.log(np.exp(lps).sum(axis=1, keepdims=True))
    with np.errstate(divide="ignore"):
        target = np.log1p(-np.exp(tail.astype(np.float64)))[:, None]
    lps = (lps + np.where(np.isfinite(target), target - kept, 0.0)).astype(np.float32)
    order = np.argsort(q, axis=1, kind="stable")  # ascending level = descending log-prob
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)


# -- compact-v2 ---------------------------------------------------------------------------
# Mean KL(exact || stored) per position that compact-v2's value step aims at (the contract
# asks for <= 1e-3). Quantising u = sqrt(p) with step d costs about 2 * d**2 / 12 nats per
# entry whatever p is (sqrt is the map under which the KL is locally uniform), so k entries
# cost about k * d**2 / 6 and the step follows from k alone.
V2_KL_BUDGET = 5e-4
_V2_ZERO = 0.25  # level 0 (p < step**2 / 4) decodes to sqrt(p) = _V2_ZERO * step
# Decoding tables over the 256 id head bytes h = 8 * c + m (c = bit length - 1 of the gap,
# m = up to 3 bits after its leading 1): low bits that follow, the gap without them, validity.
_V2_HEAD_C = np.arange(256) >> 3
_V2_HEAD_NBITS = _V2_HEAD_C - np.minimum(_V2_HEAD_C, 3)
_V2_HEAD_BASE = (np.int64(1) << _V2_HEAD_C) | ((np.arange(256) & 7) << _V2_HEAD_NBITS)
_V2_HEAD_VALID = (_V2_HEAD_C <= 30) & ((np.arange(256) & 7) >> np.minimum(_V2_HEAD_C, 3) == 0)


def v2_sqrt_step(k: int) -> float:
    """compact-v2 quantisation step of sqrt(p) for top-``k`` labels.

    ``sqrt(6 * V2_KL_BUDGET / k)``, floored at 1/255 so that p = 1 still fits a byte (from
    k = 196 on; the expected KL then grows as ``k * 2.6e-6`` nats).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return max(float(np.sqrt(6.0 * V2_KL_BUDGET / k)), 1.0 / 255.0)


def _starts(lengths: np.ndarray) -> np.ndarray:
    """(R,) lengths → (R + 1,) int64 offsets."""
    starts = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


def _binary(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    """A binary array whose row r is the uint8 bytes ``data[offsets[r]:offsets[r + 1]]``."""
    if offsets[-1] >= 2**31:
        raise ValueError(f"one batch of rows holds {offsets[-1]} bytes in a column; write < 2 GiB at once")
    data = np.ascontiguousarray(data, np.uint8)
    buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.binary(), len(offsets) - 1, buffers)


def encode_topk_v2(
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
    field_rows = _starts(positions * k)
    bit_sum = np.concatenate([[0], np.cumsum(nbits)])
    byte_offsets = _starts((bit_sum[field_rows[1:]] - bit_sum[field_rows[:-1]] + 7) // 8)
    start = bit_sum[:-1] + np.repeat(8 * byte_offsets[:-1] - bit_sum[field_rows[:-1]], positions * k)
    some = nbits > 0  # only these fields have bits in the stream
    start, nbits, mant = start[some], nbits[some], mant[some]
    window = mant << (64 - nbits - (start & 31)).astype(np.uint64)  # field placed in a 64-bit window
    n_words = int(byte_offsets[-1]) // 4 + 2
    word = start >> 5  # fields never overlap, so adding their parts (exact in float64) ORs them
    words = np.bincount(word, (window >> np.uint64(32)).astype(np.float64), n_words)
    words += np.bincount(word + 1, (window & np.uint64(0xFFFFFFFF)).astype(np.float64), n_words)
    stream = words.astype(np.uint32).astype(">u4").view(np.uint8)[: byte_offsets[-1]]
    # Values in the same (id) order: sqrt(p) in steps of v2_sqrt_step(k).
    u = np.exp(np.take_along_axis(lps, order, 1) / 2)
    levels = np.clip(np.rint(u / v2_sqrt_step(k)), 0, 254).astype(np.uint8)
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
    pos_starts = _starts(positions)
    dest = 2 * pos_starts[pos_rows] + (np.arange(n) - pos_starts[pos_rows])
    planes = np.empty(2 * n, np.uint8)
    planes[dest], planes[dest + positions[pos_rows]] = tail[0::2], tail[1::2]
    return {
        Columns.V2_ID_HEAD: _binary(head.astype(np.uint8), field_rows),
        Columns.V2_ID_BITS: _binary(stream, byte_offsets),
        Columns.V2_SQRT_Q: _binary(levels, field_rows),
        Columns.V2_TAIL: _binary(planes, 2 * pos_starts),
    }


def _binary_parts(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A binary column → (its data buffer as uint8, (R + 1,) int64 offsets into it)."""
    column = table.column(name).combine_chunks()
    if not pa.types.is_binary(column.type):
        raise FormatError(f"column {name!r} must be binary for compact-v2, got {column.type}")
    buffers = column.buffers()
    offsets = np.frombuffer(buffers[1], np.int32, len(column) + 1, 4 * column.offset).astype(np.int64)
    data = np.frombuffer(buffers[2], np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    return data, offsets


def decode_topk_v2(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    """compact-v2 decoder: a table with the codec's columns → (N, k) int32 ids and float32
    log-probs by rank (N = label positions of all rows, in order).

    The first rank is the teacher's top-1; the others follow the decoded values, and
    entries whose values share a level keep id order. The top-k is rescaled so that its
    mass plus the stored tail mass is 1.
    """
    head_data, field_rows = _binary_parts(table, Columns.V2_ID_HEAD)
    lev_data, lev_rows = _binary_parts(table, Columns.V2_SQRT_Q)
    bit_data, byte_offsets = _binary_parts(table, Columns.V2_ID_BITS)
    tail_data, tail_rows = _binary_parts(table, Columns.V2_TAIL)
    positions = np.diff(tail_rows) // 2
    counts = (np.diff(field_rows), np.diff(lev_rows))
    if (np.diff(tail_rows) % 2).any() or not all(np.array_equal(c, positions * k) for c in counts):
        raise FormatError(f"compact-v2 columns disagree on the number of label positions (k={k})")
    # Per head byte (lookup tables): its gap's leading bits and how many low bits follow.
    head = head_data[field_rows[0] : field_rows[-1]]
    if head.size and not _V2_HEAD_VALID[head].all():
        raise FormatError("compact-v2 id head bytes out of range: the shard is corrupt")
    nbits = _V2_HEAD_NBITS[head]
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
    gaps = (_V2_HEAD_BASE[head] | low.astype(np.int64)).reshape(n, k)
    ids = (np.cumsum(gaps, axis=1) - 1).astype(np.int32)
    levels = lev_data[lev_rows[0] : lev_rows[-1]].reshape(n, k)
    step = v2_sqrt_step(k)
    level_lps = 2.0 * np.log(np.maximum(np.arange(256), _V2_ZERO) * step)  # (256,) log-prob per level
    pos_rows = np.repeat(np.arange(len(positions)), positions)
    lo = tail_rows[pos_rows] + (np.arange(n) - _starts(positions)[pos_rows])
    hi = lo + positions[pos_rows]
    tail = (tail_data[lo].astype(np.uint16) | (tail_data[hi].astype(np.uint16) << 8)).view("<f2")
    kept = np.log(np.exp(level_lps)[levels].sum(axis=1))
    with np.errstate(divide="ignore"):
        target = np.log1p(-np.exp(tail.astype(np.float64)))
    shift = np.where(np.isfinite(target), target - kept, 0.0).astype(np.float32)[:, None]
    lps = level_lps.astype(np.float32)[levels] + shift
    order = np.argsort(255 - levels, axis=1, kind="stable")  # descending level; ties in id order
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lps, order, 1)


def topk_column_names(codec: str) -> list[str]:
    """The columns that hold the top-k labels under ``codec``."""
    if codec not in CODECS:
        raise ValueError(f"unknown top-k codec {codec!r}; known: {', '.join(CODECS)}")
    if codec == "plain":
        return [Columns.TOPK_IDS, Columns.TOPK_LOGPROBS]
    if codec == "compact-v1":
        return [Columns.TOPK_ID_DELTAS, Columns.TOPK_LOGPROB_Q, Columns.TOPK_TAIL]
    return [Columns.V2_ID_HEAD, Columns.V2_ID_BITS, Columns.V2_SQRT_Q, Columns.V2_TAIL]


def encode_topk_columns(
    codec: str, topk_ids: np.ndarray, topk_logprobs: np.ndarray, positions: np.ndarray
) -> dict[str, pa.Array]:
    """Top-k labels of R rows → their columns under ``codec`` (names: :func:`topk_column_names`).

    Args:
        topk_ids: (N, k) ids by rank, N = sum(positions).
        topk_logprobs: (N, k) raw log-probs by rank.
        positions: (R,) label positions (T - 1) of each row.
    """
    positions = np.asarray(positions, np.int64)
    if codec == "compact-v2":
        return encode_topk_v2(topk_ids, topk_logprobs, positions)
    k = topk_ids.shape[1]

    def lists(values: np.ndarray, width: int, value_type: pa.DataType) -> pa.Array:
        offsets = pa.array(_starts(positions * width).astype(np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).ravel(), value_type))

    if codec == "plain":
        return {
            Columns.TOPK_IDS: lists(topk_ids.astype(np.int32), k, pa.int32()),
            Columns.TOPK_LOGPROBS: lists(topk_logprobs.astype(np.float32), k, pa.float32()),
        }
    if codec == "compact-v1":
        gaps, q, tail = encode_topk(topk_ids, topk_logprobs)
        return {
            Columns.TOPK_ID_DELTAS: lists(gaps, k, pa.int32()),
            Columns.TOPK_LOGPROB_Q: lists(q, k, pa.uint8()),
            Columns.TOPK_TAIL: lists(tail, 1, pa.float32()),
        }
    raise ValueError(f"unknown top-k codec {codec!r}; known: {', '.join(CODECS)}")


def _list_values(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    return column.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]


def decode_topk_table(table: pa.Table, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k labels of a shard table (any codec; detected by its columns) as (N, k) int32
    ids and float32 log-probs by rank, N = label positions of all rows in order."""
    if Columns.V2_ID_HEAD in table.column_names:
        return decode_topk_v2(table, k)
    if Columns.TOPK_ID_DELTAS in table.column_names:
        gaps = _list_values(table, Columns.TOPK_ID_DELTAS).reshape(-1, k)
        levels = _list_values(table, Columns.TOPK_LOGPROB_Q).reshape(-1, k)
        ids, lps = decode_topk(gaps, levels, _list_values(table, Columns.TOPK_TAIL))
    else:
        ids = _list_values(table, Columns.TOPK_IDS).reshape(-1, k)
        lps = _list_values(table, Columns.TOPK_LOGPROBS).reshape(-1, k)
    return ids, lps


def label_schema(draws: bool = False, codec: str = "plain") -> pa.Schema:
    """Arrow schema of a label shard (format version ``FORMAT_VERSION``)."""
    flat = _flat
    if codec not in CODECS:
        raise ValueError(f"unknown top-k codec {codec!r}; known: {', '.join(CODECS)}")
    if codec == "plain":
        topk = [flat(Columns.TOPK_IDS, pa.int32()), flat(Columns.TOPK_LOGPROBS, pa.float32())]
    elif codec == "compact-v1":
        topk = [
            flat(Columns.TOPK_ID_DELTAS, pa.int32()),
            flat(Columns.TOPK_LOGPROB_Q, pa.uint8()),
            flat(Columns.TOPK_TAIL, pa.float32()),
        ]
    else:
        topk = [pa.field(name, pa.binary(), nullable=False) for name in topk_column_names(codec)]
    extra = (
        [
            flat(Columns.DRAW_NUM, pa.uint8()),
            flat(Columns.DRAW_IDS, pa.int32()),
            flat(Columns.DRAW_COUNTS, pa.uint8()),
        ]
        if draws
        else []
    )
    return pa.schema(
        [
            pa.field(Columns.SAMPLE_ID, pa.string(), nullable=False),
            pa.field(Columns.TOKEN_HASH, pa.uint64(), nullable=False),
            pa.field(Columns.NUM_TOKENS, pa.int32(), nullable=False),
            flat(Columns.INPUT_IDS, pa.int32()),
            flat(Columns.LABEL_MASK, pa.uint8()),
            *topk,
            flat(Columns.TARGET_LOGPROBS, pa.float32()),
            *extra,
        ],
        metadata={b"labelgen.format_version": FORMAT_VERSION.encode()},
    )


def shard_name(unit: int, shard: int) -> str:
    """Zero-padded shard stem; lexical order equals (unit, shard) order."""
    return f"part-{unit:05d}-{shard:05d}"


def token_hash(input_ids: np.ndarray) -> int:
    """64-bit hash of a token sequence (int32 little-endian bytes, blake2b)."""
    data = np.ascontiguousarray(input_ids, dtype="<i4").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over a tokenizer's vocabulary and special tokens.

    Works on any object with ``get_vocab()`` (HF tokenizers). Two tokenizers with the
    same fingerprint map every string to the same ids.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    specials = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    payload = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def list_fresh(fs: Any, directory: str, prefix: str = "") -> list[str]:
    """Sorted paths under ``directory`` (those starting with ``prefix`` where the store can
    filter by key prefix), bypassing fsspec's listing cache on object stores: commit
    records are written by other processes while a job runs. [] if it does not exist."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" not in protocols:
        fs.invalidate_cache(directory)
        if prefix:
            try:  # s3fs/gcsfs list by key prefix: one request for a unit, not the whole directory
                return sorted(fs.find(directory, prefix=prefix))
            except TypeError:
                pass
    try:
        return sorted(fs.ls(directory, detail=False))
    except FileNotFoundError:
        return []


def join_url(base: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping the scheme of ``base``."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard."""

    path: str  # relative to the dataset root, e.g. "shards/part-00000-00001.parquet"
    unit: int
    index: int  # shard index within the unit
    rows: int
    tokens: int
    label_positions: int
    row_groups: int
    bytes: int
    sha256: str
    first_sequence: int  # unit-local index of the first sequence in the shard
    next_sequence: int  # unit-local index one past the last sequence in the shard
    hidden_path: str = ""  # the matching hidden-state shard, if the product is on
    hidden_bytes: int = 0
    hidden_sha256: str = ""


@dataclass(frozen=True)
class UnitRecord:
    """One finished work unit (one input source)."""

    unit: int
    source: str
    sequences: int
    tokens: int
    shards: int
    rejected: dict[str, int] = field(default_factory=dict)
    source_sha256: str = ""


@dataclass
class Manifest:
    """The index of a complete label dataset; written last."""

    k: int
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    corpus: dict[str, Any]
    spec_sha256: str
    shards: list[ShardRecord]
    units: list[UnitRecord]
    created_at: str
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    position_convention: str = "position t holds the distribution of token t+1 given tokens <= t"
    logprob_temperature: float = 1.0
    codec: str = "plain"
    """Top-k layout: 'plain' (int32 ids + float32 log-probs by rank), 'compact-v1' or 'compact-v2'."""
    products: dict[str, Any] = field(default_factory=dict)
    """Optional products: {"draws": {"n", "temperature", "seed"}, "hidden": {"layers",
    "every", "dtype", "dim", "seed"}}; top-k is always present."""

    @property
    def rejected(self) -> dict[str, int]:
        """Rejected input records by reason, summed over units."""
        total: dict[str, int] = {}
        for unit in self.units:
            for reason, count in unit.rejected.items():
                total[reason] = total.get(reason, 0) + count
        return dict(sorted(total.items()))

    @property
    def totals(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "rows": sum(s.rows for s in self.shards),
            "tokens": sum(s.tokens for s in self.shards),
            "label_positions": sum(s.label_positions for s in self.shards),
            "bytes": sum(s.bytes for s in self.shards),
        }

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["totals"] = self.totals
        data["rejected"] = self.rejected
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{where} is not valid JSON: {exc}") from exc
        check_format_version(data, where)
        data.pop("totals", None)
        data.pop("rejected", None)
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["shards"] = [ShardRecord(**s) for s in data.get("shards", [])]
        data["units"] = [UnitRecord(**u) for u in data.get("units", [])]
        return cls(**data)


def check_format_version(data: Mapping[str, Any], where: str) -> None:
    """Raise FormatError unless ``data`` is a manifest of a format version we read."""
    if data.get("format") != FORMAT_NAME:
        raise FormatError(f"{where} is not a {FORMAT_NAME} manifest (format={data.get('format')!r})")
    found = str(data.get("format_version"))
    if found.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise FormatError(
            f"{where} has format version {found}, this reader supports {FORMAT_VERSION}; "
            "install the labelgen release that matches the dataset"
        )


def read_manifest(url: str) -> Manifest:
    """Read ``<url>/manifest.json``; raise FormatError naming the URL if absent (incomplete)."""
    import fsspec

    path = join_url(url, MANIFEST_NAME)
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        committed = _count_commits(fs, join_url(fs_path.rsplit("/", 1)[0], COMMITS_DIR))
        hint = (
            f"{committed} shard(s) are committed, so a labeling job is still running or was "
            "interrupted; re-run `labelgen run` with the same spec to finish it"
            if committed
            else "check the URL (run `labelgen inspect URL`)"
        )
        raise FormatError(f"no {MANIFEST_NAME} at {url!r}: the dataset is incomplete or absent; {hint}")
    with fs.open(fs_path, "r") as f:
        return Manifest.from_json(f.read(), where=path)


def _count_commits(fs: Any, commits_dir: str) -> int:
    try:
        return sum(1 for p in fs.ls(commits_dir, detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    except (FileNotFoundError, OSError):
        return 0
