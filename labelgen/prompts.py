"""Prompts for generation: corpus records → token-id prompts, and the seed of each sample.

A generation job (``labelgen generate``) reads its corpus with the same readers as a
labeling job, as a :class:`labelgen.corpus.PromptCorpus` (:func:`prompt_corpus`), and
turns each record into a :class:`Prompt` (:func:`build_prompt`):

- a chat (``corpus.messages_field``, trailing assistant turns dropped) is rendered with
  the tokenizer's chat template and its generation prompt;
- a text prompt (``generate.prompt_field``, or a text file's line or paragraph) becomes
  one user message, rendered the same way, or with ``generate.chat_template: false``
  is tokenized as it is;
- token ids (``generate.prompt_ids_field``) are sent as they are.

``generate.system_prompt`` is put first in chats and text prompts that have no system
message. No special tokens are added beyond what the template renders. A prompt whose
tokens leave no room for ``generate.max_tokens`` (plus the one token a labeling request
needs) is rejected (``prompt_too_long``), as is a record without the reference the
reference check needs (``no_reference``): both are counted with the corpus's rejections.

Prompt ids are ``<unit sample prefix>#<record>``, stable across re-runs; sample ``i`` of
a prompt is drawn with :func:`sample_seed` of (``generate.seed``, prompt id, ``i``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelgen.corpus import PromptCorpus, Record, Rejected
from labelgen.spec import GenerateSpec, JobSpec

__all__ = ["Prompt", "prompt_corpus", "build_prompt", "sample_seed", "SEED_BITS"]

SEED_BITS = 62
"""Sampling seeds are integers in [0, 2**62)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a generation unit."""

    prompt_id: str  # "<unit sample prefix>#<record>"
    index: int  # unit-local index among the unit's valid prompts, from 0
    ids: np.ndarray  # (P,) int32: the tokens the engine is given
    messages: list[dict[str, Any]]  # the prompt as chat messages (a text prompt: one user message)
    reference: str | None = None  # the record's reference answer, as text
    fields: dict[str, Any] = field(default_factory=dict)  # the record's carried fields
    progress: int = 0  # input bytes of the unit consumed when this prompt was read


def prompt_corpus(spec: JobSpec) -> PromptCorpus:
    """The job's corpus section read as prompts (the reference field carried along)."""
    gen = spec.generate
    assert gen is not None, "prompt_corpus is for generation jobs"
    carry = (gen.checks.reference.field,) if gen.checks.reference is not None else ()
    corpus = {f: getattr(spec.corpus, f) for f in spec.corpus.__dataclass_fields__}
    return PromptCorpus(
        **corpus,
        prompt_field=gen.prompt_field,
        prompt_ids_field=gen.prompt_ids_field,
        carry=carry,
    )


def sample_seed(base: int, prompt_id: str, sample: int) -> int:
    """The sampling seed of sample ``sample`` of ``prompt_id`` under base seed ``base``."""
    digest = hashlib.sha256(f"{base}\x00{prompt_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - SEED_BITS)


def _with_system(messages: list[dict[str, Any]], gen: GenerateSpec) -> list[dict[str, Any]]:
    if gen.system_prompt is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": gen.system_prompt}, *messages]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _check_template(tokenizer: Any, chat: bool) -> None:
    if getattr(tokenizer, "chat_template", None) is not None:
        return
    if chat:
        raise ValueError(
            "corpus.messages_field holds chats but the tokenizer has no chat template to render them; set "
            "teacher.tokenizer to one that has, or give text prompts (generate.prompt_field)"
        )
    raise ValueError(
        "generate.chat_template is true but the tokenizer has no chat template; set teacher.tokenizer to "
        "one that has, or set generate.chat_template: false to send text prompts as they are"
    )


def build_prompt(
    record: Record,
    prefix: str,
    index: int,
    tokenizer: Any,
    gen: GenerateSpec,
    max_prompt_tokens: int | None,
) -> Prompt | Rejected:
    """The prompt of ``record`` (see the module doc), or why it cannot be one.

    Args:
        record: a record read through :func:`prompt_corpus`'s corpus.
        prefix: the unit's sample prefix (:attr:`labelgen.units.WorkUnit.sample_prefix`).
        index: the prompt's unit-local index, if it is valid.
        max_prompt_tokens: the most prompt tokens the engine takes with room for the
            response (None: unbounded).
    """
    from labelgen.packing import _template_errors

    fields = dict(record.fields or {})
    reference = None
    if gen.checks.reference is not None:
        value = fields.get(gen.checks.reference.field)
        if value is None:
            return Rejected(record.index, "no_reference", record.progress)
        reference = value if isinstance(value, str) else str(value)
    if record.prompt_ids is not None:
        ids = list(record.prompt_ids)
        messages = [{"role": "user", "content": tokenizer.decode(ids)}]
    else:
        if record.messages is not None:
            messages = _with_system(list(record.messages), gen)
        else:
            messages = _with_system([{"role": "user", "content": record.text or ""}], gen)
        if gen.chat_template or record.messages is not None:
            _check_template(tokenizer, record.messages is not None)
            try:
                text = _render(tokenizer, messages)
            except _template_errors():
                return Rejected(record.index, "chat_template_error", record.progress)
        else:
            text = "".join(f"{m['content']}\n\n" if m["role"] == "system" else m["content"] for m in messages)
        ids = _encode(tokenizer, text)
    if not ids:
        return Rejected(record.index, "empty_text", record.progress)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return Rejected(record.index, "prompt_too_long", record.progress)
    return Prompt(
        prompt_id=f"{prefix}#{record.index}",
        index=index,
        ids=np.asarray(ids, dtype=np.int32),
        messages=messages,
        reference=reference,
        fields=fields,
        progress=record.progress,
    )
