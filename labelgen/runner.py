"""Labeling jobs: plan, run the work units, write the manifest last; the local executor.

A job is planned (:func:`plan_job`: sources listed, output checked against the spec,
commit records read), its pending work units are run by an executor, and it is
finished (:func:`finish_job`: the manifest, written last). Work units are the job's
sources, in sorted order. :func:`run_unit` labels one unit: it reads and packs its
source, sends sequences to the teacher in batches of ``teacher.batch_sequences`` and
writes shards. Committed shards and finished units leave records in the commit log
(:mod:`labelgen.contract.commits`); a re-run of the same spec skips finished units, and inside an
unfinished unit skips the sequences its committed shards already hold, so a killed
job re-run ends with exactly the rows of an uninterrupted run.

Executors only decide where units run: :func:`run_job` runs them one after another
in this process; :mod:`labelgen.cluster` runs them on Ray actors. Both call
:func:`run_unit`, and report through :mod:`labelgen.progress`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import yaml

from labelgen.contract.commits import SOURCES_RECORD, CommitLog, JobRecord
from labelgen.contract.config_input import read_yaml
from labelgen.contract.format import MANIFEST_NAME, SPEC_NAME, Manifest, ShardRecord, UnitRecord, join_url
from labelgen.contract.storage import write_text_atomic
from labelgen.corpus import Source, check_sources, read_source, resolve_sources, source_sha256
from labelgen.packing import PackedSequence, pack
from labelgen.progress import JobProgress, ProgressBar, UnitProgress
from labelgen.provenance import check_model_path, load_tokenizer, tokenizer_info, weights_fingerprint
from labelgen.spec import JobSpec
from labelgen.teacher import Teacher, load_teacher
from labelgen.writer import ShardWriter

__all__ = [
    "JobError",
    "JobPlan",
    "plan_job",
    "finish_job",
    "record_teacher",
    "run_job",
    "run_unit",
    "job_products",
]


class JobError(RuntimeError):
    """The job cannot run as specified (output conflict, changed corpus, ...)."""


def job_products(spec: JobSpec, hidden_dim: int | None = None) -> dict[str, Any]:
    """The optional products a job writes, as its job record and manifest describe them."""
    products: dict[str, Any] = {}
    if spec.labels.draws:
        products["draws"] = {
            "n": spec.labels.draws,
            "temperature": spec.labels.draw_temperature,
            "seed": spec.labels.seed,
        }
    if spec.hidden.layers:
        products["hidden"] = {
            "layers": list(spec.hidden.layers),
            "every": spec.hidden.every,
            "dtype": spec.hidden.dtype,
            "dim": hidden_dim,
            "seed": spec.labels.seed,
            "numbering": "0 = embeddings, i = output of decoder layer i, last = after the final norm",
        }
    return products


def _prepare_output(spec: JobSpec, fs: Any, root: str, sources: list[Source]) -> Manifest | None:
    """Check the output against this spec; returns the manifest if the job is already done."""
    spec_hash = spec.content_hash()
    spec_path = join_url(root, SPEC_NAME)
    if fs.exists(spec_path):
        with fs.open(spec_path, "rb") as f:
            stored, _ = read_yaml(f.read().decode("utf-8", "replace"))
        stored = stored if isinstance(stored, dict) else {}  # damaged: a different spec
        if stored.get("spec_sha256") != spec_hash:
            if not spec.output.overwrite:
                raise JobError(
                    f"output.url {spec.output.url!r} already holds labels from a different job spec "
                    f"(spec sha256 {stored.get('spec_sha256')} vs {spec_hash}); use a new output.url, "
                    "or set output.overwrite=true to delete it"
                )
            fs.rm(root, recursive=True)
    manifest_path = join_url(root, MANIFEST_NAME)
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "rb") as f:
            return Manifest.from_json(f.read(), where=manifest_path)
    fs.makedirs(root, exist_ok=True)
    if not fs.exists(spec_path):
        body = {"spec_sha256": spec_hash, **spec.to_dict()}
        write_text_atomic(fs, spec_path, yaml.safe_dump(body, sort_keys=False))
    commits = CommitLog(fs, root)
    listing = [{"url": s.url, "name": s.name, "format": s.format, "size": s.size} for s in sources]
    before = commits.sources()
    if before is None:
        commits.write_sources(listing)
    elif before != listing:
        raise JobError(
            f"the corpus changed since this job started (sources or sizes differ from "
            f"{commits.path(SOURCES_RECORD)}); restore it, or use a new output.url"
        )
    return None


@dataclass
class JobPlan:
    """What a job still has to do, as found in its output: the input of every executor."""

    spec: JobSpec
    sources: list[Source]
    tokenizer: Any
    fs: Any
    root: str
    units: dict[int, UnitRecord]
    done: Manifest | None = None  # set when the manifest already exists
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Sources left out as unreadable (corpus.on_bad_source=skip): name -> reason."""

    @functools.cached_property
    def commits(self) -> CommitLog:
        return CommitLog(self.fs, self.root)

    @property
    def pending(self) -> list[tuple[int, Source]]:
        return [(i, s) for i, s in enumerate(self.sources) if i not in self.units]


