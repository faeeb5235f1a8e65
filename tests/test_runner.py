"""The local runner with a deterministic fake teacher: shards, manifest, resume, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from fakes import FakeTeacher
from helpers import make_spec
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
