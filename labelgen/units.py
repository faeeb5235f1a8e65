"""Work units: the job's sources split into parts of about ``corpus.unit_mib``, deterministically.

A work unit is what one executor call labels (:func:`labelgen.runner.run_unit`): its
shards are ``part-UUUUU-SSSSS`` with U the unit's index, and a finished unit leaves
one unit record. :func:`plan_units` is the one home of the plan: a pure function of the
sources' listing (URL, format, size), the Parquet footers and saved datasets'
``state.json`` of the sources it splits, and the corpus spec, so every run, resume and
executor of a job (any number of replicas) finds the same units:

- a source of at most ``unit_mib`` is one unit, the whole file, exactly as before units
  could be parts (kind ``file``);
- an uncompressed jsonl or text file (``text_split`` line or paragraph) is cut into
  ``ceil(size / unit_mib)`` byte ranges of equal size (kind ``bytes``), without reading
  it: a range reads the records that *begin* in it (:mod:`labelgen.corpus`), so the
  ranges tile the file and every record is read by exactly one unit;
- a Parquet file is cut between row groups (kind ``row_groups``), consecutive row
  groups gathered while they fit in ``unit_mib`` (a row group larger than that is a unit
  of its own), by the footer's byte spans; a file of one row group is one unit;
- a saved HF ``datasets`` directory is cut between its Arrow files (kind
  ``arrow_files``) the same way;
- compressed streams (any compression fsspec infers from the name, and ``.zst`` /
  ``.lz4`` whatever is installed) cannot be entered mid-way and stay one unit, and so
  do text files read whole (``text_split: file``): the rule is
  :func:`labelgen.corpus.byte_splittable`, next to the readers that rely on it.

Packing restarts in every unit (a sequence never spans two), and a unit's sample ids
start with :attr:`WorkUnit.sample_prefix`: the source's name for whole files and
Parquet parts (whose records keep their row numbers in the file), ``<name>@<start>``
for byte-range and Arrow-file parts, whose records are numbered within the part. The
plan is recorded in the commit log when a job starts (:func:`plan_record`) and must be
found again on every resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise

from labelgen.contract.commits import PlannedUnit, PlanRecord
from labelgen.contract.storage import MIB
from labelgen.corpus import (
    CorpusError,
    Record,
    Rejected,
    Source,
    byte_splittable,
    bytes_sha256,
    files_sha256,
    hf_files,
    parquet_row_groups,
    read_source,
    row_group_span,
    source_sha256,
)
from labelgen.spec import CorpusSpec

__all__ = [
    "KINDS",
    "MAX_UNITS",
    "WorkUnit",
    "plan_units",
    "legacy_plan",
    "plan_record",
    "read_unit",
    "unit_sha256",
]

KINDS = ("file", "bytes", "row_groups", "arrow_files")
"""What a unit's range counts: the whole source (``[0, size)`` bytes), bytes of a jsonl
or text file, row groups of a Parquet file, Arrow files of a saved dataset."""

MAX_UNITS = 99_999
"""Units a job may have: shard names number units with 5 digits, so lexical order is
(unit, shard) order."""


@dataclass(frozen=True)
class WorkUnit:
    """One work unit: a source, or one part of it."""

    index: int
    """The unit's number in the job (shard names ``part-UUUUU-SSSSS``, unit records)."""
    source: Source
    part: int
    """Which part of the source, from 0."""
    parts: int
    """How many parts the source is split into (1: the unit is the whole source)."""
    kind: str
    """What ``start`` and ``stop`` count, one of :data:`KINDS`."""
    start: int
    stop: int
    """The range ``[start, stop)``: bytes (``file``, ``bytes``), row groups, Arrow files."""
    size: int
    """Bytes of input the unit covers (progress and ETA; the bytes its sha256 covers)."""
    offset: int = 0
    """First byte of the unit's bytes in the file: ``start`` for bytes, the first column
    chunk of the first row group for row groups, 0 for whole files and Arrow files."""
    first_record: int = 0
    """Index of the unit's first record in the source (Parquet parts: the rows before
    ``start``); 0 where records are numbered within the part."""

    @property
    def whole(self) -> bool:
        """True if the unit is its whole source."""
        return self.kind == "file"

    @property
    def sample_prefix(self) -> str:
        """What the sample ids of the unit's sequences start with (before ``#record.chunk``):
        the source's name where record numbers are the source's own (whole files, Parquet
        parts), ``<name>@<start>`` where they count from 0 within the part."""
        if self.kind in ("bytes", "arrow_files"):
            return f"{self.source.name}@{self.start}"
        return self.source.name

    def describe(self) -> str:
        """``name`` for a whole source, ``name, part 2/5 (bytes [a, b))`` for a part: for logs."""
        if self.whole:
            return self.source.name
        return (
            f"{self.source.name}, part {self.part + 1}/{self.parts} ({self.kind} [{self.start}, {self.stop}))"
        )


def _whole(index: int, source: Source) -> WorkUnit:
    return WorkUnit(index, source, 0, 1, "file", 0, source.size, source.size)