def plan_job(spec: JobSpec, log: Callable[[str], None] = lambda msg: None) -> JobPlan:
    """List and check the sources, check the model path and the output, read the commit records.

    Unreadable corpus URLs and sources (:func:`labelgen.corpus.check_sources`) and a
    missing model fail here, before any model loads; with ``corpus.on_bad_source: skip``
    unreadable sources are left out (and listed in :attr:`JobPlan.skipped`).
    """
    sources, skipped = check_sources(resolve_sources(spec.corpus), spec.corpus)
    for name, reason in skipped.items():
        log(f"skipping corpus source {name}: {reason}")
    check_model_path(spec.teacher.model)
    tokenizer = load_tokenizer(spec.teacher)
    fs, root = fsspec.core.url_to_fs(spec.output.url)
    done = _prepare_output(spec, fs, root, sources)
    if done is not None:
        return JobPlan(spec, sources, tokenizer, fs, root, {}, done, skipped)
    commits = CommitLog(fs, root)
    units = commits.units()
    # What the shards hold and the tokenizer, before any shard: a follower (a student
    # training while the job writes) reads them from the log, never from a shard.
    commits.write_job(
        JobRecord(
            k=spec.labels.k,
            codec=spec.labels.codec,
            products=job_products(spec),
            spec_sha256=spec.content_hash(),
        )
    )
    commits.write_tokenizer(tokenizer_info(tokenizer, spec.teacher.tokenizer or spec.teacher.model))
    plan = JobPlan(spec, sources, tokenizer, fs, root, units, skipped=skipped)
    left_out = f" ({len(skipped)} unreadable, skipped)" if skipped else ""
    log(f"{len(sources)} source(s){left_out}, {len(units)} already labeled, {len(plan.pending)} to go")
    return plan


def record_teacher(plan: JobPlan, provenance: dict[str, Any]) -> None:
    """Save the running teacher's provenance for the manifest (written before any unit)."""
    plan.commits.write_teacher(provenance)


def finish_job(plan: JobPlan) -> Manifest:
    """Build the manifest from the commit records and write it, last."""
    shards, units = plan.commits.committed()
    missing = [i for i in range(len(plan.sources)) if i not in units]
    if missing:
        raise JobError(f"units {missing} of {plan.spec.output.url} are not finished; re-run the job")
    teacher_info = plan.commits.teacher()
    if teacher_info is None:
        raise JobError(
            f"{plan.spec.output.url} has every unit finished but no teacher record: the commit log "
            "is incomplete; delete the output (or set output.overwrite=true) and run the job again"
        )
    manifest = _build_manifest(plan, shards, units, teacher_info)
    write_text_atomic(plan.fs, join_url(plan.root, MANIFEST_NAME), manifest.to_json())
    return manifest


