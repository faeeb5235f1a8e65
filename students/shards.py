"""Shard access for the student reader: listings, checksum verification, row-group reads.

A :class:`ShardReader` reads one (shard, row group) at a time. With verification on
(``verify="error"`` or ``"skip"``) the first touch of a shard in a process reads the
whole file once, checks its byte size and sha256 against the shard record (from the
manifest, or from the commit log while a job is still writing) and keeps the verified
bytes in a bounded LRU buffer, so further row groups of that shard are served from
memory; a shard evicted from the buffer is re-read by row group (range reads) and not
hashed again, nor by later readers in the same process (evaluation streams).
``verify="off"`` always reads by row group. Row groups are decoded
zero-copy to numpy (flat list columns + offsets), never through Python objects.

Every path comes from a record and is joined to the dataset root only through
:func:`~labelgen.contract.format.dataset_file`, so a record cannot make the reader open
a file outside the dataset. Decoding trusts no byte: whatever a file holds, reading it
ends in :class:`Rows` whose arrays agree in shape (:func:`decode_rows`), in a
:class:`ChecksumError` (verification on: a changed file always fails its checksum, or is
skipped under 'skip') or in a FormatError naming the file.

Hidden-state shards are verified the same way (:meth:`ShardReader.open_verified`).
Each row group is decoded with the dataset's codec (:mod:`labelgen.contract.codecs`).
"""

from __future__ import annotations

import hashlib
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

from labelgen.contract.codecs import Codec, codec_for_columns, get_codec
from labelgen.contract.codecs.base import list_parts
from labelgen.contract.errors import ChecksumError
from labelgen.contract.format import (
    Columns,
    FormatError,
    Manifest,
    ShardRecord,
    check_dataset_path,
    dataset_file,
    label_schema,
    schema_problem,
)
from labelgen.contract.storage import MIB

__all__ = [
    "VERIFY_POLICIES",
    "check_verify_policy",
    "ChecksumError",
    "RowGroupRef",
    "Rows",
    "ShardReader",
    "decode_rows",
]

VERIFY_POLICIES = ("error", "skip", "off")
logger = logging.getLogger("students.stream")


_VERIFIED: set[tuple[str, str, str]] = set()  # (dataset root, shard path, sha256) hashed in this process


def check_verify_policy(verify: str) -> None:
    """Raise ValueError naming the policies unless ``verify`` is one of them."""
    if verify not in VERIFY_POLICIES:
        raise ValueError(f"verify={verify!r} is not a policy; choose one of {', '.join(VERIFY_POLICIES)}")


@dataclass(frozen=True, order=True)
class RowGroupRef:
    """One work unit: row group ``row_group`` of ``shard`` (path relative to the dataset root)."""

    shard: str
    row_group: int

    def __post_init__(self) -> None:
        check_dataset_path(self.shard, f"row group {self.row_group} of shard")


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


def _check_schema(table: pa.Table, codec: Codec, draws: bool) -> None:
    """Every column of the label schema is there with its type, so decoding never meets a
    column it cannot read."""
    problem = schema_problem(table, label_schema(draws=draws, codec=codec.name))
    if problem is not None:
        raise FormatError(f"{problem} (a {codec.name} label shard)")


def _lengths_agree(offsets: np.ndarray, expected: np.ndarray, what: str) -> None:
    if not np.array_equal(np.diff(offsets), expected):
        raise FormatError(f"{what} row lengths disagree with num_tokens")


def decode_rows(table: pa.Table, k: int, codec: Codec, where: str = "row group") -> Rows:
    """A label shard table stored with ``codec`` → :class:`Rows` (numpy views where Arrow allows).

    Whatever the table holds, the rows' arrays agree: every column of the format is there
    with its type and without nulls, each row's lists hold T, T-1 or (T-1)·k entries as
    the format says (T = ``num_tokens`` >= 1), ids are >= 0, and the draws (if any) add up.

    Raises:
        FormatError: naming ``where``, the column and what is wrong.
    """
    try:
        return _decode_rows(table, k, codec)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from exc


