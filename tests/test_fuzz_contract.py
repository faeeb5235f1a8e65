"""Fuzz targets for the label contract: whatever bytes a manifest, a commit record or a
shard holds, reading it ends in a value of the documented shape or in FormatError /
ChecksumError, never in another exception or in wrong rows (tests/fuzzing.py has the
profiles). Fixtures are built once per module; each example writes only its own
mutated file, in memory.

The plain tests at the end pin the inputs the targets found or that must always hold.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from fuzzing import mutate, mutations
from helpers import codec_labels
from labelgen.contract.codecs import CODEC_NAMES, get_codec
from labelgen.contract.commits import CommitLog, JobRecord
from labelgen.contract.format import (
    FormatError,
    Manifest,
    ShardRecord,
    UnitRecord,
    check_dataset_path,
)
from labelgen.labels import SequenceLabels
from labelgen.packing import PackedSequence
from labelgen.writer import ShardWriter
from students.shards import ChecksumError, RowGroupRef, Rows, ShardReader, decode_rows
from students.stream import collate

K = 8
_ids = itertools.count()
BAD_PATHS = ["../../../../etc/hostname", "/etc/hostname", "shards/../../x", "s3://other-bucket/x", ""]
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(BAD_PATHS),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _memory_root(kind: str) -> tuple[Any, str]:
    """A fresh directory on fsspec's in-memory filesystem, and its URL."""
    url = f"memory://fuzz-{kind}/{next(_ids)}"
    return fsspec.core.url_to_fs(url)[0], url


# -- what a parsed record must be, when parsing accepts it ----------------------------------
def _assert_typed(record: object) -> None:
    """Every field of a record the parser returned has its declared type (ints are counts)."""
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        value = getattr(record, f.name)
        kind = {"int": int, "str": str, "float": float}.get(f.type) if isinstance(f.type, str) else None
        if kind is int:
            assert type(value) is int and value >= 0, (f.name, value)
        elif kind is not None:
            assert type(value) is kind, (f.name, value)
        elif isinstance(value, list):
            for item in value:
                _assert_typed(item)
        else:
            assert isinstance(value, dict), (f.name, value)
            if f.name == "rejected":
                assert all(type(v) is int and v >= 0 for v in value.values())
    if isinstance(record, ShardRecord):
        check_dataset_path(record.path, "parsed")
        assert record.hidden_path == "" or check_dataset_path(record.hidden_path, "parsed")
    if isinstance(record, Manifest | JobRecord):
        assert record.k >= 1 and record.codec in CODEC_NAMES
        assert all(isinstance(p, dict) for p in record.products.values())


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into parsed JSON (the targets of structured mutations)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out += _paths(child, (*prefix, i))
    return out


def _structured(data: dict, draw) -> dict:
    """``data`` (a copy) with one field replaced by random JSON, deleted, or an unknown key added."""
    data = json.loads(json.dumps(data))
    path = draw(st.sampled_from(_paths(data)))
    op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    if op == "replace":
        parent[path[-1]] = draw(JSON)
    elif op == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = draw(JSON)
    return data


def _gist(exc: Exception) -> str:
    """The kind of a FormatError, for hypothesis's statistics (``--hypothesis-show-statistics``)."""
    text = str(exc)
    for kind in (
        "not valid JSON",
        "must be",
        "has no field",
        "not a dataset path",
        "format version",
        "holds",
    ):
        if kind in text:
            return kind
    return text[:40]


# -- (a) manifests ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> Path:
    """A small real dataset: two sources labeled by the fake teacher (tests/fakes.py) with
    draws and hidden states, so its manifest and commit records have every kind of field.
    The teacher directory is an untrained tiny Llama (no pretraining: the fake teacher
    only needs its tokenizer and config), so this takes seconds."""
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.contract.configs import load_config
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec
    from labelgen.testing import build_llama, build_tokenizer, stdlib_texts, write_jsonl_corpus

    base = tmp_path_factory.mktemp("fuzz-labeled")
    texts = stdlib_texts()[:80]
    tokenizer = build_tokenizer(base / "teacher", texts, vocab_size=300)
    build_llama(base / "teacher", tokenizer, hidden_size=32, num_layers=2, num_heads=1, intermediate_size=32)
    write_jsonl_corpus(base / "corpus" / "a.jsonl", texts[:40], chat_every=5)
    write_jsonl_corpus(base / "corpus" / "b.jsonl", texts[40:])
    sections = {"labels": {"draws": 4}, "hidden": {"layers": [1], "dtype": "float16"}}
    spec = load_config(JobSpec, make_spec(base / "teacher", base / "corpus", str(base / "ds"), **sections))
    run_job(
        spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k, draws=4, layers=(1,))
    )
    return base / "ds"


