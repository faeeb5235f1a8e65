"""The sequences an audit re-scores: which rows (seeded), and their stored labels, decoded.

Rows are numbered through the manifest's shards in order; a seeded sample of them is read
a row group at a time (only the row groups that hold sampled rows) through the contract's
codecs, so every top-k codec decodes the way the student reader decodes it. Hidden-state
rows come from the shard's hidden file (same rows, same order).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.contract.codecs import get_codec
from labelgen.contract.codecs.base import list_parts
from labelgen.contract.columns import Columns
from labelgen.contract.format import FormatError, Manifest, ShardRecord, dataset_file, token_hash
from labelgen.contract.records import decode_hidden

__all__ = ["StoredRow", "sample_rows", "read_rows"]


@dataclass
class StoredRow:
    """One stored sequence of T tokens (P = T - 1 label positions), decoded."""

    shard: str
    """The shard's dataset path."""
    row: int
    """Row index within the shard."""
    sample_id: str
    input_ids: np.ndarray  # (T,) int32
    topk_ids: np.ndarray  # (P, k) int32, by stored rank
    topk_logprobs: np.ndarray  # (P, k) float32
    target_logprobs: np.ndarray  # (P,) float32
    hash_ok: bool
    """The stored token_hash is the hash of input_ids."""
    draw_num: np.ndarray | None = None  # (P,)
    draw_ids: np.ndarray | None = None  # (sum draw_num,)
    draw_counts: np.ndarray | None = None  # (sum draw_num,)
    hidden_positions: np.ndarray | None = None  # (H,) int64
    hidden: dict[int, np.ndarray] | None = None  # layer -> (H, D) float32


def sample_rows(shards: list[ShardRecord], rows: int | None, seed: int) -> list[tuple[int, int]]:
    """``rows`` distinct (shard index, row in shard) picked with ``seed`` (None: every row),
    in dataset order."""
    counts = [s.rows for s in shards]
    total = sum(counts)
    picked = (
        range(total)
        if rows is None or rows >= total
        else sorted(random.Random(seed).sample(range(total), rows))
    )
    starts = np.cumsum([0, *counts])
    out = []
    for index in picked:
        shard = int(np.searchsorted(starts, index, side="right") - 1)
        out.append((shard, int(index - starts[shard])))
    return out


def _read_groups(fs, path: str, wanted: list[int], columns: list[str] | None) -> tuple[pa.Table, list[int]]:
    """The row groups of the Parquet file at ``path`` holding rows ``wanted`` (sorted) →
    (those rows as a table, in order, their positions in it)."""
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.metadata.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        if wanted and wanted[-1] >= starts[-1]:
            raise FormatError(f"{path} holds {starts[-1]} rows; its record gives more (row {wanted[-1]})")
        group_of = np.searchsorted(starts, wanted, side="right") - 1
        groups = sorted({int(g) for g in group_of})
        table = parquet.read_row_groups(groups, columns=columns)
    table.validate(full=True)
    in_table, at = {}, 0  # where each read row group starts in the table
    for g in groups:
        in_table[g], at = at, at + sizes[g]
    local = [in_table[int(g)] + r - int(starts[g]) for g, r in zip(group_of, wanted, strict=True)]
    return table.take(pa.array(local, pa.int64())), local


def read_rows(fs, root: str, manifest: Manifest, shard: ShardRecord, rows: list[int]) -> list[StoredRow]:
    """Rows ``rows`` (sorted, within ``shard``) of the dataset at ``root``, decoded.

    Raises:
        FormatError: the shard (or its hidden file) cannot be read or decoded; names the file.
    """
    codec = get_codec(manifest.codec)
    draws = "draws" in manifest.products
    path = dataset_file(root, shard.path, "shard record")
    try:
        table, _ = _read_groups(fs, path, rows, None)
        ids, lps = codec.decode(table, manifest.k)
        offsets, input_ids = list_parts(table, Columns.INPUT_IDS)
        t_offsets, targets = list_parts(table, Columns.TARGET_LOGPROBS)
        if draws:
            n_off, draw_num = list_parts(table, Columns.DRAW_NUM)
            d_off, draw_ids = list_parts(table, Columns.DRAW_IDS)
            _, draw_counts = list_parts(table, Columns.DRAW_COUNTS)
    except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError
        raise FormatError(f"cannot read rows {rows[:4]}... of {path}: {exc}") from exc
    sample_ids = table.column(Columns.SAMPLE_ID).to_pylist()
    hashes = table.column(Columns.TOKEN_HASH).to_pylist()
    out = []
    for i, row in enumerate(rows):
        tokens = input_ids[offsets[i] : offsets[i + 1]].astype(np.int32)
        lo, hi = t_offsets[i], t_offsets[i + 1]
        item = StoredRow(
            shard=shard.path,
            row=row,
            sample_id=str(sample_ids[i]),
            input_ids=tokens,
            topk_ids=ids[lo:hi],
            topk_logprobs=lps[lo:hi],
            target_logprobs=targets[lo:hi].astype(np.float32),
            hash_ok=token_hash(tokens) == hashes[i],
        )
        if draws:
            num = draw_num[n_off[i] : n_off[i + 1]].astype(np.int64)
            item.draw_num = num
            item.draw_ids = draw_ids[d_off[i] : d_off[i + 1]].astype(np.int64)
            item.draw_counts = draw_counts[d_off[i] : d_off[i + 1]].astype(np.int64)
        out.append(item)
    hidden = manifest.products.get("hidden")
    if hidden and shard.hidden_path:
        _attach_hidden(fs, root, shard, rows, out, hidden)
    return out


def _attach_hidden(
    fs, root: str, shard: ShardRecord, rows: list[int], out: list[StoredRow], hidden: dict
) -> None:
    layers = [int(x) for x in hidden.get("layers", [])]
    dtype, dim = str(hidden.get("dtype", "float16")), int(hidden.get("dim") or 0)
    path = dataset_file(root, shard.hidden_path, "shard record")
    try:
        table, _ = _read_groups(fs, path, rows, None)
        offsets, positions = list_parts(table, Columns.HIDDEN_POSITIONS)
        columns = {layer: table.column(Columns.HIDDEN_LAYER.format(layer)).to_pylist() for layer in layers}
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise FormatError(f"cannot read rows {rows[:4]}... of {path}: {exc}") from exc
    for i, item in enumerate(out):
        item.hidden_positions = positions[offsets[i] : offsets[i + 1]].astype(np.int64)
        count = len(item.hidden_positions)
        item.hidden = {layer: decode_hidden(columns[layer][i], dtype, count) for layer in layers}
        if dim and any(v.size and v.shape[1] != dim for v in item.hidden.values()):
            raise FormatError(f"{path}: row {rows[i]} holds hidden states not of the manifest's width {dim}")
