"""Bad input never crashes a labeling job: odd records are counted, bad sources found early.

The four inputs that broke a job before (deeply nested JSON, a lone surrogate, a Parquet
source with a broken footer, a source truncated while the job runs) run through the
whole local runner here, with the deterministic fake teacher.
"""

from __future__ import annotations

import gzip
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fakes import FakeTeacher
from helpers import dataset_rows, make_spec
from labelgen.contract.configs import load_config
from labelgen.contract.dataset import read_manifest
from labelgen.corpus import REJECTION_REASONS, CorpusError, SourceError
from labelgen.runner import run_job
from labelgen.spec import JobSpec


def job(teacher_dir, corpus, out, **corpus_options) -> JobSpec:
    spec = make_spec(teacher_dir, corpus, str(out), corpus={"sources": [f"{corpus}/*"], **corpus_options})
    return load_config(JobSpec, spec)


def fake(spec: JobSpec) -> FakeTeacher:
    return FakeTeacher(spec.labels.k)


def no_teacher(_):
    raise AssertionError("must fail before the teacher starts")


def test_odd_records_are_counted_by_reason_and_the_job_goes_on(teacher_dir, texts, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [json.dumps({"text": t}) for t in texts[:20]]
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "an answer"}]
    odd = [
        "[" * 100_000 + "]" * 100_000,  # RecursionError in json.loads before
        '{"text": "\\ud800 lone surrogate"}',  # TypeError in the tokenizer before
        json.dumps({"messages": [{"role": "user", "content": {"nested": True}}, chat[1]]}),
        json.dumps({"messages": [{"role": "narrator", "content": "q"}, chat[1]]}),
        json.dumps({"messages": chat * 400}),
    ]
    (corpus / "odd.jsonl").write_text("\n".join(good[:10] + odd + good[10:]) + "\n")
    manifest = run_job(job(teacher_dir, corpus, tmp_path / "out", messages_field="messages"), False, fake)
    assert manifest.rejected == {
        "bad_message": 1,
        "invalid_text": 1,
        "too_deep": 1,
        "too_many_messages": 1,
        "unknown_role": 1,
    }
    assert set(manifest.rejected) <= set(REJECTION_REASONS)
    assert manifest.totals["rows"] > 0


def write_broken_parquet(path):
    pq.write_table(pa.table({"text": ["some text to label"] * 50}), path)
    data = bytearray(path.read_bytes())
    data[-12:-4] = b"\xff" * 8  # a broken footer behind the valid magic
    path.write_bytes(bytes(data))


def test_a_corrupt_parquet_source_fails_before_the_model_loads_or_is_skipped(teacher_dir, texts, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[:30]) + "\n")
    write_broken_parquet(corpus / "b.parquet")
    with pytest.raises(
        CorpusError, match=r"(?s)b.parquet is not a readable parquet source: .*on_bad_source=skip"
    ):
        run_job(job(teacher_dir, corpus, tmp_path / "out"), False, no_teacher)
    spec = job(teacher_dir, corpus, tmp_path / "skip", on_bad_source="skip")
    manifest = run_job(spec, False, fake)
    (reason,) = manifest.corpus["skipped_sources"].values()
    assert list(manifest.corpus["skipped_sources"]) == ["b.parquet"] and "not a readable parquet" in reason
    assert [s["url"].rsplit("/", 1)[-1] for s in manifest.corpus["sources"]] == ["a.jsonl"]
    assert read_manifest(spec.output.url).corpus["skipped_sources"] == manifest.corpus["skipped_sources"]


class TruncatingTeacher(FakeTeacher):
    """Truncates a source file while the job labels an earlier one."""

    def __init__(self, k, victim):
        super().__init__(k)
        self.victim = victim

    def label(self, batch):
        if self.calls == 0:
            self.victim.write_bytes(self.victim.read_bytes()[: self.victim.stat().st_size // 2])
        return super().label(batch)


def test_a_source_truncated_mid_job_fails_its_unit_clearly_and_keeps_committed_shards(
    teacher_dir, texts, tmp_path
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts[:30]) + "\n")
    lines = "".join(json.dumps({"text": f"record number {i} of b"}) + "\n" for i in range(3000))
    (corpus / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    backup = tmp_path / "b.jsonl.gz"
    shutil.copy(corpus / "b.jsonl.gz", backup)
    spec = job(teacher_dir, corpus, tmp_path / "out")
    with pytest.raises(SourceError, match=r"b.jsonl.gz broke while being read, .*: EOFError"):
        run_job(spec, False, lambda s: TruncatingTeacher(s.labels.k, corpus / "b.jsonl.gz"))
    from labelgen.contract.commits import CommitLog

    assert list(CommitLog.at(spec.output.url).units()) == [0]  # unit a.jsonl stays committed
    shutil.copy(backup, corpus / "b.jsonl.gz")
    run_job(spec, False, fake)
    reference = job(teacher_dir, corpus, tmp_path / "ref")
    run_job(reference, False, fake)
    assert dataset_rows(spec.output.url) == dataset_rows(reference.output.url)


def test_the_new_corpus_fields_keep_the_spec_hash_of_the_previous_release():
    """An output written before corpus.max_messages / chat_roles / on_bad_source / unit_mib
    and labels.logits_budget_mib existed resumes: at their defaults (on_bad_source and the
    logits budget always) they are left out of the hash."""
    raw = make_spec("/models/teacher", "/data/corpus", "/out/labels")
    previous = "6755eb58cec27a9f8725d65dd2993b1ae95a5e740b7b6c6434b5f9c29a96a2db"  # that release's hash
    assert load_config(JobSpec, raw).content_hash() == previous
    raw["corpus"]["on_bad_source"] = "skip"
    assert load_config(JobSpec, raw).content_hash() == previous
    raw["labels"]["logits_budget_mib"] = 64.0  # changes no label: never in the hash
    assert load_config(JobSpec, raw).content_hash() == previous
    raw["corpus"]["unit_mib"] = 64.0  # changes the plan: in the hash once set
    assert load_config(JobSpec, raw).content_hash() != previous
    del raw["corpus"]["unit_mib"]
    raw["corpus"]["max_messages"] = 8
    assert load_config(JobSpec, raw).content_hash() != previous