@pytest.fixture(scope="module")
def manifest_bytes(labeled) -> bytes:
    return (labeled / "manifest.json").read_bytes()


def _parse_manifest(data: bytes) -> None:
    try:
        manifest = Manifest.from_json(data, where="fuzzed manifest")
    except FormatError as exc:
        event(f"FormatError ({_gist(exc)})")
        return
    _assert_typed(manifest)
    event("a manifest")


@pytest.mark.fuzz
@given(edits=mutations())
@example(edits=[("truncate", 0.5, 0)])
def test_fuzz_manifest_bytes(manifest_bytes, edits):
    _parse_manifest(mutate(manifest_bytes, edits))


@pytest.mark.fuzz
@given(data=st.data())
def test_fuzz_manifest_fields(manifest_bytes, data):
    _parse_manifest(json.dumps(_structured(json.loads(manifest_bytes), data.draw)).encode())


# -- (b) commit records ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def commit_records(labeled) -> dict[str, bytes]:
    commits = labeled / "_commits"
    return {
        name: (commits / name).read_bytes()
        for name in ("part-00000-00001.json", "unit-00000.json", "job.json")
    }


def _flatten(found: object) -> list:
    """The records in what a CommitLog reader returned (a record, list, dict, tuple or None)."""
    if isinstance(found, tuple):
        return [r for part in found for r in _flatten(part)]
    if isinstance(found, dict):
        return list(found.values())
    if isinstance(found, list):
        return found
    return [] if found is None else [found]


def _read_log(records: dict[str, bytes]) -> None:
    """Write ``records`` as a fresh commit log, read it every way; only FormatError may end it."""
    fs, url = _memory_root("commits")
    log = CommitLog.at(url)
    for name, data in records.items():
        fs.pipe_file(log.path(name), data)
    try:
        for read in (log.shards, log.units, log.committed, log.job, lambda: log.shards(0)):
            try:
                found = read()
            except FormatError as exc:
                event(f"FormatError ({_gist(exc)})")
                continue
            event(f"read: {type(found).__name__}")
            for record in _flatten(found):
                _assert_typed(record)
        assert log.count_shards() == 1
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)


@pytest.mark.fuzz
@given(which=st.sampled_from(["part-00000-00001.json", "unit-00000.json", "job.json"]), edits=mutations())
def test_fuzz_commit_record_bytes(commit_records, which, edits):
    _read_log({**commit_records, which: mutate(commit_records[which], edits)})


@pytest.mark.fuzz
@given(which=st.sampled_from(["part-00000-00001.json", "unit-00000.json", "job.json"]), data=st.data())
def test_fuzz_commit_record_fields(commit_records, which, data):
    changed = _structured(json.loads(commit_records[which]), data.draw)
    _read_log({**commit_records, which: json.dumps(changed).encode()})


# -- (c) shards -----------------------------------------------------------------------------
@dataclasses.dataclass(repr=False)
class Shard:
    codec: str
    files: dict[str, bytes]  # "zstd" (as the writer wrote it) and "none" (the same rows uncompressed)
    record: ShardRecord  # of the zstd file
    rows: list[Rows]  # decoded from the unchanged file, per row group
    tables: list[pa.Table]

    def __repr__(self) -> str:  # hypothesis prints the fixture with a failing example
        return f"<{self.codec} shard, {self.record.rows} rows in {self.record.row_groups} row groups>"


