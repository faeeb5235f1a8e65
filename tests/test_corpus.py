"""Corpus readers: formats, globs, and every bad record counted by reason."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from labelgen.contract.configs import load_config
from labelgen.corpus import CorpusError, Record, Rejected, read_source, resolve_sources
from labelgen.spec import CorpusSpec


def spec(**kw) -> CorpusSpec:
    return load_config(CorpusSpec, {"sources": ["unused"], **kw})


def read_all(path, **kw):
    s = spec(sources=[str(path)], **kw)
    (source,) = resolve_sources(s)
    return list(read_source(source, s))


def reasons(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        if isinstance(item, Rejected):
            out[item.reason] = out.get(item.reason, 0) + 1
    return out


def test_jsonl_bad_lines_are_counted_not_fatal(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(
        b'{"text": "good one"}\n'
        b'{"text": broken\n'
        b'{"body": "no text"}\n'
        b'{"text": "   "}\n'
        b"\xff\xfe\n"
        b'{"text": 7}\n'
        b"[1, 2]\n"
        b'{"text": "' + b"x" * 50 + b'"}\n'
        b'{"text": "good two"}\n'
    )
    items = read_all(path, max_record_chars=40)
    assert [i.text for i in items if isinstance(i, Record)] == ["good one", "good two"]
    assert reasons(items) == {
        "malformed_json": 2,
        "missing_field": 1,
        "empty_text": 1,
        "invalid_utf8": 1,
        "wrong_type": 1,
        "too_long": 1,
    }
    assert [i.index for i in items] == list(range(9))
    assert items[-1].progress == path.stat().st_size


def test_chat_records_and_fallback_to_text(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": "nope"},
        {"text": "plain"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = read_all(path, messages_field="messages")
    assert items[0].messages[1]["content"] == "hello"
    assert reasons(items) == {"empty_text": 1, "wrong_type": 1}
    assert items[3].text == "plain"


def test_parquet_text_and_globs_sorted(tmp_path):
    pq.write_table(pa.table({"text": ["a b", None, "c d"]}), tmp_path / "x.parquet")
    (tmp_path / "y.txt").write_text("para one\n\npara two\n\n\n")
    (tmp_path / "z.txt").write_text("line one\nline two\n")
    s = spec(sources=[f"{tmp_path}/*.txt", str(tmp_path / "x.parquet")])
    sources = resolve_sources(s)
    assert [src.name for src in sources] == ["x.parquet", "y.txt", "z.txt"]
    assert [src.format for src in sources] == ["parquet", "text", "text"]
    items = list(read_source(sources[0], s))
    assert reasons(items) == {"missing_field": 1}
    texts = [i.text for i in read_source(sources[1], s) if isinstance(i, Record)]
    assert texts == ["para one", "para two"]
    lines = [i.text for i in read_source(sources[2], spec(text_split="line")) if isinstance(i, Record)]
    assert lines == ["line one", "line two"]


def test_saved_hf_dataset_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two", ""]}).save_to_disk(str(tmp_path / "ds"))
    items = read_all(tmp_path / "ds")
    assert [i.text for i in items if isinstance(i, Record)] == ["one", "two"]
    assert reasons(items) == {"empty_text": 1}


def test_unreadable_sources_fail_early_listing_all(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"")
    s = spec(sources=[str(tmp_path / "missing.jsonl"), f"{tmp_path}/*.nothing", str(tmp_path / "data.bin")])
    with pytest.raises(CorpusError) as info:
        resolve_sources(s)
    message = str(info.value)
    assert "missing.jsonl" in message and "*.nothing' matches no file" in message
    assert "cannot tell the format" in message and "corpus.format" in message


def test_deeply_nested_json_is_a_counted_rejection_not_a_crash(tmp_path):
    path = tmp_path / "c.jsonl"
    deep = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(
        b'{"text": "before"}\n' + deep + b'\n{"text": {"a": ' + deep + b'}}\n{"text": "after"}\n'
    )
    items = read_all(path)
    assert [i.text for i in items if isinstance(i, Record)] == ["before", "after"]
    assert reasons(items) == {"too_deep": 2}


def test_lone_surrogates_never_reach_the_tokenizer(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [
        '{"text": "\\ud800 lone high"}',
        '{"text": "ok \\udfff"}',
        '{"text": "a pair \\ud83d\\ude00 is fine"}',
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udc80"}]}',
    ]
    path.write_text("\n".join(rows) + "\n")
    items = read_all(path, messages_field="messages")
    assert reasons(items) == {"invalid_text": 3}
    (good,) = [i for i in items if isinstance(i, Record)]
    assert good.text == "a pair \U0001f600 is fine"


def test_chat_messages_are_checked_one_by_one(tmp_path):
    path = tmp_path / "c.jsonl"
    ok = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "extra": [1, {"x": 2}]}]
    rows = [
        {"messages": ok},
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        {"messages": ["not a mapping", {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": 1, "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 200},
        {"messages": []},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = read_all(path, messages_field="messages", max_messages=300)
    assert reasons(items) == {"bad_message": 5, "unknown_role": 1, "too_many_messages": 1, "wrong_type": 1}
    # Other keys reach the chat template when they hold plain data; null ones are dropped.
    assert items[0].messages == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "extra": [1, {"x": 2}]},
    ]


def test_other_message_keys_must_be_plain_and_clean(tmp_path):
    path = tmp_path / "c.jsonl"
    a = {"role": "assistant", "content": "a"}
    rows = [
        {"messages": [{"role": "user", "content": "q", "name": None}, a]},
        {"messages": [{"role": "ipython", "content": "out", "tool_call_id": "7"}, a]},
        '{"messages": [{"role": "user", "content": "q", "name": "\\udc00"}, '
        '{"role": "assistant", "content": "a"}]}',
        {"messages": [{"role": "user", "content": "q", "args": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}, a]},
        {"messages": [{"role": "user", "content": "q", "big": "x" * 50}, a]},
    ]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    items = read_all(path, messages_field="messages", max_record_chars=40)
    assert items[0].messages[0] == {"role": "user", "content": "q"}
    assert items[1].messages[0] == {"role": "ipython", "content": "out", "tool_call_id": "7"}
    assert reasons(items) == {"bad_message": 2, "too_long": 1}
    custom = read_all(path, messages_field="messages", max_record_chars=40, chat_roles=["user", "assistant"])
    assert reasons(custom) == {"bad_message": 2, "too_long": 1, "unknown_role": 1}


def test_an_overlong_jsonl_line_is_skipped_without_holding_it(tmp_path, monkeypatch):
    import labelgen.corpus as corpus

    monkeypatch.setattr(corpus, "_CHUNK", 1000)
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "' + b"x" * 200_000 + b'"}\n{"text": "next"}\n')
    items = read_all(path, max_record_chars=10)
    assert reasons(items) == {"too_long": 1}
    assert items[1].text == "next" and items[1].index == 1
    assert items[1].progress == path.stat().st_size


def write_corrupt_sources(tmp_path):
    """A good jsonl, a Parquet file with a broken footer, a gzip stream with a bad header."""
    import gzip

    (tmp_path / "good.jsonl").write_text('{"text": "fine"}\n')
    pq.write_table(pa.table({"text": ["a", "b"] * 50}), tmp_path / "broken.parquet")
    data = bytearray((tmp_path / "broken.parquet").read_bytes())
    data[-12:-4] = b"\xff" * 8  # footer length and the end of the footer; the magic stays
    (tmp_path / "broken.parquet").write_bytes(bytes(data))
    stream = bytearray(gzip.compress(b'{"text": "x"}\n' * 100))
    stream[3] = 0xFF  # reserved flag bits: not a gzip stream any decoder accepts
    (tmp_path / "bad.jsonl.gz").write_bytes(bytes(stream))


def test_unreadable_sources_are_found_at_plan_time_with_file_and_reason(tmp_path):
    from labelgen.corpus import check_sources

    write_corrupt_sources(tmp_path)
    s = spec(sources=[f"{tmp_path}/*"])
    sources = resolve_sources(s)
    with pytest.raises(CorpusError) as info:
        check_sources(sources, s)
    message = str(info.value)
    assert "broken.parquet is not a readable parquet source" in message
    assert "bad.jsonl.gz is not a readable jsonl source" in message
    assert "good.jsonl" not in message and "corpus.on_bad_source=skip" in message
    kept, skipped = check_sources(sources, spec(sources=[f"{tmp_path}/*"], on_bad_source="skip"))
    assert [x.name for x in kept] == ["good.jsonl"]
    assert sorted(skipped) == ["bad.jsonl.gz", "broken.parquet"]
    only_bad = spec(sources=[f"{tmp_path}/b*"], on_bad_source="skip")
    with pytest.raises(CorpusError, match=r"no source can be read \(2 of 2\)"):
        check_sources(resolve_sources(only_bad), only_bad)


def test_a_parquet_source_without_the_text_column_fails_its_check(tmp_path):
    from labelgen.corpus import check_sources

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    s = spec(sources=[str(tmp_path / "x.parquet")])
    with pytest.raises(CorpusError, match="has no column 'text' \\(columns: body\\); set corpus.text_field"):
        check_sources(resolve_sources(s), s)


def test_a_damaged_saved_dataset_fails_its_check(tmp_path):
    datasets = pytest.importorskip("datasets")
    from labelgen.corpus import check_sources

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    (arrow,) = (tmp_path / "ds").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes()[:20])
    s = spec(sources=[str(tmp_path / "ds")])
    with pytest.raises(CorpusError, match="ds is not a readable hf source"):
        check_sources(resolve_sources(s), s)


def test_a_source_that_breaks_mid_read_names_the_file(tmp_path):
    import gzip

    from labelgen.corpus import SourceError, check_sources

    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(b'{"text": "record %d"}\n' % i for i in range(200_000))))
    s = spec(sources=[str(path)])
    (source,) = check_sources(resolve_sources(s), s)[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated after planning
    items = []
    with pytest.raises(SourceError, match=r"c.jsonl.gz broke while being read, after record \d+: EOFError"):
        items.extend(read_source(source, s))
    assert len(items) > 10_000


def test_every_rejection_reason_is_declared_and_documented():
    """The reasons the reader, packing and prompts emit are the ones REJECTION_REASONS and FORMAT.md list."""
    import ast

    from helpers import REPO
    from labelgen.corpus import REJECTION_REASONS

    emitted = set()
    for module in ("labelgen/corpus.py", "labelgen/packing.py", "labelgen/prompts.py"):
        for node in ast.walk(ast.parse((REPO / module).read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Rejected":
                emitted.update(
                    a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                )
            subscript = isinstance(node, ast.Subscript) and getattr(node.value, "id", None) == "rejected"
            if subscript and isinstance(node.slice, ast.Constant):
                emitted.add(node.slice.value)
    assert emitted == set(REJECTION_REASONS)
    docs = (REPO / "docs" / "FORMAT.md").read_text()
    assert [reason for reason in REJECTION_REASONS if f"| `{reason}` |" not in docs] == []


def test_long_lines_within_the_limits_and_huge_integers(tmp_path):
    path = tmp_path / "c.jsonl"
    emoji = json.dumps({"text": "\U0001f600" * 60_000})  # 12 bytes a character, escaped
    path.write_text(emoji + '\n{"text": "hello", "id": ' + "1" * 5000 + "}\n")
    items = read_all(path, max_record_chars=100_000)
    assert isinstance(items[0], Record) and len(items[0].text) == 60_000
    assert reasons(items) == {"malformed_json": 1}  # int() refuses 5000 digits: a bad record, not a crash
