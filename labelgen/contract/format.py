"""The label format: the one contract between the teacher side and the student side.

A label dataset is a directory (local path or any fsspec URL) holding::

    manifest.json                      written last; its presence means "complete"
    job-spec.yaml                      the resolved job spec that produced it
    shards/part-UUUUU-SSSSS.parquet    label shards (unit U, shard S), zero-padded
    hidden/part-UUUUU-SSSSS.parquet    hidden-state samples of the same rows (optional)
    _commits/                          the job's commit log (:mod:`labelgen.contract.commits`)
    _signatures/KEYID.json             detached manifest signatures (:mod:`labelgen.contract.signatures`)

One Parquet row holds one token sequence of length T. Every list column is flat and
non-nullable (never a list of lists): per-position arrays of width k are flattened
row-major and reshaped with numpy on read. The top-k columns are the codec's
(:mod:`labelgen.contract.codecs`; docs/FORMAT.md has their layouts).

Position convention: label position t (0 <= t < T-1) holds the teacher's
distribution over token t+1 given tokens 0..t, so it lines up with a causal
student's logits at position t. (vLLM's ``prompt_logprobs`` entry t+1.)

Values are raw log-probabilities at temperature 1. The mass outside the stored
top-k is exact: ``1 - sum(exp(topk_logprobs))``.

This module imports only the standard library, numpy and pyarrow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from labelgen.contract.codecs import DEFAULT_CODEC, get_codec
from labelgen.contract.codecs.base import flat_field
from labelgen.contract.columns import Columns
from labelgen.contract.errors import FormatError
from labelgen.contract.records import REWRITE, check_layout, parse_json, parse_record

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "SPEC_NAME",
    "SHARDS_DIR",
    "HIDDEN_DIR",
    "COMMITS_DIR",
    "FormatError",
    "Columns",
    "label_schema",
    "hidden_schema",
    "schema_problem",
    "shard_name",
    "unit_shard_prefix",
    "ShardRecord",
    "UnitRecord",
    "Manifest",
    "busy_fraction",
    "token_hash",
    "tokenizer_fingerprint",
    "check_format_version",
    "MAX_PATH_CHARS",
    "check_dataset_path",
    "dataset_file",
    "check_layout",
    "parse_json",
    "parse_record",
    "join_url",
]

FORMAT_NAME = "labelgen"
FORMAT_VERSION = "1.0"
MANIFEST_NAME = "manifest.json"
SPEC_NAME = "job-spec.yaml"  # beside the manifest, and the spec file `labelgen submit` uploads
SHARDS_DIR = "shards"
HIDDEN_DIR = "hidden"
COMMITS_DIR = "_commits"
SHARD_PREFIX = "part-"  # shard stems: part-UUUUU-SSSSS (unit U, shard S)
_VERSION_KEY = b"labelgen.format_version"
MAX_PATH_CHARS = 1024
"""The longest dataset path a record may hold."""
_SEGMENT = re.compile(r"[A-Za-z0-9._+=-]+")


def label_schema(draws: bool = False, codec: str = DEFAULT_CODEC) -> pa.Schema:
    """Arrow schema of a label shard (format version ``FORMAT_VERSION``) under ``codec``."""
    draw_fields = [
        flat_field(Columns.DRAW_NUM, pa.uint8()),
        flat_field(Columns.DRAW_IDS, pa.int32()),
        flat_field(Columns.DRAW_COUNTS, pa.uint8()),
    ]
    return pa.schema(
        [
            pa.field(Columns.SAMPLE_ID, pa.string(), nullable=False),
            pa.field(Columns.TOKEN_HASH, pa.uint64(), nullable=False),
            pa.field(Columns.NUM_TOKENS, pa.int32(), nullable=False),
            flat_field(Columns.INPUT_IDS, pa.int32()),
            flat_field(Columns.LABEL_MASK, pa.uint8()),
            *get_codec(codec).fields(),
            flat_field(Columns.TARGET_LOGPROBS, pa.float32()),
            *(draw_fields if draws else []),
        ],
        metadata={_VERSION_KEY: FORMAT_VERSION.encode()},
    )


def hidden_schema(layers: Iterable[int]) -> pa.Schema:
    """Arrow schema of a hidden-state shard for the given layer ids."""
    return pa.schema(
        [
            pa.field(Columns.SAMPLE_ID, pa.string(), nullable=False),
            pa.field(Columns.TOKEN_HASH, pa.uint64(), nullable=False),
            flat_field(Columns.HIDDEN_POSITIONS, pa.int32()),
            *[pa.field(Columns.HIDDEN_LAYER.format(i), pa.binary(), nullable=False) for i in layers],
        ],
        metadata={_VERSION_KEY: FORMAT_VERSION.encode()},
    )


def schema_problem(table: pa.Table, schema: pa.Schema) -> str | None:
    """What keeps ``table`` from holding every column of ``schema`` with its type (a list
    column: its value type) and, where the schema says non-nullable, without nulls; None
    if nothing. Readers check a shard's table with it before decoding a value."""
    for expected in schema:
        if expected.name not in table.column_names:
            return f"has no column {expected.name!r}"
        found = table.schema.field(expected.name).type
        if pa.types.is_list(expected.type):
            ok = pa.types.is_list(found) and found.value_type == expected.type.value_type
        else:
            ok = found == expected.type
        if not ok:
            return f"has column {expected.name!r} of type {found}, the label format says {expected.type}"
        if not expected.nullable and table.column(expected.name).null_count:
            return f"has {table.column(expected.name).null_count} null(s) in column {expected.name!r}"
    return None


