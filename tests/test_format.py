"""The label-format contract: light imports, manifest round trip, version checks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from labelgen.contract.format import (
    FORMAT_VERSION,
    FormatError,
    Manifest,
    ShardRecord,
    UnitRecord,
    label_schema,
    read_manifest,
    shard_name,
    token_hash,
)


def test_contract_and_students_data_import_no_heavy_libraries():
    code = (
        "import sys, labelgen.contract, labelgen.spec, students.config, students.data\n"
        "heavy = [m for m in ('torch', 'vllm', 'ray', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_students_import_only_the_contract_from_labelgen():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "students"
    for path in root.glob("*.py"):
        for line in path.read_text().splitlines():
            if line.strip().startswith(("from labelgen", "import labelgen")):
                assert line.strip().startswith("from labelgen.contract"), (path.name, line)


def test_schema_is_flat_and_non_nullable():
    schema = label_schema()
    for field in schema:
        assert not field.nullable, field.name
        if hasattr(field.type, "value_type"):
            assert not hasattr(field.type.value_type, "value_type"), f"{field.name} is a list of lists"
    assert schema.metadata[b"labelgen.format_version"] == FORMAT_VERSION.encode()


def test_shard_names_sort_in_unit_order():
    names = [shard_name(u, s) for u in (0, 1, 10) for s in (0, 2, 11)]
    assert names == sorted(names)


def test_token_hash_depends_on_every_token():
    a = np.arange(100, dtype=np.int32)
    b = a.copy()
    b[57] += 1
    assert token_hash(a) == token_hash(a.astype(np.int64)) != token_hash(b)


def _manifest() -> Manifest:
    shard = ShardRecord("shards/part-00000-00000.parquet", 0, 0, 3, 30, 27, 1, 100, "ab", 0, 3)
    unit = UnitRecord(0, "file:///c.jsonl", 3, 30, 1, {"empty_text": 2}, "cd")
    return Manifest(
        k=4,
        teacher={"model": "m"},
        tokenizer={"fingerprint": "f"},
        corpus={},
        spec_sha256="s",
        shards=[shard],
        units=[unit, unit],
        created_at="now",
    )


def test_manifest_round_trip_and_totals(tmp_path):
    m = _manifest()
    (tmp_path / "manifest.json").write_text(m.to_json())
    back = read_manifest(str(tmp_path))
    assert back == m
    assert back.totals["tokens"] == 30 and back.rejected == {"empty_text": 4}


def test_missing_manifest_means_incomplete(tmp_path):
    (tmp_path / "_commits").mkdir()
    (tmp_path / "_commits" / "part-00000-00000.json").write_text("{}")
    with pytest.raises(FormatError, match="incomplete.*1 shard\\(s\\) are committed"):
        read_manifest(str(tmp_path))


def test_version_mismatch_names_both_versions(tmp_path):
    data = json.loads(_manifest().to_json())
    data["format_version"] = "2.0"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=f"format version 2.0, this reader supports {FORMAT_VERSION}"):
        read_manifest(str(tmp_path))


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_compact_codec_round_trip_and_kl_bound(scale):
    from labelgen.contract.format import decode_topk, encode_topk

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 32000)) * scale
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-lp, axis=1)[:, :64].astype(np.int32)
    vals = np.take_along_axis(lp, top, 1).astype(np.float32)
    gaps, q, tail = encode_topk(top, vals)
    assert gaps.dtype == np.int32 and q.dtype == np.uint8 and np.all(gaps[:, 1:] > 0)
    ids, lps = decode_topk(gaps, q, tail)
    assert np.array_equal(np.sort(ids, 1), np.sort(top, 1))
    assert np.all(np.diff(lps, axis=1) <= 0)  # rank order restored
    # KL(exact || stored) over the k+1 buckets (top-k + tail), per position.
    p = np.exp(np.take_along_axis(lp, ids, 1))
    p_tail = np.clip(1 - p.sum(1), 0, 1)
    stored = np.exp(lps.astype(np.float64))
    s_tail = np.clip(1 - stored.sum(1), 1e-300, 1)
    np.testing.assert_allclose(s_tail, p_tail, rtol=1e-3, atol=1e-9)  # the tail mass is exact
    kl = (p * np.log(p / stored)).sum(1) + np.where(p_tail > 0, p_tail * np.log(p_tail / s_tail), 0)
    assert kl.mean() <= 1e-3, kl.mean()


def _labels(rng: np.random.Generator, n: int, vocab: int, k: int, scale: float) -> tuple[np.ndarray, ...]:
    """(n, vocab) random log-softmax → its (n, k) top-k ids and log-probs by rank, and the full log-probs."""
    logits = rng.standard_normal((n, vocab)) * scale
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(lp, top, 1), axis=1), 1).astype(np.int32)
    return top, np.take_along_axis(lp, top, 1).astype(np.float32), lp


def _kl_k_plus_1(p_lps: np.ndarray, q_lps: np.ndarray) -> np.ndarray:
    """Per-position KL(p || q) over k + 1 buckets; (n, k) log-probs of the same ids in the same order."""
    p, q = np.exp(p_lps.astype(np.float64)), np.exp(q_lps.astype(np.float64))
    p_tail, q_tail = np.clip(1 - p.sum(1), 0, 1), np.clip(1 - q.sum(1), 1e-300, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * np.log(p_tail / q_tail), 0.0)
    return (p * np.log(p / q)).sum(1) + tail


def _v2_round_trip(ids: np.ndarray, lps: np.ndarray, positions) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    from labelgen.contract.format import decode_topk_table, encode_topk_columns, topk_column_names

    columns = encode_topk_columns("compact-v2", ids, lps, np.asarray(positions))
    assert list(columns) == topk_column_names("compact-v2")
    assert all(len(c) == len(positions) for c in columns.values())
    return decode_topk_table(pa.table(columns), ids.shape[1])


def _same_ids_in_stored_order(ids, lps, ids_q, lps_q):
    """Stored log-probs re-ordered to the exact labels' id order (asserting equal id sets)."""
    by_id, by_id_q = np.argsort(ids, 1), np.argsort(ids_q, 1)
    np.testing.assert_array_equal(np.take_along_axis(ids, by_id, 1), np.take_along_axis(ids_q, by_id_q, 1))
    return np.take_along_axis(lps, by_id, 1), np.take_along_axis(lps_q, by_id_q, 1)


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_compact_v2_round_trip_and_kl_bound(k, scale):
    rng = np.random.default_rng(k)
    ids, lps, _ = _labels(rng, 300, 32000, k, scale)
    ids_q, lps_q = _v2_round_trip(ids, lps, [100, 0, 1, 199])  # rows of 100, 0, 1 and 199 positions
    assert ids_q.dtype == np.int32 and lps_q.dtype == np.float32 and ids_q.shape == ids.shape
    assert np.all(np.diff(lps_q, axis=1) <= 0)  # rank order
    np.testing.assert_array_equal(ids_q[:, 0], ids[:, 0])  # the top-1 is kept exactly
    p, q = _same_ids_in_stored_order(ids, lps, ids_q, lps_q)
    # The tail mass is kept to float16 precision of its log: relative error <= 2**-11 * |log tail|.
    p_tail, q_tail = 1 - np.exp(p.astype(np.float64)).sum(1), 1 - np.exp(q.astype(np.float64)).sum(1)
    np.testing.assert_allclose(q_tail, p_tail, rtol=2**-11 * np.abs(np.log(p_tail)).max() + 1e-5)
    kl = _kl_k_plus_1(p, q)
    assert kl.mean() <= 1e-3, kl.mean()
    assert kl.max() <= 4e-3, kl.max()


