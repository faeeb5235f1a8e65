"""The commit log: the records a labeling job leaves under ``<dataset>/_commits/``.

A job writes, in this order::

    _commits/sources.json                the resolved input listing (URL, name, format, size)
    _commits/plan.json                   the work units (sources, or parts of them) the job labels
    _commits/job.json                    what every shard holds: k, codec, products, spec sha256
    _commits/tokenizer.json              the tokenizer (fingerprint, vocab size)
    _commits/teacher.json                the running engine's provenance
    _commits/part-UUUUU-SSSSS.json       one per committed shard, after the shard itself
    _commits/gen-UUUUU-SSSSS.json        a generation job's shards instead: one per shard, after
                                         all its files (:mod:`labelgen.contract.generation`)
    _commits/unit-UUUUU.json             one per finished work unit

Every record is written atomically (rename, or one PUT), so a listed record is whole,
and a shard record exists only once its shard does. A resumed job reads the log to skip
committed work; a follower (the student reader in follow mode, ``labelgen inspect``)
reads it to see a dataset that is still being written: ``job.json`` and
``tokenizer.json`` come before the first shard, so a follower never has to guess k,
the codec or the tokenizer. Listings bypass fsspec's cache and are retried, since
other processes write the log while it is read. This module is the only code that
knows the log's file names.

Reading trusts nothing it reads: only files listed directly in the log's own directory
are records, a record's content is type-checked field by field
(:func:`labelgen.contract.format.parse_record`), its shard paths must stay inside the
dataset (:func:`labelgen.contract.format.check_dataset_path`) and its file name must be
the one its writer gives it; anything else raises FormatError naming the file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import fsspec

from labelgen.contract.format import (
    COMMITS_DIR,
    FORMAT_VERSION,
    SHARD_PREFIX,
    FormatError,
    ShardRecord,
    UnitRecord,
    check_layout,
    join_url,
    parse_json,
    parse_record,
    shard_name,
    unit_shard_prefix,
)
from labelgen.contract.generation import GenerationShardRecord
from labelgen.contract.storage import list_fresh, retry, write_json_atomic

__all__ = [
    "GENERATION_RECORD_PREFIX",
    "generation_record_name",
    "SOURCES_RECORD",
    "PLAN_RECORD",
    "JOB_RECORD",
    "TOKENIZER_RECORD",
    "TEACHER_RECORD",
    "JobRecord",
    "PlannedUnit",
    "PlanRecord",
    "CommitLog",
]

SOURCES_RECORD = "sources.json"
PLAN_RECORD = "plan.json"
JOB_RECORD = "job.json"
TOKENIZER_RECORD = "tokenizer.json"
TEACHER_RECORD = "teacher.json"
_UNIT_PREFIX = "unit-"
GENERATION_RECORD_PREFIX = "gen-"
_SUFFIX = ".json"
_REWRITE = "the commit log is corrupt or was not written by labelgen: re-run the labeling job to rewrite it"


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

    @classmethod
    def from_dict(cls, data: object, where: str) -> JobRecord:
        """A job record from parsed JSON: every field type-checked (unknown keys ignored, as
        in the manifest), k, codec and products ones a reader can decode; FormatError
        naming ``where`` and the field otherwise (another major format version too)."""
        if isinstance(data, dict):
            found = str(data.get("format_version", FORMAT_VERSION))
            if found.split(".")[0] != FORMAT_VERSION.split(".")[0]:
                raise FormatError(
                    f"{where} has format version {found:.40}, this reader supports "
                    f"{FORMAT_VERSION}; install the labelgen release that matches the dataset"
                )
        record = parse_record(cls, data, where)
        check_layout(record.k, record.codec, record.products, where)
        return record


@dataclass(frozen=True)
class PlannedUnit:
    """One work unit of a job's plan (:class:`labelgen.units.WorkUnit`, as recorded)."""

    unit: int
    """The unit's index (shard names ``part-UUUUU-SSSSS``, ``unit-UUUUU.json``)."""
    source: str
    """The source's URL (as in ``sources.json``)."""
    part: int
    """Which part of the source, from 0."""
    parts: int
    """How many parts the source is split into (1: the whole source)."""
    kind: str
    """What ``start``/``stop`` count: ``file`` (the whole source, bytes), ``bytes``,
    ``row_groups`` (Parquet) or ``arrow_files`` (a saved HF dataset)."""
    start: int
    stop: int
    """The range ``[start, stop)``."""
    size: int
    """Bytes of input the unit covers."""
    offset: int = 0
    """First byte of the unit's bytes in the file (bytes and row groups; else 0)."""
    first_record: int = 0
    """Index of the unit's first record in the source (Parquet parts; else 0)."""


