"""Batches of any label stream, in DataLoader worker processes where the stream asks for them.

:func:`make_loader` is how training reads data: for a :class:`~students.stream.LabelStream`
with ``num_workers > 0`` it runs ``DataLoader(LabelDataset(stream), num_workers=W,
batch_size=None)`` and passes each batch's cursor to ``stream.observe``, so
``stream.state_dict()`` stays exact; with ``num_workers == 0`` the stream reads in this
process; a :class:`~students.mixture.MixtureStream` or
:class:`~students.ensemble.EnsembleStream` reads each of its components through
:func:`make_loader` in turn. Batches are dicts of numpy arrays (shapes in
:func:`students.stream.collate`).

``LabelDataset`` yields ``(batch, meta)`` with ``meta = {"worker", "cursor", "skipped"}``.
PyTorch interleaves workers round-robin (in order), so a loader built after
``stream.load_state_dict(...)`` gives DataLoader worker ``w`` the logical worker
``(next_worker + w) % W`` and resumes with the exact next batch.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from students.ensemble import EnsembleStream
from students.mixture import MixtureStream
from students.stream import LabelStream

__all__ = ["LabelDataset", "make_loader", "make_dataloader"]

Batch = dict[str, np.ndarray]


class LabelDataset(IterableDataset):
    """Batches of one rank's share of a label dataset; each DataLoader worker reads its units.

    Snapshot of the stream's cursors at construction: build it (or the loader) after
    ``load_state_dict``.
    """

    def __init__(self, stream: LabelStream):
        super().__init__()
        self.stream = stream
        self.offset = stream._next_worker
        self.cursors = copy.deepcopy(stream._cursors)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
        info = get_worker_info()
        count, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        if count != self.stream.workers:
            raise ValueError(
                f"LabelDataset runs under {count} DataLoader worker(s) but its stream was built with "
                f"num_workers={self.stream.num_workers}; pass num_workers={self.stream.num_workers} "
                "to the DataLoader (the split over workers depends on it)"
            )
        if info is not None:  # one decode thread per worker process: workers are the parallelism
            pa.set_cpu_count(1)
            torch.set_num_threads(1)
        worker = (self.offset + wid) % count
        for batch, cursor, skipped in self.stream.worker_batches(worker, self.cursors[worker]):
            meta = {"worker": worker, "cursor": cursor, "skipped": skipped}
            yield {key: torch.from_numpy(value) for key, value in batch.items()}, meta


def make_dataloader(stream: LabelStream, **kwargs: Any) -> DataLoader:
    """A DataLoader over ``stream`` with its ``num_workers`` (in-order, no auto-batching);
    it yields ``(batch of tensors, meta)``: pass each ``meta`` to ``stream.observe``."""
    workers = stream.num_workers
    options: dict[str, Any] = {"num_workers": workers, "batch_size": None, "in_order": True}
    if workers > 0:
        options["multiprocessing_context"] = stream.mp_context
        options["prefetch_factor"] = max(stream.prefetch, 1)
    options.update(kwargs)
    return DataLoader(LabelDataset(stream), **options)


def make_loader(stream: LabelStream | MixtureStream | EnsembleStream) -> Iterator[Batch]:
    """The batches of ``stream`` from its cursor on, read where the stream asks (module doc)."""
    if isinstance(stream, MixtureStream | EnsembleStream):
        return stream.batches(make_loader)
    if stream.num_workers == 0:
        return iter(stream)
    return _observed(stream)


def _observed(stream: LabelStream) -> Iterator[Batch]:
    for batch, meta in make_dataloader(stream):
        stream.observe(meta)
        yield {key: value.numpy() for key, value in batch.items()}
