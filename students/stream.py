"""Streaming reader over a label dataset URL: row-group work units over ranks × workers.

Work units are (shard, row group) pairs. Epoch ``e`` lists every unit once, in a seeded
permutation of ``(seed, e)`` (or manifest order with ``shuffle=False``); global worker
``g = rank * W + w`` (W = dataloader workers per rank, at least 1) of ``G = world_size * W``
takes units ``order[g::G]``. The split is exact: every unit goes to exactly one worker
per epoch; when G does not divide the unit count, the first ``count % G`` workers get
one unit more (no padding, no dropping). Row groups differ in rows anyway, so ranks
never produce equal batch counts per epoch: train with ``loop=True`` and a step budget
(DDP lockstep holds because every rank's stream is endless), and reduce eval sums
across ranks.

Each worker turns its units into batches (a batch never spans row groups) and
attaches its next cursor ``{"epoch", "pos", "row", "follow"}``. :meth:`LabelStream.state_dict`
holds every worker's cursor plus which worker yields next, so
:meth:`LabelStream.load_state_dict` resumes with exactly the batch an uninterrupted run
would yield next, in-process or with ``num_workers`` DataLoader processes (which PyTorch
interleaves round-robin; a resumed loader is rotated to start at the right worker).

Follow mode (``follow=True``) reads a dataset whose labeling job is still running: the
units come from ``_commits/part-*.json`` (polled every ``poll_interval`` seconds). In
this first epoch unit ``(u, i)`` (the i-th row group of work unit u) belongs to worker
``(u + i) % G``, a rule that does not depend on when a shard was seen; the cursor holds
the next index per work unit. The epoch ends when ``manifest.json`` exists and every
listed unit was read; with ``loop=True`` further epochs run over the manifest as above.

Checksums (``verify``) and row-group reads live in :mod:`students.shards`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
import numpy as np

from labelgen.contract.commits import CommitLog
from labelgen.contract.dataset import labels_layout, read_manifest, read_manifest_if_complete
from labelgen.contract.format import FormatError, Manifest, ShardRecord
from students.hidden import read_hidden
from students.shards import ChecksumError, RowGroupRef, Rows, ShardReader, check_verify_policy, decode_rows

__all__ = [
    "RowGroupRef",
    "Rows",
    "ChecksumError",
    "LabelStream",
    "open_dataset",
    "row_group_refs",
    "collate",
    "collate_hidden",
    "decode_rows",
    "STATE_FORMAT",
]

STATE_FORMAT = "labelgen-stream/2"
Cursor = dict[str, Any]  # {"epoch": int, "pos": int, "row": int, "follow": dict | None}


def row_group_refs(manifest: Manifest) -> list[RowGroupRef]:
    """All (shard, row group) pairs of a dataset, in manifest order."""
    return [RowGroupRef(s.path, i) for s in manifest.shards for i in range(s.row_groups)]


def open_dataset(url: str) -> tuple[Manifest, Any, str]:
    """Manifest, filesystem and root path of a complete label dataset."""
    manifest = read_manifest(url)
    fs, root = fsspec.core.url_to_fs(url)
    return manifest, fs, root


def collate(rows: Rows, indices: Iterable[int]) -> dict[str, np.ndarray]:
    """Pad the given rows into a batch (numpy), vectorised (no per-row Python loop).

    Returns:
        input_ids (B, T) int64, zero-padded; label_mask (B, T-1) float32 (0 on padding);
        topk_ids (B, T-1, k) int64; topk_logprobs (B, T-1, k) float32;
        target_logprobs (B, T-1) float32; next_ids (B, T-1) int64; with random-sampling
        labels also draw_ids (B, T-1, U) int64 and draw_counts (B, T-1, U) float32;
        token_hash (B,) int64: each row's ``token_hash`` (uint64 bits), to join other products.
        T is the longest selected row; B = len(indices).
    """
    idx = np.fromiter(indices, np.int64)
    lengths = rows.num_tokens[idx].astype(np.int64)
    b, t, k = len(idx), int(lengths.max()), rows.k
    tok_start, lab_start = rows.token_offsets[idx], rows.label_offsets[idx]
    contiguous = bool(np.all(lengths == t)) and bool(np.all(np.diff(idx) == 1))
    if contiguous:  # packed rows of one length: one slice + reshape per column
        a, z = int(lab_start[0]), int(lab_start[0]) + b * (t - 1)
        ts = int(tok_start[0])
        out = {
            "input_ids": rows.input_ids[ts : ts + b * t].reshape(b, t).astype(np.int64),
            "label_mask": rows.label_mask[a:z].reshape(b, t - 1).astype(np.float32),
            "topk_ids": rows.topk_ids[a:z].reshape(b, t - 1, k).astype(np.int64),
            "topk_logprobs": rows.topk_logprobs[a:z].reshape(b, t - 1, k).copy(),
            "target_logprobs": rows.target_logprobs[a:z].reshape(b, t - 1).copy(),
        }
        positions = np.arange(a, z).reshape(b, t - 1)
        valid = np.ones((b, t - 1), bool)
    else:
        steps = np.arange(t)
        tok_valid = steps[None, :] < lengths[:, None]  # (B, T)
        tok_src = np.where(tok_valid, tok_start[:, None] + steps[None, :], 0)
        valid = tok_valid[:, 1:]  # (B, T-1): position p < length - 1
        positions = np.where(valid, lab_start[:, None] + steps[None, :-1], 0)
        out = {
            "input_ids": np.where(tok_valid, rows.input_ids[tok_src], 0).astype(np.int64),
            "label_mask": np.where(valid, rows.label_mask[positions], 0).astype(np.float32),
            "topk_ids": np.where(valid[..., None], rows.topk_ids[positions], 0).astype(np.int64),
            "topk_logprobs": np.where(valid[..., None], rows.topk_logprobs[positions], 0).astype(np.float32),
            "target_logprobs": np.where(valid, rows.target_logprobs[positions], 0).astype(np.float32),
        }
    out["next_ids"] = out["input_ids"][:, 1:].copy()
    if rows.token_hashes is not None:  # row identity (uint64 bits as int64) for joins and checks
        out["token_hash"] = rows.token_hashes[idx].view(np.int64)
    if rows.draw_offsets is not None:
        out.update(_collate_draws(rows, positions, valid))
    return out


def _collate_draws(rows: Rows, positions: np.ndarray, valid: np.ndarray) -> dict[str, np.ndarray]:
    """Random-sampling labels as (B, T-1, U) ids and counts, zero-padded (U = most unique ids).

    Args:
        positions: (B, T-1) flat label-position index of each batch slot.
        valid: (B, T-1) bool, False on padding.
    """
    assert rows.draw_offsets is not None and rows.draw_ids is not None and rows.draw_counts is not None
    start = rows.draw_offsets[positions]  # (B, T-1)
    count = np.where(valid, rows.draw_offsets[positions + 1] - start, 0)
    width = max(int(count.max(initial=0)), 1)
    slot = np.arange(width)
    hit = slot[None, None, :] < count[..., None]  # (B, T-1, U)
    src = np.where(hit, start[..., None] + slot, 0)
    ids = np.where(hit, rows.draw_ids[src], 0).astype(np.int64)
    counts = np.where(hit, rows.draw_counts[src], 0).astype(np.float32)
    return {"draw_ids": ids, "draw_counts": counts}


def collate_hidden(hidden: Any, indices: Iterable[int]) -> dict[str, np.ndarray]:
    """The teacher's sampled hidden states of the given rows (a ``HiddenRows``), flat.

    Returns:
        hidden_row (P,) int64: the batch row (0..B-1) of each sample; hidden_pos (P,) int64:
        its token position t in that row (the state after token t); hidden_layer_<L> (P, D_L)
        float32 for each stored teacher layer L. P = samples over the selected rows.
    """
    idx = np.fromiter(indices, np.int64)
    starts, ends = hidden.offsets[idx], hidden.offsets[idx + 1]
    counts = ends - starts
    take = np.concatenate([np.arange(a, z) for a, z in zip(starts, ends, strict=True)]) if len(idx) else []
    take = np.asarray(take, np.int64)
    out = {
        "hidden_row": np.repeat(np.arange(len(idx), dtype=np.int64), counts),
        "hidden_pos": hidden.positions[take].astype(np.int64),
    }
    for layer, values in hidden.values.items():
        out[f"hidden_layer_{layer}"] = values[take] if len(take) else values[:0]
    return out


def _log_warning(message: str) -> None:
    import logging

    logging.getLogger("students.stream").warning(message)


class LabelStream:
    """Batches of padded label rows from a label dataset, sharded over ranks × workers.

    Args:
        url: dataset URL.
        manifest: the dataset's manifest; None only with ``follow=True`` (read if present).
        refs: the row groups this stream reads (e.g. all but the held-out ones); None: all.
        batch_sequences: rows per batch.
        seed: order seed.
        shuffle: permute row groups per epoch (training) or keep manifest order (eval).
        loop: start a new epoch when one ends (training) or stop (eval).
        prefetch: row groups read ahead in a background thread per worker (0: none).
        rank: this process's rank in ``world_size`` data-parallel ranks.
        world_size: number of data-parallel ranks.
        num_workers: DataLoader worker processes per rank (0: read in this process).
        verify: shard checksum policy, 'error' | 'skip' | 'off' (see :class:`ShardReader`).
        cache_mib: per-process LRU buffer of verified shard bytes.
        follow: read a dataset while its labeling job still writes it (see module doc).
        poll_interval: seconds between polls of ``_commits/`` in follow mode.
        follow_timeout: raise TimeoutError after this many seconds without a new commit
            (None: wait for ever).
        mp_context: multiprocessing start method of the DataLoader workers.
        log: called with warnings (skipped shards); must pickle when num_workers > 0.
        hidden: also join the teacher's sampled hidden states to each batch
            (:func:`collate_hidden`; needs a dataset labeled with hidden.layers).
    """

    def __init__(
        self,
        url: str,
        manifest: Manifest | None,
        refs: list[RowGroupRef] | None,
        batch_sequences: int,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        prefetch: int = 2,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        verify: str = "error",
        cache_mib: float = 512,
        follow: bool = False,
        poll_interval: float = 5.0,
        follow_timeout: float | None = None,
        mp_context: str | None = "forkserver",
        log: Callable[[str], None] | None = None,
        hidden: bool = False,
    ):
        if batch_sequences < 1:
            raise ValueError(f"batch_sequences must be >= 1, got {batch_sequences}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        check_verify_policy(verify)
        self.url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.follow, self.hidden = follow, hidden
        if hidden and follow:
            raise ValueError(
                "hidden=True needs the complete dataset's manifest; it cannot be used with follow=True"
            )
        if follow:
            if refs is not None:
                raise ValueError(
                    "follow=True reads every committed row group, so refs must be None; "
                    "evaluate on a separate dataset (data.eval_url)"
                )
            manifest = manifest or read_manifest_if_complete(self.fs, self.root)
        elif manifest is None:
            raise ValueError(f"{url!r}: manifest is required unless follow=True (use open_dataset(url))")
        self.manifest = manifest
        self.k: int | None = None  # top-k width and codec: from the manifest, or the job record
        self.codec: str | None = None
        self._adopt_layout(manifest)
        if refs is None:
            refs = row_group_refs(manifest) if manifest is not None else []
        if not refs and not follow:
            raise FormatError(f"{url!r}: no row groups to read (the dataset or its split is empty)")
        self.refs, self.batch, self.seed = refs, batch_sequences, seed
        self.shuffle, self.loop, self.prefetch = shuffle, loop, prefetch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.workers = max(num_workers, 1)  # logical workers of this rank
        if loop and refs and len(refs) < world_size * self.workers:
            raise ValueError(
                f"{url!r} has {len(refs)} row groups but world_size * num_workers = "
                f"{world_size * self.workers} workers; some would never get data. Lower num_workers, "
                "or label with a smaller output.row_group_mib"
            )
        self.verify, self.cache_mib = verify, cache_mib
        self.poll_interval, self.follow_timeout = poll_interval, follow_timeout
        self.mp_context = mp_context
        self.log = log or _log_warning
        self.records: dict[str, ShardRecord] = {s.path: s for s in manifest.shards} if manifest else {}
        self._cursors: list[Cursor] = [self._start_cursor() for _ in range(self.workers)]
        self._skipped: list[list[str]] = [[] for _ in range(self.workers)]
        self._next_worker = 0

    # -- order and sharding -----------------------------------------------------------
    def order(self, epoch: int) -> list[RowGroupRef]:
        """Every unit of epoch ``epoch`` in read order (a pure function of seed and epoch)."""
        if not self.shuffle:
            return list(self.refs)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.refs))
        return [self.refs[i] for i in perm]

    def global_worker(self, worker: int) -> tuple[int, int]:
        """(g, G): the global index of logical worker ``worker`` of this rank, and the count."""
        return self.rank * self.workers + worker, self.world_size * self.workers

    def worker_units(self, epoch: int, worker: int) -> list[RowGroupRef]:
        """The units logical worker ``worker`` of this rank reads in epoch ``epoch``."""
        g, n = self.global_worker(worker)
        return self.order(epoch)[g::n]

    # -- state ------------------------------------------------------------------------
    @property
    def skipped_shards(self) -> list[str]:
        """Shards skipped by ``verify='skip'`` so far (over all workers of this rank)."""
        return sorted({s for per_worker in self._skipped for s in per_worker})

    def _start_cursor(self) -> Cursor:
        return {"epoch": 0, "pos": 0, "row": 0, "follow": None}

    def state_dict(self) -> dict[str, Any]:
        """The cursor of the next batch (JSON-able). Save one per rank."""
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "follow": self.follow,
            "next_worker": self._next_worker,
            "workers": [dict(c) for c in self._cursors],
            "skipped": [list(s) for s in self._skipped],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (also accepts the old ``{epoch, unit, row, seed}``)."""
        if "format" not in state:  # single-worker cursor of the first reader version
            state = {
                "seed": state.get("seed", self.seed),
                "workers": [{"epoch": state["epoch"], "pos": state["unit"], "row": state["row"]}],
            }
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data cursor was saved with seed {state['seed']}, this run uses {self.seed}")
        for name in ("rank", "world_size", "num_workers", "follow"):
            saved = state.get(name, getattr(self, name))
            if saved != getattr(self, name):
                raise ValueError(
                    f"data cursor was saved with {name}={saved}, this stream has "
                    f"{name}={getattr(self, name)}; exact resume needs the same sharding: restart with "
                    "the saved value"
                )
        workers = state["workers"]
        if len(workers) != self.workers:
            raise ValueError(
                f"data cursor holds {len(workers)} worker cursors, this stream has {self.workers}"
            )
        self._cursors = [{**self._start_cursor(), **w} for w in workers]
        self._skipped = [list(s) for s in state.get("skipped", [[] for _ in workers])]
        self._next_worker = int(state.get("next_worker", 0))

    def observe(self, meta: dict[str, Any]) -> None:
        """Record the cursor attached to a batch (``LabelDataset`` yields ``(batch, meta)``)."""
        worker = int(meta["worker"])
        self._cursors[worker] = meta["cursor"]
        self._skipped[worker] = list(meta["skipped"])
        self._next_worker = (worker + 1) % self.workers

    # -- plans: which units, from which row, with which cursors --------------------------
    def _plan(self, worker: int, cursor: Cursor, stop: threading.Event) -> Iterator[tuple]:
        """(ref, start row, cursor-at-row function, cursor after the unit) from ``cursor`` on."""
        epoch, pos, row = cursor["epoch"], cursor["pos"], cursor["row"]
        if self.follow and epoch == 0:
            yield from self._follow_plan(worker, cursor, stop)
            if not self.loop:
                return
            epoch, pos, row = 1, 0, 0
        if self.follow and not self.refs:  # resumed after the follow epoch
            self._adopt_manifest(read_manifest(self.url))
        while not stop.is_set():
            mine = self.worker_units(epoch, worker)
            while pos < len(mine):

                def at(r: int, e: int = epoch, p: int = pos) -> Cursor:
                    return {"epoch": e, "pos": p, "row": r, "follow": None}

                yield mine[pos], row, at, {"epoch": epoch, "pos": pos + 1, "row": 0, "follow": None}
                pos, row = pos + 1, 0
            if not self.loop:
                return
            epoch, pos = epoch + 1, 0

    def _adopt_layout(self, manifest: Manifest | None) -> None:
        """Learn k and the codec (from the manifest, else the job record, if written yet)."""
        layout = labels_layout(self.fs, self.root, manifest)
        if layout is not None:
            self.k, self.codec = layout.k, layout.codec

    def _adopt_manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._adopt_layout(manifest)
        self.refs = row_group_refs(manifest)
        self.records.update({s.path: s for s in manifest.shards})
        g, n = self.global_worker(0)
        if self.loop and len(self.refs) < n:
            raise ValueError(
                f"{self.url!r} has {len(self.refs)} row groups for {n} workers; lower num_workers"
            )

    def _follow_plan(self, worker: int, cursor: Cursor, stop: threading.Event) -> Iterator[tuple]:
        """The follow epoch: committed units of this worker as they appear (module doc)."""
        g, n = self.global_worker(worker)
        state = cursor.get("follow") or {"units": {}, "active": None}
        done = {int(u): int(i) for u, i in state["units"].items()}  # next unread index per unit
        active = state["active"]
        seen, last_new = -1, time.monotonic()
        looked = False  # for the job record: it precedes the first shard record, or is never written
        while not stop.is_set():
            manifest = read_manifest_if_complete(self.fs, self.root)  # before listing: then complete
            records = manifest.shards if manifest is not None else CommitLog(self.fs, self.root).shards()
            self.records.update({r.path: r for r in records})
            if records and self.k is None and (not looked or manifest is not None):
                looked = True
                self._adopt_layout(manifest)
            shards: dict[int, list[ShardRecord]] = {}
            for r in sorted(records, key=lambda r: (r.unit, r.index)):
                listed = shards.setdefault(r.unit, [])
                if r.index == len(listed):  # a unit's shards commit in order; stop at a gap
                    listed.append(r)
            by_unit = {
                u: [RowGroupRef(r.path, i) for r in listed for i in range(r.row_groups)]
                for u, listed in shards.items()
            }
            todo = [
                (u, i, refs[i])
                for u, refs in sorted(by_unit.items())
                for i in range(done.get(u, 0), len(refs))
                if (u + i) % n == g
            ]
            if active is not None:  # the unit a saved cursor stopped in comes first
                todo.sort(key=lambda item: (item[0], item[1]) != (active[0], active[1]))
            if len(records) != seen:
                seen, last_new = len(records), time.monotonic()
            if not todo:
                if manifest is not None:
                    self._adopt_manifest(manifest)
                    return
                if self.follow_timeout is not None and time.monotonic() - last_new > self.follow_timeout:
                    raise TimeoutError(
                        f"follow: no new shard committed under {self.url!r} for {self.follow_timeout}s "
                        "and no manifest; the labeling job may have died (re-run it to finish)"
                    )
                stop.wait(self.poll_interval)
                continue
            for u, i, ref in todo:
                start = active[2] if active is not None and (u, i) == (active[0], active[1]) else 0
                before = {str(x): y for x, y in done.items()}

                def at(r: int, u: int = u, i: int = i, before: dict = before) -> Cursor:
                    return {"epoch": 0, "pos": 0, "row": 0, "follow": {"units": before, "active": [u, i, r]}}

                done[u] = i + 1
                after = {"units": {str(x): y for x, y in done.items()}, "active": None}
                yield ref, start, at, {"epoch": 0, "pos": 0, "row": 0, "follow": after}
                active = None
                if stop.is_set():
                    return

    # -- batches ----------------------------------------------------------------------
    def _reader(self) -> ShardReader:
        return ShardReader(
            self.url,
            self.records,
            self.k,
            self.codec,
            verify=self.verify,
            cache_mib=self.cache_mib,
            log=self.log,
        )

    def worker_batches(
        self, worker: int, cursor: Cursor
    ) -> Iterator[tuple[dict[str, np.ndarray], Cursor, list]]:
        """(batch, cursor after it, skipped shards) of one logical worker from ``cursor`` on.

        Row groups are read and decoded ``prefetch`` ahead in a background thread; a shard's
        rows are handed out only after its checksum verdict (:meth:`ShardReader.read_pending`).
        """
        reader: ShardReader | None = None  # made at the first row group: a follower knows k by then
        stop = threading.Event()
        plan = self._plan(worker, cursor, stop)

        def load(item: tuple) -> tuple:
            nonlocal reader
            ref, start, at, end = item
            if reader is None:
                reader = self._reader()
            rows, check = reader.read_pending(ref)  # a first-touch shard is hashed meanwhile
            if self.hidden and rows is not None:
                assert self.manifest is not None  # hidden excludes follow mode
                hidden = read_hidden(self.url, self.manifest, ref, rows, reader=reader)
                if hidden is None:  # its hidden shard was skipped: so are its rows
                    if check is not None:
                        check()  # settle the label shard's hash too (frees its buffer)
                    return ref, start, at, end, None, None
                rows = (rows, hidden)
            return ref, start, at, end, rows, check

        items: Iterator[tuple]
        if self.prefetch <= 0:
            items = (load(item) for item in plan)
        else:
            items = _background(map(load, plan), self.prefetch, stop)
        try:
            for _ref, start, at, end, rows, check in items:
                if rows is None or (check is not None and not check()):
                    continue  # shard skipped by verify='skip'
                rows, hidden = rows if self.hidden else (rows, None)
                for row in range(start, len(rows), self.batch):
                    stop_row = min(row + self.batch, len(rows))
                    after = end if stop_row >= len(rows) else at(stop_row)
                    batch = collate(rows, range(row, stop_row))
                    if hidden is not None:
                        batch.update(collate_hidden(hidden, range(row, stop_row)))
                    yield batch, after, list(reader.skipped if reader is not None else [])
        finally:
            stop.set()
            if hasattr(items, "close"):
                items.close()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches (numpy, shapes in :func:`collate`) from the cursor on, read in this process.

        Raises:
            ValueError: the stream has ``num_workers > 0``: its batches come from DataLoader
                worker processes, through :func:`students.loader.make_loader`.
        """
        if self.num_workers > 0:
            raise ValueError(
                f"this stream of {self.url!r} reads with num_workers={self.num_workers} DataLoader "
                "workers: iterate students.loader.make_loader(stream), or build it with num_workers=0"
            )
        for batch, cursor, skipped in self.worker_batches(0, self._cursors[0]):
            self._cursors[0], self._skipped[0] = cursor, skipped
            yield batch


def _background(items: Iterator[Any], depth: int, stop: threading.Event) -> Iterator[Any]:
    """Iterate ``items`` in a daemon thread, ``depth`` ahead; exceptions re-raised here."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            put(exc)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := box.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