def _sequences(seed: int = 0) -> list[tuple[PackedSequence, SequenceLabels]]:
    """A dozen sequences of 2..40 tokens with top-8 labels and draws."""
    rng = np.random.default_rng(seed)
    out = []
    for i, t in enumerate(rng.integers(2, 40, 12)):
        ids, lps, full = codec_labels(rng, t - 1, 300, K, 3.0)
        tokens = rng.integers(0, 300, t).astype(np.int32)
        num = rng.integers(1, 4, t - 1)
        draw_ids = np.concatenate([np.sort(rng.choice(300, n, replace=False)) for n in num]).astype(np.int32)
        labels = SequenceLabels(
            ids,
            lps,
            full[np.arange(t - 1), tokens[1:]].astype(np.float32),
            draw_num=num.astype(np.uint8),
            draw_ids=draw_ids,
            draw_counts=rng.integers(1, 5, len(draw_ids)).astype(np.uint8),
        )
        out.append((PackedSequence(f"s#{i}.0", tokens, rng.integers(0, 2, t - 1).astype(np.uint8)), labels))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Shard]:
    out = {}
    for codec in CODEC_NAMES:
        root = tmp_path_factory.mktemp(f"fuzz-{codec}")
        writer = ShardWriter(str(root), 0, K, 0, 0, 64, 0.001, 3, draws=True, codec=codec)
        for i, (seq, labels) in enumerate(_sequences()):
            writer.add(seq, labels)
            if i % 6 == 5:
                writer.end_batch()  # a row group every 6 sequences
        (record,) = writer.close()
        zstd = (root / record.path).read_bytes()
        parquet = pq.ParquetFile(root / record.path)
        tables = [parquet.read_row_group(i) for i in range(parquet.num_row_groups)]
        sink = pa.BufferOutputStream()
        with pq.ParquetWriter(sink, parquet.schema_arrow, compression="none", use_dictionary=False) as plain:
            for table in tables:
                plain.write_table(table)
        reader = ShardReader(str(root), {record.path: record}, K, codec, verify="error")
        rows = [reader.read(RowGroupRef(record.path, i)) for i in range(record.row_groups)]
        assert record.row_groups == 2 and all(r is not None for r in rows)
        out[codec] = Shard(codec, {"zstd": zstd, "none": sink.getvalue().to_pybytes()}, record, rows, tables)
    return out


