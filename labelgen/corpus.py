"""Corpus readers: sources (URLs, globs) → records, with every bad record counted.

A *source* is one input file (or one saved HF ``datasets`` directory). Reading a
source, or one range of it (:func:`read_source` with ``part``: bytes of a jsonl or text
file, row groups of a Parquet file, Arrow files of a saved dataset; the job's work
units are planned in :mod:`labelgen.units`), yields :class:`Record` objects (a text or
a chat) and :class:`Rejected` objects (the record index and a reason), in file order,
so a re-run reads the same records with the same indices.

A byte range ``[start, stop)`` of a jsonl or text file holds the records that *begin*
in it (the rule Hadoop's line reader follows): reading skips to the first record that
begins at or after ``start`` and reads every record that begins before ``stop``, to its
end. The ranges of a file thus tile it and each record is read by exactly one of them,
whatever the ranges' bounds. Records are lines (jsonl, ``text_split: line``) or
paragraphs (``text_split: paragraph``): a paragraph begins at the file's start and
after every blank line (one holding only ``\\n`` or ``\\r\\n``), which gives the same
non-blank paragraphs as the whole-file reader's split on blank lines.

The reader is the one place that decides what a valid record is: a :class:`Record`
holds only clean ``str`` (encodable as UTF-8, no lone surrogates) and, for chats, a
bounded list of ``{"role", "content"}`` messages with known roles, so the tokenizer
never sees anything else. Every other record becomes a :class:`Rejected` with one of
the reasons in :data:`REJECTION_REASONS` (packing adds its own there too), and the job
goes on.

Sources are checked before the model loads (:func:`check_sources`): each is opened
far enough to prove it readable (Parquet footer and schema, the first block of a
compressed stream, a saved dataset's metadata and Arrow files). A source that breaks
later, mid-read, raises :class:`SourceError` naming the file and the record reached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
import fsspec.utils

from labelgen.spec import CHAT_ROLES, CorpusSpec

__all__ = [
    "REJECTION_REASONS",
    "COMPRESSED_SUFFIXES",
    "byte_splittable",
    "CHAT_ROLES",
    "Source",
    "Record",
    "PromptCorpus",
    "Rejected",
    "CorpusError",
    "SourceError",
    "resolve_sources",
    "check_sources",
    "read_source",
    "source_sha256",
    "bytes_sha256",
    "files_sha256",
    "RowGroup",
    "parquet_row_groups",
    "row_group_span",
    "hf_files",
]

REJECTION_REASONS = {
    "malformed_json": "a jsonl line is not a JSON object",
    "too_deep": "a jsonl line nests JSON deeper than the parser allows",
    "invalid_utf8": "the bytes are not UTF-8",
    "invalid_text": "the text holds code points no tokenizer can encode (lone surrogates)",
    "missing_field": "the record has no text_field (and no messages_field)",
    "wrong_type": "the text field is not a string, or the messages field is not a list",
    "bad_message": "a chat message is not a mapping of string 'role' and 'content' (and plain JSON)",
    "unknown_role": "a chat message's role is not one of corpus.chat_roles",
    "too_many_messages": "a chat has more than corpus.max_messages messages",
    "empty_text": "the text (or every assistant turn; for a prompt, the prompt) is blank",
    "bad_prompt_ids": "a prompt's token ids are not a non-empty list of integers in [0, 2**31)",
    "bad_field": "a carried field (generate's reference field) is not plain JSON data",
    "too_long": "the record is longer than corpus.max_record_chars",
    "chat_template_error": "the tokenizer's chat template refused the conversation",
    "chat_not_prefix": "the chat template does not render the conversation's turns as prefixes",
    "too_short": "a packed sequence is shorter than packing.min_tokens",
    "no_reference": "a prompt has no value in the reference check's field (generate.checks.reference.field)",
    "prompt_too_long": "a prompt leaves no room for generate.max_tokens within the engine's max_model_len",
}
"""Every reason a record (or a packed sequence) is left out, as counted in the manifest."""


_JSONL = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".ndjson")
_TEXT = (".txt", ".md", ".txt.gz", ".txt.zst", ".text")


class CorpusError(ValueError):
    """A corpus URL is unreadable or of an unknown format (raised before the model loads)."""


class SourceError(CorpusError):
    """A source that passed its check broke while being read (truncated, replaced, ...)."""


@dataclass(frozen=True)
class Source:
    """One input: a file, or a saved HF ``datasets`` directory (split into work units by
    :mod:`labelgen.units`)."""

    url: str  # full URL with protocol
    name: str  # stable short name used in sample ids (path relative to the glob root)
    format: str  # jsonl | parquet | text | hf
    size: int  # bytes (sum of files for hf directories)


@dataclass(frozen=True)
class Record:
    index: int  # record number within the source (a part: see read_source), counting rejected records too
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    progress: int = 0  # bytes of the source (part) consumed so far (approximate for parquet/hf)
    prompt_ids: list[int] | None = None  # a tokenized prompt (PromptCorpus.prompt_ids_field)
    fields: dict[str, Any] | None = None  # the record's PromptCorpus.carry fields that are present


@dataclass(frozen=True)
class PromptCorpus(CorpusSpec):
    """A corpus read as prompts, for generation (``labelgen generate``; built from the job
    spec's ``corpus`` and ``generate`` sections by :func:`labelgen.prompts.prompt_corpus`).

    A record's prompt is, in this order of preference: its ``messages_field`` chat (up to
    the last non-assistant message: trailing assistant turns are the answers, not the
    prompt), its ``prompt_ids_field`` token ids, or its ``prompt_field`` text; a text
    file's records (lines, paragraphs) are text prompts. The ``carry`` fields (the
    reference answer, ...) come along in :attr:`Record.fields` when present.
    """

    prompt_field: str = "prompt"
    prompt_ids_field: str | None = None
    carry: tuple[str, ...] = ()


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
    return _files_sha256(fs, files)


def bytes_sha256(url: str, start: int, stop: int) -> str:
    """sha256 of bytes ``[start, stop)`` of the file at ``url`` (read in chunks).

    Raises:
        SourceError: the file ends before ``stop`` (it changed since the job was planned).
    """
    digest = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        f.seek(start)
        left = stop - start
        while left > 0 and (chunk := f.read(min(left, 1 << 22))):
            digest.update(chunk)
            left -= len(chunk)
    if left > 0:
        raise SourceError(
            f"corpus source {url} ends {left} byte(s) before byte {stop}, the end of a work unit "
            "planned when the job started: it was truncated or replaced since; restore it and re-run "
            "the job (committed shards are kept), or use a new output.url"
        )
    return digest.hexdigest()


def files_sha256(urls: Iterable[str]) -> str:
    """sha256 of the files at ``urls`` (on one filesystem: a source's files), their bytes one
    after another in the order given."""
    urls = list(urls)
    if not urls:
        return hashlib.sha256().hexdigest()
    fs, first = fsspec.core.url_to_fs(urls[0])
    return _files_sha256(fs, [first, *(fsspec.core.url_to_fs(url)[1] for url in urls[1:])])


def _files_sha256(fs: Any, paths: Iterable[str]) -> str:
    """sha256 of the files at ``paths`` on ``fs``, their bytes one after another."""
    digest = hashlib.sha256()
    for path in paths:
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def _clean(text: str) -> bool:
    """True if ``text`` can be encoded as UTF-8 (Python strings may hold lone surrogates,
    e.g. from a JSON escape of half a surrogate pair; tokenizers refuse them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(index: int, value: Any, max_chars: int, progress: int) -> Record | Rejected:
    if not isinstance(value, str):
        return Rejected(index, "wrong_type", progress)
    if not value.strip():
        return Rejected(index, "empty_text", progress)
    if len(value) > max_chars:
        return Rejected(index, "too_long", progress)
    if not _clean(value):
        return Rejected(index, "invalid_text", progress)
    return Record(index, text=value, progress=progress)


_MAX_MESSAGE_DEPTH = 16  # nesting of a message's other keys (tool calls and their arguments)


def _plain_chars(value: Any) -> int | None:
    """Characters of text in ``value`` if it is plain JSON data (strings clean, nesting at
    most ``_MAX_MESSAGE_DEPTH``), else None. Iterative: deep data cannot overflow the stack."""
    chars, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not _clean(item):
                return None
            chars += len(item)
        elif isinstance(item, dict | list):
            if depth >= _MAX_MESSAGE_DEPTH:
                return None
            if isinstance(item, dict):
                if not all(isinstance(key, str) and _clean(key) for key in item):
                    return None
                chars += sum(len(key) for key in item)
                item = list(item.values())
            stack.extend((child, depth + 1) for child in item)
        elif not (item is None or isinstance(item, bool | int | float)):
            return None
    return chars


def _check_messages(
    index: int, value: Any, spec: CorpusSpec, progress: int, prompt: bool = False
) -> Record | Rejected:
    """A chat record of clean messages: a string ``role`` of ``corpus.chat_roles``, a string
    ``content``, and other keys (``name``, ``tool_calls``, ...) kept when they hold plain JSON
    data (dropped when null). With ``prompt``, the chat is a prompt: trailing assistant
    messages are dropped and what is left must not be blank."""
    if not isinstance(value, list) or not value:
        return Rejected(index, "wrong_type", progress)
    if len(value) > spec.max_messages:
        return Rejected(index, "too_many_messages", progress)
    messages = []
    chars = 0
    for message in value:
        if not isinstance(message, dict):
            return Rejected(index, "bad_message", progress)
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return Rejected(index, "bad_message", progress)
        if role not in spec.chat_roles:
            return Rejected(index, "unknown_role", progress)
        others = {key: item for key, item in message.items() if key not in ("role", "content")}
        others = {key: item for key, item in others.items() if item is not None}
        size = _plain_chars(others)
        if size is None:
            return Rejected(index, "bad_message", progress)
        chars += len(content) + size
        if chars > spec.max_record_chars:
            return Rejected(index, "too_long", progress)
        if not _clean(content):
            return Rejected(index, "invalid_text", progress)
        messages.append({"role": role, "content": content, **others})
    if prompt:
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not any(m["content"].strip() for m in messages):
            return Rejected(index, "empty_text", progress)
    elif not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return Rejected(index, "empty_text", progress)
    return Record(index, messages=messages, progress=progress)


_MAX_TOKEN_ID = 1 << 31


def _check_prompt_ids(index: int, value: Any, spec: CorpusSpec, progress: int) -> Record | Rejected:
    if (
        not isinstance(value, list)
        or not value
        or not all(type(t) is int and 0 <= t < _MAX_TOKEN_ID for t in value)
    ):
        return Rejected(index, "bad_prompt_ids", progress)
    if len(value) > spec.max_record_chars:
        return Rejected(index, "too_long", progress)
    return Record(index, prompt_ids=list(value), progress=progress)


def _prompt_from_mapping(
    index: int, row: dict[str, Any], spec: PromptCorpus, progress: int
) -> Record | Rejected:
    """A prompt record (see :class:`PromptCorpus`) with its carried fields."""
    item: Record | Rejected
    if spec.messages_field and row.get(spec.messages_field) is not None:
        item = _check_messages(index, row[spec.messages_field], spec, progress, prompt=True)
    elif spec.prompt_ids_field and row.get(spec.prompt_ids_field) is not None:
        item = _check_prompt_ids(index, row[spec.prompt_ids_field], spec, progress)
    elif row.get(spec.prompt_field) is not None:
        item = _check_text(index, row[spec.prompt_field], spec.max_record_chars, progress)
    else:
        return Rejected(index, "missing_field", progress)
    if isinstance(item, Rejected):
        return item
    fields = {name: row[name] for name in spec.carry if row.get(name) is not None}
    size = _plain_chars(fields)
    if size is None:
        return Rejected(index, "bad_field", progress)
    if size > spec.max_record_chars:
        return Rejected(index, "too_long", progress)
    return dataclasses.replace(item, fields=fields)


def _from_mapping(index: int, row: Any, spec: CorpusSpec, progress: int) -> Record | Rejected:
    if not isinstance(row, dict):
        return Rejected(index, "malformed_json", progress)
    if isinstance(spec, PromptCorpus):
        return _prompt_from_mapping(index, row, spec, progress)
    if spec.messages_field and row.get(spec.messages_field) is not None:
        return _check_messages(index, row[spec.messages_field], spec, progress)
    if spec.text_field not in row or row[spec.text_field] is None:
        return Rejected(index, "missing_field", progress)
    return _check_text(index, row[spec.text_field], spec.max_record_chars, progress)


_CHUNK = 1 << 20


def _lines(f: Any, limit: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, bytes consumed) per line of ``f`` (read in chunks; any file object); line None
    for a line of more than ``limit`` bytes (newline not counted), skipped, never held whole."""
    pending = bytearray()
    skipped = -1  # bytes of an over-long line skipped so far; -1 while not skipping
    while chunk := f.read(_CHUNK):
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            piece = chunk[start : end + 1]
            start = end + 1
            if skipped >= 0:
                yield None, skipped + len(piece)
                skipped = -1
            elif len(pending) + len(piece) - 1 > limit:
                yield None, len(pending) + len(piece)
                pending.clear()
            else:
                pending += piece
                yield bytes(pending), len(pending)
                pending.clear()
        rest = chunk[start:]
        if skipped >= 0:
            skipped += len(rest)
        elif len(pending) + len(rest) > limit:
            skipped = len(pending) + len(rest)
            pending.clear()
        else:
            pending += rest
    if skipped >= 0:
        yield None, skipped
    elif pending:
        yield bytes(pending), len(pending)


def _line_limit(spec: CorpusSpec) -> int:
    """Bytes a jsonl line may have before it is skipped unparsed as ``too_long``: a record
    of max_record_chars characters, each escaped at worst (12 bytes for a character
    outside the BMP), plus 16 MiB for the record's other fields. Bounds the memory one
    line takes; the text's own limit is checked on the parsed field."""
    return 12 * spec.max_record_chars + (16 << 20)


def _lines_at(f: Any, start: int, limit: int) -> Iterator[tuple[bytes | None, int, int, bool]]:
    """(line, offset of its first byte, offset past its end, whether the line before it is
    blank) of every line of the seekable, uncompressed ``f`` that begins at or after
    ``start``, as :func:`_lines` gives them (with their newline; None if over ``limit``).

    Reading starts up to 3 bytes before ``start``, enough to tell whether the line just
    before the first one yielded is blank (``\\n`` or ``\\r\\n``): a line read from mid-way
    is taken as not blank, which it is whenever the next line begins at or after
    ``start``. A line begun before ``start`` is read past (an over-long one without being held).
    """
    back = min(start, 3)
    f.seek(start - back)
    position = start - back
    whole = position == 0  # the first piece read is a whole line only at the file's start
    before_blank = False
    for raw, size in _lines(f, limit):
        begin, position = position, position + size
        if begin >= start:
            yield raw, begin, position, before_blank
        before_blank = whole and raw in (b"\n", b"\r\n")
        whole = True


def _range_lines(f: Any, start: int, stop: int, limit: int) -> Iterator[tuple[bytes | None, int, int, bool]]:
    """:func:`_lines_at`, the lines that begin in ``[start, stop)`` only."""
    for line in _lines_at(f, start, limit):
        if line[1] >= stop:
            return
        yield line


def _paragraphs_at(
    lines: Iterator[tuple[bytes | None, int, int, bool]], stop: int, limit: int
) -> Iterator[tuple[bytes | None, int]]:
    """(paragraph, offset past its last line) of the paragraphs that begin among ``lines``
    (:func:`_lines_at`) before ``stop``; the paragraph None if its lines hold more than
    ``limit`` bytes (then skipped, never held whole).

    A paragraph begins at the file's start and after every blank line, and is its lines up
    to and including the next blank one (so one between two blank lines is empty). Lines
    before the first beginning among ``lines`` end a paragraph begun before them: not read.
    """
    held: bytearray | None = None  # the paragraph's lines so far; None before the first
    over = False  # longer than limit
    end = 0
    for raw, begin, after, before_blank in lines:
        if begin >= stop and (held is None or over):
            # No paragraph begins in this range, or the one that did is already too long:
            # nothing more to read here (its remaining lines belong to no other paragraph).
            if held is not None:
                yield None, end
            return
        if begin == 0 or before_blank:
            if held is not None:
                yield (None if over else bytes(held)), end
            if begin >= stop:
                return
            held, over = bytearray(), False
        if held is None:
            continue
        end = after
        if raw is None or len(held) + len(raw) > limit:
            held, over = bytearray(), True
        elif not over:
            held += raw
    if held is not None:
        yield (None if over else bytes(held)), end


def _jsonl_items(
    lines: Iterable[tuple[bytes | None, int]], total: int, spec: CorpusSpec
) -> Iterator[Record | Rejected]:
    """Records of jsonl ``lines`` ((line or None if over-long, bytes consumed after it))."""
    for index, (raw, consumed) in enumerate(lines):
        progress = min(consumed, total)
        if raw is None:
            yield Rejected(index, "too_long", progress)
            continue
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
        except ValueError:  # bad syntax, or an integer of more than 4300 digits
            yield Rejected(index, "malformed_json", progress)
            continue
        except RecursionError:
            yield Rejected(index, "too_deep", progress)
            continue
        yield _from_mapping(index, row, spec, progress)


def _read_jsonl(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    limit = _line_limit(spec)
    with fsspec.open(source.url, "rb", compression="infer") as f:
        consumed = 0

        def lines() -> Iterator[tuple[bytes | None, int]]:
            nonlocal consumed
            for raw, size in _lines(f, limit):
                consumed += size
                yield raw, consumed

        yield from _jsonl_items(lines(), source.size, spec)


def _read_jsonl_part(source: Source, spec: CorpusSpec, start: int, stop: int) -> Iterator[Record | Rejected]:
    with fsspec.open(source.url, "rb") as f:  # only uncompressed files are split
        lines = _range_lines(f, start, stop, _line_limit(spec))
        yield from _jsonl_items(((raw, end - start) for raw, _, end, _ in lines), stop - start, spec)


def _text_piece(index: int, piece: bytes, spec: CorpusSpec, progress: int) -> Record | Rejected | None:
    """The record of one piece of a text file (a line, paragraph or the file); None if blank."""
    if not piece.strip():
        return None  # blank lines separate records in text files; they are not records
    try:
        text = piece.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected(index, "invalid_utf8", progress)
    return _check_text(index, text.strip("\n"), spec.max_record_chars, progress)


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
        item = _text_piece(index, piece, spec, min(consumed, source.size))
        if item is not None:
            yield item


def _read_text_part(source: Source, spec: CorpusSpec, start: int, stop: int) -> Iterator[Record | Rejected]:
    """Lines or paragraphs (``text_split``) that begin in bytes ``[start, stop)``, read in
    bounded memory: a piece over :func:`_line_limit` bytes is ``too_long``."""
    size, limit = stop - start, _line_limit(spec)
    with fsspec.open(source.url, "rb") as f:  # only uncompressed files are split
        if spec.text_split == "line":
            pieces = (
                (raw.removesuffix(b"\n") if raw is not None else None, end)
                for raw, _, end, _ in _range_lines(f, start, stop, limit)
            )
        else:
            assert spec.text_split == "paragraph", spec.text_split  # 'file' sources are one unit
            pieces = (
                (raw.replace(b"\r\n", b"\n") if raw is not None else None, end)
                for raw, end in _paragraphs_at(_lines_at(f, start, limit), stop, limit)
            )
        for index, (piece, end) in enumerate(pieces):
            progress = min(end - start, size)
            item = (
                Rejected(index, "too_long", progress)
                if piece is None
                else _text_piece(index, piece, spec, progress)
            )
            if item is not None:
                yield item


def _read_rows(rows: Iterator[dict[str, Any]], total: int, source: Source, spec: CorpusSpec):
    for index, row in enumerate(rows):
        progress = source.size * (index + 1) // max(total, 1)
        yield _from_mapping(index, row, spec, progress)


def content_columns(spec: CorpusSpec) -> list[str]:
    """The fields a record's content may be in: text_field and messages_field; for a
    :class:`PromptCorpus`, messages_field, prompt_ids_field and prompt_field."""
    if isinstance(spec, PromptCorpus):
        wanted = (spec.messages_field, spec.prompt_ids_field, spec.prompt_field)
    else:
        wanted = (spec.text_field, spec.messages_field)
    return [c for c in wanted if c]


def _record_columns(spec: CorpusSpec) -> list[str]:
    """The columns a reader selects: the content columns and the carried fields."""
    carry = spec.carry if isinstance(spec, PromptCorpus) else ()
    return list(dict.fromkeys([*content_columns(spec), *carry]))


def _parquet_columns(names: list[str], spec: CorpusSpec) -> list[str]:
    """The columns of a file (``names``) to read; empty when it has no content column."""
    if not any(c in names for c in content_columns(spec)):
        return []
    return [c for c in _record_columns(spec) if c in names]


def _missing_content(names: list[str], spec: CorpusSpec) -> str:
    """Why a file with columns ``names`` has nothing to read, and the fix."""
    wanted = " or ".join(repr(c) for c in content_columns(spec))
    fields = "generate.prompt_field (or corpus.messages_field, generate.prompt_ids_field)"
    if not isinstance(spec, PromptCorpus):
        fields = "corpus.text_field (or corpus.messages_field)"
    listed = ", ".join(names) or "none"
    return f"has no column {wanted} (columns: {listed}); set {fields} to the column holding it"


def _read_parquet(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    import pyarrow.parquet as pq

    with fsspec.open(source.url, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = _parquet_columns(pf.schema_arrow.names, spec)

        def rows() -> Iterator[dict[str, Any]]:
            for batch in pf.iter_batches(batch_size=1024, columns=columns or None):
                yield from batch.to_pylist()

        yield from _read_rows(rows(), pf.metadata.num_rows, source, spec)


class RowGroup(NamedTuple):
    """One row group of a Parquet file, from its footer."""

    rows: int
    start: int  # offset of its first column chunk (dictionary page, else first data page)
    stop: int  # offset past the end of its last column chunk


def _row_groups(metadata: Any) -> list[RowGroup]:
    groups = []
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        spans = []
        for c in range(group.num_columns):
            column = group.column(c)
            first = column.data_page_offset
            if column.has_dictionary_page and column.dictionary_page_offset:
                first = min(first, column.dictionary_page_offset)
            spans.append((first, first + column.total_compressed_size))
        start = min((a for a, _ in spans), default=0)
        groups.append(RowGroup(group.num_rows, start, max((b for _, b in spans), default=start)))
    return groups


def parquet_row_groups(source: Source) -> list[RowGroup]:
    """The row groups of a Parquet source, from its footer alone (no data page is read)."""
    import pyarrow.parquet as pq

    with fsspec.open(source.url, "rb") as f:
        return _row_groups(pq.ParquetFile(f).metadata)


def row_group_span(groups: list[RowGroup], start: int, stop: int) -> tuple[int, int]:
    """Bytes ``[first, end)`` of the file that row groups ``[start, stop)`` take: from the
    first column chunk of the first to the end of the last one's last."""
    chosen = groups[start:stop]
    return min(g.start for g in chosen), max(g.stop for g in chosen)


def _read_parquet_part(
    source: Source, spec: CorpusSpec, start: int, stop: int
) -> Iterator[Record | Rejected]:
    """Rows of row groups ``[start, stop)``, numbered as in the whole file (the footer's
    row counts give the rows before ``start``)."""
    import pyarrow.parquet as pq

    with fsspec.open(source.url, "rb") as f:
        pf = pq.ParquetFile(f)
        groups = _row_groups(pf.metadata)
        if stop > len(groups):
            raise SourceError(
                f"corpus source {source.url} has {len(groups)} row group(s), but a work unit planned "
                f"when the job started reads row groups [{start}, {stop}): the file was replaced since; "
                "restore it and re-run the job (committed shards are kept), or use a new output.url"
            )
        columns = _parquet_columns(pf.schema_arrow.names, spec)
        first_byte, end_byte = row_group_span(groups, start, stop)
        size = end_byte - first_byte
        first = sum(g.rows for g in groups[:start])
        total = max(sum(g.rows for g in groups[start:stop]), 1)
        index = 0
        batches = pf.iter_batches(batch_size=1024, row_groups=range(start, stop), columns=columns or None)
        for batch in batches:
            for row in batch.to_pylist():
                yield _from_mapping(first + index, row, spec, size * (index + 1) // total)
                index += 1


def hf_files(source: Source) -> list[tuple[str, int]]:
    """(URL, bytes) of each Arrow file of a saved ``datasets`` directory, in the order its
    ``state.json`` lists them.

    Read with pyarrow, not ``datasets``: every record batch is validated before a value
    is touched, where a memory-mapped damaged file could crash the process.
    """
    fs, root = fsspec.core.url_to_fs(source.url)
    root = root.rstrip("/")
    if fs.exists(f"{root}/dataset_dict.json"):
        raise CorpusError(
            f"{source.url} holds a DatasetDict (several splits); point corpus.sources at the "
            "directory of one split"
        )
    try:
        state = json.loads(fs.cat_file(f"{root}/state.json"))
        names = [entry["filename"] for entry in state["_data_files"]]
    except FileNotFoundError as exc:
        raise CorpusError(
            f"{source.url} has no state.json, so it is not a directory Dataset.save_to_disk wrote; "
            "save the dataset again, or point corpus.sources at its files"
        ) from exc
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorpusError(
            f"{source.url} has a damaged state.json ({type(exc).__name__}: {exc}); save the dataset again"
        ) from exc
    bad = [n for n in names if not isinstance(n, str) or not n or "/" in n or "\\" in n or n in (".", "..")]
    if bad or not names:
        raise CorpusError(
            f"{source.url} has a state.json that lists no Arrow files, or names outside the "
            f"directory ({bad}); save the dataset again"
        )
    return [(fs.unstrip_protocol(f"{root}/{name}"), int(fs.size(f"{root}/{name}"))) for name in names]


def _hf_batches(url: str, columns: list[str] | None) -> Iterator[tuple[Any, int]]:
    """(validated record batch, bytes of the file read so far) of one Arrow stream file,
    only ``columns`` if given."""
    import pyarrow as pa

    with fsspec.open(url, "rb") as f:
        reader = pa.ipc.open_stream(f)
        names = reader.schema.names
        wanted = [c for c in columns if c in names] if columns is not None else names
        for batch in reader:
            batch = batch.select(wanted)
            batch.validate(full=True)  # offsets and lengths inside their buffers
            yield batch, f.tell()


def _hf_records(files: list[tuple[str, int]], total: int, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    columns = _record_columns(spec)
    index = done = 0
    for url, size in files:
        for batch, read in _hf_batches(url, columns):
            progress = min(done + read, total)
            for row in batch.to_pylist():
                yield _from_mapping(index, row, spec, progress)
                index += 1
        done += size


def _read_hf(source: Source, spec: CorpusSpec) -> Iterator[Record | Rejected]:
    yield from _hf_records(hf_files(source), source.size, spec)


def _read_hf_part(source: Source, spec: CorpusSpec, start: int, stop: int) -> Iterator[Record | Rejected]:
    """Rows of Arrow files ``[start, stop)`` (in ``state.json`` order), numbered from 0."""
    files = hf_files(source)
    if stop > len(files):
        raise SourceError(
            f"corpus source {source.url} lists {len(files)} Arrow file(s), but a work unit planned when "
            f"the job started reads files [{start}, {stop}): the dataset was saved again since; restore "
            "it and re-run the job (committed shards are kept), or use a new output.url"
        )
    chosen = files[start:stop]
    yield from _hf_records(chosen, sum(size for _, size in chosen), spec)


_READERS = {"jsonl": _read_jsonl, "text": _read_text, "parquet": _read_parquet, "hf": _read_hf}
_PART_READERS = {
    "jsonl": _read_jsonl_part,
    "text": _read_text_part,
    "parquet": _read_parquet_part,
    "hf": _read_hf_part,
}


COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma", ".zip", ".zst", ".zstd", ".lz4")
"""Compressed names, whatever fsspec has registered on this machine, so that which files
can be split does not depend on the compression libraries installed."""


def byte_splittable(source: Source, spec: CorpusSpec) -> bool:
    """Whether a source can be read in byte ranges (:func:`read_source` with ``part``): an
    uncompressed jsonl or text file, not read whole (``text_split: file``). A compressed
    stream cannot be entered mid-way."""
    if source.format not in ("jsonl", "text") or (source.format == "text" and spec.text_split == "file"):
        return False
    name = source.url.lower()
    return not (name.endswith(COMPRESSED_SUFFIXES) or fsspec.utils.infer_compression(name) is not None)


def read_source(
    source: Source, spec: CorpusSpec, part: tuple[int, int] | None = None
) -> Iterator[Record | Rejected]:
    """Records of one source (or of one part of it), in order; bad records come out as Rejected.

    Args:
        source: the source.
        spec: the corpus spec (fields, limits, ``text_split``).
        part: None for the whole source; else ``(start, stop)``: bytes of an uncompressed
            jsonl or text file (the records that begin in them, see the module docstring;
            not for ``text_split: file``), row groups of a Parquet file, Arrow files of a
            saved dataset (``state.json`` order). Record indices count from 0 within a part,
            except Parquet's, which are the rows' numbers in the whole file.

    Raises:
        SourceError: the source broke while being read (names the file and the last
            record read); records read before it were already yielded.
    """
    if part is not None and source.format in ("jsonl", "text") and not byte_splittable(source, spec):
        raise CorpusError(
            f"{source.url} cannot be read in byte ranges (compressed, or text_split: file); "
            "read it whole (part=None)"
        )
    last = -1
    where = "" if part is None else f" (work unit range [{part[0]}, {part[1]}))"
    try:
        items = (
            _READERS[source.format](source, spec)
            if part is None
            else _PART_READERS[source.format](source, spec, *part)
        )
        for item in items:
            last = item.index
            yield item
    except CorpusError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises, the file is named
        raise SourceError(
            f"corpus source {source.url}{where} broke while being read, "
            f"{f'after record {last}' if last >= 0 else 'before its first record'}: "
            f"{type(exc).__name__}: {exc}. Its header was readable when the job was planned, so it "
            "was truncated or changed since, or is damaged past its header; restore or repair it and "
            "re-run the job (committed shards are kept), or remove it and use a new output.url"
        ) from exc


# -- checks before the model loads --------------------------------------------------------
def _check_stream(source: Source, spec: CorpusSpec) -> None:
    """Open a (possibly compressed) jsonl/text file and decode its first block."""
    with fsspec.open(source.url, "rb", compression="infer") as f:
        f.read(1 << 16)


def _check_parquet(source: Source, spec: CorpusSpec) -> None:
    import pyarrow.parquet as pq

    with fsspec.open(source.url, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if not _parquet_columns(names, spec):
            raise CorpusError(_missing_content(names, spec))
        for group in range(pf.metadata.num_row_groups):
            pf.metadata.row_group(group)  # every row group's metadata parses


def _check_hf(source: Source, spec: CorpusSpec) -> None:
    import pyarrow as pa

    files = hf_files(source)
    for url, _ in files:
        with fsspec.open(url, "rb") as f:
            names = pa.ipc.open_stream(f).schema.names
        if not _parquet_columns(names, spec):
            raise CorpusError(f"{_missing_content(names, spec)} (in {url.rsplit('/', 1)[-1]})")
    next(_hf_batches(files[0][0], None), None)  # the first batch decodes


_CHECKS = {"jsonl": _check_stream, "text": _check_stream, "parquet": _check_parquet, "hf": _check_hf}


def _source_problem(source: Source, spec: CorpusSpec) -> str | None:
    try:
        _CHECKS[source.format](source, spec)
    except CorpusError as exc:
        return str(exc).removeprefix(f"{source.url} ")
    except Exception as exc:  # noqa: BLE001 - whatever the backend raises is the reason
        return f"is not a readable {source.format} source: {type(exc).__name__}: {exc}"
    return None


def check_sources(sources: list[Source], spec: CorpusSpec) -> tuple[list[Source], dict[str, str]]:
    """Open every source far enough to prove it readable (in parallel, before the model loads).

    Returns the readable sources and ``{name: reason}`` of the others, which
    ``corpus.on_bad_source: skip`` leaves out of the job.

    Raises:
        CorpusError: some source is unreadable and ``corpus.on_bad_source`` is 'error'
            (every bad source is listed, with its reason).
    """
    with ThreadPoolExecutor(max_workers=min(16, max(len(sources), 1))) as pool:
        problems = list(pool.map(lambda s: _source_problem(s, spec), sources))
    bad = {s.name: p for s, p in zip(sources, problems, strict=True) if p is not None}
    if bad and (spec.on_bad_source == "error" or len(bad) == len(sources)):
        by_name = {s.name: s.url for s in sources}
        lines = [f"corpus.sources: {by_name[name]} {reason}" for name, reason in bad.items()]
        lines.append(
            f"no source can be read ({len(bad)} of {len(sources)}); fix them, or check corpus.sources"
            if len(bad) == len(sources)
            else f"{len(bad)} of {len(sources)} source(s) cannot be read; fix or remove them, or set "
            "corpus.on_bad_source=skip to label the others and count these in the manifest"
        )
        raise CorpusError("\n".join(lines))
    return [s for s in sources if s.name not in bad], bad
