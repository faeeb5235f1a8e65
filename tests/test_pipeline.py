"""The overlapped labeling loop: same order and results as the serial loop, errors stop it,
and the engine stops waiting on the host (labelgen/pipeline.py)."""

from __future__ import annotations

import threading
import time

import pytest

from labelgen.pipeline import EngineClock, run_overlapped


def _stages(n: int, sleep_s: float = 0.0, fail_prepare: int = -1, fail_label: int = -1, fail_store: int = -1):
    log: dict[str, list] = {"prepared": [], "labeled": [], "stored": [], "closed": [], "threads": set()}

    def batches():
        try:
            for i in range(n):
                if i == fail_prepare:
                    raise OSError(f"source broke at batch {i}")
                time.sleep(sleep_s)
                log["prepared"].append(i)
                log["threads"].add(("prepare", threading.current_thread().name))
                yield [i, i * 10]
        finally:
            log["closed"].append(True)

    def label(batch):
        if batch[0] == fail_label:
            raise RuntimeError(f"engine failed on batch {batch[0]}")
        time.sleep(sleep_s)
        log["labeled"].append(batch[0])
        return [x + 0.5 for x in batch]

    def store(batch, labels):
        if batch[0] == fail_store:
            raise OSError(f"store failed on batch {batch[0]}")
        time.sleep(sleep_s)
        log["threads"].add(("store", threading.current_thread().name))
        log["stored"].append((batch, labels))

    return batches(), label, store, log


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_every_batch_is_stored_once_in_order(depth):
    batches, label, store, log = _stages(40)
    clock = run_overlapped(batches, label, store, depth=depth)
    assert log["stored"] == [([i, i * 10], [i + 0.5, i * 10 + 0.5]) for i in range(40)]
    assert log["labeled"] == list(range(40)) and log["closed"] == [True]
    assert clock.wall_s >= clock.busy_s >= 0
    threads = {name for stage, name in log["threads"]}
    assert (threads == {"MainThread"}) == (depth == 0)


@pytest.mark.parametrize("depth", [0, 2])
def test_a_failing_read_stores_what_came_before_it_and_raises(depth):
    batches, label, store, log = _stages(10, fail_prepare=4)
    with pytest.raises(OSError, match="source broke at batch 4"):
        run_overlapped(batches, label, store, depth=depth)
    assert [b[0] for b, _ in log["stored"]] == [0, 1, 2, 3]  # what the serial loop would have done


@pytest.mark.parametrize("depth", [0, 2])
def test_a_failing_engine_stops_the_reader_and_keeps_what_was_labeled(depth):
    batches, label, store, log = _stages(1000, fail_label=5)
    with pytest.raises(RuntimeError, match="engine failed on batch 5"):
        run_overlapped(batches, label, store, depth=depth)
    assert [b[0] for b, _ in log["stored"]] == [0, 1, 2, 3, 4]
    assert len(log["prepared"]) <= 5 + 1 + 2 * max(depth, 1)  # stopped, not read to the end
    assert log["closed"] == [True]  # the source was closed


@pytest.mark.parametrize("depth", [0, 2])
def test_a_failing_store_stops_the_engine(depth):
    batches, label, store, log = _stages(1000, fail_store=3)
    with pytest.raises(OSError, match="store failed on batch 3"):
        run_overlapped(batches, label, store, depth=depth)
    assert [b[0] for b, _ in log["stored"]] == [0, 1, 2]
    assert len(log["labeled"]) <= 3 + 1 + depth + 1


def test_the_engine_does_not_wait_on_the_host():
    """Every stage sleeps as long as the engine: serially the engine is busy a third of the
    time; overlapped it is nearly always busy. Sleeps use no CPU, so the ratio is robust."""
    fractions = {}
    for depth in (0, 2):
        batches, label, store, _ = _stages(24, sleep_s=0.03)
        fractions[depth] = run_overlapped(batches, label, store, depth=depth).fraction()
    assert fractions[0] < 0.45, fractions
    assert fractions[2] > 0.75, fractions
    assert fractions[2] / fractions[0] > 2, fractions


@pytest.mark.parametrize("depth", [0, 2])
def test_the_clock_reads_live_and_never_above_one(depth):
    clock = EngineClock()
    assert clock.fraction() is None
    seen = []

    def label(batch):
        time.sleep(0.01)
        return batch

    def store(batch, labels):  # where the progress bar and the Ray driver read it
        seen.append((clock.busy_s, clock.wall_s, clock.fraction()))

    run_overlapped(iter([[1], [2], [3], [4]]), label, store, depth=depth, clock=clock)
    assert all(busy <= wall and 0 < fraction <= 1 for busy, wall, fraction in seen), seen
    assert [wall for _, wall, _ in seen] == sorted(wall for _, wall, _ in seen)
    assert not clock.running and seen[-1][1] <= clock.wall_s
    # A clock the caller started keeps running after the loop (the unit's last commit).
    clock = EngineClock()
    clock.start()
    run_overlapped(iter([[1]]), label, lambda b, lab: None, depth=depth, clock=clock)
    assert clock.running and clock.busy_s > 0
    before = clock.wall_s
    time.sleep(0.02)
    clock.stop()
    assert clock.wall_s >= before + 0.015 and not clock.running


def test_a_job_overlapped_equals_the_serial_job_and_reports_the_busy_fraction(
    teacher_dir, corpus_dir, tmp_path
):
    import json

    from fakes import FakeTeacher
    from helpers import dataset_rows, make_spec, unit_facts
    from labelgen.contract.configs import load_config
    from labelgen.contract.dataset import read_manifest
    from labelgen.progress import PROGRESS_NAME, format_progress
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec

    manifests = {}
    for depth in (0, 2):
        out = tmp_path / f"depth-{depth}"
        spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, str(out), labels={"draws": 4}))
        run_job(
            spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k, draws=4), depth=depth
        )
        manifests[depth] = read_manifest(str(out))
        progress = json.loads((out / PROGRESS_NAME).read_text())
        assert 0 < progress["engine_busy_fraction"] <= 1
        assert "engine busy " in format_progress(progress)
        on_disk = json.loads((out / "manifest.json").read_text())["labeling"]
        assert on_disk == manifests[depth].labeling and 0 < on_disk["engine_busy_fraction"] <= 1
        assert all(0 < u.engine_s <= u.wall_s for u in manifests[depth].units)
    assert dataset_rows(tmp_path / "depth-0") == dataset_rows(tmp_path / "depth-2")
    assert unit_facts(manifests[0].units) == unit_facts(manifests[2].units)
    assert [s.sha256 for s in manifests[0].shards] == [s.sha256 for s in manifests[2].shards]