def test_compact_v2_edge_ids_peaked_and_zero_tail():
    # ids 0, vocab - 1 and the largest id the codec takes; k = 1; a peaked teacher whose
    # tail is 1e-7; a position whose top-k holds all the mass (tail 0).
    big = 2**31 - 2
    ids = np.array([[0, 31999, 5, 1], [big, 0, 7, 31999], [3, 2, 1, 0]], np.int32)
    p = np.array([[0.4, 0.3, 0.2, 0.05], [1 - 1e-7 - 3e-9, 1e-9, 1e-9, 1e-9], [0.25, 0.25, 0.25, 0.25]])
    lps = np.log(p).astype(np.float32)
    ids_q, lps_q = _v2_round_trip(ids, lps, [2, 1])
    np.testing.assert_array_equal(ids_q[:2, 0], ids[:2, 0])  # the top-1 survives (row 3: a tie)
    ref, got = _same_ids_in_stored_order(ids, lps, ids_q, lps_q)
    kl = _kl_k_plus_1(ref, got)
    assert kl.max() <= 1e-3, kl
    tails = 1 - np.exp(got.astype(np.float64)).sum(1)
    np.testing.assert_allclose(tails[:2], [0.05, 1e-7], rtol=1e-2)
    assert abs(tails[2]) < 1e-6  # all mass in the top-k: the decoded top-k sums to 1
    k1_ids, k1_lps, _ = _labels(np.random.default_rng(1), 50, 512, 1, 3.0)
    ids_q, lps_q = _v2_round_trip(k1_ids, k1_lps, [50])
    np.testing.assert_array_equal(ids_q, k1_ids)
    assert _kl_k_plus_1(k1_lps, lps_q).max() <= 1e-3