@dataclass(frozen=True)
class PlanRecord:
    """The work units a job labels, written when it starts; every resume must find it again."""

    unit_mib: float
    """``corpus.unit_mib`` the plan was made with."""
    units: list[PlannedUnit]
    """Every unit, in index order."""

    @classmethod
    def from_dict(cls, data: object, where: str) -> PlanRecord:
        """A plan record from parsed JSON, every field checked (:func:`parse_record`) and the
        units numbered 0, 1, ...; FormatError naming ``where`` and the field otherwise."""
        record = parse_record(cls, data, where)
        numbers = [u.unit for u in record.units]
        if numbers != list(range(len(numbers))):
            raise FormatError(f"{where} lists units {numbers[:20]}, not 0, 1, 2, ... in order; {_REWRITE}")
        return record


def _shard_record_name(record: ShardRecord) -> str:
    """The commit record file name of a shard: its file's stem + ``.json``."""
    return record.path.rsplit("/", 1)[-1].removesuffix(".parquet") + _SUFFIX


def generation_record_name(unit: int, shard: int) -> str:
    """The commit record file name of a generation job's shard: ``gen-UUUUU-SSSSS.json``."""
    return GENERATION_RECORD_PREFIX + shard_name(unit, shard).removeprefix(SHARD_PREFIX) + _SUFFIX


