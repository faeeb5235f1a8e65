"""The local runner with a deterministic fake teacher: shards, manifest, resume, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fakes import FakeTeacher
from helpers import make_spec, unit_facts
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import Columns, token_hash
from labelgen.corpus import CorpusError
from labelgen.provenance import ModelPathError
from labelgen.runner import JobError, run_job
from labelgen.spec import JobSpec


def job(teacher_dir, corpus_dir, out, **sections) -> JobSpec:
    return load_config(JobSpec, make_spec(teacher_dir, corpus_dir, str(out), **sections))


def table(url, manifest):
    return [pq.read_table(f"{url}/{s.path}") for s in manifest.shards]


def rows(url):
    m = read_manifest(str(url))
    out = []
    for t in table(url, m):
        out.extend(t.to_pylist())
    return out


class Crash(RuntimeError):
    pass


class CrashingTeacher(FakeTeacher):
    def __init__(self, k, after):
        super().__init__(k)
        self.after = after

    def label(self, batch):
        if self.calls >= self.after:
            raise Crash("killed")
        return super().label(batch)


def test_shards_manifest_and_values(teacher_dir, corpus_dir, tmp_path):
    spec = job(teacher_dir, corpus_dir, tmp_path / "out")
    fake = FakeTeacher(spec.labels.k)
    m = run_job(spec, show_progress=False, teacher_factory=lambda s: fake)
    assert len(m.units) == 2 and len(m.shards) > 2, "shards must rotate at 0.25 MiB"
    assert m.rejected == {
        "empty_text": 1,
        "invalid_utf8": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "wrong_type": 1,
    }
    assert m.tokenizer["vocab_size"] == 512 and m.tokenizer["model_vocab_size"] == 1024
    assert m.teacher["weights"]["sha256"] and m.corpus["sources"][0]["sha256"]
    data = rows(tmp_path / "out")
    assert len(data) == m.totals["rows"] and len({r["sample_id"] for r in data}) == len(data)
    for r in data[:50]:
        ids = np.array(r[Columns.INPUT_IDS], np.int32)
        t = len(ids)
        assert r[Columns.NUM_TOKENS] == t and r[Columns.TOKEN_HASH] == token_hash(ids)
        top = np.array(r[Columns.TOPK_IDS]).reshape(t - 1, spec.labels.k)
        lps = np.array(r[Columns.TOPK_LOGPROBS], np.float32).reshape(t - 1, spec.labels.k)
        ref = fake.logprobs[ids[:-1]]
        np.testing.assert_array_equal(top[:, 0], ref.argmax(-1))
        np.testing.assert_allclose(lps[:, 0], ref.max(-1), rtol=1e-6)
        np.testing.assert_allclose(r[Columns.TARGET_LOGPROBS], ref[np.arange(t - 1), ids[1:]], rtol=1e-5)
        assert np.all(np.diff(lps, axis=1) <= 0)
    meta = pq.ParquetFile(f"{tmp_path}/out/{m.shards[0].path}").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert (tmp_path / "out" / "job-spec.yaml").is_file()


def test_crash_and_rerun_gives_identical_dataset(teacher_dir, corpus_dir, tmp_path):
    spec = job(teacher_dir, corpus_dir, tmp_path / "ref")
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    crashed = dataclasses.replace(spec, output=dataclasses.replace(spec.output, url=str(tmp_path / "re")))
    for after in (3, 7, 11):  # crash three times at different points, then finish
        with pytest.raises(Crash):
            run_job(
                crashed,
                show_progress=False,
                teacher_factory=lambda s, a=after: CrashingTeacher(s.labels.k, a),
            )
        with pytest.raises(Exception, match="incomplete"):
            read_manifest(str(tmp_path / "re"))
    run_job(crashed, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert rows(tmp_path / "re") == rows(tmp_path / "ref")
    a, b = read_manifest(str(tmp_path / "ref")), read_manifest(str(tmp_path / "re"))
    assert [(s.path, s.rows, s.sha256) for s in a.shards] == [(s.path, s.rows, s.sha256) for s in b.shards]
    assert a.rejected == b.rejected


def test_rerun_of_complete_job_does_nothing_and_other_spec_is_refused(teacher_dir, corpus_dir, tmp_path):
    spec = job(teacher_dir, corpus_dir, tmp_path / "o")
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))

    def no_teacher(_):
        raise AssertionError("a complete job must not start the teacher")

    run_job(spec, show_progress=False, teacher_factory=no_teacher)
    other = job(teacher_dir, corpus_dir, tmp_path / "o", labels={"k": 4})
    with pytest.raises(JobError, match="different job spec.*output.overwrite=true"):
        run_job(other, show_progress=False, teacher_factory=no_teacher)
    forced = job(teacher_dir, corpus_dir, tmp_path / "o", labels={"k": 4}, output={"overwrite": True})
    m = run_job(forced, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert m.k == 4


def test_bad_paths_fail_before_the_model_loads(teacher_dir, corpus_dir, tmp_path):
    def no_teacher(_):
        raise AssertionError("must fail before the teacher starts")

    missing_model = job(tmp_path / "no-such-model", corpus_dir, tmp_path / "o")
    with pytest.raises(ModelPathError, match="no-such-model.*does not exist"):
        run_job(missing_model, show_progress=False, teacher_factory=no_teacher)
    missing_corpus = job(teacher_dir, tmp_path / "nothing-here", tmp_path / "o")
    with pytest.raises(CorpusError, match="matches no file"):
        run_job(missing_corpus, show_progress=False, teacher_factory=no_teacher)


def test_draws_and_hidden_products_round_trip(teacher_dir, corpus_dir, tmp_path):
    from labelgen.contract.format import Columns as C
    from students.stream import LabelStream, row_group_refs

    spec = job(
        teacher_dir,
        corpus_dir,
        tmp_path / "o",
        labels={"draws": 16},
        hidden={"layers": [0, 2], "every": 3, "dtype": "float32"},
        teacher={"engine_args": {"enforce_eager": True}},
    )
    fake = FakeTeacher(spec.labels.k, draws=16, layers=(0, 2))
    m = run_job(spec, show_progress=False, teacher_factory=lambda s: fake)
    assert m.products["draws"] == {"n": 16, "temperature": 1.0, "seed": 0}
    assert m.products["hidden"]["layers"] == [0, 2] and m.products["hidden"]["dim"] == 8
    shard = m.shards[0]
    labels = pq.read_table(tmp_path / "o" / shard.path)
    hidden = pq.read_table(tmp_path / "o" / shard.hidden_path)
    assert labels.num_rows == hidden.num_rows and shard.hidden_sha256
    row, hrow = labels.slice(0, 1).to_pylist()[0], hidden.slice(0, 1).to_pylist()[0]
    assert hrow["sample_id"] == row["sample_id"] and hrow["token_hash"] == row["token_hash"]
    assert sum(row[C.DRAW_COUNTS]) == 16 * (row["num_tokens"] - 1)
    positions = np.array(hrow["positions"])
    vectors = np.frombuffer(hrow["layer_2"], "<f4").reshape(len(positions), 8)
    np.testing.assert_array_equal(vectors[:, 0], np.array(row["input_ids"])[positions] + 2)
    stream = LabelStream(str(tmp_path / "o"), m, row_group_refs(m), 4, shuffle=False, loop=False)
    batch = next(iter(stream))
    assert batch["draw_ids"].shape[:2] == batch["label_mask"].shape
    np.testing.assert_array_equal(batch["draw_counts"].sum(-1)[batch["label_mask"] > 0], 16)


def test_compact_codec_is_decoded_transparently(teacher_dir, corpus_dir, tmp_path):
    from students.stream import LabelStream, row_group_refs

    plain = job(teacher_dir, corpus_dir, tmp_path / "plain")
    compact = job(teacher_dir, corpus_dir, tmp_path / "compact", labels={"codec": "compact-v1"})
    batches = {}
    for name, spec in (("plain", plain), ("compact", compact)):
        m = run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
        assert m.codec == ("plain" if name == "plain" else "compact-v1")
        stream = LabelStream(spec.output.url, m, row_group_refs(m), 4, shuffle=False, loop=False)
        batches[name] = next(iter(stream))
        batches[name + "_bytes"] = m.totals["bytes"]
    a, b = batches["plain"], batches["compact"]
    # The same id sets; rank order only up to ties within one quantisation level.
    np.testing.assert_array_equal(np.sort(a["topk_ids"], -1), np.sort(b["topk_ids"], -1))
    np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1 / 16)
    np.testing.assert_array_equal(a["target_logprobs"], b["target_logprobs"])
    assert batches["compact_bytes"] < batches["plain_bytes"]


# -- work units: sources split into parts (labelgen.units) ---------------------------------
SPLIT_MIB = 0.015  # ~16 KB: the big sources below are 3-4 units each


@pytest.fixture(scope="module")
def big_corpus(tmp_path_factory, texts):
    """A jsonl and a Parquet file (row groups of 9 rows) of ~50 KB each, with bad records."""
    import pyarrow as pa

    from labelgen.testing import write_jsonl_corpus

    out = tmp_path_factory.mktemp("big-corpus")
    write_jsonl_corpus(out / "big.jsonl", texts[:70], chat_every=6)
    with (out / "big.jsonl").open("ab") as f:
        f.write(b'{"text": broken\n{"text": ""}\n{"text": "the last line has no newline"}')
    column = [None if i == 5 else text for i, text in enumerate(texts[70:160])]
    pq.write_table(pa.table({"text": column}), out / "big.parquet", row_group_size=9)
    return out


def split_job(teacher_dir, corpus, out, unit_mib=SPLIT_MIB, **sections) -> JobSpec:
    corpus_section = {"sources": [f"{corpus}/big.*"], "unit_mib": unit_mib}
    return job(teacher_dir, corpus, out, corpus=corpus_section, **sections)


def label_key(row: dict) -> tuple:
    return row[Columns.TOKEN_HASH], tuple(row[Columns.INPUT_IDS])


def test_split_sources_label_exactly_the_records_of_the_unsplit_job(teacher_dir, big_corpus, tmp_path):
    import hashlib

    packing = {"cross_documents": False}  # a record's sequences do not depend on its neighbours
    whole = split_job(teacher_dir, big_corpus, tmp_path / "whole", unit_mib=256.0, packing=packing)
    split = split_job(teacher_dir, big_corpus, tmp_path / "split", packing=packing)
    mw = run_job(whole, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    ms = run_job(split, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert [(u.part, u.parts) for u in mw.units] == [(0, 1), (0, 1)]
    kinds = [u.range_kind for u in ms.units]
    assert kinds.count("bytes") >= 3 and kinds.count("row_groups") >= 3, kinds
    a, b = rows(tmp_path / "whole"), rows(tmp_path / "split")
    ids = [r["sample_id"] for r in b]
    assert len(set(ids)) == len(ids), "sample ids are unique across the parts"
    assert sorted(a, key=label_key) != [] and len(a) == len(b)
    strip = [{k: v for k, v in r.items() if k != "sample_id"} for r in sorted(a, key=label_key)]
    assert strip == [{k: v for k, v in r.items() if k != "sample_id"} for r in sorted(b, key=label_key)]
    # Parquet parts keep the file's record numbers, byte-range parts say where they start.
    assert {i for i in ids if i.startswith("big.parquet")} == {
        r["sample_id"] for r in a if r["sample_id"].startswith("big.parquet")
    }
    starts = {u.range_start for u in ms.units if u.range_kind == "bytes"}
    assert {i.split("#")[0] for i in ids if i.startswith("big.jsonl")} == {f"big.jsonl@{s}" for s in starts}
    assert ms.rejected == mw.rejected
    assert {k: v for k, v in ms.rejected.items() if k != "too_short"} == {
        "empty_text": 1,
        "malformed_json": 1,
        "missing_field": 1,
    }
    assert sum(u.sequences for u in ms.units) == sum(u.sequences for u in mw.units)
    # Integrity: whole sources keep their sha256, parts hash their own bytes.
    assert all(s["sha256"] and "parts" not in s for s in mw.corpus["sources"])
    jsonl, parquet = ms.corpus["sources"]
    assert jsonl["sha256"] is None and [p["unit"] for p in jsonl["parts"]] == list(range(len(jsonl["parts"])))
    data = (big_corpus / "big.jsonl").read_bytes()
    for part, record in zip(jsonl["parts"], ms.units, strict=False):
        assert (
            part["sha256"]
            == record.range_sha256
            == hashlib.sha256(data[part["start"] : part["stop"]]).hexdigest()
        )
        assert record.source_sha256 == "" and (record.range_start, record.range_stop) == (
            part["start"],
            part["stop"],
        )
    assert jsonl["parts"][-1]["stop"] == len(data) and parquet["parts"][0]["kind"] == "row_groups"


def test_a_split_job_killed_mid_unit_resumes_to_identical_shards(teacher_dir, big_corpus, tmp_path):
    import json

    from labelgen.contract.commits import CommitLog
    from labelgen.progress import PROGRESS_NAME

    small_shards = {"shard_mib": 0.02}  # every batch closes a shard: units span several
    spec = split_job(teacher_dir, big_corpus, tmp_path / "ref", output=small_shards)
    ref = run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert len(ref.units) >= 6 and any(u.shards >= 2 and u.parts > 1 for u in ref.units)
    out = tmp_path / "re"
    crashed = dataclasses.replace(spec, output=dataclasses.replace(spec.output, url=str(out)))
    log = CommitLog.at(str(out))
    mid_unit = []
    for after in (2, 5, 9):
        with pytest.raises(Crash):
            run_job(
                crashed,
                show_progress=False,
                teacher_factory=lambda s, a=after: CrashingTeacher(s.labels.k, a),
            )
        shards, units = log.committed()
        mid_unit.extend(s.unit for s in shards if s.unit not in units)
    assert mid_unit, "a crash came after a shard of an unfinished part"
    run_job(crashed, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert rows(out) == rows(tmp_path / "ref")
    b = read_manifest(str(out))
    assert [(s.path, s.rows, s.sha256) for s in b.shards] == [(s.path, s.rows, s.sha256) for s in ref.shards]
    assert unit_facts(b.units) == unit_facts(ref.units) and b.corpus["sources"] == ref.corpus["sources"]
    progress = json.loads((out / PROGRESS_NAME).read_text())
    assert progress["units_total"] == progress["units_done"] == len(ref.units)


def test_a_changed_plan_is_refused_and_a_legacy_output_resumes_one_unit_per_source(
    teacher_dir, big_corpus, tmp_path, monkeypatch
):
    import json

    import labelgen.units
    from labelgen.contract.commits import PLAN_RECORD, CommitLog

    small_shards = {"shard_mib": 0.02}
    spec = split_job(teacher_dir, big_corpus, tmp_path / "ref", unit_mib=256.0, output=small_shards)
    ref = run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    out = tmp_path / "re"
    crashed = dataclasses.replace(spec, output=dataclasses.replace(spec.output, url=str(out)))
    after = -(-ref.units[0].sequences // spec.teacher.batch_sequences) + 2  # two batches into source 1
    with pytest.raises(Crash):
        run_job(crashed, show_progress=False, teacher_factory=lambda s: CrashingTeacher(s.labels.k, after))
    log = CommitLog.at(str(out))
    assert list(log.units()) == [0] and log.shards(1), "the crash came inside the second source"
    monkeypatch.setattr(labelgen.units, "MIB", 64)  # as if this labelgen split these files
    with pytest.raises(
        JobError, match=rf"differ from those this job started with \(.*{PLAN_RECORD}\): unit 0"
    ):
        run_job(crashed, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    # The release before work units could be parts wrote no plan record and unit records
    # without a range: such an output resumes with one unit per source.
    (out / CommitLog.record_file(ref.units[0])).write_text(
        json.dumps(
            {k: v for k, v in dataclasses.asdict(ref.units[0]).items() if not k.startswith(("part", "range"))}
        )
    )
    Path(log.path(PLAN_RECORD)).unlink()
    messages: list[str] = []
    run_job(
        crashed, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k), log=messages.append
    )
    assert any(f"has no {PLAN_RECORD}" in m and "one unit per source" in m for m in messages), messages
    assert log.plan() is None, "a legacy output gets no plan record (it would not match a later plan)"
    assert rows(out) == rows(tmp_path / "ref")
    b = read_manifest(str(out))
    assert [(s.path, s.rows, s.sha256) for s in b.shards] == [(s.path, s.rows, s.sha256) for s in ref.shards]
    assert b.corpus["sources"] == ref.corpus["sources"] and len(b.units) == 2


def test_a_split_job_that_lost_its_plan_record_is_refused_not_finished_short(
    teacher_dir, big_corpus, tmp_path
):
    """Without plan.json an output counts as one unit per source only if its records say so:
    a split job's records (parts, unit numbers past the sources) are refused by name."""
    from labelgen.contract.commits import PLAN_RECORD, CommitLog

    spec = split_job(teacher_dir, big_corpus, tmp_path / "out")
    with pytest.raises(Crash):
        run_job(spec, show_progress=False, teacher_factory=lambda s: CrashingTeacher(s.labels.k, 6))
    log = CommitLog.at(spec.output.url)
    assert log.units(), "some parts finished before the crash"
    Path(log.path(PLAN_RECORD)).unlink()
    with pytest.raises(JobError, match=rf"has no .*{PLAN_RECORD} but its commit records are not one unit"):
        run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    assert not (tmp_path / "out" / "manifest.json").exists()