def test_compact_v2_rejects_bad_input_and_corrupt_columns():
    import pyarrow as pa

    from labelgen.contract.format import FormatError, decode_topk_table, encode_topk_columns

    ids, lps, _ = _labels(np.random.default_rng(0), 10, 100, 4, 1.0)
    dup = ids.copy()
    dup[3, 1] = dup[3, 0]
    with pytest.raises(ValueError, match="repeat within a position"):
        encode_topk_columns("compact-v2", dup, lps, np.array([10]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\*\*31 - 1\)"):
        encode_topk_columns("compact-v2", ids - 50, lps, np.array([10]))
    with pytest.raises(ValueError, match="contain NaN"):
        encode_topk_columns("compact-v2", ids, np.full_like(lps, np.nan), np.array([10]))
    with pytest.raises(ValueError, match="sum to N = 10"):
        encode_topk_columns("compact-v2", ids, lps, np.array([4, 4]))
    columns = encode_topk_columns("compact-v2", ids, lps, np.array([6, 4]))
    with pytest.raises(FormatError, match="disagree on the number of label positions"):
        decode_topk_table(pa.table(columns), 5)
    bits = columns["topk_v2_id_bits"].to_pylist()
    columns["topk_v2_id_bits"] = pa.array([bits[0] + b"\0", bits[1]], pa.binary())
    with pytest.raises(FormatError, match="do not match their head bytes"):
        decode_topk_table(pa.table(columns), 4)


def test_compact_v2_shard_written_by_the_writer_reads_back(tmp_path):
    import pyarrow.parquet as pq

    from labelgen.contract.format import SHARDS_DIR, decode_topk_table, encode_topk_columns
    from labelgen.packing import Sequence
    from labelgen.teacher import SequenceLabels
    from labelgen.writer import ShardWriter

    k, rng = 16, np.random.default_rng(3)
    rows = []
    for i, t in enumerate([40, 2, 129, 77]):
        ids, lps, full = _labels(rng, t - 1, 2000, k, 3.0)
        tokens = rng.integers(0, 2000, t).astype(np.int32)
        target = full[np.arange(t - 1), tokens[1:]].astype(np.float32)
        seq = Sequence(f"s#{i}.0", tokens, np.ones(t - 1, np.uint8))
        rows.append((seq, SequenceLabels(ids, lps, target)))
    sizes = {}
    for codec in ("plain", "compact-v1", "compact-v2"):
        writer = ShardWriter(str(tmp_path / codec), 0, k, 0, 0, 64, 1, 3, codec=codec)
        for seq, labels in rows:
            writer.add(seq, labels)
        writer.end_batch()
        (record,) = writer.close()
        sizes[codec] = record.bytes
        table = pq.read_table(tmp_path / codec / SHARDS_DIR / record.path.split("/")[-1])
        ids_q, lps_q = decode_topk_table(table, k)
        ids = np.concatenate([lab.topk_ids for _, lab in rows])
        lps = np.concatenate([lab.topk_logprobs for _, lab in rows])
        positions = np.array([len(seq.input_ids) - 1 for seq, _ in rows])
        for name, column in encode_topk_columns(codec, ids, lps, positions).items():  # the same bytes
            assert table.column(name).combine_chunks().equals(column.cast(table.schema.field(name).type))
        if codec == "plain":
            np.testing.assert_array_equal(ids_q, ids)
            continue
        if codec == "compact-v2":
            np.testing.assert_array_equal(ids_q[:, 0], ids[:, 0])  # the argmax is kept exactly
        ref, got = _same_ids_in_stored_order(ids, lps, ids_q, lps_q)
        assert _kl_k_plus_1(ref, got).mean() <= 1e-3
        target = np.concatenate(table.column("target_logprobs").to_pylist())
        np.testing.assert_array_equal(target, np.concatenate([lab.target_logprobs for _, lab in rows]))
    assert sizes["compact-v2"] < sizes["compact-v1"] < sizes["plain"], sizes


def test_compact_v2_decodes_sliced_and_chunked_tables():
    import pyarrow as pa

    from labelgen.contract.format import decode_topk_table, encode_topk_columns

    ids, lps, _ = _labels(np.random.default_rng(5), 30, 1000, 8, 2.0)
    table = pa.table(encode_topk_columns("compact-v2", ids, lps, np.array([10, 0, 5, 15])))
    all_ids, all_lps = decode_topk_table(table, 8)
    part_ids, part_lps = decode_topk_table(table.slice(2, 2), 8)  # rows with 5 and 15 positions
    np.testing.assert_array_equal(part_ids, all_ids[10:])
    np.testing.assert_array_equal(part_lps, all_lps[10:])
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 3)])
    np.testing.assert_array_equal(decode_topk_table(chunked, 8)[0], all_ids)
    empty = pa.table(encode_topk_columns("compact-v2", ids[:0], lps[:0], np.array([0, 0])))
    assert decode_topk_table(empty, 8)[0].shape == (0, 8)