def _gather(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive items ``[start, stop)`` gathered while their sizes fit in ``target``
    (an item larger than it alone)."""
    ranges: list[tuple[int, int]] = []
    start, held = 0, 0
    for i, size in enumerate(sizes):
        if i > start and held + size > target:
            ranges.append((start, i))
            start, held = i, 0
        held += size
    ranges.append((start, len(sizes)))
    return ranges


def _parts(source: Source, spec: CorpusSpec, target: int) -> list[tuple[str, int, int, int, int, int]]:
    """(kind, start, stop, size, offset, first record) of each part of a source larger
    than ``target`` bytes; empty if it stays whole."""
    if source.format in ("jsonl", "text"):
        if not byte_splittable(source, spec):
            return []
        n = math.ceil(source.size / target)
        cuts = [source.size * i // n for i in range(n + 1)]
        return [("bytes", a, b, b - a, a, 0) for a, b in pairwise(cuts)]
    if source.format == "parquet":
        groups = parquet_row_groups(source)
        if not groups:
            return []  # no rows: one (empty) unit
        ranges = _gather([g.stop - g.start for g in groups], target)
        out = []
        for a, b in ranges:
            first_byte, end_byte = row_group_span(groups, a, b)
            out.append(
                ("row_groups", a, b, end_byte - first_byte, first_byte, sum(g.rows for g in groups[:a]))
            )
        return out if len(out) > 1 else []
    assert source.format == "hf", source.format
    files = hf_files(source)
    sizes = [size for _, size in files]
    ranges = _gather(sizes, target)
    return [("arrow_files", a, b, sum(sizes[a:b]), 0, 0) for a, b in ranges] if len(ranges) > 1 else []


def plan_units(sources: list[Source], spec: CorpusSpec) -> list[WorkUnit]:
    """The job's work units: each source whole, or in parts of about ``spec.unit_mib``
    (see the module docstring), in source order; unit index = position in the list.

    Reads only the Parquet footers and saved datasets' ``state.json`` (and file sizes)
    of sources larger than ``unit_mib`` (16 at a time); jsonl and text files are not opened.
    """
    target = max(1, int(spec.unit_mib * MIB))
    big = [s for s in sources if s.size > target]
    with ThreadPoolExecutor(max_workers=min(16, max(len(big), 1))) as pool:
        found = dict(zip((s.url for s in big), pool.map(lambda s: _parts(s, spec, target), big), strict=True))
    units: list[WorkUnit] = []
    for source in sources:
        parts = found.get(source.url, [])
        if not parts:
            units.append(_whole(len(units), source))
            continue
        for part, (kind, start, stop, size, offset, first) in enumerate(parts):
            units.append(
                WorkUnit(len(units), source, part, len(parts), kind, start, stop, size, offset, first)
            )
    _check_units(units, spec)
    return units


def _check_units(units: list[WorkUnit], spec: CorpusSpec) -> None:
    """Raise CorpusError if the plan breaks a rule of the format: at most
    :data:`MAX_UNITS` units (shard names), sample-id prefixes of different sources that
    coincide (a part ``x.jsonl@0`` and a source named ``x.jsonl@0``)."""
    if len(units) > MAX_UNITS:
        raise CorpusError(
            f"corpus.unit_mib ({spec.unit_mib}) splits the corpus into {len(units):,} work units, more "
            f"than the {MAX_UNITS:,} shard names can number; raise corpus.unit_mib"
        )
    owner: dict[str, str] = {}
    for unit in units:
        prefix = unit.sample_prefix
        if owner.setdefault(prefix, unit.source.url) != unit.source.url:
            raise CorpusError(
                f"corpus.sources: the sample ids of {unit.source.url} ({unit.describe()}) would start with "
                f"{prefix!r}, as those of {owner[prefix]} do; rename one of them (a source's name may not "
                "be another's followed by '@' and a number)"
            )


def legacy_plan(sources: list[Source]) -> list[WorkUnit]:
    """One unit per source: the plan of outputs written before units could be parts
    (they have unit records but no plan record), so such jobs resume exactly."""
    return [_whole(i, source) for i, source in enumerate(sources)]


def plan_record(units: list[WorkUnit], spec: CorpusSpec) -> PlanRecord:
    """The plan as the commit log records it."""
    return PlanRecord(
        unit_mib=float(spec.unit_mib),
        units=[
            PlannedUnit(
                unit=u.index,
                source=u.source.url,
                part=u.part,
                parts=u.parts,
                kind=u.kind,
                start=u.start,
                stop=u.stop,
                size=u.size,
                offset=u.offset,
                first_record=u.first_record,
            )
            for u in units
        ],
    )


def read_unit(unit: WorkUnit, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    """The unit's records (:func:`labelgen.corpus.read_source` of its source or range);
    ``progress`` counts bytes consumed within the unit."""
    return read_source(unit.source, spec, None if unit.whole else (unit.start, unit.stop))


def unit_sha256(unit: WorkUnit) -> str:
    """sha256 of the unit's own bytes: the whole source (:func:`labelgen.corpus.source_sha256`)
    for a whole unit; else its byte range, its row groups' span, or its Arrow files one
    after another. A big file is never hashed whole once per part."""
    if unit.whole:
        return source_sha256(unit.source)
    if unit.kind == "arrow_files":
        return files_sha256(url for url, _ in hf_files(unit.source)[unit.start : unit.stop])
    return bytes_sha256(unit.source.url, unit.offset, unit.offset + unit.size)
