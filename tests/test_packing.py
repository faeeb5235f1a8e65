"""Tokenize + pack: determinism, stable sample ids, chat masking, document modes."""

from __future__ import annotations

import numpy as np

from labelgen.contract.configs import load_config
from labelgen.corpus import Record, Rejected
from labelgen.packing import pack, tokenize_record
from labelgen.spec import PackingSpec


def records(texts):
    return [Record(i, text=t) for i, t in enumerate(texts)]


def test_cross_document_packing_is_full_and_deterministic(tokenizer, texts):
    spec = load_config(PackingSpec, {"seq_len": 64})
    rejected: dict[str, int] = {}
    a = list(pack("src", iter(records(texts[:20])), tokenizer, spec, rejected))
    b = list(pack("src", iter(records(texts[:20])), tokenizer, spec, {}))
    assert all(len(s.input_ids) == 64 for s in a[:-1]) and 2 <= len(a[-1].input_ids) <= 64
    assert [s.sample_id for s in a] == [s.sample_id for s in b]
    assert all(np.array_equal(x.input_ids, y.input_ids) for x, y in zip(a, b, strict=True))
    assert a[0].sample_id == "src#0.0"
    assert len(set(s.sample_id for s in a)) == len(a)
    total = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts[:20])
    assert sum(len(s.input_ids) for s in a) == total  # every token, separators included
    assert all(s.label_mask.shape == (len(s.input_ids) - 1,) and s.label_mask.all() for s in a)


def test_per_document_mode_splits_long_documents(tokenizer, texts):
    spec = load_config(PackingSpec, {"seq_len": 32, "cross_documents": False, "separator": "none"})
    seqs = list(pack("s", iter(records(texts[:3])), tokenizer, spec, {}))
    first_doc = [s for s in seqs if s.sample_id.startswith("s#0.")]
    n = len(tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    assert len(first_doc) == n // 32 + (1 if n % 32 >= 2 else 0)  # a 1-token tail chunk is dropped
    assert [s.sample_id for s in first_doc][:2] == ["s#0.0", "s#0.1"]


def test_rejections_are_counted(tokenizer):
    spec = load_config(
        PackingSpec, {"seq_len": 16, "cross_documents": False, "min_tokens": 4, "separator": "none"}
    )
    items = [Rejected(0, "malformed_json"), Record(1, text="a"), Rejected(2, "malformed_json")]
    rejected: dict[str, int] = {}
    assert list(pack("s", iter(items), tokenizer, spec, rejected)) == []
    assert rejected == {"malformed_json": 2, "too_short": 1}


def test_chat_masks_prompt_tokens(tokenizer):
    messages = [
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "An ordered sequence."},
        {"role": "user", "content": "And a tuple?"},
        {"role": "assistant", "content": "An immutable one."},
    ]
    doc = tokenize_record(tokenizer, Record(0, messages=messages))
    targets = np.array(doc.targets, bool)
    text = tokenizer.decode([t for t, m in zip(doc.ids, targets, strict=True) if m])
    assert "An ordered sequence." in text and "An immutable one." in text
    assert "What is a list?" not in text and "<|user|>" not in text
    prompt = tokenizer.decode([t for t, m in zip(doc.ids, targets, strict=True) if not m])
    assert "What is a list?" in prompt and "<|assistant|>" in prompt


def test_conversations_the_chat_template_refuses_are_counted_not_fatal(teacher_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system only first') }}{% endif %}"
        # Earlier assistant turns lose their reasoning, as some templates do: no prefix property.
        "{% set c = m['content'].split('</think>')[-1] if m['role'] == 'assistant' and not loop.last "
        "else m['content'] %}<|{{ m['role'] }}|>{{ c }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    q, a = {"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}
    chats = [
        [q, a],
        [q, {"role": "system", "content": "late"}, a],
        [q, {"role": "assistant", "content": "<think>hm</think>yes"}, q, a],
    ]
    items = [Record(i, messages=m) for i, m in enumerate(chats)]
    rejected: dict[str, int] = {}
    seqs = list(pack("src", iter(items), tok, load_config(PackingSpec, {"seq_len": 64}), rejected))
    assert rejected == {"chat_template_error": 1, "chat_not_prefix": 1}
    assert [s.sample_id for s in seqs] == ["src#0.0"]


def test_a_generation_prompt_ending_in_a_space_still_masks(teacher_dir):
    """Token ids of the prompt need not be a prefix of the chat's (the space merges with
    the answer's first word); the rendered text is, and masking goes by token counts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    chat = [
        {"role": "user", "content": "What is a list?"},
        {"role": "assistant", "content": "An ordered one."},
    ]
    doc = tokenize_record(tok, Record(0, messages=chat))
    assert not isinstance(doc, Rejected)
    text = tok.decode([t for t, m in zip(doc.ids, doc.targets, strict=True) if m])
    assert "ordered one." in text and "What is a list" not in text
