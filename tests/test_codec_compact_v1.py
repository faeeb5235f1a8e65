"""The compact-v1 codec: gap-coded ids, 1/16-nat levels, exact tail mass."""

from __future__ import annotations

import numpy as np
import pytest

from labelgen.contract.codecs.compact_v1 import decode_arrays, encode_arrays


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])
def test_compact_codec_round_trip_and_kl_bound(scale):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((200, 32000)) * scale
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argsort(-lp, axis=1)[:, :64].astype(np.int32)
    vals = np.take_along_axis(lp, top, 1).astype(np.float32)
    gaps, q, tail = encode_arrays(top, vals)
    assert gaps.dtype == np.int32 and q.dtype == np.uint8 and np.all(gaps[:, 1:] > 0)
    ids, lps = decode_arrays(gaps, q, tail)
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