def _decode_rows(table: pa.Table, k: int, codec: Codec) -> Rows:
    draws_on = Columns.DRAW_NUM in table.column_names
    _check_schema(table, codec, draws_on)
    for name in (Columns.SAMPLE_ID, Columns.TOKEN_HASH, Columns.NUM_TOKENS):
        if table.column(name).null_count:
            raise FormatError(f"column {name!r} holds nulls; every column is non-nullable")
    num_tokens = table.column(Columns.NUM_TOKENS).to_numpy()
    if (num_tokens < 1).any():
        raise FormatError(f"num_tokens must be >= 1, got {int(num_tokens.min())}")
    positions = num_tokens.astype(np.int64) - 1
    tok_off, ids = list_parts(table, Columns.INPUT_IDS)
    _lengths_agree(tok_off, num_tokens, Columns.INPUT_IDS)
    lab_off, mask = list_parts(table, Columns.LABEL_MASK)
    _lengths_agree(lab_off, positions, Columns.LABEL_MASK)
    tgt_off, tgt = list_parts(table, Columns.TARGET_LOGPROBS)
    _lengths_agree(tgt_off, positions, Columns.TARGET_LOGPROBS)
    n = int(positions.sum())
    top_ids, top_lps = codec.decode(table, k)
    if top_ids.shape != (n, k) or top_lps.shape != (n, k):
        raise FormatError(
            f"{codec.name} top-k decoded to {top_ids.shape}, the rows hold {n} positions × k={k}"
        )
    if (ids.size and ids.min() < 0) or (top_ids.size and top_ids.min() < 0):
        raise FormatError("token ids must be >= 0; the shard is corrupt")
    draws: dict[str, Any] = {}
    if draws_on:
        num_off, num = list_parts(table, Columns.DRAW_NUM)
        _lengths_agree(num_off, positions, Columns.DRAW_NUM)
        offsets = np.zeros(len(num) + 1, np.int64)
        np.cumsum(num, out=offsets[1:])
        per_row = offsets[lab_off[1:]] - offsets[lab_off[:-1]]  # draws of each row's positions
        ids_off, draw_ids = list_parts(table, Columns.DRAW_IDS)
        counts_off, draw_counts = list_parts(table, Columns.DRAW_COUNTS)
        for name, off in ((Columns.DRAW_IDS, ids_off), (Columns.DRAW_COUNTS, counts_off)):
            if not np.array_equal(np.diff(off), per_row):
                raise FormatError(f"{name} row lengths disagree with the sums of draw_num")
        if draw_ids.size and draw_ids.min() < 0:
            raise FormatError("draw ids must be >= 0; the shard is corrupt")
        draws = {"draw_offsets": offsets, "draw_ids": draw_ids, "draw_counts": draw_counts}
    return Rows(
        **draws,
        k=k,
        sample_ids=table.column(Columns.SAMPLE_ID).to_pylist(),
        num_tokens=num_tokens,
        token_offsets=tok_off,
        input_ids=ids,
        label_offsets=lab_off,
        label_mask=mask,
        topk_ids=top_ids,
        topk_logprobs=top_lps,
        target_logprobs=tgt,
        token_hashes=table.column(Columns.TOKEN_HASH).to_numpy(),
    )


