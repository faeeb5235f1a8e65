"""Shard access for the student reader: listings, checksum verification, row-group reads.

A :class:`ShardReader` reads one (shard, row group) at a time. With verification on
(``verify="error"`` or ``"skip"``) the first touch of a shard in a process reads the
whole file once, checks its byte size and sha256 against the shard record (from the
manifest, or from ``_commits/`` while a job is still writing) and keeps the verified
bytes in a bounded LRU buffer, so further row groups of that shard are served from
memory; a shard evicted from the buffer is re-read by row group (range reads) and not
hashed again, nor by later readers in the same process (evaluation streams).
``verify="off"`` always reads by row group. Row groups are decoded
zero-copy to numpy (flat list columns + offsets), never through Python objects.

This module also reads the commit records of a dataset that is still being written
(the same ``_commits/part-*.json`` files ``labelgen.runner`` writes), using only the
contract's names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.contract.format import (
    COMMITS_DIR,
    MANIFEST_NAME,
    Columns,
    FormatError,
    Manifest,
    ShardRecord,
    decode_topk_table,
    join_url,
    list_fresh,
)

__all__ = [
    "VERIFY_POLICIES",
    "ChecksumError",
    "RowGroupRef",
    "Rows",
    "ShardReader",
    "decode_rows",
    "infer_k",
    "read_commit_records",
    "read_manifest_if_complete",
]

VERIFY_POLICIES = ("error", "skip", "off")
_MIB = 1 << 20
logger = logging.getLogger("students.data")


_VERIFIED: set[tuple[str, str, str]] = set()  # (dataset root, shard path, sha256) hashed in this process


class ChecksumError(FormatError):
    """A shard's bytes do not match the size or sha256 its record promises."""


@dataclass(frozen=True, order=True)
class RowGroupRef:
    """One work unit: row group ``row_group`` of ``shard`` (path relative to the dataset root)."""

    shard: str
    row_group: int


@dataclass
class Rows:
    """Decoded rows of one row group. R rows, N = sum(T-1) label positions."""

    k: int
    sample_ids: list[str]
    num_tokens: np.ndarray  # (R,) int32
    token_offsets: np.ndarray  # (R+1,) offsets into input_ids
    input_ids: np.ndarray  # (sum T,) int32
    label_offsets: np.ndarray  # (R+1,) offsets into label positions
    label_mask: np.ndarray  # (N,) uint8
    topk_ids: np.ndarray  # (N, k) int32
    topk_logprobs: np.ndarray  # (N, k) float32
    target_logprobs: np.ndarray  # (N,) float32
    draw_offsets: np.ndarray | None = None  # (N+1,) offsets into draw_ids per position
    draw_ids: np.ndarray | None = None  # (sum U,) int32
    draw_counts: np.ndarray | None = None  # (sum U,) uint8
    token_hashes: np.ndarray | None = None  # (R,) uint64, joins other products (hidden states)

    def __len__(self) -> int:
        return len(self.sample_ids)


def _flat(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table.column(name).combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=False)
    return offsets - offsets[0], values[offsets[0] : offsets[-1]]


def decode_rows(table: pa.Table, k: int) -> Rows:
    """A label shard table (any codec) → :class:`Rows` (numpy views where Arrow allows)."""
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
        token_hashes=table.column(Columns.TOKEN_HASH).to_numpy(),
    )


def infer_k(table: pa.Table, where: str) -> int:
    """The top-k width of a shard table: top-k values per label position."""
    positions = table.column(Columns.LABEL_MASK).combine_chunks().values
    name = Columns.TOPK_IDS if Columns.TOPK_IDS in table.column_names else Columns.TOPK_ID_DELTAS
    values = table.column(name).combine_chunks().values
    if len(positions) == 0 or len(values) % len(positions):
        raise FormatError(f"{where}: cannot infer k ({len(values)} top-k values, {len(positions)} positions)")
    return len(values) // len(positions)


