"""The compact-v2 codec: head byte + packed low bits for ids, sqrt(p) levels, float16 tail."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from helpers import codec_labels, kl_k_plus_1, same_ids_in_stored_order
from labelgen.contract.codecs import get_codec
from labelgen.contract.format import FormatError

V2 = get_codec("compact-v2")


def _v2_round_trip(ids: np.ndarray, lps: np.ndarray, positions) -> tuple[np.ndarray, np.ndarray]:
    columns = V2.encode(ids, lps, np.asarray(positions))
    assert tuple(columns) == V2.columns
    assert all(len(c) == len(positions) for c in columns.values())
    return V2.decode(pa.table(columns), ids.shape[1])


@pytest.mark.parametrize("k", [1, 8, 64])
@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_compact_v2_round_trip_and_kl_bound(k, scale):
    rng = np.random.default_rng(k)
    ids, lps, _ = codec_labels(rng, 300, 32000, k, scale)
    ids_q, lps_q = _v2_round_trip(ids, lps, [100, 0, 1, 199])  # rows of 100, 0, 1 and 199 positions
    assert ids_q.dtype == np.int32 and lps_q.dtype == np.float32 and ids_q.shape == ids.shape
    assert np.all(np.diff(lps_q, axis=1) <= 0)  # rank order
    np.testing.assert_array_equal(ids_q[:, 0], ids[:, 0])  # the top-1 is kept exactly
    p, q = same_ids_in_stored_order(ids, lps, ids_q, lps_q)
    # The tail mass is kept to float16 precision of its log: relative error <= 2**-11 * |log tail|.
    p_tail, q_tail = 1 - np.exp(p.astype(np.float64)).sum(1), 1 - np.exp(q.astype(np.float64)).sum(1)
    np.testing.assert_allclose(q_tail, p_tail, rtol=2**-11 * np.abs(np.log(p_tail)).max() + 1e-5)
    kl = kl_k_plus_1(p, q)
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
    ref, got = same_ids_in_stored_order(ids, lps, ids_q, lps_q)
    kl = kl_k_plus_1(ref, got)
    assert kl.max() <= 1e-3, kl
    tails = 1 - np.exp(got.astype(np.float64)).sum(1)
    np.testing.assert_allclose(tails[:2], [0.05, 1e-7], rtol=1e-2)
    assert abs(tails[2]) < 1e-6  # all mass in the top-k: the decoded top-k sums to 1
    k1_ids, k1_lps, _ = codec_labels(np.random.default_rng(1), 50, 512, 1, 3.0)
    ids_q, lps_q = _v2_round_trip(k1_ids, k1_lps, [50])
    np.testing.assert_array_equal(ids_q, k1_ids)
    assert kl_k_plus_1(k1_lps, lps_q).max() <= 1e-3


def test_compact_v2_rejects_bad_input_and_corrupt_columns():
    ids, lps, _ = codec_labels(np.random.default_rng(0), 10, 100, 4, 1.0)
    dup = ids.copy()
    dup[3, 1] = dup[3, 0]
    with pytest.raises(ValueError, match="repeat within a position"):
        V2.encode(dup, lps, np.array([10]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\*\*31 - 1\)"):
        V2.encode(ids - 50, lps, np.array([10]))
    with pytest.raises(ValueError, match="contain NaN"):
        V2.encode(ids, np.full_like(lps, np.nan), np.array([10]))
    with pytest.raises(ValueError, match="sum to N = 10"):
        V2.encode(ids, lps, np.array([4, 4]))
    columns = V2.encode(ids, lps, np.array([6, 4]))
    with pytest.raises(FormatError, match="disagree on the number of label positions"):
        V2.decode(pa.table(columns), 5)
    bits = columns["topk_v2_id_bits"].to_pylist()
    columns["topk_v2_id_bits"] = pa.array([bits[0] + b"\0", bits[1]], pa.binary())
    with pytest.raises(FormatError, match="do not match their head bytes"):
        V2.decode(pa.table(columns), 4)


def test_compact_v2_decodes_sliced_and_chunked_tables():
    ids, lps, _ = codec_labels(np.random.default_rng(5), 30, 1000, 8, 2.0)
    table = pa.table(V2.encode(ids, lps, np.array([10, 0, 5, 15])))
    all_ids, all_lps = V2.decode(table, 8)
    part_ids, part_lps = V2.decode(table.slice(2, 2), 8)  # rows with 5 and 15 positions
    np.testing.assert_array_equal(part_ids, all_ids[10:])
    np.testing.assert_array_equal(part_lps, all_lps[10:])
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 3)])
    np.testing.assert_array_equal(V2.decode(chunked, 8)[0], all_ids)
    empty = pa.table(V2.encode(ids[:0], lps[:0], np.array([0, 0])))
    assert V2.decode(empty, 8)[0].shape == (0, 8)
