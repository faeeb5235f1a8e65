"""Interop: HF datasets, DuckDB and pyarrow.dataset read our shards; the hidden-state join."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fakes import FakeTeacher
from helpers import make_spec
from labelgen.contract.codecs import get_codec
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import Columns
from labelgen.runner import run_job
from labelgen.spec import JobSpec
from students.hidden import read_hidden
from students.interop import shard_files, to_hf_iterable
from students.shards import ShardReader
from students.stream import LabelStream, row_group_refs


def label(teacher_dir, corpus_dir, out, teacher=None, **sections) -> str:
    sections.setdefault("corpus", {"sources": [f"{corpus_dir}/a.jsonl"]})
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, out, **sections))
    run_job(spec, show_progress=False, teacher_factory=lambda s: teacher or FakeTeacher(s.labels.k))
    return out


@pytest.fixture(scope="module")
def compact_labels(teacher_dir, corpus_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("compact") / "ds")
    return label(teacher_dir, corpus_dir, out, labels={"codec": "compact-v1"})


@pytest.fixture(scope="module")
def hidden_labels(teacher_dir, corpus_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("hidden") / "ds")
    hidden = {"layers": [0, 2], "every": 3, "dtype": "float16"}
    return label(teacher_dir, corpus_dir, out, FakeTeacher(8, layers=(0, 2)), hidden=hidden)


@pytest.mark.parametrize("which", ["plain", "compact"])
def test_hf_load_dataset_reads_the_shards(fake_labels, compact_labels, which, tmp_path):
    from datasets import load_dataset

    url = fake_labels if which == "plain" else compact_labels
    m = read_manifest(url)
    ds = load_dataset("parquet", data_files=shard_files(url), split="train", cache_dir=str(tmp_path))
    assert ds.num_rows == m.totals["rows"]
    raw = get_codec(m.codec).columns[0]  # a compact codec's raw (encoded) columns
    assert raw in ds.column_names and Columns.INPUT_IDS in ds.column_names
    assert len(ds[0][raw]) == (ds[0][Columns.NUM_TOKENS] - 1) * m.k


@pytest.mark.parametrize("which", ["plain", "compact"])
def test_to_hf_iterable_yields_decoded_rows(fake_labels, compact_labels, which):
    url = fake_labels if which == "plain" else compact_labels
    m = read_manifest(url)
    ds = to_hf_iterable(url)
    rows = list(ds)
    assert len(rows) == m.totals["rows"]
    batch = next(iter(LabelStream(url, m, None, 2, shuffle=False, loop=False)))
    first = rows[0]
    n = first[Columns.NUM_TOKENS]
    ids = np.array(first[Columns.TOPK_IDS]).reshape(n - 1, m.k)
    np.testing.assert_array_equal(ids, batch["topk_ids"][0, : n - 1])
    lps = np.array(first[Columns.TOPK_LOGPROBS], np.float32).reshape(n - 1, m.k)
    np.testing.assert_array_equal(lps, batch["topk_logprobs"][0, : n - 1])
    assert first[Columns.TOKEN_HASH] == batch["token_hash"][0]
    torch_row = next(iter(ds.with_format("torch")))
    assert torch_row[Columns.INPUT_IDS].shape == (n,)


def test_duckdb_and_pyarrow_dataset_query_the_shards(fake_labels):
    import duckdb
    import pyarrow.dataset as pads

    m = read_manifest(fake_labels)
    t = m.totals
    rows, tokens, positions = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), sum(num_tokens), sum(len(label_mask)) "
            f"FROM read_parquet('{fake_labels}/shards/*.parquet')"
        )
        .fetchone()
    )
    assert (rows, tokens, positions) == (t["rows"], t["tokens"], t["label_positions"])
    dataset = pads.dataset(shard_files(fake_labels), format="parquet")
    assert dataset.count_rows() == t["rows"]
    long_rows = dataset.count_rows(filter=pads.field(Columns.NUM_TOKENS) == 128)
    assert 0 < long_rows <= t["rows"]


def test_hidden_states_join_by_sample_id_and_token_hash(hidden_labels, tmp_path):
    m = read_manifest(hidden_labels)
    ref = row_group_refs(m)[1]
    reader = ShardReader(hidden_labels, {s.path: s for s in m.shards}, m.k)
    rows = reader.read(ref)
    assert rows is not None
    hidden = read_hidden(hidden_labels, m, ref, rows)

    def check(h):
        assert h.layers == (0, 2) and len(h.offsets) == len(rows) + 1
        for j in range(len(rows)):
            positions, per_layer = h.row(j)
            tokens = rows.input_ids[rows.token_offsets[j] : rows.token_offsets[j + 1]]
            assert len(positions) and positions.max() < len(tokens)
            for layer, values in per_layer.items():
                assert values.shape == (len(positions), 8) and values.dtype == np.float32
                np.testing.assert_array_equal(values[:, 0], tokens[positions] + layer)

    check(hidden)
    # Reversed rows in one row group: the join is by key, so the answer must not change.
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hidden_labels, copy)
    record = next(s for s in m.shards if s.path == ref.shard)
    table = pq.read_table(copy / record.hidden_path)
    pq.write_table(table.take(pa.array(np.arange(table.num_rows)[::-1])), copy / record.hidden_path)
    moved = read_hidden(str(copy), m, ref, rows)
    check(moved)
    np.testing.assert_array_equal(moved.positions, hidden.positions)


def test_hidden_shards_are_checksum_verified_like_label_shards(hidden_labels, tmp_path):
    import shutil

    from students.shards import ChecksumError

    copy = tmp_path / "damaged"
    shutil.copytree(hidden_labels, copy)
    m = read_manifest(str(copy))
    bad = m.shards[0]
    data = bytearray((copy / bad.hidden_path).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes
    (copy / bad.hidden_path).write_bytes(bytes(data))

    def stream(**kw):
        return LabelStream(str(copy), m, None, 4, shuffle=False, loop=False, hidden=True, **kw)

    with pytest.raises(
        ChecksumError, match=rf"{bad.hidden_path} has sha256 [0-9a-f]{{64}}.*{bad.hidden_sha256}"
    ):
        list(stream())
    logged: list[str] = []
    skipping = stream(verify="skip", log=logged.append)
    rows = sum(len(b["input_ids"]) for b in skipping)
    assert rows == m.totals["rows"] - bad.rows  # the label shard's rows go with its hidden shard
    assert skipping.skipped_shards == [bad.hidden_path] and "verify='skip'" in logged[0]
    intact = LabelStream(hidden_labels, m, None, 4, shuffle=False, loop=False, hidden=True)
    assert sum(len(b["input_ids"]) for b in intact) == m.totals["rows"]
