"""Shard writer: size-rotated Parquet shards, committed atomically, with commit records.

Rows are buffered and written a row group at a time into a local temporary file.
When the file reaches the target size (checked only at batch boundaries, so a
resumed job forms the same batches) the shard is committed: on a local filesystem
by renaming the temporary file into place, on an object store by one PUT of the
finished file to its final key (retried with backoff; :mod:`labelgen.contract.storage`).
Only then is its shard record written to the commit log, so a shard without a record
is never trusted and is simply rewritten on resume.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.contract.codecs import DEFAULT_CODEC, get_codec
from labelgen.contract.commits import CommitLog
from labelgen.contract.format import (
    HIDDEN_DIR,
    SHARDS_DIR,
    Columns,
    ShardRecord,
    hidden_schema,
    join_url,
    label_schema,
    shard_name,
    token_hash,
)
from labelgen.contract.storage import MIB, publish_file
from labelgen.labels import SequenceLabels
from labelgen.packing import PackedSequence

__all__ = ["ShardWriter", "hidden_bytes", "parquet_write_options"]


def parquet_write_options(compression_level: int, codec: str = DEFAULT_CODEC) -> dict[str, Any]:
    """ParquetWriter options for label shards: zstd, no dictionaries, byte-stream-split floats
    (the codec adds the encodings of its own columns)."""
    return {
        "compression": "zstd",
        "compression_level": compression_level,
        "use_dictionary": False,
        "column_encoding": {
            f"{Columns.TARGET_LOGPROBS}.list.element": "BYTE_STREAM_SPLIT",
            # ascending within a position: small deltas
            f"{Columns.DRAW_IDS}.list.element": "DELTA_BINARY_PACKED",
            **get_codec(codec).column_encodings(),
        },
        "write_statistics": [Columns.SAMPLE_ID, Columns.NUM_TOKENS, Columns.TOKEN_HASH],
    }


def hidden_bytes(values: np.ndarray, dtype: str) -> bytes:
    """(P, D) float array → little-endian bytes in ``dtype`` (bfloat16: rounded to nearest even)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values.astype("<f4").tobytes()
    if dtype == "float16":
        return values.astype("<f2").tobytes()
    bits = values.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Writes the shards of one work unit."""

    def __init__(
        self,
        root_url: str,
        unit: int,
        k: int,
        first_shard: int,
        first_sequence: int,
        shard_mib: float,
        row_group_mib: float,
        compression_level: int,
        draws: bool = False,
        codec: str = DEFAULT_CODEC,
        hidden_layers: tuple[int, ...] = (),
        hidden_dtype: str = "float16",
        record_commits: bool = True,
    ):
        self.fs, self.root = fsspec.core.url_to_fs(root_url)
        self.commits = CommitLog(self.fs, self.root)
        self.record_commits = record_commits
        """Write each committed shard's record to the commit log (False: the caller commits the
        returned records inside its own, as a generation job's shard record does)."""
        self.unit, self.k = unit, k
        self.draws = draws
        self.hidden_layers, self.hidden_dtype = tuple(hidden_layers), hidden_dtype
        self.hidden_schema = hidden_schema(self.hidden_layers) if self.hidden_layers else None
        self._hidden_writer: pq.ParquetWriter | None = None
        self._hidden_sink: pa.NativeFile | None = None
        self.shard_bytes = int(shard_mib * MIB)
        self.row_group_bytes = int(row_group_mib * MIB)
        self.options = parquet_write_options(compression_level, codec)
        self.codec = get_codec(codec)
        self.schema = label_schema(draws=draws, codec=codec)
        self.next_shard = first_shard
        self.next_sequence = first_sequence
        self.committed: list[ShardRecord] = []
        self._rows: list[tuple[PackedSequence, SequenceLabels]] = []
        self._buffered_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None
        self._tmp_path = ""
        self._shard_first_sequence = first_sequence
        self._shard_stats = {"rows": 0, "tokens": 0, "label_positions": 0, "row_groups": 0}
        self._tmp_dir = tempfile.mkdtemp(prefix="labelgen-shard-")

    # -- rows -------------------------------------------------------------------------
    def add(self, seq: PackedSequence, labels: SequenceLabels) -> None:
        labels.validate(len(seq.input_ids), self.k, self.draws, self.hidden_layers)
        self._rows.append((seq, labels))
        t = len(seq.input_ids)
        self._buffered_bytes += t * 5 + (t - 1) * (8 * self.k + 5) + len(seq.sample_id) + 16

    def end_batch(self) -> ShardRecord | None:
        """Called after each teacher batch: flush a row group / commit the shard if due;
        returns the record of the shard committed, if one was."""
        self.flush_full_row_group()
        if self.shard_due():
            return self.commit_shard()
        return None

    def flush_full_row_group(self) -> None:
        """Write the buffered rows as a row group if they reach ``row_group_mib``."""
        if self._buffered_bytes >= self.row_group_bytes:
            self._flush_row_group()

    def shard_due(self) -> bool:
        """Whether the open shard has reached its target size (rows buffered are assumed to
        compress ~4x; the decision only has to be deterministic)."""
        written = self._sink.tell() if self._sink is not None else 0
        return bool(written and written + self._buffered_bytes // 4 >= self.shard_bytes)

    def commit_shard(self) -> ShardRecord | None:
        """Commit the open shard now, with the rows buffered; None if it holds no row."""
        self._flush_row_group()
        if self._writer is None:
            return None
        return self._commit()

    def close(self) -> list[ShardRecord]:
        """Commit what is left; returns the records of shards committed by this writer."""
        self.commit_shard()
        os.rmdir(self._tmp_dir)
        return self.committed

    # -- internals --------------------------------------------------------------------
    def _table(self, hashes: list[int]) -> pa.Table:
        seqs = [s for s, _ in self._rows]
        labs = [lab for _, lab in self._rows]

        def lists(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
            lengths = np.fromiter((a.size for a in arrays), dtype=np.int32, count=len(arrays))
            offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            values = pa.array(np.concatenate([np.asarray(a).ravel() for a in arrays]))
            return pa.ListArray.from_arrays(pa.array(offsets), values.cast(value_type))

        if self.draws:
            draw_columns = {
                Columns.DRAW_NUM: lists([lab.draw_num for lab in labs], pa.uint8()),
                Columns.DRAW_IDS: lists([lab.draw_ids for lab in labs], pa.int32()),
                Columns.DRAW_COUNTS: lists([lab.draw_counts for lab in labs], pa.uint8()),
            }
        else:
            draw_columns = {}
        columns = {
            **draw_columns,
            Columns.SAMPLE_ID: pa.array([s.sample_id for s in seqs], pa.string()),
            Columns.TOKEN_HASH: pa.array(hashes, pa.uint64()),
            Columns.NUM_TOKENS: pa.array([len(s.input_ids) for s in seqs], pa.int32()),
            Columns.INPUT_IDS: lists([s.input_ids for s in seqs], pa.int32()),
            Columns.LABEL_MASK: lists([s.label_mask for s in seqs], pa.uint8()),
            **self._topk_columns(labs),
            Columns.TARGET_LOGPROBS: lists([lab.target_logprobs for lab in labs], pa.float32()),
        }
        return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in self.schema], schema=self.schema)

    def _topk_columns(self, labs: list[SequenceLabels]) -> dict[str, pa.Array]:
        """The row group's top-k columns under the job's codec, one vectorised pass."""
        return self.codec.encode(
            np.concatenate([lab.topk_ids.reshape(-1, self.k) for lab in labs]),
            np.concatenate([lab.topk_logprobs.reshape(-1, self.k) for lab in labs]),
            np.array([len(lab.target_logprobs) for lab in labs], np.int64),
        )

    def _hidden_table(self, hashes: list[int]) -> pa.Table:
        assert self.hidden_schema is not None
        seqs = [s for s, _ in self._rows]
        labs = [lab for _, lab in self._rows]  # validated in add(): every row has its hidden states
        positions = [np.asarray(lab.hidden_positions, np.int32) for lab in labs]
        lengths = np.fromiter((len(p) for p in positions), np.int32, len(positions))
        offsets = np.zeros(len(positions) + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat_pos = np.concatenate(positions) if positions else np.zeros(0, np.int32)
        columns = [
            pa.array([s.sample_id for s in seqs], pa.string()),
            pa.array(hashes, pa.uint64()),
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat_pos, pa.int32())),
        ]
        for layer in self.hidden_layers:
            columns.append(
                pa.array([hidden_bytes(lab.hidden[layer], self.hidden_dtype) for lab in labs], pa.binary())
            )
        return pa.Table.from_arrays(
            [c.cast(f.type) for c, f in zip(columns, self.hidden_schema, strict=True)],
            schema=self.hidden_schema,
        )

    def _flush_row_group(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            name = shard_name(self.unit, self.next_shard)
            self._tmp_path = os.path.join(self._tmp_dir, f"{name}.parquet")
            self._sink = pa.OSFile(self._tmp_path, "wb")
            self._writer = pq.ParquetWriter(self._sink, self.schema, **self.options)
            if self.hidden_schema is not None:
                self._hidden_sink = pa.OSFile(self._tmp_path + ".hidden", "wb")
                self._hidden_writer = pq.ParquetWriter(
                    self._hidden_sink,
                    self.hidden_schema,
                    compression="zstd",
                    compression_level=self.options["compression_level"],
                    use_dictionary=False,
                )
        hashes = [token_hash(s.input_ids) for s, _ in self._rows]  # shared by both products
        table = self._table(hashes)
        self._writer.write_table(table, row_group_size=table.num_rows)
        if self._hidden_writer is not None:
            hidden = self._hidden_table(hashes)
            self._hidden_writer.write_table(hidden, row_group_size=hidden.num_rows)
        stats = self._shard_stats
        stats["rows"] += table.num_rows
        stats["tokens"] += sum(len(s.input_ids) for s, _ in self._rows)
        stats["label_positions"] += sum(len(s.input_ids) - 1 for s, _ in self._rows)
        stats["row_groups"] += 1
        self.next_sequence += len(self._rows)
        self._rows.clear()
        self._buffered_bytes = 0

    def _commit(self) -> ShardRecord:
        assert self._writer is not None and self._sink is not None
        self._writer.close()
        self._sink.close()
        name = shard_name(self.unit, self.next_shard)
        rel = f"{SHARDS_DIR}/{name}.parquet"
        dest = join_url(self.root, rel)
        hidden_fields: dict[str, Any] = {}
        if self._hidden_writer is not None:
            assert self._hidden_sink is not None
            self._hidden_writer.close()
            self._hidden_sink.close()
            hidden_tmp = self._tmp_path + ".hidden"
            hidden_rel = f"{HIDDEN_DIR}/{name}.parquet"
            hidden_fields = {
                "hidden_path": hidden_rel,
                "hidden_bytes": os.path.getsize(hidden_tmp),
                "hidden_sha256": _sha256_file(hidden_tmp),
            }
            publish_file(self.fs, hidden_tmp, join_url(self.root, hidden_rel))
            self._hidden_writer = self._hidden_sink = None
        record = ShardRecord(
            path=rel,
            unit=self.unit,
            index=self.next_shard,
            bytes=os.path.getsize(self._tmp_path),
            sha256=_sha256_file(self._tmp_path),
            first_sequence=self._shard_first_sequence,
            next_sequence=self.next_sequence,
            **self._shard_stats,
            **hidden_fields,
        )
        publish_file(self.fs, self._tmp_path, dest)
        if self.record_commits:
            self.commits.write_shard(record)
        self.committed.append(record)
        self.next_shard += 1
        self._shard_first_sequence = self.next_sequence
        self._shard_stats = {"rows": 0, "tokens": 0, "label_positions": 0, "row_groups": 0}
        self._writer = None
        self._sink = None
        return record
