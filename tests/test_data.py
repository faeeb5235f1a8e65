"""The streaming reader: row-group units, sharding over ranks × workers, exact resume, checksums."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import FormatError
from students.loader import make_loader
from students.shards import RowGroupRef, ShardReader
from students.stream import ChecksumError, LabelStream, Rows, collate, row_group_refs


def stream(url, **kw) -> LabelStream:
    m = read_manifest(url)
    return LabelStream(url, m, row_group_refs(m), kw.pop("batch", 5), **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def all_hashes(url) -> list[int]:
    m = read_manifest(url)
    return sorted(
        h
        for s in m.shards
        for h in pq.read_table(f"{url}/{s.path}", columns=["token_hash"])["token_hash"].to_pylist()
    )


def hashes(batches) -> list[int]:
    return [int(h) for b in batches for h in np.asarray(b["token_hash"]).view(np.uint64)]


def assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_one_epoch_covers_every_row_once_in_manifest_order(fake_labels):
    m = read_manifest(fake_labels)
    s = stream(fake_labels, shuffle=False, loop=False, batch=7)
    seen = list(s)
    assert sum(len(b["input_ids"]) for b in seen) == m.totals["rows"]
    assert sorted(hashes(seen)) == all_hashes(fake_labels)
    first = pq.read_table(f"{fake_labels}/{m.shards[0].path}").slice(0, 1).to_pylist()[0]
    np.testing.assert_array_equal(seen[0]["input_ids"][0, : first["num_tokens"]], first["input_ids"])
    b = next(iter(stream(fake_labels, shuffle=False, loop=False, batch=3)))
    t = b["input_ids"].shape[1]
    k = m.k
    assert b["topk_ids"].shape == (3, t - 1, k) and b["topk_logprobs"].shape == (3, t - 1, k)
    assert b["label_mask"].shape == b["target_logprobs"].shape == b["next_ids"].shape == (3, t - 1)
    np.testing.assert_array_equal(b["next_ids"], b["input_ids"][:, 1:])


def test_order_depends_on_seed_and_epoch_only(fake_labels):
    a, b, c = stream(fake_labels, seed=1), stream(fake_labels, seed=1), stream(fake_labels, seed=2)
    assert a.order(0) == b.order(0) != c.order(0)
    assert a.order(0) != a.order(1)


def test_resume_gives_the_same_next_batches(fake_labels):
    ref = take(iter(stream(fake_labels, seed=3)), 40)  # crosses an epoch boundary
    for cut in (1, 9, 23, 31):
        first = stream(fake_labels, seed=3)
        it = iter(first)
        take(it, cut)
        state = first.state_dict()
        resumed = stream(fake_labels, seed=3)
        resumed.load_state_dict(state)
        assert_same(ref[cut:], take(iter(resumed), 40 - cut))


def test_old_single_worker_cursor_still_loads(fake_labels):
    ref = take(iter(stream(fake_labels, seed=3)), 12)
    resumed = stream(fake_labels, seed=3)
    first_unit = resumed.order(0)[0]
    n = pq.ParquetFile(f"{fake_labels}/{first_unit.shard}").metadata.row_group(first_unit.row_group).num_rows
    batches_in_first = -(-n // 5)
    resumed.load_state_dict({"epoch": 0, "unit": 1, "row": 0, "seed": 3})
    assert_same(ref[batches_in_first : batches_in_first + 3], take(iter(resumed), 3))


def test_ranks_split_units_exactly_once_when_not_looping(fake_labels):
    n_units = len(row_group_refs(read_manifest(fake_labels)))
    world = 3
    assert n_units % world  # the uneven case: some ranks get one unit more
    per_rank = [
        hashes(stream(fake_labels, loop=False, rank=r, world_size=world, seed=7)) for r in range(world)
    ]
    assert all(per_rank) and len({tuple(h) for h in per_rank}) == world
    assert sorted(h for hs in per_rank for h in hs) == all_hashes(fake_labels)
    units = [stream(fake_labels, rank=r, world_size=world, seed=7).worker_units(0, 0) for r in range(world)]
    assert sorted(len(u) for u in units) == [n_units // world] * (world - n_units % world) + [
        n_units // world + 1
    ] * (n_units % world)
    assert len({u for us in units for u in us}) == n_units


def test_workers_split_and_resume_exactly_with_a_dataloader(fake_labels):
    """2 DataLoader workers on rank 1 of 4: coverage of the rank's share, then exact resume
    at cuts before and after one worker runs out (loop=False) and across epochs (loop=True)."""
    kw = {"rank": 1, "world_size": 4, "num_workers": 2, "mp_context": "fork", "seed": 5}
    s = stream(fake_labels, **kw)
    order = s.order(0)
    assert s.worker_units(0, 0) == order[2::8] and s.worker_units(0, 1) == order[3::8]  # g = rank * 2 + w
    ref_stream = stream(fake_labels, loop=False, **kw)
    ref = list(make_loader(ref_stream))
    mine = {u for w in (0, 1) for u in ref_stream.worker_units(0, w)}
    m = read_manifest(fake_labels)
    expected_rows = sum(
        pq.ParquetFile(f"{fake_labels}/{u.shard}").metadata.row_group(u.row_group).num_rows for u in mine
    )
    assert sum(len(b["input_ids"]) for b in ref) == expected_rows < m.totals["rows"]
    for cut in (3, len(ref) - 4):
        first = stream(fake_labels, loop=False, **kw)
        it = make_loader(first)
        take(it, cut)
        state = first.state_dict()
        del it
        resumed = stream(fake_labels, loop=False, **kw)
        resumed.load_state_dict(state)
        assert_same(ref[cut:], list(make_loader(resumed)))
    looping = take(make_loader(stream(fake_labels, **kw)), len(ref) + 6)  # into epoch 1
    first = stream(fake_labels, **kw)
    it = make_loader(first)
    take(it, len(ref) - 2)
    state = first.state_dict()
    del it
    resumed = stream(fake_labels, **kw)
    resumed.load_state_dict(state)
    assert_same(looping[len(ref) - 2 :], take(make_loader(resumed), 8))


def test_resume_refuses_a_different_sharding(fake_labels):
    state = stream(fake_labels, world_size=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        stream(fake_labels).load_state_dict(state)


def test_too_many_workers_for_the_row_groups_is_refused(fake_labels):
    n = len(row_group_refs(read_manifest(fake_labels)))
    with pytest.raises(ValueError, match="some would never get data"):
        stream(fake_labels, world_size=n + 1)


def _reference_collate(rows: Rows, indices: list[int]) -> dict[str, np.ndarray]:
    lengths = [int(rows.num_tokens[i]) for i in indices]
    b, t, k = len(indices), max(lengths), rows.k
    out = {
        "input_ids": np.zeros((b, t), np.int64),
        "label_mask": np.zeros((b, t - 1), np.float32),
        "topk_ids": np.zeros((b, t - 1, k), np.int64),
        "topk_logprobs": np.zeros((b, t - 1, k), np.float32),
        "target_logprobs": np.zeros((b, t - 1), np.float32),
    }
    width = 1
    for i, n in zip(indices, lengths, strict=True):
        for p in range(n - 1):
            q = rows.label_offsets[i] + p
            width = max(width, int(rows.draw_offsets[q + 1] - rows.draw_offsets[q]))
    out["draw_ids"] = np.zeros((b, t - 1, width), np.int64)
    out["draw_counts"] = np.zeros((b, t - 1, width), np.float32)
    for j, i in enumerate(indices):
        n = lengths[j]
        ts, ls = rows.token_offsets[i], rows.label_offsets[i]
        out["input_ids"][j, :n] = rows.input_ids[ts : ts + n]
        out["label_mask"][j, : n - 1] = rows.label_mask[ls : ls + n - 1]
        out["topk_ids"][j, : n - 1] = rows.topk_ids[ls : ls + n - 1]
        out["topk_logprobs"][j, : n - 1] = rows.topk_logprobs[ls : ls + n - 1]
        out["target_logprobs"][j, : n - 1] = rows.target_logprobs[ls : ls + n - 1]
        for p in range(n - 1):
            a, z = rows.draw_offsets[ls + p], rows.draw_offsets[ls + p + 1]
            out["draw_ids"][j, p, : z - a] = rows.draw_ids[a:z]
            out["draw_counts"][j, p, : z - a] = rows.draw_counts[a:z]
    out["next_ids"] = out["input_ids"][:, 1:].copy()
    out["token_hash"] = rows.token_hashes[indices].view(np.int64)
    return out


def _random_rows(rng, lengths, k=3) -> Rows:
    lengths = np.asarray(lengths, np.int32)
    n = int((lengths - 1).sum())
    draw_num = rng.integers(0, 4, n)
    draw_offsets = np.zeros(n + 1, np.int64)
    np.cumsum(draw_num, out=draw_offsets[1:])
    tok_off = np.concatenate([[0], np.cumsum(lengths)])
    lab_off = np.concatenate([[0], np.cumsum(lengths - 1)])
    return Rows(
        k=k,
        sample_ids=[f"s#{i}" for i in range(len(lengths))],
        num_tokens=lengths,
        token_offsets=tok_off,
        input_ids=rng.integers(1, 100, int(lengths.sum())).astype(np.int32),
        label_offsets=lab_off,
        label_mask=rng.integers(0, 2, n).astype(np.uint8),
        topk_ids=rng.integers(0, 100, (n, k)).astype(np.int32),
        topk_logprobs=rng.normal(size=(n, k)).astype(np.float32),
        target_logprobs=rng.normal(size=n).astype(np.float32),
        draw_offsets=draw_offsets,
        draw_ids=rng.integers(0, 100, int(draw_num.sum())).astype(np.int32),
        draw_counts=rng.integers(1, 9, int(draw_num.sum())).astype(np.uint8),
        token_hashes=rng.integers(0, 2**63, len(lengths)).astype(np.uint64),
    )


@pytest.mark.parametrize("lengths", [[6, 6, 6, 6], [5, 2, 9, 7, 3], [4]])
@pytest.mark.parametrize("pick", ["all", "some"])
def test_vectorised_collate_matches_the_row_loop(lengths, pick):
    rows = _random_rows(np.random.default_rng(len(lengths)), lengths)
    indices = list(range(len(lengths))) if pick == "all" else list(range(len(lengths)))[::-2]
    got = collate(rows, indices)
    want = _reference_collate(rows, indices)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture
def damaged(fake_labels, tmp_path):
    """A copy of the dataset with one shard corrupted (same size) and one truncated."""
    copy = tmp_path / "copy"
    shutil.copytree(fake_labels, copy)
    m = read_manifest(str(copy))
    corrupt, truncated = m.shards[1], m.shards[3]
    data = bytearray((copy / corrupt.path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / corrupt.path).write_bytes(bytes(data))
    (copy / truncated.path).write_bytes((copy / truncated.path).read_bytes()[:-100])
    return str(copy), corrupt, truncated


def test_corrupt_or_truncated_shard_error_names_file_and_hashes(damaged):
    url, corrupt, truncated = damaged
    m = read_manifest(url)
    assert m.shards[1] == corrupt
    before: list[int] = []
    with pytest.raises(ChecksumError, match=rf"{corrupt.path}.*sha256 [0-9a-f]{{64}}.*says {corrupt.sha256}"):
        for batch in stream(url, shuffle=False, loop=False):
            before.extend(hashes([batch]))
    first = pq.read_table(f"{url}/{m.shards[0].path}", columns=["token_hash"])["token_hash"].to_pylist()
    assert before == first  # everything before the bad shard, nothing of it (hashed while decoding)
    s = LabelStream(url, m, [RowGroupRef(truncated.path, 0)], 5, loop=False)
    with pytest.raises(
        ChecksumError, match=rf"{truncated.path} is {truncated.bytes - 100} bytes.*{truncated.bytes}"
    ):
        list(s)


def test_skip_policy_drops_and_counts_bad_shards(damaged):
    url, corrupt, truncated = damaged
    logged = []
    s = stream(url, shuffle=False, loop=False, verify="skip", log=logged.append)
    rows = sum(len(b["input_ids"]) for b in s)
    assert rows == read_manifest(url).totals["rows"] - corrupt.rows - truncated.rows
    assert s.skipped_shards == sorted([corrupt.path, truncated.path])
    assert len(logged) == 2 and all("verify='skip'" in line for line in logged)
    assert s.state_dict()["skipped"] == [sorted([corrupt.path, truncated.path])]


def test_each_shard_is_read_whole_and_hashed_once_per_process(fake_labels, tmp_path):
    copy = tmp_path / "fresh"  # a root no reader of this process has verified yet
    shutil.copytree(fake_labels, copy)
    m = read_manifest(str(copy))
    records = {s.path: s for s in m.shards}
    reader = ShardReader(str(copy), records, m.k, cache_mib=0)  # no buffer: later reads are by row group
    for ref in row_group_refs(m) * 2:
        assert reader.read(ref) is not None
    assert reader.hashed_bytes == m.totals["bytes"] and reader.verified == set(records)
    again = ShardReader(str(copy), records, m.k)  # e.g. the next evaluation's stream
    for ref in row_group_refs(m):
        assert again.read(ref) is not None
    assert again.hashed_bytes == 0


def test_unreadable_shard_error_names_the_file(fake_labels, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fake_labels, copy)
    m = read_manifest(str(copy))
    (copy / m.shards[0].path).write_bytes(b"not parquet at all")
    with pytest.raises(FormatError, match=m.shards[0].path.split("/")[-1]):
        list(stream(str(copy), shuffle=False, loop=False, verify="off"))
    with pytest.raises(FormatError, match=m.shards[0].path.split("/")[-1]):
        list(stream(str(copy), shuffle=False, loop=False))
