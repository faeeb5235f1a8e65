"""Fuzz targets: corpus readers (jsonl, text, Parquet, saved datasets) and chat rendering.

Each input ends in records and counted rejections, a CorpusError at the check before the
model loads, or a SourceError naming the file mid-read; never another exception. What a
reader lets through is clean: text the tokenizer encodes, chats of known roles.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzzing import mutate, mutations
from labelgen.contract.configs import load_config
from labelgen.corpus import (
    CHAT_ROLES,
    REJECTION_REASONS,
    CorpusError,
    Record,
    Rejected,
    SourceError,
    check_sources,
    read_source,
    resolve_sources,
)
from labelgen.packing import pack
from labelgen.spec import CorpusSpec, PackingSpec

pytestmark = pytest.mark.fuzz

# Every code point, lone surrogates included (hypothesis leaves category Cs out by default).
any_text = st.text(st.characters(codec=None, categories=None), max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.dictionaries(
        st.sampled_from(["role", "content", "name"]),
        st.sampled_from([*CHAT_ROLES, "wizard", ""]) | any_text | json_values,
        max_size=3,
    )
    | json_values,
    max_size=6,
)
records = st.one_of(
    st.builds(lambda t: {"text": t}, any_text),
    st.builds(lambda m: {"messages": m}, messages),
    st.builds(lambda v: {"text": v}, json_values),
    json_values,
)
raw_lines = st.one_of(
    st.builds(lambda r: json.dumps(r, ensure_ascii=True).encode(), records),
    st.builds(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass"), records),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"text": ' + b"[" * n),
)


def corpus_spec(path, **kw) -> CorpusSpec:
    return load_config(CorpusSpec, {"sources": [str(path)], "messages_field": "messages", **kw})


def read_checked(path, spec: CorpusSpec) -> list[Record | Rejected] | None:
    """Check, then read one source; None if the check refused it. Asserts what comes out is clean."""
    sources = resolve_sources(spec)
    try:
        check_sources(sources, spec)
    except CorpusError as exc:
        assert str(path.name) in str(exc)
        return None
    items: list[Record | Rejected] = []
    try:
        items.extend(read_source(sources[0], spec))
    except SourceError as exc:
        assert str(path.name) in str(exc)
    for item in items:
        if isinstance(item, Rejected):
            assert item.reason in REJECTION_REASONS
        elif item.text is not None:
            item.text.encode("utf-8")
            assert item.text.strip()
        else:
            assert item.messages and len(item.messages) <= spec.max_messages
            for m in item.messages:
                assert m["role"] in spec.chat_roles and isinstance(m["content"], str)
                json.dumps(m, ensure_ascii=False).encode("utf-8")  # plain data, clean text
    return items


def pack_all(items, tokenizer) -> None:
    packing = load_config(PackingSpec, {"seq_len": 32})
    rejected: dict[str, int] = {}
    for seq in pack("src", iter(items), tokenizer, packing, rejected):
        assert 2 <= len(seq.input_ids) <= 32
    assert set(rejected) <= set(REJECTION_REASONS)


@given(lines=st.lists(raw_lines, max_size=12))
def test_fuzz_jsonl_records_are_clean_or_counted(lines, tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("jsonl") / "c.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    items = read_checked(path, corpus_spec(path, max_messages=4, max_record_chars=200))
    assert items is not None and [i.index for i in items] == list(range(len(lines)))
    pack_all(items, tokenizer)


@given(edits=mutations(), compress=st.sampled_from(["", ".gz"]))
def test_fuzz_jsonl_bytes(edits, compress, tmp_path_factory, tokenizer):
    body = "".join(
        json.dumps(r) + "\n"
        for r in (
            {"text": "plain text"},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        )
        * 3
    ).encode()
    if compress == ".gz":
        import gzip

        body = gzip.compress(body, mtime=0)
    path = tmp_path_factory.mktemp("bytes") / f"c.jsonl{compress}"
    path.write_bytes(mutate(body, edits))
    items = read_checked(path, corpus_spec(path))
    if items is not None:
        pack_all(items, tokenizer)


@given(data=st.binary(max_size=400), split=st.sampled_from(["file", "paragraph", "line"]))
def test_fuzz_text_reader(data, split, tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "c.txt"
    path.write_bytes(data)
    assert read_checked(path, corpus_spec(path, text_split=split, max_record_chars=100)) is not None


def _parquet_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("pq") / "seed.parquet"
    table = pa.table(
        {
            "text": ["first text", None, "third text"] * 20,
            "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * 60,
        }
    )
    pq.write_table(table, path, row_group_size=16)
    return path.read_bytes()


@given(edits=mutations(max_edits=4))
def test_fuzz_parquet_bytes(edits, tmp_path_factory):
    path = tmp_path_factory.mktemp("pqbytes") / "c.parquet"
    path.write_bytes(mutate(_parquet_bytes(tmp_path_factory), edits))
    read_checked(path, corpus_spec(path))


column_values = st.one_of(
    st.lists(
        st.none() | any_text.map(lambda t: t.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    ),
    st.lists(st.none() | st.integers(-(2**63), 2**63 - 1)),
    st.lists(st.none() | st.binary(max_size=10)),
    st.lists(st.none() | st.lists(st.text(max_size=5), max_size=3)),
    st.lists(
        st.none()
        | st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", "x"]), "content": st.text()}
            ),
            max_size=3,
        )
    ),
)


@given(text=column_values, chat=column_values)
def test_fuzz_parquet_columns_of_any_type(text, chat, tmp_path_factory):
    n = min(len(text), len(chat))
    path = tmp_path_factory.mktemp("pqcols") / "c.parquet"
    pq.write_table(pa.table({"text": pa.array(text[:n]), "messages": pa.array(chat[:n])}), path)
    items = read_checked(path, corpus_spec(path))
    assert items is not None and len(items) == n


@settings(max_examples=max(10, settings().max_examples // 5))  # each example loads a dataset
@given(edits=mutations(max_edits=3), target=st.sampled_from(["arrow", "state.json", "dataset_info.json"]))
def test_fuzz_saved_dataset(edits, target, tmp_path_factory):
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("hf") / "ds"
    datasets.Dataset.from_dict({"text": ["one", "two", "three"] * 5}).save_to_disk(str(root))
    file = next(root.glob("*.arrow")) if target == "arrow" else root / target
    file.write_bytes(mutate(file.read_bytes(), edits))
    read_checked(root, corpus_spec(root))


@given(chat=messages)
def test_fuzz_chat_rendering(chat, tokenizer):
    from labelgen.corpus import _check_messages

    spec = load_config(CorpusSpec, {"sources": ["unused"], "max_messages": 5})
    item = _check_messages(0, chat, spec, 0)
    if isinstance(item, Record):
        assert all(m["role"] in CHAT_ROLES for m in item.messages)
    pack_all([item], tokenizer)


@given(data=st.binary(max_size=300).map(lambda b: b.replace(b"\x00", b"\n")), chunk=st.integers(1, 40))
def test_fuzz_bounded_line_splitting_matches_split(data, chunk):
    """The jsonl reader's line splitter gives the lines of ``bytes.split``, long ones as None."""
    import io

    import labelgen.corpus as corpus

    limit = 12
    saved, corpus._CHUNK = corpus._CHUNK, chunk
    try:
        got = list(corpus._lines(io.BytesIO(data), limit))
    finally:
        corpus._CHUNK = saved
    pieces = data.split(b"\n")
    expected = [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    assert [size for _, size in got] == [len(p) for p in expected]
    assert [line for line, _ in got] == [p if len(p.rstrip(b"\n")) <= limit else None for p in expected]
