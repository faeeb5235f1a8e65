"""The commit log: the records a labeling job leaves under ``<dataset>/_commits/``.

A job writes, in this order::

    _commits/sources.json                the resolved input listing (URL, name, format, size)
    _commits/job.json                    what every shard holds: k, codec, products, spec sha256
    _commits/tokenizer.json              the tokenizer (fingerprint, vocab size)
    _commits/teacher.json                the running engine's provenance
    _commits/part-UUUUU-SSSSS.json       one per committed shard, after the shard itself
    _commits/unit-UUUUU.json             one per finished work unit

Every record is written atomically (rename, or one PUT), so a listed record is whole,
and a shard record exists only once its shard does. A resumed job reads the log to skip
committed work; a follower (the student reader in follow mode, ``labelgen inspect``)
reads it to see a dataset that is still being written: ``job.json`` and
``tokenizer.json`` come before the first shard, so a follower never has to guess k,
the codec or the tokenizer. Listings bypass fsspec's cache and are retried, since
other processes write the log while it is read. This module is the only code that
knows the log's file names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import fsspec

from labelgen.contract.format import (
    COMMITS_DIR,
    FORMAT_VERSION,
    FormatError,
    ShardRecord,
    UnitRecord,
    join_url,
    unit_shard_prefix,
)
from labelgen.contract.storage import list_fresh, read_json, retry, write_json_atomic

__all__ = [
    "SOURCES_RECORD",
    "JOB_RECORD",
    "TOKENIZER_RECORD",
    "TEACHER_RECORD",
    "JobRecord",
    "CommitLog",
]

SOURCES_RECORD = "sources.json"
JOB_RECORD = "job.json"
TOKENIZER_RECORD = "tokenizer.json"
TEACHER_RECORD = "teacher.json"
_UNIT_PREFIX = "unit-"
_SUFFIX = ".json"


@dataclass(frozen=True)
class JobRecord:
    """What every shard of a job holds, written before the first one."""

    k: int
    """Top-k width."""
    codec: str
    """The top-k codec (:mod:`labelgen.contract.codecs`)."""
    products: dict[str, Any] = field(default_factory=dict)
    """Optional products as the manifest will record them (hidden ``dim`` is added there)."""
    spec_sha256: str = ""
    format_version: str = FORMAT_VERSION


class CommitLog:
    """The commit log of the dataset at ``root`` on filesystem ``fs``.

    Args:
        fs: an fsspec filesystem.
        root: the dataset root path on ``fs`` (no scheme), as ``fsspec.core.url_to_fs`` gives.
    """

    def __init__(self, fs: Any, root: str):
        self.fs, self.root = fs, root
        self.directory = join_url(root, COMMITS_DIR)

    @classmethod
    def at(cls, url: str) -> CommitLog:
        """The commit log of the dataset at ``url`` (any fsspec URL)."""
        return cls(*fsspec.core.url_to_fs(url))

    def path(self, name: str) -> str:
        return join_url(self.directory, name)

    # -- writing (the labeling job) -------------------------------------------------------
    def write_sources(self, listing: list[dict[str, Any]]) -> None:
        write_json_atomic(self.fs, self.path(SOURCES_RECORD), listing)

    def write_job(self, record: JobRecord) -> None:
        write_json_atomic(self.fs, self.path(JOB_RECORD), dataclasses.asdict(record))

    def write_tokenizer(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.fs, self.path(TOKENIZER_RECORD), info)

    def write_teacher(self, provenance: dict[str, Any]) -> None:
        write_json_atomic(self.fs, self.path(TEACHER_RECORD), provenance)

    def write_shard(self, record: ShardRecord) -> None:
        """Record a committed shard; call only after the shard is published."""
        name = record.path.rsplit("/", 1)[-1].removesuffix(".parquet")
        write_json_atomic(self.fs, self.path(f"{name}{_SUFFIX}"), dataclasses.asdict(record))

    def write_unit(self, record: UnitRecord) -> None:
        """Record a finished unit; call after its last shard record."""
        write_json_atomic(
            self.fs, self.path(f"{_UNIT_PREFIX}{record.unit:05d}{_SUFFIX}"), dataclasses.asdict(record)
        )

    # -- reading ------------------------------------------------------------------------
    def _optional(self, name: str) -> Any:
        path = self.path(name)
        try:
            return read_json(self.fs, path)
        except FileNotFoundError:
            return None

    def sources(self) -> list[dict[str, Any]] | None:
        """The input listing the job started with (None before the job started)."""
        return self._optional(SOURCES_RECORD)

    def job(self) -> JobRecord | None:
        """What the job's shards hold (None: no job started here, or one written before the
        record existed).

        Raises:
            FormatError: the record was written by a labelgen of another major format version.
        """
        data = self._optional(JOB_RECORD)
        if data is None:
            return None
        found = str(data.get("format_version", FORMAT_VERSION))
        if found.split(".")[0] != FORMAT_VERSION.split(".")[0]:
            raise FormatError(
                f"{self.path(JOB_RECORD)} has format version {found}, this reader supports "
                f"{FORMAT_VERSION}; install the labelgen release that matches the dataset"
            )
        known = {f.name for f in dataclasses.fields(JobRecord)}
        return JobRecord(**{key: value for key, value in data.items() if key in known})

    def tokenizer(self) -> dict[str, Any] | None:
        """The job's tokenizer record (None before the job wrote it)."""
        return self._optional(TOKENIZER_RECORD)

    def teacher(self) -> dict[str, Any] | None:
        """The running engine's provenance (None before the first engine started)."""
        return self._optional(TEACHER_RECORD)

    def committed(self) -> tuple[list[ShardRecord], dict[int, UnitRecord]]:
        """Committed shard records sorted by (unit, index) and finished unit records, read
        fresh in one listing."""
        shards, units = self._records((unit_shard_prefix(), _UNIT_PREFIX), "")
        return shards, {record.unit: record for record in units}

    def shards(self, unit: int | None = None) -> list[ShardRecord]:
        """Committed shard records (of one unit, or all), sorted by (unit, index), read fresh;
        only shard records are listed (by key prefix where the store allows)."""
        prefix = unit_shard_prefix(unit)
        return self._records((prefix,), prefix)[0]

    def units(self) -> dict[int, UnitRecord]:
        """Finished unit records by unit, read fresh (only unit records are listed)."""
        return {record.unit: record for record in self._records((_UNIT_PREFIX,), _UNIT_PREFIX)[1]}

    def _records(self, prefixes: tuple[str, ...], common: str) -> tuple[list[ShardRecord], list[UnitRecord]]:
        shards, units = [], []
        for path in self._list(common):
            name = path.rsplit("/", 1)[-1]
            if not name.endswith(_SUFFIX) or not name.startswith(prefixes):
                continue  # temporary files (*.json.tmp-PID) and the job's other records
            data = read_json(self.fs, path)
            if name.startswith(unit_shard_prefix()):
                shards.append(ShardRecord(**data))
            else:
                units.append(UnitRecord(**data))
        shards.sort(key=lambda r: (r.unit, r.index))
        return shards, units

    def count_shards(self) -> int:
        """How many shard records are listed (no record is read)."""
        try:
            names = [path.rsplit("/", 1)[-1] for path in self._list(unit_shard_prefix())]
        except OSError:
            return 0
        return sum(1 for name in names if name.startswith(unit_shard_prefix()) and name.endswith(_SUFFIX))

    def _list(self, prefix: str) -> list[str]:
        return retry(lambda: list_fresh(self.fs, self.directory, prefix), f"list {self.directory}")