def read_commit_records(fs: Any, root: str) -> list[ShardRecord]:
    """Committed shard records under ``<root>/_commits`` sorted by (unit, shard index).

    Records are written atomically after their shard, so every listed shard is complete.
    Temporary files (``*.json.tmp-PID``) and unit records are ignored.
    """
    records = []
    for path in list_fresh(fs, join_url(root, COMMITS_DIR), "part-"):
        name = path.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(".json"):
            with fs.open(path, "r") as f:
                records.append(ShardRecord(**json.load(f)))
    records.sort(key=lambda r: (r.unit, r.index))
    return records


def read_manifest_if_complete(fs: Any, root: str) -> Manifest | None:
    """The manifest if the dataset is complete (``manifest.json`` present), else None."""
    path = join_url(root, MANIFEST_NAME)
    try:
        with fs.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return Manifest.from_json(text, where=path)


class ShardReader:
    """Reads and decodes row groups of one dataset, verifying each shard once per process.

    Args:
        url: dataset URL (any fsspec URL).
        records: shard path → its record (expected ``bytes`` and ``sha256``).
        k: top-k width of the dataset (None: inferred per row group, for datasets being written).
        verify: 'error' (raise :class:`ChecksumError`), 'skip' (log, count, skip the
            shard's rows) or 'off' (no hashing; range reads).
        cache_mib: LRU buffer of verified shard bytes, in MiB.
        log: called with a message when a shard is skipped.
    """

    def __init__(
        self,
        url: str,
        records: dict[str, ShardRecord],
        k: int | None,
        verify: str = "error",
        cache_mib: float = 512,
        log: Callable[[str], None] | None = None,
    ):
        if verify not in VERIFY_POLICIES:
            raise ValueError(f"verify={verify!r} is not a policy; choose one of {', '.join(VERIFY_POLICIES)}")
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.records, self.k, self.verify = records, k, verify
        self.cache_bytes = int(cache_mib * _MIB)
        self.log = log or logger.warning
        self.verified: set[str] = set()
        self.skipped: list[str] = []  # shard paths skipped by verify='skip', in order seen
        self._buffers: OrderedDict[str, bytes] = OrderedDict()
        self._metadata: dict[str, pq.FileMetaData] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, tuple[Future, bytes]] = {}  # shards whose hash is running
        self._verdicts: dict[str, bool] = {}  # shard -> verified (True) or rejected (False)
        self._lock = threading.RLock()  # the consumer settles, the prefetch thread reads
        self.hashed_bytes = 0  # bytes read whole and hashed (verification cost)

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers start with empty caches
        state = dict(self.__dict__)
        state.update(_buffers=OrderedDict(), _metadata={}, _pool=None, _pending={}, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def read(self, ref: RowGroupRef) -> Rows | None:
        """Decoded rows of ``ref``; None if its shard failed verification under 'skip'.

        Raises:
            ChecksumError: the shard's size or sha256 differ from its record ('error').
            FormatError: the shard cannot be read or parsed (names the file).
        """
        rows, check = self.read_pending(ref)
        if check is not None and not check():
            return None
        return rows

    def read_pending(self, ref: RowGroupRef) -> tuple[Rows | None, Callable[[], bool] | None]:
        """Like :meth:`read`, but the shard's hash may still be running: returns the rows and
        ``check`` (None once the shard is verified), which waits for the hash and returns
        False if the rows must be dropped ('skip') or raises ChecksumError ('error').

        The first touch of a shard reads the whole file and hashes it in a helper thread;
        meanwhile this row group and the next ones of the shard are decoded from the same
        buffer (hashing and decoding both release the GIL). Call ``check`` before handing
        any of the rows out.
        """
        path = join_url(self.root, ref.shard)
        verdict = self._verdicts.get(ref.shard)
        if verdict is None and self._key(ref.shard) in _VERIFIED:  # another reader of this process
            verdict = True
        if verdict is False:
            return None, None
        if self.verify == "off" or verdict is True:
            with self._lock:
                data = self._buffers.get(ref.shard)
                if data is not None:
                    self._buffers.move_to_end(ref.shard)
            return self._decode(ref, path, None if data is None else pa.BufferReader(data)), None
        if ref.shard not in self._pending:
            started = self._start(ref.shard, path)
            if started is None:
                return None, None
            self._pending[ref.shard] = started
        data = self._pending[ref.shard][1]
        try:
            rows: Rows | None = self._decode(ref, path, pa.BufferReader(data))
        except FormatError:
            if self._settle(ref.shard):  # a corrupt file often fails to parse: checksum first
                raise
            return None, None
        return rows, lambda: self._settle(ref.shard)

    def _key(self, shard: str) -> tuple[str, str, str]:
        record = self.records.get(shard)
        return (f"{self.fs.protocol}:{self.root}", shard, record.sha256 if record else "")

    def _start(self, shard: str, path: str) -> tuple[Future, bytes] | None:
        """Read a shard whole, check its size, start its hash. None: rejected ('skip')."""
        record = self.records.get(shard)
        if record is None:
            raise FormatError(
                f"{path} has no shard record (manifest or _commits), so it cannot be verified; "
                "pass verify='off' to read it unverified"
            )
        try:
            data = self.fs.cat_file(path)
        except OSError as exc:
            raise FormatError(f"cannot read {path}: {exc}") from exc
        self.hashed_bytes += len(data)
        if len(data) != record.bytes:
            self._reject(
                shard, f"is {len(data)} bytes, its record says {record.bytes} (truncated or replaced)"
            )
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-sha256")
        return self._pool.submit(lambda: hashlib.sha256(data).hexdigest()), data

    def _settle(self, shard: str) -> bool:
        """Wait for a shard's hash; apply the policy once. True: verified."""
        with self._lock:
            if shard in self._verdicts:
                return self._verdicts[shard]
            future, data = self._pending.pop(shard)
            actual, expected = future.result(), self.records[shard].sha256
            if actual != expected:
                self._reject(shard, f"has sha256 {actual}, its record says {expected} (corrupt)")
                return False
            self._verdicts[shard] = True
            self.verified.add(shard)
            _VERIFIED.add(self._key(shard))
            if len(data) <= self.cache_bytes:
                self._buffers[shard] = data
                while sum(len(b) for b in self._buffers.values()) > self.cache_bytes:
                    self._buffers.popitem(last=False)
            return True

    def _decode(self, ref: RowGroupRef, path: str, source: pa.BufferReader | None) -> Rows:
        try:
            with source if source is not None else self.fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f, metadata=self._metadata.get(ref.shard))
                self._metadata.setdefault(ref.shard, parquet.metadata)
                if ref.row_group >= parquet.num_row_groups:
                    raise FormatError(
                        f"{path} has {parquet.num_row_groups} row groups, its record promises more "
                        f"(asked for row group {ref.row_group}); the shard was replaced after it was "
                        "committed: re-run the labeling job"
                    )
                table = parquet.read_row_group(ref.row_group)  # threads: capped per DataLoader worker
        except (OSError, pa.ArrowException) as exc:
            raise FormatError(f"cannot read row group {ref.row_group} of {path}: {exc}") from exc
        return decode_rows(table, self.k or infer_k(table, path))

    def _reject(self, shard: str, problem: str) -> None:
        """Apply the policy to a shard that failed verification (raise, or log + count)."""
        message = f"shard {join_url(self.root, shard)} {problem}"
        self._verdicts[shard] = False
        if self.verify == "error":
            raise ChecksumError(
                f"{message}; re-run the labeling job to rewrite it, or pass verify='skip' to train without it"
            )
        self.skipped.append(shard)
        self.log(f"{message}; skipping its {self.records[shard].rows} rows (verify='skip')")