class ShardReader:
    """Reads and decodes row groups of one dataset, verifying each file once per process.

    Label shards and their hidden-state shards are verified alike: size and sha256
    against the shard record, under the same policy.

    Args:
        url: dataset URL (any fsspec URL).
        records: label shard path → its record (expected ``bytes`` and ``sha256``, and the
            hidden shard's ``hidden_bytes`` and ``hidden_sha256``). A follower adds records
            to this dict as they are committed.
        k: top-k width of the dataset (None: read off each row group, for a dataset whose
            writer recorded no job record).
        codec: the dataset's top-k codec name (None: recognised by its columns, likewise).
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
        codec: str | None = None,
        verify: str = "error",
        cache_mib: float = 512,
        log: Callable[[str], None] | None = None,
    ):
        check_verify_policy(verify)
        for name in records:  # the records themselves checked their paths when made
            check_dataset_path(name, f"{url}: shard record key")
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.records, self.k, self.verify = records, k, verify
        self.codec: Codec | None = get_codec(codec) if codec is not None else None
        self.cache_bytes = int(cache_mib * MIB)
        self.log = log or logger.warning
        self.verified: set[str] = set()
        self.skipped: list[str] = []  # file paths skipped by verify='skip', in order seen
        self._hidden_records: dict[str, ShardRecord] = {}  # hidden path -> its label shard's record
        self._buffers: OrderedDict[str, bytes] = OrderedDict()
        self._metadata: dict[str, pq.FileMetaData] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, tuple[Future, bytes]] = {}  # files whose hash is running
        self._verdicts: dict[str, bool] = {}  # file -> verified (True) or rejected (False)
        self._lock = threading.RLock()  # the consumer settles, the prefetch thread reads
        self.hashed_bytes = 0  # bytes read whole and hashed (verification cost)

    @classmethod
    def for_manifest(cls, url: str, manifest: Manifest, **options: Any) -> ShardReader:
        """A reader of the complete dataset ``manifest`` describes (options: verify, cache_mib, log)."""
        return cls(url, {s.path: s for s in manifest.shards}, manifest.k, manifest.codec, **options)

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
        path = dataset_file(self.root, ref.shard, "row group ref")
        with self._lock:  # a verdict is set before its pending entry goes: one of them is seen
            verdict = self._verdict(ref.shard)
            pending = self._pending.get(ref.shard)
        if verdict is False:
            return None, None
        if self.verify == "off" or verdict is True:
            return self._decode(ref, path, self._buffered(ref.shard)), None
        if pending is None:
            pending = self._start(ref.shard, path)
            if pending is None:
                return None, None
            with self._lock:
                self._pending[ref.shard] = pending
        data = pending[1]
        try:
            rows: Rows | None = self._decode(ref, path, pa.BufferReader(data))
        except FormatError:
            if self._settle(ref.shard):  # a corrupt file often fails to parse: checksum first
                raise
            return None, None
        return rows, lambda: self._settle(ref.shard)

    def open_verified(self, file: str) -> Any | None:
        """A readable file object for ``file`` (a dataset path: label or hidden shard) after
        verifying it against its record, synchronously; None if rejected under 'skip'.

        Raises:
            ChecksumError: the file's size or sha256 differ from its record ('error').
        """
        path = dataset_file(self.root, file, "verified file")
        verdict = self._verdict(file)
        if verdict is False:
            return None
        if self.verify != "off" and verdict is None:
            started = self._start(file, path)
            if started is None:
                return None
            with self._lock:
                self._pending[file] = started
            if not self._settle(file):
                return None
        buffered = self._buffered(file)
        return buffered if buffered is not None else self.fs.open(path, "rb")

    def _verdict(self, file: str) -> bool | None:
        verdict = self._verdicts.get(file)
        if verdict is None and self._key(file) in _VERIFIED:  # another reader of this process
            return True
        return verdict

    def _buffered(self, file: str) -> pa.BufferReader | None:
        with self._lock:
            data = self._buffers.get(file)
            if data is not None:
                self._buffers.move_to_end(file)
        return None if data is None else pa.BufferReader(data)

    def _expected(self, file: str) -> tuple[int, str, int] | None:
        """(bytes, sha256, rows) a file's record promises; None if it has no record."""
        record = self.records.get(file)
        if record is not None:
            return record.bytes, record.sha256, record.rows
        if file not in self._hidden_records:  # records may have been added (follow mode)
            self._hidden_records = {r.hidden_path: r for r in self.records.values() if r.hidden_path}
        record = self._hidden_records.get(file)
        if record is not None:
            return record.hidden_bytes, record.hidden_sha256, record.rows
        return None

    def _key(self, file: str) -> tuple[str, str, str]:
        expected = self._expected(file)
        return (f"{self.fs.protocol}:{self.root}", file, expected[1] if expected else "")

    def _start(self, file: str, path: str) -> tuple[Future, bytes] | None:
        """Read a file whole, check its size, start its hash. None: rejected ('skip')."""
        expected = self._expected(file)
        if expected is None:
            raise FormatError(
                f"{path} has no shard record (manifest or commit log), so it cannot be verified; "
                "pass verify='off' to read it unverified"
            )
        try:
            data = self.fs.cat_file(path)
        except ChecksumError as exc:  # the filesystem checks bytes itself (labelgen:// URLs)
            self._reject(file, f"failed its storage's check: {exc}")
            return None
        except OSError as exc:
            raise FormatError(f"cannot read {path}: {exc}") from exc
        self.hashed_bytes += len(data)
        if len(data) != expected[0]:
            self._reject(file, f"is {len(data)} bytes, its record says {expected[0]} (truncated or replaced)")
            return None
        if (
            getattr(self.fs, "verifies_whole_reads", False)
            and self.fs.info(path).get("sha256") == expected[1]
        ):
            # The filesystem (labelgen://) checked these bytes against this very sha256 as it
            # read them, and raises ChecksumError otherwise: hashing them again adds nothing.
            done: Future = Future()
            done.set_result(expected[1])
            return done, data
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-sha256")
        return self._pool.submit(lambda: hashlib.sha256(data).hexdigest()), data

    def _settle(self, file: str) -> bool:
        """Wait for a file's hash (without holding the lock); apply the policy once. True: verified."""
        with self._lock:
            if file in self._verdicts:
                return self._verdicts[file]
            future, data = self._pending[file]
        actual = future.result()
        with self._lock:
            if file in self._verdicts:  # settled by another thread meanwhile
                return self._verdicts[file]
            try:
                expected = self._expected(file)
                assert expected is not None  # _start refused files without a record
                if actual != expected[1]:
                    self._reject(file, f"has sha256 {actual}, its record says {expected[1]} (corrupt)")
                    return False
                self._verdicts[file] = True
                self.verified.add(file)
                _VERIFIED.add(self._key(file))
                if len(data) <= self.cache_bytes:
                    self._buffers[file] = data
                    while sum(len(b) for b in self._buffers.values()) > self.cache_bytes:
                        self._buffers.popitem(last=False)
                return True
            finally:
                self._pending.pop(file, None)

    def _decode(self, ref: RowGroupRef, path: str, source: pa.BufferReader | None) -> Rows:
        try:
            with source if source is not None else self.fs.open(path, "rb") as f:
                parquet = pq.ParquetFile(f, metadata=self._metadata.get(ref.shard))
                self._metadata.setdefault(ref.shard, parquet.metadata)
                groups = parquet.num_row_groups
                # threads: capped per DataLoader worker
                table = parquet.read_row_group(ref.row_group) if ref.row_group < groups else None
            if table is not None:
                table.validate(full=True)  # offsets within their buffers, valid UTF-8
        except (OSError, ValueError, pa.ArrowException) as exc:  # ArrowInvalid is a ValueError
            raise FormatError(f"cannot read row group {ref.row_group} of {path}: {exc}") from exc
        if table is None:
            raise FormatError(
                f"{path} has {groups} row groups, its record promises more (asked for row group "
                f"{ref.row_group}); the shard was replaced after it was committed: re-run the labeling job"
            )
        try:
            codec = self.codec or codec_for_columns(table.column_names)
        except ValueError as exc:
            raise FormatError(f"{path}: {exc}") from exc
        where = f"row group {ref.row_group} of {path}"
        k = self.k or codec.infer_k(table, where)
        return decode_rows(table, k, codec, where)

    def _reject(self, file: str, problem: str) -> None:
        """Apply the policy to a file that failed verification (raise, or log + count)."""
        message = f"shard {dataset_file(self.root, file)} {problem}"
        self._verdicts[file] = False
        if self.verify == "error":
            raise ChecksumError(
                f"{message}; re-run the labeling job to rewrite it, or pass verify='skip' to train without it"
            )
        self.skipped.append(file)
        expected = self._expected(file)
        rows = expected[2] if expected else 0
        self.log(f"{message}; skipping its {rows} rows (verify='skip')")
