"""Records → prompts for generation: chats, text, token ids, system prompts, refusals, seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from labelgen.contract.configs import load_config
from labelgen.corpus import Record, Rejected, read_source, resolve_sources
from labelgen.prompts import SEED_BITS, Prompt, build_prompt, prompt_corpus, sample_seed
from labelgen.spec import GenerateSpec, JobSpec


def gen(**fields) -> GenerateSpec:
    return load_config(GenerateSpec, fields, "generate")


def render(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_chat_is_rendered_to_its_generation_prompt_with_the_system_prompt_first(tokenizer):
    chat = [{"role": "user", "content": "What is 2+2?"}]
    p = build_prompt(
        Record(3, messages=chat), "src.jsonl", 0, tokenizer, gen(system_prompt="Be brief."), None
    )
    assert isinstance(p, Prompt) and p.prompt_id == "src.jsonl#3"
    want = [{"role": "system", "content": "Be brief."}, *chat]
    assert p.messages == want and p.ids.tolist() == render(tokenizer, want)
    # A chat with its own system message keeps it.
    own = [{"role": "system", "content": "Mine."}, *chat]
    p = build_prompt(Record(0, messages=own), "s", 0, tokenizer, gen(system_prompt="Be brief."), None)
    assert p.messages == own


def test_text_prompts_with_and_without_the_template_and_token_id_prompts(tokenizer):
    p = build_prompt(Record(0, text="Say hi."), "s", 0, tokenizer, gen(), None)
    assert p.ids.tolist() == render(tokenizer, [{"role": "user", "content": "Say hi."}])
    raw = build_prompt(Record(0, text="Say hi."), "s", 0, tokenizer, gen(chat_template=False), None)
    assert raw.ids.tolist() == tokenizer("Say hi.", add_special_tokens=False)["input_ids"]
    assert raw.messages == [{"role": "user", "content": "Say hi."}]
    ids = build_prompt(Record(0, prompt_ids=[5, 6, 7]), "s", 0, tokenizer, gen(), None)
    assert ids.ids.dtype == np.int32 and ids.ids.tolist() == [5, 6, 7]


def test_refusals_are_counted_reasons_and_a_missing_template_is_an_error(tokenizer):
    with_ref = gen(checks={"reference": {"field": "answer"}})
    refused = build_prompt(Record(4, text="x", fields={}), "s", 0, tokenizer, with_ref, None)
    assert refused == Rejected(4, "no_reference", 0)
    kept = build_prompt(Record(4, text="x", fields={"answer": 12}), "s", 0, tokenizer, with_ref, None)
    assert kept.reference == "12"
    long = build_prompt(Record(1, prompt_ids=list(range(10))), "s", 0, tokenizer, gen(), 9)
    assert long == Rejected(1, "prompt_too_long", 0)

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="generate.chat_template: false"):
        build_prompt(Record(0, text="x"), "s", 0, NoTemplate(), gen(), None)


def test_the_reader_gives_prompts_trailing_assistant_turns_dropped_and_the_reference_carried(tmp_path):
    path = tmp_path / "p.jsonl"
    deep: object = "x"
    for _ in range(20):  # deeper than a message's other keys may nest
        deep = [deep]
    rows = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "answer": "1",
        },
        {"prompt": "plain", "answer": 2},
        {"prompt_ids": [1, 2, 3], "answer": "3"},
        {"prompt_ids": [1, -2]},
        {"messages": [{"role": "assistant", "content": "only an answer"}]},
        {"prompt": "with bad field", "answer": deep},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    spec = load_config(
        JobSpec,
        {
            "teacher": {"model": "m"},
            "corpus": {"sources": [str(path)], "messages_field": "messages"},
            "output": {"url": str(tmp_path / "o")},
            "generate": {"prompt_ids_field": "prompt_ids", "checks": {"reference": {"field": "answer"}}},
        },
    )
    corpus = prompt_corpus(spec)
    (source,) = resolve_sources(corpus)
    items = list(read_source(source, corpus))
    assert items[0].messages == [{"role": "user", "content": "q"}] and items[0].fields == {"answer": "1"}
    assert items[1].text == "plain" and items[1].fields == {"answer": 2}
    assert items[2].prompt_ids == [1, 2, 3]
    assert [i.reason for i in items[3:]] == ["bad_prompt_ids", "empty_text", "bad_field"]


def test_seeds_depend_on_the_base_seed_the_prompt_and_the_sample_only():
    seeds = {sample_seed(b, p, i) for b in (0, 1) for p in ("a#0", "a#1") for i in range(4)}
    assert len(seeds) == 16 and all(0 <= s < 2**SEED_BITS for s in seeds)
    assert sample_seed(0, "a#0", 2) == sample_seed(0, "a#0", 2)


def test_a_parquet_prompt_corpus_is_checked_and_read_for_its_prompt_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelgen.corpus import CorpusError, check_sources

    pq.write_table(pa.table({"prompt": ["1+1=", "2+2="], "answer": ["2", "4"]}), tmp_path / "p.parquet")
    spec = load_config(
        JobSpec,
        {
            "teacher": {"model": "m"},
            "corpus": {"sources": [str(tmp_path / "p.parquet")]},
            "output": {"url": str(tmp_path / "o")},
            "generate": {"checks": {"reference": {"field": "answer"}}},
        },
    )
    corpus = prompt_corpus(spec)
    sources, skipped = check_sources(resolve_sources(corpus), corpus)
    assert len(sources) == 1 and not skipped
    items = list(read_source(sources[0], corpus))
    assert [(i.text, i.fields) for i in items] == [("1+1=", {"answer": "2"}), ("2+2=", {"answer": "4"})]
    pq.write_table(pa.table({"question": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match="has no column 'prompt'.*set generate.prompt_field"):
        check_sources(resolve_sources(corpus), corpus)
