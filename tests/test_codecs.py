"""The top-k codec registry: every registered codec round-trips, is found by its columns,
reads k off a table, and writes shards the student side decodes (codec-specific tests:
tests/test_codec_*.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import codec_labels, kl_k_plus_1, same_ids_in_stored_order
from labelgen.contract.codecs import CODEC_NAMES, CODECS, DEFAULT_CODEC, codec_for_columns, get_codec
from labelgen.contract.columns import Columns
from labelgen.contract.format import SHARDS_DIR, label_schema
from labelgen.labels import SequenceLabels
from labelgen.packing import PackedSequence
from labelgen.writer import ShardWriter


def test_every_codec_module_registers_one_codec():
    import labelgen.contract.codecs as package

    modules = sorted(
        p.stem for p in Path(package.__file__).parent.glob("*.py") if p.stem not in ("__init__", "base")
    )
    assert len(modules) == len(CODECS) >= 3
    assert tuple(sorted(CODECS)) == CODEC_NAMES and DEFAULT_CODEC in CODECS
    for name, codec in CODECS.items():
        assert codec.name == name and codec.columns and codec.k_column in codec.columns
        assert [f.name for f in codec.fields()] == list(codec.columns)
        assert all(not f.nullable for f in codec.fields())
    with pytest.raises(ValueError, match="unknown top-k codec 'zip'; known: " + ", ".join(CODEC_NAMES)):
        get_codec("zip")


def _table(codec, ids, lps, positions) -> pa.Table:
    """The codec's columns plus the label mask (what a shard table holds around them)."""
    mask = pa.array([[1] * int(p) for p in positions], pa.list_(pa.uint8()))
    fields = {f.name: f for f in codec.fields()}
    columns = {
        name: array.cast(fields[name].type) for name, array in codec.encode(ids, lps, positions).items()
    }
    return pa.table({Columns.LABEL_MASK: mask, **columns})


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("k", [1, 8, 64])
def test_every_codec_round_trips_within_its_budget(name, k):
    codec = get_codec(name)
    ids, lps, _ = codec_labels(np.random.default_rng(k), 120, 32000, k, 2.0)
    positions = np.array([50, 0, 1, 69])
    table = _table(codec, ids, lps, positions)
    assert [table.schema.field(f.name).type for f in codec.fields()] == [f.type for f in codec.fields()]
    ids_q, lps_q = codec.decode(table, k)
    assert ids_q.shape == lps_q.shape == (positions.sum(), k)
    assert ids_q.dtype == np.int32 and lps_q.dtype == np.float32
    assert np.all(np.diff(lps_q, axis=1) <= 0)  # rank order
    ref, got = same_ids_in_stored_order(ids, lps, ids_q, lps_q)  # asserts the same id sets
    if codec.lossless:
        np.testing.assert_array_equal(ids_q, ids)
        np.testing.assert_array_equal(lps_q, lps)
    else:
        assert kl_k_plus_1(ref, got).mean() <= 1e-3
    assert codec.infer_k(table, "t") == k
    assert codec_for_columns(table.column_names) is codec
    assert set(codec.columns) <= {f.name for f in label_schema(codec=name)}


def test_codec_for_columns_names_the_known_codecs():
    with pytest.raises(ValueError, match="no top-k codec matches"):
        codec_for_columns([Columns.INPUT_IDS, Columns.LABEL_MASK])


def test_shards_written_by_the_writer_read_back_under_every_codec(tmp_path):
    k, rng = 16, np.random.default_rng(3)
    rows = []
    for i, t in enumerate([40, 2, 129, 77]):
        ids, lps, full = codec_labels(rng, t - 1, 2000, k, 3.0)
        tokens = rng.integers(0, 2000, t).astype(np.int32)
        target = full[np.arange(t - 1), tokens[1:]].astype(np.float32)
        seq = PackedSequence(f"s#{i}.0", tokens, np.ones(t - 1, np.uint8))
        rows.append((seq, SequenceLabels(ids, lps, target)))
    sizes = {}
    for codec in CODEC_NAMES:
        writer = ShardWriter(str(tmp_path / codec), 0, k, 0, 0, 64, 1, 3, codec=codec)
        for seq, labels in rows:
            writer.add(seq, labels)
        writer.end_batch()
        (record,) = writer.close()
        sizes[codec] = record.bytes
        table = pq.read_table(tmp_path / codec / SHARDS_DIR / record.path.split("/")[-1])
        ids_q, lps_q = get_codec(codec).decode(table, k)
        ids = np.concatenate([lab.topk_ids for _, lab in rows])
        lps = np.concatenate([lab.topk_logprobs for _, lab in rows])
        positions = np.array([len(seq.input_ids) - 1 for seq, _ in rows])
        for name, column in get_codec(codec).encode(ids, lps, positions).items():  # the same bytes
            assert table.column(name).combine_chunks().equals(column.cast(table.schema.field(name).type))
        if get_codec(codec).lossless:
            np.testing.assert_array_equal(ids_q, ids)
            continue
        if codec == "compact-v2":
            np.testing.assert_array_equal(ids_q[:, 0], ids[:, 0])  # the argmax is kept exactly
        ref, got = same_ids_in_stored_order(ids, lps, ids_q, lps_q)
        assert kl_k_plus_1(ref, got).mean() <= 1e-3
        target = np.concatenate(table.column("target_logprobs").to_pylist())
        np.testing.assert_array_equal(target, np.concatenate([lab.target_logprobs for _, lab in rows]))
    assert sizes["compact-v2"] < sizes["compact-v1"] < sizes["plain"], sizes