def _same_rows(a: Rows, b: Rows) -> None:
    assert a.sample_ids == b.sample_ids and a.k == b.k
    for name in ("num_tokens", "token_offsets", "input_ids", "label_offsets", "label_mask", "topk_ids"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in (
        "topk_logprobs",
        "target_logprobs",
        "draw_offsets",
        "draw_ids",
        "draw_counts",
        "token_hashes",
    ):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def _assert_consistent(rows: Rows, k: int) -> None:
    """Rows whose arrays agree in shape, and that the batcher can pad (what a reader hands out)."""
    r = len(rows.sample_ids)
    assert rows.num_tokens.shape == (r,) and (rows.num_tokens >= 1).all()
    assert rows.token_offsets.shape == (r + 1,) and rows.token_offsets[0] == 0
    np.testing.assert_array_equal(np.diff(rows.token_offsets), rows.num_tokens)
    assert rows.input_ids.shape == (rows.token_offsets[-1],) and (rows.input_ids >= 0).all()
    np.testing.assert_array_equal(np.diff(rows.label_offsets), rows.num_tokens - 1)
    n = int(rows.label_offsets[-1])
    assert rows.label_mask.shape == rows.target_logprobs.shape == (n,)
    assert rows.topk_ids.shape == rows.topk_logprobs.shape == (n, k)
    assert rows.topk_ids.dtype == np.int32 and rows.topk_logprobs.dtype == np.float32
    assert (rows.topk_ids >= 0).all()
    assert rows.token_hashes is not None and rows.token_hashes.shape == (r,)
    if rows.draw_offsets is not None:
        assert rows.draw_ids is not None and rows.draw_counts is not None
        assert rows.draw_offsets.shape == (n + 1,)
        assert rows.draw_ids.shape == rows.draw_counts.shape == (rows.draw_offsets[-1],)
    if r:
        batch = collate(rows, range(r))
        t = int(rows.num_tokens.max())
        assert batch["input_ids"].shape == (r, t) and batch["topk_ids"].shape == (r, t - 1, k)


def _read_shard(shard: Shard, data: bytes, original: bytes, verify: str) -> None:
    """Serve ``data`` as the shard whose record promises ``original``; read every row group."""
    fs, url = _memory_root(f"shard-{shard.codec}")
    record = dataclasses.replace(shard.record)
    fs.pipe_file(f"{url.removeprefix('memory://')}/{record.path}", data)
    # k and codec come from the manifest, or (a writer without job records) from the file
    k, codec = (K, shard.codec) if len(data) % 2 else (None, None)
    reader = ShardReader(url, {record.path: record}, k, codec, verify=verify, log=lambda m: None)
    try:
        for group in range(record.row_groups):
            ref = RowGroupRef(record.path, group)
            if verify == "off" or data == original:
                try:
                    rows = reader.read(ref)
                except FormatError as exc:
                    assert not isinstance(exc, ChecksumError)
                    assert data != original
                    event(f"verify=off: FormatError ({str(exc).split(': ')[-1][:40]})")
                    continue
                assert rows is not None
                if data == original:
                    _same_rows(rows, shard.rows[group])
                    event("unchanged: the same rows")
                else:
                    _assert_consistent(rows, rows.k)
                    event("verify=off: changed bytes, consistent rows")
            elif verify == "error" and group == 0:  # a changed file always fails its checksum
                with pytest.raises(ChecksumError, match=record.path):
                    reader.read(ref)
                event("verify=error: ChecksumError")
            else:  # skipped, or (after the error) refused without another read
                assert reader.read(ref) is None
                assert reader.skipped == ([record.path] if verify == "skip" else [])
                event(f"verify={verify}: dropped")
    finally:
        fs.rm(url.removeprefix("memory://"), recursive=True)


@pytest.mark.fuzz
@pytest.mark.parametrize("codec", CODEC_NAMES)
@given(
    compression=st.sampled_from(["zstd", "none"]),
    edits=mutations(),
    verify=st.sampled_from(["error", "skip", "off"]),
)
def test_fuzz_shard_bytes(shards, codec, compression, edits, verify):
    shard = shards[codec]
    original = shard.files["zstd"]
    data = mutate(shard.files[compression], edits)
    if compression == "none":
        original = shard.files["none"] if verify == "off" else original  # its record is the zstd file's
    _read_shard(shard, data, original, verify)


def _mutate_column(table: pa.Table, draw) -> pa.Table:
    """``table`` with one row of one column changed: a value, a list's length, or a binary value's bytes."""
    name = draw(st.sampled_from(table.column_names))
    field = table.schema.field(name)
    values = table.column(name).to_pylist()
    row = draw(st.integers(0, len(values) - 1))
    kind = field.type.value_type if pa.types.is_list(field.type) else field.type
    if pa.types.is_integer(kind):
        info = np.iinfo(kind.to_pandas_dtype())
        scalar = st.integers(int(info.min), int(info.max))
    elif pa.types.is_floating(kind):
        scalar = st.floats(width=32)
    else:
        scalar = st.text(max_size=6)
    if pa.types.is_list(field.type):
        items = values[row]
        op = draw(st.sampled_from(["set", "insert", "delete"] if items else ["insert"]))
        at = draw(st.integers(0, max(len(items) - 1, 0)))
        if op == "set":
            items[at] = draw(scalar)
        elif op == "insert":
            items.insert(at, draw(scalar))
        else:
            del items[at]
    elif pa.types.is_binary(field.type):
        values[row] = mutate(values[row], draw(mutations(3)))
    else:
        values[row] = draw(scalar)
    return table.set_column(table.column_names.index(name), field, pa.array(values, field.type))


@pytest.mark.fuzz
@pytest.mark.parametrize("codec", CODEC_NAMES)
@given(data=st.data())
def test_fuzz_decode_rows_of_changed_tables(shards, codec, data):
    shard = shards[codec]
    group = data.draw(st.integers(0, len(shard.tables) - 1))
    table = shard.tables[group]
    for _ in range(data.draw(st.integers(1, 3))):
        table = _mutate_column(table, data.draw)
    try:
        rows = decode_rows(table, K, get_codec(codec), "fuzzed row group")
    except FormatError as exc:
        assert "fuzzed row group" in str(exc)
        event(f"FormatError ({str(exc).split(': ', 1)[-1][:40]})")
        return
    _assert_consistent(rows, K)
    event("consistent rows")


# -- what the targets found, pinned ---------------------------------------------------------
GOOD_SHARD = {
    "path": "shards/part-00000-00000.parquet",
    **dict(unit=0, index=0, rows=3, tokens=30, label_positions=27, row_groups=1, bytes=100),
    **dict(sha256="ab", first_sequence=0, next_sequence=3),
}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"format": "labelgen", "format_version": "1.0", "k": ' + "9" * 5000 + "}", "not valid JSON"),
        (
            b'{"format": "labelgen", "format_version": "1.0", "k": 4 \xff}',
            "UnicodeDecodeError|not valid JSON",
        ),
        ("[]", "holds a JSON list, not an object"),
        ('"labelgen"', "holds a JSON str"),
        ('{"format": "labelgen", "format_version": 1}', "has no field 'k'"),
    ],
)
def test_manifest_text_that_is_no_manifest_is_a_format_error(text, message):
    with pytest.raises(FormatError, match=message):
        Manifest.from_json(text, where="m.json")