def run_unit(
    spec: JobSpec,
    unit: int,
    source: Source,
    tokenizer: Any,
    teacher: Teacher,
    committed: list[ShardRecord],
    progress: UnitProgress,
) -> UnitRecord:
    """Label one source; resumes after the sequences held by ``committed`` shards."""
    committed = [r for i, r in enumerate(sorted(committed, key=lambda r: r.index)) if r.index == i]
    resume_at = committed[-1].next_sequence if committed else 0
    writer = ShardWriter(
        spec.output.url,
        unit,
        spec.labels.k,
        first_shard=len(committed),
        first_sequence=resume_at,
        shard_mib=spec.output.shard_mib,
        row_group_mib=spec.output.row_group_mib,
        compression_level=spec.output.compression_level,
        draws=spec.labels.draws > 0,
        codec=spec.labels.codec,
        hidden_layers=tuple(spec.hidden.layers),
        hidden_dtype=spec.hidden.dtype,
    )
    rejected: dict[str, int] = {}
    position = {"bytes": 0}

    def records():
        for item in read_source(source, spec.corpus):
            position["bytes"] = item.progress
            yield item

    batch: list[PackedSequence] = []

    def flush() -> None:
        labels = teacher.label([s.input_ids for s in batch])
        for seq, lab in zip(batch, labels, strict=True):
            writer.add(seq, lab)
        writer.end_batch()
        tokens = sum(len(s.input_ids) for s in batch)
        progress.update(position["bytes"], len(batch), tokens, sum(rejected.values()))
        batch.clear()

    progress.start_unit(unit)
    count = tokens = 0
    for index, seq in enumerate(pack(source.name, records(), tokenizer, spec.packing, rejected)):
        count += 1
        tokens += len(seq.input_ids)
        if index < resume_at:
            continue  # already in a committed shard
        batch.append(seq)
        if len(batch) >= spec.teacher.batch_sequences:
            flush()
    if batch:
        flush()
    progress.update(source.size, rejected=sum(rejected.values()))
    shards = committed + writer.close()
    record = UnitRecord(
        unit=unit,
        source=source.url,
        sequences=count,
        tokens=tokens,
        shards=len(shards),
        rejected=dict(sorted(rejected.items())),
        source_sha256=source_sha256(source),
    )
    writer.commits.write_unit(record)
    return record


def run_job(
    spec: JobSpec,
    show_progress: bool = True,
    teacher_factory: Callable[[JobSpec], Teacher] = load_teacher,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
) -> Manifest:
    """Run (or finish) a labeling job on this machine, one unit after another; returns the manifest."""
    plan = plan_job(spec, log)
    if plan.done is not None:
        log(f"{spec.output.url} is already complete ({plan.done.totals['rows']} sequences); nothing to do")
        return plan.done
    pending = plan.pending
    if pending:
        teacher = teacher_factory(spec)
        record_teacher(plan, teacher.provenance())
        job = JobProgress(plan.sources, dict(plan.units))
        bar = ProgressBar(job, sum(s.size for _, s in pending), show_progress)
        state = "failed"
        try:
            for unit, source in pending:
                mine = plan.commits.shards(unit)
                job.finish_unit(run_unit(spec, unit, source, plan.tokenizer, teacher, mine, bar))
                job.write(plan.fs, plan.root)
            state = "done"
        finally:
            bar.close()
            teacher.close()
            job.write(plan.fs, plan.root, state)
    return finish_job(plan)


def _build_manifest(
    plan: JobPlan,
    shards: list[ShardRecord],
    units: dict[int, UnitRecord],
    teacher_info: dict[str, Any],
) -> Manifest:
    spec, sources, tokenizer = plan.spec, plan.sources, plan.tokenizer
    keep = []
    for unit, record in sorted(units.items()):
        unit_shards = [s for s in shards if s.unit == unit and s.index < record.shards]
        if len(unit_shards) != record.shards:
            raise JobError(
                f"unit {unit} of {spec.output.url} records {record.shards} shard(s) but "
                f"{len(unit_shards)} shard record(s) are committed: the commit log lost records; delete "
                "the output (or set output.overwrite=true) and run the job again"
            )
        keep.extend(unit_shards)
    t = spec.teacher
    tok = tokenizer_info(tokenizer, t.tokenizer or t.model)
    tok["model_vocab_size"] = teacher_info.get("model_vocab_size")
    teacher = {
        "model": t.model,
        "revision": t.revision,
        "max_model_len": t.max_model_len,
        "weights": weights_fingerprint(t.model, t.weights_hash),
        **teacher_info,
    }
    corpus = {
        "sources": [
            {"url": s.url, "size": s.size, "sha256": units[i].source_sha256} for i, s in enumerate(sources)
        ],
        "text_field": spec.corpus.text_field,
        "messages_field": spec.corpus.messages_field,
        "packing": asdict(spec.packing),
        "skipped_sources": dict(sorted(plan.skipped.items())),
    }
    return Manifest(
        codec=spec.labels.codec,
        products=job_products(spec, teacher_info.get("hidden_size")),
        k=spec.labels.k,
        teacher=teacher,
        tokenizer=tok,
        corpus=corpus,
        spec_sha256=spec.content_hash(),
        shards=keep,
        units=[units[u] for u in sorted(units)],
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
