"""Streaming reader over a label dataset URL, row group by row group, resumable.

The unit of work is a (shard, row group) pair listed by the manifest; the dataset is
never downloaded as a whole. Each row group is read through fsspec + pyarrow and
decoded zero-copy to numpy (flat list columns + offsets), then cut into batches.
Order is a pure function of (seed, epoch): the row-group order is a seeded
permutation, rows within a row group are in order. The cursor ``(epoch, unit,
row)`` returned by :meth:`LabelStream.state_dict` goes into every checkpoint;
:meth:`LabelStream.load_state_dict` resumes with the exact next batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.contract.format import (
    Columns,
    FormatError,
    Manifest,
    decode_topk_table,
    join_url,
    read_manifest,
)

__all__ = ["RowGroupRef", "Rows", "LabelStream", "open_dataset", "row_group_refs", "read_row_group"]


@dataclass(frozen=True)
class RowGroupRef:
    shard: str  # path relative to the dataset root
    row_group: int


@dataclass
class Rows:
    """Decoded rows of one row group (or a slice of one). Per-row arrays via ``row(i)``."""

    k: int
    sample_ids: list[str]
    num_tokens: np.ndarray  # (R,) int32
    token_offsets: np.ndarray  # (R+1,) offsets into input_ids
    input_ids: np.ndarray  # (sum T,) int32
    label_offsets: np.ndarray  # (R+1,) offsets into label positions
    label_mask: np.ndarray  # (sum T-1,) uint8
    topk_ids: np.ndarray  # (sum T-1, k) int32
    topk_logprobs: np.ndarray  # (sum T-1, k) float32
    target_logprobs: np.ndarray  # (sum T-1,) float32
    draw_offsets: np.ndarray | None = None  # (sum T-1 + 1,) offsets into draw_ids per position
    draw_ids: np.ndarray | None = None  # (sum U,) int32
    draw_counts: np.ndarray | None = None  # (sum U,) uint8

    def __len__(self) -> int:
        return len(self.sample_ids)


def _flat(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def read_row_group(fs: Any, root: str, ref: RowGroupRef, k: int) -> Rows:
    """Read and decode one row group (raises FormatError naming the file if unreadable)."""
    path = join_url(root, ref.shard)
    try:
        with fs.open(path, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(ref.row_group)
    except (OSError, pa.ArrowException) as exc:
        raise FormatError(f"cannot read row group {ref.row_group} of {path}: {exc}") from exc
    tok_off, ids = _flat(table, Columns.INPUT_IDS)
    lab_off, mask = _flat(table, Columns.LABEL_MASK)
    top_ids, top_lps = decode_topk_table(table, k)
    _, tgt = _flat(table, Columns.TARGET_LOGPROBS)
    draws: dict[str, Any] = {}
    if Columns.DRAW_NUM in table.column_names:
        _, num = _flat(table, Columns.DRAW_NUM)
        offsets = np.zeros(len(num) + 1, np.int64)
        np.cumsum(num, out=offsets[1:])
        draws = {
            "draw_offsets": offsets,
            "draw_ids": _flat(table, Columns.DRAW_IDS)[1],
            "draw_counts": _flat(table, Columns.DRAW_COUNTS)[1],
        }
    return Rows(
        **draws,
        k=k,
        sample_ids=table.column(Columns.SAMPLE_ID).to_pylist(),
        num_tokens=table.column(Columns.NUM_TOKENS).to_numpy(),
        token_offsets=tok_off,
        input_ids=ids,
        label_offsets=lab_off,
        label_mask=mask,
        topk_ids=top_ids.reshape(-1, k),
        topk_logprobs=top_lps.reshape(-1, k),
        target_logprobs=tgt,
    )


def row_group_refs(manifest: Manifest) -> list[RowGroupRef]:
    """All (shard, row group) pairs of a dataset, in manifest order."""
    return [RowGroupRef(s.path, i) for s in manifest.shards for i in range(s.row_groups)]


def open_dataset(url: str) -> tuple[Manifest, Any, str]:
    """Manifest, filesystem and root path of a complete label dataset."""
    manifest = read_manifest(url)
    fs, root = fsspec.core.url_to_fs(url)
    return manifest, fs, root


def collate(rows: Rows, indices: list[int]) -> dict[str, np.ndarray]:
    """Pad the given rows into a batch (numpy).

    Returns:
        input_ids (B, T) int64, zero-padded; label_mask (B, T-1) float32 (0 on padding);
        topk_ids (B, T-1, k) int64; topk_logprobs (B, T-1, k) float32;
        target_logprobs (B, T-1) float32; next_ids (B, T-1) int64.
    """
    lengths = [int(rows.num_tokens[i]) for i in indices]
    b, t, k = len(indices), max(lengths), rows.k
    out = {
        "input_ids": np.zeros((b, t), np.int64),
        "label_mask": np.zeros((b, t - 1), np.float32),
        "topk_ids": np.zeros((b, t - 1, k), np.int64),
        "topk_logprobs": np.zeros((b, t - 1, k), np.float32),
        "target_logprobs": np.zeros((b, t - 1), np.float32),
    }
    for j, i in enumerate(indices):
        n = lengths[j]
        ts, ls = rows.token_offsets[i], rows.label_offsets[i]
        out["input_ids"][j, :n] = rows.input_ids[ts : ts + n]
        out["label_mask"][j, : n - 1] = rows.label_mask[ls : ls + n - 1]
        out["topk_ids"][j, : n - 1] = rows.topk_ids[ls : ls + n - 1]
        out["topk_logprobs"][j, : n - 1] = rows.topk_logprobs[ls : ls + n - 1]
        out["target_logprobs"][j, : n - 1] = rows.target_logprobs[ls : ls + n - 1]
    out["next_ids"] = out["input_ids"][:, 1:].copy()
    if rows.draw_offsets is not None:
        out.update(_collate_draws(rows, indices, lengths))
    return out


def _collate_draws(rows: Rows, indices: list[int], lengths: list[int]) -> dict[str, np.ndarray]:
    """Random-sampling labels as (B, T-1, U) ids and counts, zero-padded (U = most unique ids)."""
    assert rows.draw_offsets is not None and rows.draw_ids is not None and rows.draw_counts is not None
    b, t = len(indices), max(lengths)
    per_position = np.diff(rows.draw_offsets)
    width = max(
        int(per_position[rows.label_offsets[i] : rows.label_offsets[i] + n - 1].max(initial=0))
        for i, n in zip(indices, lengths, strict=True)
    )
    ids = np.zeros((b, t - 1, max(width, 1)), np.int64)
    counts = np.zeros((b, t - 1, max(width, 1)), np.float32)
    for j, (i, n) in enumerate(zip(indices, lengths, strict=True)):
        first = rows.label_offsets[i]
        for p in range(n - 1):
            a, z = rows.draw_offsets[first + p], rows.draw_offsets[first + p + 1]
            ids[j, p, : z - a] = rows.draw_ids[a:z]
            counts[j, p, : z - a] = rows.draw_counts[a:z]
    return {"draw_ids": ids, "draw_counts": counts}


class LabelStream:
    """Batches of padded label rows from a subset of a dataset's row groups.

    Args:
        url: dataset URL.
        refs: the row groups this stream reads (e.g. all but the held-out ones).
        batch_sequences: rows per batch.
        seed: order seed.
        shuffle: permute row groups per epoch (training) or keep manifest order (eval).
        loop: start a new epoch when one ends (training) or stop (eval).
        prefetch: row groups read ahead in a background thread.
    """

    def __init__(
        self,
        url: str,
        manifest: Manifest,
        refs: list[RowGroupRef],
        batch_sequences: int,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        prefetch: int = 2,
    ):
        if not refs:
            raise FormatError(f"{url!r}: no row groups to read (the dataset or its split is empty)")
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.k = manifest.k
        self.refs, self.batch, self.seed = refs, batch_sequences, seed
        self.shuffle, self.loop, self.prefetch = shuffle, loop, prefetch
        self.epoch, self.unit, self.row = 0, 0, 0  # cursor of the next batch

    def order(self, epoch: int) -> list[RowGroupRef]:
        if not self.shuffle:
            return list(self.refs)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.refs))
        return [self.refs[i] for i in perm]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "unit": self.unit, "row": self.row, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data cursor was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.unit, self.row = state["epoch"], state["unit"], state["row"]

    def _row_groups(self) -> Iterator[tuple[int, int, Rows]]:
        """(epoch, unit index, rows) from the cursor on, read ahead in a thread."""
        epoch, unit = self.epoch, self.unit
        items: queue.Queue = queue.Queue(maxsize=max(self.prefetch, 1))
        stop = threading.Event()

        def produce() -> None:
            e, u = epoch, unit
            try:
                while not stop.is_set():
                    order = self.order(e)
                    while u < len(order) and not stop.is_set():
                        items.put((e, u, read_row_group(self.fs, self.root, order[u], self.k)))
                        u += 1
                    if not self.loop:
                        break
                    e, u = e + 1, 0
                items.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                items.put(exc)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while (item := items.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    items.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches from the cursor on. A batch never spans row groups (the last one of a
        row group may be smaller), which keeps the cursor a simple (epoch, unit, row)."""
        for epoch, unit, rows in self._row_groups():
            start = self.row if (epoch, unit) == (self.epoch, self.unit) else 0
            for row in range(start, len(rows), self.batch):
                indices = list(range(row, min(row + self.batch, len(rows))))
                nxt = indices[-1] + 1
                if nxt >= len(rows):
                    order_len = len(self.refs)
                    self.epoch, self.unit, self.row = (
                        (epoch + 1, 0, 0) if unit + 1 >= order_len else (epoch, unit + 1, 0)
                    )
                else:
                    self.epoch, self.unit, self.row = epoch, unit, nxt
                yield collate(rows, indices)
