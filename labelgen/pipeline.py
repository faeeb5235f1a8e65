"""The overlapped labeling loop: the host prepares and stores batches while the engine computes.

A work unit's labeling has three stages:

1. **prepare** (a thread): read the source, tokenize, pack and group sequences into
   batches (the ``batches`` iterable the caller builds);
2. **label** (the calling thread): ``teacher.label(batch)``, the only stage that uses
   the accelerator;
3. **store** (a thread): encode, hash, write and commit shards (the ``store``
   callback).

Bounded queues of ``depth`` batches between the stages keep the next batch ready
before the engine finishes the current one, and the engine does not wait for the
previous batch to be encoded and written. Each stage handles batches one at a time in
the order the prepare stage made them, so rows, row groups, shard rotation and the
commit records are exactly those of the serial loop (``depth=0``, every stage in the
calling thread, one after another), and so is resuming a killed job.

The cost is memory: besides the batch being stored, up to ``depth`` labeled batches wait
for the store stage and ``depth`` prepared ones for the engine (labels of 256 sequences of
2,048 tokens at k = 64 are ~270 MB; prepared batches are only token ids).

An error in any stage stops the others: batches prepared before a failing read are
still labeled and stored (as the serial loop would), nothing after it is; a failed
store stops the engine before its next batch; the first error is re-raised in the
calling thread.

:class:`EngineClock` measures the *engine busy fraction*: seconds inside
``label(batch)`` over the wall time (the runner times the whole unit: the loop, the
last shard's commit after it). It is what a GPU-hour buys: 1.0 means the engine call
never waited on the host. It counts time inside the call, so it cannot see an
accelerator idling inside it (vLLM's engine core runs in its own process, outside this
interpreter's lock).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from labelgen.contract.format import busy_fraction

__all__ = ["EngineClock", "run_overlapped", "DEFAULT_DEPTH"]

B = TypeVar("B")
L = TypeVar("L")

DEFAULT_DEPTH = 2
"""Batches each queue holds: one ready for the engine while the next is being prepared."""

_END = object()  # end of a stage's stream


class EngineClock:
    """Seconds the engine computed and seconds the clock ran; safe to read from another thread.

    ``busy_s`` grows by each finished engine call; ``wall_s`` is live while the clock runs
    (:meth:`start` .. :meth:`stop`), so ``busy_s <= wall_s`` whenever it is read.
    """

    def __init__(self) -> None:
        self.busy_s = 0.0
        self._started: float | None = None
        self._wall = 0.0

    @property
    def running(self) -> bool:
        return self._started is not None

    def start(self) -> None:
        self._started = time.monotonic() - self._wall

    def stop(self) -> None:
        if self._started is not None:
            self._wall = time.monotonic() - self._started
            self._started = None

    @property
    def wall_s(self) -> float:
        started = self._started
        return time.monotonic() - started if started is not None else self._wall

    def fraction(self) -> float | None:
        """busy / wall, or None before anything ran."""
        return busy_fraction(self.busy_s, self.wall_s)


@dataclass
class _Failure:
    error: BaseException


class _Stage(Generic[B]):
    """A worker thread's outbox, with a shared stop flag checked while it waits."""

    def __init__(self, depth: int, stop: threading.Event):
        self.queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self.stop = stop

    def put(self, item: object) -> bool:
        """Put ``item``; False if the loop stopped while waiting for room."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> object:
        while True:
            try:
                return self.queue.get(timeout=0.05)
            except queue.Empty:
                if self.stop.is_set():
                    return _END


def run_overlapped(
    batches: Iterable[B],
    label: Callable[[B], L],
    store: Callable[[B, L], None],
    depth: int = DEFAULT_DEPTH,
    clock: EngineClock | None = None,
) -> EngineClock:
    """Label every batch of ``batches`` and store it, in order; returns the engine clock.

    Args:
        batches: the prepared batches, produced lazily (iterated in the prepare thread
            when ``depth > 0``; it is closed there too, if it is a generator).
        label: the engine call, run in the calling thread (``teacher.label``).
        store: called with each batch and its labels, in order, in the store thread.
        depth: batches queued between stages; 0 runs the serial loop in this thread.
        clock: accumulate into this clock (e.g. one a progress reporter reads live); if it
            is already running, the caller stops it (to count work after the loop).
    """
    clock = clock if clock is not None else EngineClock()
    owned = not clock.running  # a running clock is the caller's to stop
    clock.start()
    try:
        if depth <= 0:
            iterator = iter(batches)
            try:
                for batch in iterator:
                    store(batch, _timed(label, batch, clock))
            finally:
                _close(iterator)
        else:
            _run_threads(batches, label, store, depth, clock)
    finally:
        if owned:
            clock.stop()
    return clock


def _close(iterator: object) -> None:
    """Close a generator (its ``finally`` blocks close the source's files)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _timed(label: Callable[[B], L], batch: B, clock: EngineClock) -> L:
    began = time.monotonic()
    try:
        return label(batch)
    finally:
        clock.busy_s += time.monotonic() - began


def _run_threads(
    batches: Iterable[B],
    label: Callable[[B], L],
    store: Callable[[B, L], None],
    depth: int,
    clock: EngineClock,
) -> None:
    stop = threading.Event()
    ready: _Stage[B] = _Stage(depth, stop)  # prepare -> label
    done: _Stage[tuple[B, L]] = _Stage(depth, stop)  # label -> store
    store_error: list[BaseException] = []

    def prepare() -> None:
        iterator = iter(batches)
        try:
            for batch in iterator:
                if not ready.put(batch):
                    return
            ready.put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, in order
            ready.put(_Failure(exc))
        finally:
            _close(iterator)

    def write() -> None:
        try:
            while (item := done.get()) is not _END:
                batch, labels = item  # type: ignore[misc]
                store(batch, labels)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the calling thread
            store_error.append(exc)
            stop.set()

    workers = [
        threading.Thread(target=prepare, name="labelgen-prepare", daemon=True),
        threading.Thread(target=write, name="labelgen-store", daemon=True),
    ]
    for worker in workers:
        worker.start()
    try:
        while not store_error:
            item = ready.get()
            if item is _END or store_error:
                break
            if isinstance(item, _Failure):
                _drain(done, workers[1], store_error)
                raise item.error
            labels = _timed(label, item, clock)  # type: ignore[arg-type]
            if not done.put((item, labels)):
                break
        _drain(done, workers[1], store_error)
    finally:
        stop.set()
        workers[0].join(timeout=10)  # a prepare thread stuck in a read is a daemon: left behind
        workers[1].join()
    if store_error:
        raise store_error[0]


def _drain(done: _Stage, writer: threading.Thread, store_error: list[BaseException]) -> None:
    """Let the store stage finish every labeled batch, then end it."""
    if not store_error:
        done.put(_END)
    writer.join()