def _manifest(**changes) -> dict:
    data = {
        "format": "labelgen",
        "format_version": "1.0",
        "k": 4,
        "teacher": {},
        "tokenizer": {},
        "corpus": {},
        "spec_sha256": "s",
        "shards": [GOOD_SHARD],
        "units": [],
        "created_at": "now",
    }
    return {**data, **changes}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"k": True}, r"field 'k' must be an integer in \[0, .*got bool True"),
        ({"k": 0}, "field 'k' must be >= 1"),
        ({"k": 2.5}, "field 'k' must be an integer"),
        ({"codec": "zip"}, "field 'codec' is 'zip', not a codec this reader knows"),
        ({"shards": {}}, "field 'shards' must be a list of ShardRecord objects"),
        ({"shards": [5]}, r"shards\[0\] must be a JSON object \(ShardRecord\), got int 5"),
        ({"shards": [{**GOOD_SHARD, "rows": -1}]}, r"shards\[0\] field 'rows' must be an integer in \[0"),
        ({"shards": [{**GOOD_SHARD, "rows": 2**63}]}, r"shards\[0\] field 'rows' must be an integer"),
        ({"shards": [{**GOOD_SHARD, "sha256": 5}]}, r"shards\[0\] field 'sha256' must be a string"),
        ({"shards": [{"path": "shards/x.parquet"}]}, r"shards\[0\] has no field 'unit'"),
        ({"logprob_temperature": float("inf")}, "field 'logprob_temperature' must be a finite number"),
        ({"teacher": json.loads("[" * 70 + "]" * 70)}, "field 'teacher' must be a JSON object"),
        ({"corpus": {"a": json.loads("[" * 70 + "]" * 70)}}, "nested at most 64 deep"),
        (
            {
                "units": [
                    {
                        "unit": 0,
                        "source": "s",
                        "sequences": 1,
                        "tokens": 2,
                        "shards": 1,
                        "rejected": {"x": -1},
                    }
                ]
            },
            r"units\[0\] field 'rejected' must be an object of integers",
        ),
        (
            {"products": {"draws": {"temperature": "hot"}}},
            r"products\['draws'\]\['temperature'\] must be a number > 0",
        ),
        (
            {"products": {"hidden": {"layers": "all"}}},
            r"products\['hidden'\]\['layers'\] must be a non-empty list",
        ),
        ({"products": {"hidden": []}}, r"products\['hidden'\] must be a JSON object"),
    ],
)
def test_manifest_fields_of_the_wrong_type_are_format_errors_naming_the_field(changes, message):
    with pytest.raises(FormatError, match=f"m.json.*{message}"):
        Manifest.from_json(json.dumps(_manifest(**changes)), where="m.json")


def test_unknown_manifest_and_record_keys_are_ignored_for_forward_compatibility():
    shard = {**GOOD_SHARD, "compression": "zstd"}
    manifest = Manifest.from_json(json.dumps(_manifest(shards=[shard], new_field=[1], totals={})), "m.json")
    assert manifest.shards == [ShardRecord.from_dict(GOOD_SHARD, "s")] and manifest.logprob_temperature == 1.0
    assert UnitRecord.from_dict(
        {"unit": 0, "source": "s", "sequences": 1, "tokens": 2, "shards": 1, "x": 0}, "u"
    )


def test_commit_records_that_are_not_records_are_format_errors_naming_the_file(tmp_path):
    log = CommitLog.at(str(tmp_path / "ds"))
    (tmp_path / "ds" / "_commits").mkdir(parents=True)
    records = tmp_path / "ds" / "_commits"
    (records / "job.json").write_text('{"k": "8", "codec": "plain"}')
    with pytest.raises(FormatError, match=r"job.json field 'k' must be an integer"):
        log.job()
    (records / "job.json").write_text('["k"]')
    with pytest.raises(FormatError, match=r"job.json must hold a JSON object, got a JSON list"):
        log.job()
    (records / "job.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(FormatError, match=r"job.json is not valid JSON"):
        log.job()
    (records / "tokenizer.json").write_text("[" * 100_000)
    with pytest.raises(FormatError, match=r"tokenizer.json is not valid JSON \(RecursionError"):
        log.tokenizer()
    (records / "sources.json").write_text('{"url": "a"}')
    with pytest.raises(FormatError, match=r"sources.json must hold a JSON array of objects"):
        log.sources()
    (records / "part-00000-00000.json").write_text(json.dumps({**GOOD_SHARD, "unit": False}))
    with pytest.raises(FormatError, match=r"part-00000-00000.json field 'unit' must be an integer.*got bool"):
        log.shards()
    (records / "part-00000-00000.json").write_text("null")
    with pytest.raises(FormatError, match=r"part-00000-00000.json must be a JSON object \(ShardRecord\)"):
        log.committed()
