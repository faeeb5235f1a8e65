"""Opening a label dataset: its manifest when complete, its commit log while being written.

A reader trusts ``manifest.json`` alone for a complete dataset; a missing manifest
means "incomplete", never "empty". While a job still writes, what its shards hold
(k, codec) comes from the job record of the commit log, written before any shard.
Whatever bytes a manifest holds, reading it ends in a :class:`Manifest` or a FormatError
naming the file (:meth:`Manifest.from_json`).
"""

from __future__ import annotations

from typing import Any

import fsspec

from labelgen.contract.commits import CommitLog, JobRecord
from labelgen.contract.format import MANIFEST_NAME, FormatError, Manifest, join_url

__all__ = ["read_manifest", "read_manifest_if_complete", "labels_layout"]


def read_manifest(url: str) -> Manifest:
    """Read ``<url>/manifest.json``; raise FormatError naming the URL if absent (incomplete)."""
    fs, root = fsspec.core.url_to_fs(url)
    manifest = read_manifest_if_complete(fs, root)
    if manifest is None:
        committed = CommitLog(fs, root).count_shards()
        hint = (
            f"{committed} shard(s) are committed, so a labeling job is still running or was "
            "interrupted; re-run the job with the same spec to finish it (`labelgen run`, or "
            "`labelgen generate`)"
            if committed
            else "check the URL (run `labelgen inspect URL`)"
        )
        raise FormatError(f"no {MANIFEST_NAME} at {url!r}: the dataset is incomplete or absent; {hint}")
    return manifest


def read_manifest_if_complete(fs: Any, root: str) -> Manifest | None:
    """The manifest if the dataset is complete (``manifest.json`` present), else None."""
    path = join_url(root, MANIFEST_NAME)
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError as exc:
        raise FormatError(
            f"{path} is a directory, not a manifest; remove it or re-run the labeling job"
        ) from exc
    return Manifest.from_json(data, where=path)


def labels_layout(fs: Any, root: str, manifest: Manifest | None = None) -> JobRecord | None:
    """(k, codec, products) of a dataset: from its manifest when complete, else from the job
    record (None: the job has not started, or its writer predates job records)."""
    if manifest is not None:
        return JobRecord(k=manifest.k, codec=manifest.codec, products=dict(manifest.products))
    return CommitLog(fs, root).job()
