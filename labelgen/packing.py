"""Records → token sequences: tokenize (text or chat), then pack into sequences.

Deterministic: the same records and tokenizer give the same sequences with the same
sample ids ``"<source>#<record>.<chunk>"`` (the record and chunk of the sequence's
first token; chunk counts ``seq_len`` windows within that record's tokens).

Each token carries a target flag: 1 if predicting that token is a training target.
Plain text and separators are targets; in chat records only assistant tokens are.
A sequence's ``label_mask[t]`` is the flag of token ``t+1``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from labelgen.corpus import Record, Rejected
from labelgen.spec import PackingSpec

__all__ = ["PackedSequence", "Document", "tokenize_record", "pack", "separator_id"]


@dataclass(frozen=True)
class Document:
    """One tokenized record."""

    record: int
    ids: list[int]
    targets: list[int]  # 1 where the token is a training target


@dataclass(frozen=True)
class PackedSequence:
    """One packed token sequence, the unit of labeling and of a Parquet row."""

    sample_id: str
    input_ids: np.ndarray  # (T,) int32
    label_mask: np.ndarray  # (T-1,) uint8


def separator_id(tokenizer: Any, spec: PackingSpec) -> int | None:
    """Token id appended after each document, or None."""
    if spec.separator == "none":
        return None
    token_id = tokenizer.eos_token_id if spec.separator == "eos" else tokenizer.bos_token_id
    if token_id is None:
        raise ValueError(
            f"packing.separator is {spec.separator!r} but the tokenizer has no "
            f"{spec.separator}_token; set packing.separator to 'none' or another token type"
        )
    return int(token_id)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tokenize_record(tokenizer: Any, record: Record) -> Document | Rejected:
    """Tokenize a text record (all tokens are targets) or a chat record (assistant turns only).

    Chat masking renders the conversation turn by turn: the tokens between the prompt
    for assistant turn i (``add_generation_prompt=True``) and the rendering that
    includes turn i are that turn's tokens. This needs a template with the prefix
    property (each rendering a prefix of the next), which the usual chat templates have;
    a conversation the template renders otherwise (some drop earlier turns' reasoning)
    is rejected as ``chat_not_prefix``, and one the template raises on (roles out of the
    order it wants) as ``chat_template_error``.
    """
    if record.messages is None:
        ids = _encode(tokenizer, record.text or "")
        return Document(record.index, ids, [1] * len(ids))
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "corpus.messages_field is set but the tokenizer has no chat template; set "
            "teacher.tokenizer to one that has, or label the text field instead"
        )
    messages = record.messages
    try:
        text = _render(tokenizer, messages, add_generation_prompt=False)
        turns = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = (
                _render(tokenizer, messages[:i], add_generation_prompt=True) if i else _opening(tokenizer)
            )
            upto = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                return Rejected(record.index, "chat_not_prefix", record.progress)
            turns.append((prompt, upto))
    except _template_errors():
        return Rejected(record.index, "chat_template_error", record.progress)
    ids = _encode(tokenizer, text)
    targets = [0] * len(ids)
    for prompt, upto in turns:
        start, end = len(_encode(tokenizer, prompt)), len(_encode(tokenizer, upto))
        if end > len(ids) or start > end:
            return Rejected(record.index, "chat_not_prefix", record.progress)
        targets[start:end] = [1] * (end - start)
    return Document(record.index, ids, targets)


def _opening(tokenizer: Any) -> str:
    """What the template renders before a chat's first turn when that turn is the
    assistant's: the generation prompt of an empty chat, or nothing where the template
    (or transformers) refuses an empty chat."""
    try:
        return _render(tokenizer, [], add_generation_prompt=True)
    except _template_errors():
        return ""


def _template_errors() -> tuple[type[BaseException], ...]:
    """What a chat template raises on a conversation it refuses (jinja's errors, and the
    ValueError/TypeError/KeyError that ``raise_exception`` and filters give)."""
    from jinja2.exceptions import TemplateError

    return (TemplateError, ValueError, TypeError, KeyError, IndexError)


def _make(source: str, record: int, chunk: int, ids: list[int], targets: list[int]) -> PackedSequence:
    return PackedSequence(
        sample_id=f"{source}#{record}.{chunk}",
        input_ids=np.asarray(ids, dtype=np.int32),
        label_mask=np.asarray(targets[1:], dtype=np.uint8),
    )


def pack(
    source_name: str,
    items: Iterator[Record | Rejected],
    tokenizer: Any,
    spec: PackingSpec,
    rejected: dict[str, int],
) -> Iterator[PackedSequence]:
    """Tokenize and pack the records of one source into sequences.

    ``rejected`` is updated in place with counts by reason: the reader's reasons, the
    chat template's (see :func:`tokenize_record`) and ``too_short`` for sequences below
    ``spec.min_tokens`` (all listed in :data:`labelgen.corpus.REJECTION_REASONS`).
    """
    sep = separator_id(tokenizer, spec)
    buf_ids: list[int] = []
    buf_targets: list[int] = []
    buf_origin: list[tuple[int, int]] = []  # (record, token offset in record) per token

    def emit(n: int) -> PackedSequence | None:
        ids, targets, origin = buf_ids[:n], buf_targets[:n], buf_origin[:n]
        del buf_ids[:n], buf_targets[:n], buf_origin[:n]
        if len(ids) < spec.min_tokens:
            rejected["too_short"] = rejected.get("too_short", 0) + 1
            return None
        record, offset = origin[0]
        return _make(source_name, record, offset // spec.seq_len, ids, targets)

    for item in items:
        if isinstance(item, Rejected):
            rejected[item.reason] = rejected.get(item.reason, 0) + 1
            continue
        doc = tokenize_record(tokenizer, item)
        if isinstance(doc, Rejected):
            rejected[doc.reason] = rejected.get(doc.reason, 0) + 1
            continue
        ids, targets = list(doc.ids), list(doc.targets)
        if sep is not None:
            ids.append(sep)
            targets.append(1)
        if not spec.cross_documents:
            for start in range(0, len(ids), spec.seq_len):
                chunk_ids = ids[start : start + spec.seq_len]
                if len(chunk_ids) < spec.min_tokens:
                    rejected["too_short"] = rejected.get("too_short", 0) + 1
                    continue
                yield _make(
                    source_name,
                    doc.record,
                    start // spec.seq_len,
                    chunk_ids,
                    targets[start : start + spec.seq_len],
                )
            continue
        buf_ids.extend(ids)
        buf_targets.extend(targets)
        buf_origin.extend((doc.record, i) for i in range(len(ids)))
        while len(buf_ids) >= spec.seq_len:
            seq = emit(spec.seq_len)
            if seq is not None:
                yield seq
    if buf_ids:
        seq = emit(len(buf_ids))
        if seq is not None:
            yield seq
