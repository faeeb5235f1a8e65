"""Corpus readers: sources (URLs, globs) → records, with every bad record counted.

A *source* is one input file (or one saved HF ``datasets`` directory) and is one
work unit of a labeling job. Reading a source yields :class:`Record` objects (a
text or a chat) and :class:`Rejected` objects (the record index and a reason), in
file order, so a re-run reads the same records with the same indices.

Rejection reasons: ``malformed_json``, ``missing_field``, ``wrong_type``,
``empty_text``, ``invalid_utf8``, ``too_long``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from labelgen.spec import CorpusSpec

__all__ = ["Source", "Record", "Rejected", "CorpusError", "resolve_sources", "read_source", "source_sha256"]

_JSONL = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".ndjson")
_TEXT = (".txt", ".md", ".txt.gz", ".txt.zst", ".text")


class CorpusError(ValueError):
    """A corpus URL is unreadable or of an unknown format (raised before the model loads)."""


@dataclass(frozen=True)
class Source:
    """One input unit."""

    url: str  # full URL with protocol
    name: str  # stable short name used in sample ids (path relative to the glob root)
    format: str  # jsonl | parquet | text | hf
    size: int  # bytes (sum of files for hf directories)


@dataclass(frozen=True)
class Record:
    index: int  # record number within the source, counting rejected records too
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    progress: int = 0  # bytes of the source consumed so far (approximate for parquet/hf)


@dataclass(frozen=True)
class Rejected:
    index: int
    reason: str
    progress: int = 0


def _detect_format(path: str, fs: Any, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    lower = path.lower()
    if fs.isdir(path):
        if fs.exists(path.rstrip("/") + "/dataset_info.json") or fs.exists(path.rstrip("/") + "/state.json"):
            return "hf"
        raise CorpusError(f"{path!r} is a directory but not a saved HF dataset (no dataset_info.json)")
    if lower.endswith(_JSONL):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(_TEXT):
        return "text"
    raise CorpusError(
        f"cannot tell the format of {path!r} from its name; set corpus.format to one of "
        "jsonl, parquet, text, hf"
    )


def resolve_sources(spec: CorpusSpec) -> list[Source]:
    """Expand globs to a sorted, de-duplicated list of sources; raise CorpusError if any
    URL matches nothing or cannot be read."""
    sources: dict[str, Source] = {}
    errors: list[str] = []
    for pattern in spec.sources:
        try:
            fs, _ = fsspec.core.url_to_fs(pattern)
            paths = (
                sorted(fs.glob(pattern))
                if fsspec.core.has_magic(pattern)
                else [fsspec.core.url_to_fs(pattern)[1]]
            )
            paths = [p for p in paths if fs.exists(p)]
        except Exception as exc:  # noqa: BLE001 - any backend error is a user-facing error here
            errors.append(f"corpus.sources: cannot read {pattern!r}: {type(exc).__name__}: {exc}")
            continue
        if not paths:
            errors.append(f"corpus.sources: {pattern!r} matches no file; check the path or glob")
            continue
        for path in paths:
            try:
                fmt = _detect_format(path, fs, spec.format)
            except CorpusError as exc:
                errors.append(f"corpus.sources: {exc}")
                continue
            url = fs.unstrip_protocol(path)
            size = fs.du(path) if fmt == "hf" else fs.size(path)
            sources[url] = Source(url=url, name=path.rsplit("/", 1)[-1], format=fmt, size=int(size))
    if errors:
        raise CorpusError("\n".join(errors))
    ordered = [sources[u] for u in sorted(sources)]
    names = [s.name for s in ordered]
    if len(set(names)) != len(names):
        # Fall back to full paths so sample ids stay unique.
        ordered = [Source(s.url, s.url.split("://", 1)[-1], s.format, s.size) for s in ordered]
    return ordered


def source_sha256(source: Source) -> str:
    """sha256 of the source's bytes (all files, in sorted order, for a directory)."""
    fs, path = fsspec.core.url_to_fs(source.url)
    files = sorted(fs.find(path)) if source.format == "hf" else [path]
    digest = hashlib.sha256()
    for file in files:
        with fs.open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _check_text(index: int, value: Any, max_chars: int, progress: int) -> Record | Rejected:
    if not isinstance(value, str):
        return Rejected(index, "wrong_type", progress)
    if not value.strip():
        return Rejected(index, "empty_text", progress)
    if len(value) > max_chars:
        return Rejected(index, "too_long", progress)
    return Record(index, text=value, progress=progress)


