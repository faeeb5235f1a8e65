"""The commit log: records round-trip, listings are ordered and per unit, the job record
comes before the first shard and tells a follower (and `labelgen inspect`) what shards hold."""

from __future__ import annotations

import threading

import fsspec
import pytest

from fakes import FakeTeacher
from helpers import make_spec
from labelgen.contract.commits import PLAN_RECORD, CommitLog, JobRecord, PlannedUnit, PlanRecord
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import labels_layout, read_manifest
from labelgen.contract.format import ShardRecord, UnitRecord
from labelgen.runner import run_job
from labelgen.spec import JobSpec
from labelgen.summary import format_report, inspect_dataset


def _shard(unit: int, index: int) -> ShardRecord:
    return ShardRecord(
        f"shards/part-{unit:05d}-{index:05d}.parquet", unit, index, 3, 30, 27, 1, 100, "ab", 0, 3
    )


def test_records_round_trip_sorted_and_per_unit(tmp_path):
    log = CommitLog.at(str(tmp_path / "ds"))
    assert log.shards() == [] and log.job() is None and log.tokenizer() is None and log.count_shards() == 0
    for unit, index in ((1, 0), (0, 1), (0, 0), (10, 0)):
        log.write_shard(_shard(unit, index))
    log.write_unit(UnitRecord(0, "file:///a.jsonl", 6, 60, 2, {"empty_text": 1}, "cd"))
    log.write_job(JobRecord(k=8, codec="compact-v2", products={"draws": {"n": 4}}))
    log.write_tokenizer({"fingerprint": "f"})
    assert log.job().format_version == "1.0"
    log.write_teacher({"engine": "fake"})
    log.write_sources([{"url": "a", "size": 1}])
    (tmp_path / "ds" / "_commits" / "part-00002-00000.json.tmp-123").write_text("{")  # a write in flight
    shards, units = log.committed()
    assert [(s.unit, s.index) for s in shards] == [(0, 0), (0, 1), (1, 0), (10, 0)]
    assert list(units) == [0] and units[0].rejected == {"empty_text": 1} and log.units() == units
    assert [(s.unit, s.index) for s in log.shards(0)] == [(0, 0), (0, 1)] and log.shards(2) == []
    assert log.count_shards() == 4
    assert log.job() == JobRecord(k=8, codec="compact-v2", products={"draws": {"n": 4}})
    assert log.tokenizer() == {"fingerprint": "f"} and log.teacher() == {"engine": "fake"}
    assert log.sources() == [{"url": "a", "size": 1}]
    fs, root = fsspec.core.url_to_fs(str(tmp_path / "ds"))
    assert labels_layout(fs, root) == log.job()  # no manifest yet: the job record says


def test_job_record_precedes_the_first_shard_and_inspect_reports_it(teacher_dir, corpus_dir, tmp_path):
    out = str(tmp_path / "live")
    gate, seen = threading.Event(), {}

    class Watching(FakeTeacher):
        def label(self, batch):
            if self.calls == 0:
                seen["job"] = CommitLog.at(out).job()  # before any shard exists
            if self.calls == 12:
                seen["report"] = format_report(inspect_dataset(out))
                gate.set()
            return super().label(batch)

    sections = {
        "corpus": {"sources": [f"{corpus_dir}/a.jsonl"]},
        "labels": {"codec": "compact-v1", "draws": 0},
    }
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, out, **sections))
    run_job(spec, show_progress=False, teacher_factory=lambda s: Watching(s.labels.k))
    assert gate.is_set()
    assert seen["job"] == JobRecord(k=8, codec="compact-v1", products={}, spec_sha256=spec.content_hash())
    assert "INCOMPLETE" in seen["report"] and "labels top-8 (compact-v1)" in seen["report"]
    assert read_manifest(out).codec == "compact-v1"


def test_a_job_without_a_teacher_record_is_refused_at_the_end(teacher_dir, corpus_dir, tmp_path):
    from labelgen.runner import JobError, finish_job, plan_job

    out = str(tmp_path / "ds")
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, out))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    (tmp_path / "ds" / "manifest.json").unlink()
    (tmp_path / "ds" / "_commits" / "teacher.json").unlink()
    with pytest.raises(JobError, match="no teacher record"):
        finish_job(plan_job(spec))


def test_a_job_record_of_another_major_version_is_refused(tmp_path):
    from labelgen.contract.format import FormatError

    log = CommitLog.at(str(tmp_path / "ds"))
    log.write_job(JobRecord(k=8, codec="plain", format_version="2.0"))
    with pytest.raises(FormatError, match="format version 2.0, this reader supports 1.0"):
        log.job()


def test_the_plan_record_round_trips_and_a_damaged_one_is_refused(tmp_path):
    from labelgen.contract.format import FormatError

    log = CommitLog.at(str(tmp_path / "ds"))
    assert log.plan() is None
    units = [
        PlannedUnit(0, "file:///a.jsonl", 0, 2, "bytes", 0, 500, 500, 0, 0),
        PlannedUnit(1, "file:///a.jsonl", 1, 2, "bytes", 500, 1000, 500, 500, 0),
        PlannedUnit(2, "file:///b.parquet", 0, 1, "file", 0, 70, 70),
    ]
    log.write_plan(PlanRecord(unit_mib=0.5, units=units))
    assert log.plan() == PlanRecord(unit_mib=0.5, units=units)
    assert f"_commits/{PLAN_RECORD}" in log.record_files(), "a copy of the dataset carries the plan"
    path = tmp_path / "ds" / "_commits" / PLAN_RECORD
    path.write_text('{"unit_mib": 0.5, "units": [{"unit": 0, "source": "a", "part": 0, "parts": 1}]}')
    with pytest.raises(FormatError, match=f"{PLAN_RECORD} units\\[0\\] has no field 'kind'"):
        log.plan()
    log.write_plan(PlanRecord(unit_mib=0.5, units=units[1:]))
    with pytest.raises(FormatError, match=r"lists units \[1, 2\], not 0, 1, 2"):
        log.plan()