def _unit_record_name(unit: int) -> str:
    return f"{_UNIT_PREFIX}{unit:05d}{_SUFFIX}"


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

    def write_plan(self, record: PlanRecord) -> None:
        write_json_atomic(self.fs, self.path(PLAN_RECORD), dataclasses.asdict(record))

    def write_job(self, record: JobRecord) -> None:
        write_json_atomic(self.fs, self.path(JOB_RECORD), dataclasses.asdict(record))

    def write_tokenizer(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.fs, self.path(TOKENIZER_RECORD), info)

    def write_teacher(self, provenance: dict[str, Any]) -> None:
        write_json_atomic(self.fs, self.path(TEACHER_RECORD), provenance)

    def write_shard(self, record: ShardRecord) -> None:
        """Record a committed shard; call only after the shard is published."""
        write_json_atomic(self.fs, self.path(_shard_record_name(record)), dataclasses.asdict(record))

    def write_generation(self, record: GenerationShardRecord) -> None:
        """Record a committed generation shard; call only after all its files are published."""
        name = generation_record_name(record.unit, record.index)
        write_json_atomic(self.fs, self.path(name), dataclasses.asdict(record))

    def write_unit(self, record: UnitRecord) -> None:
        """Record a finished unit; call after its last shard record."""
        write_json_atomic(self.fs, self.path(_unit_record_name(record.unit)), dataclasses.asdict(record))

    # -- reading ------------------------------------------------------------------------
    def _read(self, path: str) -> Any:
        """The parsed JSON of the record at ``path`` (FileNotFoundError if absent); a file
        that is not JSON raises FormatError naming it."""
        try:
            raw = retry(lambda: self.fs.cat_file(path), f"read {path}")
        except IsADirectoryError as exc:
            raise FormatError(f"{path} is a directory, not a commit record; {_REWRITE}") from exc
        return parse_json(raw, path)

    def _optional(self, name: str, listing: bool = False) -> Any:
        """The record ``name`` (None if absent): a JSON object, or with ``listing`` an array
        of objects; FormatError naming the file otherwise."""
        path = self.path(name)
        try:
            data = self._read(path)
        except FileNotFoundError:
            return None
        if listing:
            ok = isinstance(data, list) and all(isinstance(item, dict) for item in data)
        else:
            ok = isinstance(data, dict)
        if not ok:
            expected = "a JSON array of objects" if listing else "a JSON object"
            raise FormatError(f"{path} must hold {expected}, got a JSON {type(data).__name__}; {_REWRITE}")
        return data

    def sources(self) -> list[dict[str, Any]] | None:
        """The input listing the job started with (None before the job started)."""
        return self._optional(SOURCES_RECORD, listing=True)

    def plan(self) -> PlanRecord | None:
        """The job's work units (None: no job started here, or one written before the record
        existed, whose units are its sources).

        Raises:
            FormatError: the record is not a plan record (names the file and the field).
        """
        data = self._optional(PLAN_RECORD)
        if data is None:
            return None
        return PlanRecord.from_dict(data, self.path(PLAN_RECORD))

    def job(self) -> JobRecord | None:
        """What the job's shards hold (None: no job started here, or one written before the
        record existed).

        Raises:
            FormatError: the record was written by a labelgen of another major format version,
                or is not a job record (names the file and the field).
        """
        data = self._optional(JOB_RECORD)
        if data is None:
            return None
        return JobRecord.from_dict(data, self.path(JOB_RECORD))

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

    def generations(self, unit: int | None = None) -> list[GenerationShardRecord]:
        """Committed generation shard records (of one unit, or all), sorted by (unit, index),
        read fresh.

        Raises:
            FormatError: a record is not a generation shard record, or is named for another shard.
        """
        prefix = GENERATION_RECORD_PREFIX if unit is None else GENERATION_RECORD_PREFIX + f"{unit:05d}-"
        records = []
        for name in self._names(prefix):
            if not (name.startswith(prefix) and name.endswith(_SUFFIX)):
                continue
            path = self.path(name)
            record = GenerationShardRecord.from_dict(self._read(path), path)
            if name != generation_record_name(record.unit, record.index):
                raise FormatError(
                    f"{path} holds the record of shard {record.index} of unit {record.unit}; {_REWRITE}"
                )
            records.append(record)
        return sorted(records, key=lambda r: (r.unit, r.index))

    def units(self) -> dict[int, UnitRecord]:
        """Finished unit records by unit, read fresh (only unit records are listed)."""
        return {record.unit: record for record in self._records((_UNIT_PREFIX,), _UNIT_PREFIX)[1]}

    def _records(self, prefixes: tuple[str, ...], common: str) -> tuple[list[ShardRecord], list[UnitRecord]]:
        """Shard and unit records among the listed files whose names start with ``prefixes``.

        Raises:
            FormatError: a record is not JSON, has a field of the wrong type, a shard path
                outside the dataset, or a file name other than the one its writer gives it.
        """
        shards, units = [], []
        for name in self._names(common):
            if not name.endswith(_SUFFIX) or not name.startswith(prefixes):
                continue  # temporary files (*.json.tmp-PID) and the job's other records
            path = self.path(name)
            data = self._read(path)
            if name.startswith(unit_shard_prefix()):
                shard = ShardRecord.from_dict(data, path)
                expected = _shard_record_name(shard)
                shards.append(shard)
            else:
                unit = UnitRecord.from_dict(data, path)
                expected = _unit_record_name(unit.unit)
                units.append(unit)
            if name != expected:
                raise FormatError(
                    f"{path} holds the record of {expected} (its writer names each record after its "
                    f"shard or unit); {_REWRITE}"
                )
        shards.sort(key=lambda r: (r.unit, r.index))
        return shards, units

    @staticmethod
    def record_file(record: ShardRecord | UnitRecord | GenerationShardRecord) -> str:
        """The path, relative to the dataset root, of the commit record of a shard, a generation
        shard or a unit (a generation job's label shard is recorded in its generation shard's)."""
        if isinstance(record, GenerationShardRecord):
            return join_url(COMMITS_DIR, generation_record_name(record.unit, record.index))
        if isinstance(record, ShardRecord):
            return join_url(COMMITS_DIR, _shard_record_name(record))
        return join_url(COMMITS_DIR, _unit_record_name(record.unit))

    def record_files(self) -> list[str]:
        """Paths, relative to the dataset root, of every record file listed in the log's
        directory (the job's records, shard and unit records; no temporary files), sorted:
        what a copy of the dataset must carry besides its manifest, spec and shards."""
        fixed = (SOURCES_RECORD, PLAN_RECORD, JOB_RECORD, TOKENIZER_RECORD, TEACHER_RECORD)
        return [
            join_url(COMMITS_DIR, name)
            for name in self._names("")
            if name in fixed
            or (
                name.endswith(_SUFFIX)
                and name.startswith((unit_shard_prefix(), _UNIT_PREFIX, GENERATION_RECORD_PREFIX))
            )
        ]

    def count_shards(self) -> int:
        """How many shard records are listed (no record is read)."""
        try:
            names = self._names(unit_shard_prefix())
        except (OSError, FormatError):
            return 0
        return sum(1 for name in names if name.startswith(unit_shard_prefix()) and name.endswith(_SUFFIX))

    def _names(self, prefix: str) -> list[str]:
        """Names of the files listed directly in the log's directory (those starting with
        ``prefix`` where the store filters by key prefix), sorted; deeper keys are skipped.

        Raises:
            FormatError: the store listed a path outside the directory.
        """
        listed = retry(lambda: list_fresh(self.fs, self.directory, prefix), f"list {self.directory}")
        names = []
        inside = self.directory.rstrip("/") + "/"
        for path in listed:
            if path.rstrip("/") == inside[:-1]:
                continue  # some stores list the directory itself
            if not path.startswith(inside):
                raise FormatError(
                    f"listing {self.directory} returned {path!r:.200}, outside it; the commit log's "
                    "store is misconfigured: check the dataset URL"
                )
            name = path[len(inside) :]
            if name and "/" not in name:  # deeper keys (s3fs find) are no records of this log
                names.append(name)
        return names