def _check_messages(index: int, value: Any, max_chars: int, progress: int) -> Record | Rejected:
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        return Rejected(index, "wrong_type", progress)
    if sum(len(m["content"]) for m in value) > max_chars:
        return Rejected(index, "too_long", progress)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        return Rejected(index, "empty_text", progress)
    return Record(index, messages=value, progress=progress)


def _from_mapping(index: int, row: Any, spec: CorpusSpec, progress: int) -> Record | Rejected:
    if not isinstance(row, dict):
        return Rejected(index, "malformed_json", progress)
    if spec.messages_field and row.get(spec.messages_field) is not None:
        return _check_messages(index, row[spec.messages_field], spec.max_record_chars, progress)
    if spec.text_field not in row or row[spec.text_field] is None:
        return Rejected(index, "missing_field", progress)
    return _check_text(index, row[spec.text_field], spec.max_record_chars, progress)


def _read_jsonl(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    consumed = 0
    with fsspec.open(source.url, "rb", compression="infer") as f:
        for index, raw in enumerate(f):
            consumed += len(raw)
            progress = min(consumed, source.size)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Rejected(index, "invalid_utf8", progress)
                continue
            if not line.strip():
                yield Rejected(index, "empty_text", progress)
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield Rejected(index, "malformed_json", progress)
                continue
            yield _from_mapping(index, row, spec, progress)


def _read_text(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    with fsspec.open(source.url, "rb", compression="infer") as f:
        data = f.read()
    if spec.text_split == "file":
        pieces = [data]
    elif spec.text_split == "line":
        pieces = data.split(b"\n")
    else:
        pieces = data.replace(b"\r\n", b"\n").split(b"\n\n")
    consumed = 0
    for index, piece in enumerate(pieces):
        consumed += len(piece) + 1
        progress = min(consumed, source.size)
        if not piece.strip():
            continue  # blank lines separate records in text files; they are not records
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError:
            yield Rejected(index, "invalid_utf8", progress)
            continue
        yield _check_text(index, text.strip("\n"), spec.max_record_chars, progress)


def _read_rows(rows: Iterator[dict[str, Any]], total: int, source: Source, spec: CorpusSpec):
    for index, row in enumerate(rows):
        progress = source.size * (index + 1) // max(total, 1)
        yield _from_mapping(index, row, spec, progress)


def _read_parquet(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    import pyarrow.parquet as pq

    with fsspec.open(source.url, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        columns = [c for c in (spec.text_field, spec.messages_field) if c and c in names]

        def rows() -> Iterator[dict[str, Any]]:
            for batch in pf.iter_batches(batch_size=1024, columns=columns or None):
                yield from batch.to_pylist()

        yield from _read_rows(rows(), pf.metadata.num_rows, source, spec)


def _read_hf(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("reading saved HF datasets needs `pip install 'labelgen[hf]'`") from exc
    ds = datasets.load_from_disk(source.url)
    if isinstance(ds, datasets.DatasetDict):
        raise CorpusError(
            f"{source.url} holds a DatasetDict ({', '.join(ds)}); point corpus.sources at one split"
        )
    yield from _read_rows(iter(ds), len(ds), source, spec)


_READERS = {"jsonl": _read_jsonl, "text": _read_text, "parquet": _read_parquet, "hf": _read_hf}


def read_source(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    """Records of one source, in order; bad records come out as Rejected."""
    return _READERS[source.format](source, spec)
