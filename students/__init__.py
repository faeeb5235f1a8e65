"""``students``: train a small student by KD from teacher labels streamed from a shard URL.

The public surface, imported lazily (``import students`` loads neither torch nor
pyarrow until a name is used)::

    from students import LabelStream, make_loader, open_dataset
    manifest, _, _ = open_dataset(url)
    for batch in make_loader(LabelStream(url, manifest, None, batch_sequences=8)):
        ...

Modules: ``config`` (the training config), ``stream`` (row-group streaming, follow
mode), ``loader`` (DataLoader workers), ``mixture`` / ``ensemble`` (several datasets),
``shards`` (verified reads), ``hidden`` (hidden-state joins), ``interop`` (datasets /
pyarrow views), ``losses`` / ``chunked_loss`` / ``hidden_losses`` (the loss library),
``lineage`` (the dataset service: data.require, runs and metrics), ``trainer`` (the
training loop).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "students.config",
    "load_train_config": "students.config",
    "LabelStream": "students.stream",
    "open_dataset": "students.stream",
    "row_group_refs": "students.stream",
    "collate": "students.stream",
    "ShardReader": "students.shards",
    "ChecksumError": "students.shards",
    "MixtureStream": "students.mixture",
    "open_mixture": "students.mixture",
    "EnsembleStream": "students.ensemble",
    "make_loader": "students.loader",
    "LabelDataset": "students.loader",
    "shard_files": "students.interop",
    "to_hf_iterable": "students.interop",
    "Trainer": "students.trainer",
    "Lineage": "students.lineage",
    "DataTrustError": "students.lineage",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'students' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