def shard_name(unit: int, shard: int) -> str:
    """Zero-padded shard stem; lexical order equals (unit, shard) order."""
    return f"{unit_shard_prefix(unit)}{shard:05d}"


def unit_shard_prefix(unit: int | None = None) -> str:
    """The stem prefix every shard of ``unit`` (or, None, of any unit) starts with."""
    return SHARD_PREFIX if unit is None else f"{SHARD_PREFIX}{unit:05d}-"


def token_hash(input_ids: np.ndarray) -> int:
    """64-bit hash of a token sequence (int32 little-endian bytes, blake2b)."""
    data = np.ascontiguousarray(input_ids, dtype="<i4").tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over a tokenizer's vocabulary and special tokens.

    Works on any object with ``get_vocab()`` (HF tokenizers). Two tokenizers with the
    same fingerprint map every string to the same ids.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    specials = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    payload = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def join_url(base: str, *parts: str) -> str:
    """Join URL path parts with '/', keeping the scheme of ``base``.

    For paths read from records use :func:`dataset_file`, which refuses those that would
    leave the dataset."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _path_problem(path: object) -> str | None:
    """What keeps ``path`` from being a dataset path (None: nothing)."""
    if not isinstance(path, str):
        return f"it is a {type(path).__name__}, not a string"
    if not path:
        return "it is empty"
    if len(path) > MAX_PATH_CHARS:
        return f"it is {len(path)} characters long, more than {MAX_PATH_CHARS}"
    if path.startswith("/"):
        return "it is absolute (starts with '/')"
    if ":" in path:
        return "it holds ':' (a URL scheme or a drive)"
    if "\\" in path:
        return "it holds a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "it holds a control character"
    for segment in path.split("/"):
        if segment == "":
            return "it has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
        if not _SEGMENT.fullmatch(segment):
            return f"its segment {segment!r} holds characters other than letters, digits and '._+=-'"
    return None


def check_dataset_path(path: object, where: str) -> str:
    """``path`` if it names a file inside a dataset, else FormatError naming it and ``where``.

    The one rule for every path a record holds (shard, hidden shard) and every reader
    joins to a dataset root: relative to the root, '/'-separated segments of letters,
    digits and ``._+=-``, none of them empty, ``.`` or ``..``, at most ``MAX_PATH_CHARS``
    characters. So no leading '/', no scheme or drive (':'), no backslash, no control
    character and nothing an HTTP store would read as an escape, query or fragment
    (``%``, ``?``, ``#``): joined to the root it can only name a file under it.
    """
    problem = _path_problem(path)
    if problem is not None:
        raise FormatError(
            f"{where}: {path!r:.200} is not a dataset path ({problem}), so it could name a file outside "
            "the dataset; a dataset path is relative to the dataset root, '/'-separated segments of "
            f"letters, digits and '._+=-', none '.' or '..' (e.g. {SHARDS_DIR}/part-00000-00000.parquet); "
            f"{REWRITE}"
        )
    return typing.cast(str, path)  # _path_problem checked it is a str


def dataset_file(root: str, path: str, where: str = "dataset path") -> str:
    """``path`` (from a record) joined to the dataset ``root`` (a path or URL), after
    :func:`check_dataset_path`: the only way a reader turns a recorded path into a file."""
    return join_url(root, check_dataset_path(path, where))


def _check_path_field(value: str, where: str) -> None:
    check_dataset_path(value, where)


def _check_optional_path_field(value: str, where: str) -> None:
    if value != "":
        check_dataset_path(value, where)


_DATASET_PATH: dict[str, Any] = {"check": _check_path_field}
_OPTIONAL_DATASET_PATH: dict[str, Any] = {"check": _check_optional_path_field}


@dataclass(frozen=True)
class ShardRecord:
    """One committed shard."""

    path: str = field(metadata=_DATASET_PATH)  # relative to the dataset root: check_dataset_path
    unit: int
    index: int  # shard index within the unit
    rows: int
    tokens: int
    label_positions: int
    row_groups: int
    bytes: int
    sha256: str
    first_sequence: int  # unit-local index of the first sequence in the shard
    next_sequence: int  # unit-local index one past the last sequence in the shard
    hidden_path: str = field(default="", metadata=_OPTIONAL_DATASET_PATH)  # its hidden-state shard, or ""
    hidden_bytes: int = 0
    hidden_sha256: str = ""

    def __post_init__(self) -> None:
        """Refuse paths that leave the dataset, however the record is made (the writer too)."""
        _check_path_field(self.path, "shard record field 'path'")
        _check_optional_path_field(self.hidden_path, "shard record field 'hidden_path'")

    @classmethod
    def from_dict(cls, data: object, where: str) -> ShardRecord:
        """A shard record from parsed JSON (manifest entry or commit record), every field
        checked (:func:`parse_record`); FormatError naming ``where`` and the field otherwise."""
        return parse_record(cls, data, where)


@dataclass(frozen=True)
class UnitRecord:
    """One finished work unit: an input source, or one part of it (records written before
    units could be parts lack the fields after ``source_sha256``: they are whole sources)."""

    unit: int
    source: str  # the source's URL
    sequences: int
    tokens: int
    shards: int
    rejected: dict[str, int] = field(default_factory=dict)
    source_sha256: str = ""  # sha256 of the whole source; "" for a part (see range_sha256)
    part: int = 0  # which part of the source, from 0
    parts: int = 1  # how many parts the source is split into (1: the unit is the whole source)
    range_kind: str = "file"  # what the range counts: file (bytes), bytes, row_groups, arrow_files
    range_start: int = 0
    range_stop: int = 0  # the unit's range [start, stop); 0, 0 in records without it
    range_sha256: str = ""  # sha256 of the part's own bytes (row groups: their span; Arrow files: in order)
    engine_s: float = 0.0  # seconds the teacher engine computed, in the attempt that finished the unit
    wall_s: float = 0.0  # seconds that attempt's labeling loop ran (engine_s / wall_s: busy fraction)
    generation: dict[str, Any] = field(default_factory=dict)
    """A generation job's unit: its sample counts (:class:`labelgen.checks.GenerationStats`)."""

    @classmethod
    def from_dict(cls, data: object, where: str) -> UnitRecord:
        """A unit record from parsed JSON, every field checked (:func:`parse_record`)."""
        return parse_record(cls, data, where)


def busy_fraction(engine_s: float, wall_s: float) -> float | None:
    """The engine busy fraction: engine seconds over wall seconds (None without wall time)."""
    return round(engine_s / wall_s, 4) if wall_s > 0 else None


@dataclass
class Manifest:
    """The index of a complete label dataset; written last."""

    k: int
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    corpus: dict[str, Any]
    spec_sha256: str
    shards: list[ShardRecord]
    units: list[UnitRecord]
    created_at: str
    format: str = FORMAT_NAME
    format_version: str = FORMAT_VERSION
    position_convention: str = "position t holds the distribution of token t+1 given tokens <= t"
    logprob_temperature: float = 1.0
    codec: str = DEFAULT_CODEC
    """The top-k codec (:mod:`labelgen.contract.codecs`) its shards are stored with."""
    products: dict[str, Any] = field(default_factory=dict)
    """Optional products: {"draws": {"n", "temperature", "seed"}, "hidden": {"layers",
    "every", "dtype", "dim", "seed"}}; top-k is always present."""
    generation: dict[str, Any] = field(default_factory=dict)
    """A generation job's part (:mod:`labelgen.contract.generation`): {"sampling", "checks",
    "keep", "stats", "shards": [generation shard records]}; empty for a labeling job. The
    label ``shards`` of a generation job hold its kept samples (none without generate.labels)."""

    @property
    def rejected(self) -> dict[str, int]:
        """Rejected input records by reason, summed over units."""
        total: dict[str, int] = {}
        for unit in self.units:
            for reason, count in unit.rejected.items():
                total[reason] = total.get(reason, 0) + count
        return dict(sorted(total.items()))

    @property
    def labeling(self) -> dict[str, float | None]:
        """How well the labeling kept the teacher busy: engine seconds over the units' wall
        seconds (each unit as the attempt that finished it ran; None without timings)."""
        engine = sum(u.engine_s for u in self.units)
        wall = sum(u.wall_s for u in self.units)
        return {
            "engine_s": round(engine, 3),
            "wall_s": round(wall, 3),
            "engine_busy_fraction": busy_fraction(engine, wall),
        }

    @property
    def totals(self) -> dict[str, int]:
        return {
            "shards": len(self.shards),
            "rows": sum(s.rows for s in self.shards),
            "tokens": sum(s.tokens for s in self.shards),
            "label_positions": sum(s.label_positions for s in self.shards),
            "bytes": sum(s.bytes for s in self.shards),
        }

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["totals"] = self.totals
        data["rejected"] = self.rejected
        data["labeling"] = self.labeling
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "manifest") -> Manifest:
        """Parse a manifest; any text that is not a manifest this reader can trust raises
        FormatError naming ``where`` (and the field), never another exception.

        Keys the manifest does not define are ignored (``totals``, ``rejected`` and
        ``labeling`` are recomputed): a later minor format version may add fields. Fields are type-checked
        (:func:`parse_record`), shard paths must stay inside the dataset
        (:func:`check_dataset_path`), and k, the codec and the products must be ones this
        reader can decode (:func:`check_layout`).
        """
        data = parse_json(text, where)
        if not isinstance(data, dict):
            raise FormatError(
                f"{where} is not a {FORMAT_NAME} manifest: it holds a JSON {type(data).__name__}, not an "
                "object; restore the file or re-run the labeling job"
            )
        check_format_version(data, where)
        manifest = parse_record(cls, data, where)
        check_layout(manifest.k, manifest.codec, manifest.products, where)
        return manifest


def check_format_version(data: Mapping[str, Any], where: str) -> None:
    """Raise FormatError unless ``data`` is a manifest of a format version we read."""
    if data.get("format") != FORMAT_NAME:
        raise FormatError(f"{where} is not a {FORMAT_NAME} manifest (format={data.get('format')!r})")
    found = str(data.get("format_version"))
    if found.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise FormatError(
            f"{where} has format version {found}, this reader supports {FORMAT_VERSION}; "
            "install the labelgen release that matches the dataset"
        )
