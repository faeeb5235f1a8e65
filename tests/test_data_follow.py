"""Follow mode: train on a dataset while its labeling job is still committing shards."""

from __future__ import annotations

import os
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest

from fakes import FakeTeacher
from helpers import make_spec
from labelgen.contract.codecs import CODEC_NAMES
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import MANIFEST_NAME
from labelgen.runner import run_job
from labelgen.spec import JobSpec
from students.stream import LabelStream


class GatedTeacher(FakeTeacher):
    """A fake teacher that, after ``gate_after`` batches, waits until the follower has read
    a batch, so the test sees shards being read before the job finishes."""

    def __init__(self, k: int, gate: threading.Event, gate_after: int):
        super().__init__(k)
        self.gate, self.gate_after = gate, gate_after

    def label(self, batch):
        if self.calls == self.gate_after:
            self.gate.wait(timeout=60)
        return super().label(batch)


def all_hashes(url) -> list[int]:
    m = read_manifest(url)
    return sorted(
        h
        for s in m.shards
        for h in pq.read_table(f"{url}/{s.path}", columns=["token_hash"])["token_hash"].to_pylist()
    )


def hashes(batch) -> list[int]:
    return [int(h) for h in np.asarray(batch["token_hash"]).view(np.uint64)]


def start_job(teacher_dir, corpus_dir, out, gate, **sections):
    one_source = {"sources": [f"{corpus_dir}/a.jsonl"]}  # half the corpus: a faster job
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, out, corpus=one_source, **sections))
    errors: list[BaseException] = []

    def run():
        try:
            run_job(spec, show_progress=False, teacher_factory=lambda s: GatedTeacher(s.labels.k, gate, 12))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.parametrize("world_size", [1, 2])
def test_follow_reads_shards_while_the_job_writes_and_stops_at_the_manifest(
    teacher_dir, corpus_dir, tmp_path, world_size
):
    out = str(tmp_path / "live")
    gate = threading.Event()
    thread, errors = start_job(teacher_dir, corpus_dir, out, gate)
    streams = [
        LabelStream(
            out,
            None,
            None,
            4,
            loop=False,
            follow=True,
            poll_interval=0.02,
            follow_timeout=60,
            rank=r,
            world_size=world_size,
        )
        for r in range(world_size)
    ]
    seen: list[list[int]] = [[] for _ in streams]
    iterators = [iter(s) for s in streams]
    manifest_at_first_batch = None
    done = [False] * world_size
    while not all(done):
        for r, it in enumerate(iterators):
            if done[r]:
                continue
            try:
                batch = next(it)
            except StopIteration:
                done[r] = True
                continue
            if manifest_at_first_batch is None:
                manifest_at_first_batch = os.path.exists(os.path.join(out, MANIFEST_NAME))
                gate.set()
            seen[r].extend(hashes(batch))
    thread.join(timeout=60)
    assert not errors, errors
    assert manifest_at_first_batch is False  # read while the job was still running
    if world_size > 1:
        assert all(seen) and not set(seen[0]) & set(seen[1])
    assert sorted(h for per_rank in seen for h in per_rank) == all_hashes(out)  # exactly once


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_follow_mode_reads_every_codec_as_the_complete_dataset_does(teacher_dir, corpus_dir, tmp_path, codec):
    """A follower decodes a dataset still being written with its codec (from the job's commit
    record, written before any shard) and gets exactly the labels a reader of the complete
    dataset gets."""
    out = str(tmp_path / codec)
    gate = threading.Event()
    thread, errors = start_job(teacher_dir, corpus_dir, out, gate, labels={"codec": codec})
    follower = LabelStream(out, None, None, 4, loop=False, follow=True, poll_interval=0.02, follow_timeout=60)
    it = iter(follower)
    live = [next(it)]
    assert not os.path.exists(os.path.join(out, MANIFEST_NAME))  # read while the job writes
    assert (follower.k, follower.codec) == (8, codec)
    gate.set()
    live.extend(it)
    thread.join(timeout=60)
    assert not errors, errors
    complete = LabelStream(out, read_manifest(out), None, 4, shuffle=False, loop=False)
    assert read_manifest(out).codec == codec

    def labels_by_row(batches) -> dict[int, tuple]:
        out = {}
        for b in batches:
            for j, h in enumerate(hashes(b)):
                real = np.flatnonzero(b["topk_logprobs"][j].any(axis=1))  # padding is all zero
                n = int(real[-1]) + 1 if real.size else 0
                out[h] = (b["topk_ids"][j, :n].tolist(), b["topk_logprobs"][j, :n].tolist())
        return out

    followed, reference = labels_by_row(live), labels_by_row(complete)
    assert sorted(followed) == all_hashes(out)
    assert followed == reference


def test_follow_resumes_exactly_mid_follow_and_loops_over_the_complete_set(teacher_dir, corpus_dir, tmp_path):
    out = str(tmp_path / "live")
    gate = threading.Event()
    thread, errors = start_job(teacher_dir, corpus_dir, out, gate)
    kw = {"follow": True, "poll_interval": 0.02, "follow_timeout": 60, "seed": 4}
    first = LabelStream(out, None, None, 4, **kw)
    it = iter(first)
    head = [next(it) for _ in range(3)]
    assert not os.path.exists(os.path.join(out, MANIFEST_NAME))
    state = first.state_dict()
    assert state["workers"][0]["follow"]["active"] is not None  # a cursor inside a follow unit
    del it
    gate.set()
    resumed = LabelStream(out, None, None, 4, **kw)
    resumed.load_state_dict(state)
    rest: list[int] = []
    epoch1: list[int] = []
    it = iter(resumed)
    while not epoch1:
        batch = next(it)
        # the cursor after a batch says which epoch it belonged to
        (epoch1 if resumed.state_dict()["workers"][0]["epoch"] else rest).extend(hashes(batch))
    thread.join(timeout=60)
    assert not errors, errors
    epoch0 = [h for b in head for h in hashes(b)] + rest
    assert sorted(epoch0) == all_hashes(out)  # the follow epoch: every row once, across the resume
    while len(epoch1) < len(epoch0):
        epoch1.extend(hashes(next(it)))
    assert sorted(epoch1) == sorted(epoch0)  # loop mode: epoch 1 over the complete set
    order = LabelStream(out, read_manifest(out), None, 4, seed=4).order(1)
    assert resumed.order(1) == order  # epoch >= 1 is the ordinary seeded permutation


def test_follow_times_out_when_nothing_is_committed(tmp_path):
    (tmp_path / "empty" / "_commits").mkdir(parents=True)
    s = LabelStream(
        str(tmp_path / "empty"), None, None, 4, follow=True, poll_interval=0.01, follow_timeout=0.1
    )
    with pytest.raises(TimeoutError, match="no new shard committed"):
        next(iter(s))


def test_follow_refuses_refs(fake_labels):
    with pytest.raises(ValueError, match="refs must be None"):
        LabelStream(fake_labels, None, [], 4, follow=True)
