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
