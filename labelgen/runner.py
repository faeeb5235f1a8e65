"""Labeling jobs: plan, run the work units, write the manifest last; the local executor.

A job is planned (:func:`plan_job`: sources listed, output checked against the spec,
work units planned and recorded, commit records read), its pending work units are run
by an executor, and it is finished (:func:`finish_job`: the manifest, written last).
Work units are the job's sources, whole or in parts of about ``corpus.unit_mib``
(:mod:`labelgen.units`, the one home of the plan), in sorted order; the plan is written
to the commit log when the job starts and a resume must find the same one.
:func:`run_unit` labels one unit: it reads and packs its source or part, sends
sequences to the teacher in batches of ``teacher.batch_sequences`` and writes shards,
the three overlapped (:mod:`labelgen.pipeline`: the next batch is prepared and the last
one written while the engine computes; the unit record keeps the engine's busy time).
Committed shards and finished units leave records in the commit log
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
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import fsspec
import yaml

from labelgen.checks import Checker
from labelgen.contract.commits import PLAN_RECORD, SOURCES_RECORD, CommitLog, JobRecord, PlanRecord
from labelgen.contract.config_input import read_yaml
from labelgen.contract.format import MANIFEST_NAME, SPEC_NAME, Manifest, ShardRecord, UnitRecord, join_url
from labelgen.contract.generation import GenerationShardRecord
from labelgen.contract.storage import write_text_atomic
from labelgen.corpus import Source, check_sources, resolve_sources
from labelgen.generation import generation_manifest_part, run_generation_unit
from labelgen.labels import SequenceLabels
from labelgen.packing import PackedSequence, pack
from labelgen.pipeline import DEFAULT_DEPTH, run_overlapped
from labelgen.progress import JobProgress, ProgressBar, UnitProgress
from labelgen.prompts import prompt_corpus
from labelgen.provenance import check_model_path, load_tokenizer, tokenizer_info, weights_fingerprint
from labelgen.spec import JobSpec
from labelgen.teacher import Teacher, load_teacher

if typing.TYPE_CHECKING:
    from labelgen.teacher import Generator
from labelgen.units import WorkUnit, legacy_plan, plan_record, plan_units, read_unit, unit_sha256
from labelgen.writer import ShardWriter

__all__ = [
    "JobError",
    "JobPlan",
    "plan_job",
    "finish_job",
    "record_teacher",
    "run_job",
    "run_unit",
    "run_work_unit",
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
    """Finished units' records, by unit index."""
    work: list[WorkUnit] = dataclasses.field(default_factory=list)
    """Every work unit of the job, in index order (empty when the job is done)."""
    done: Manifest | None = None  # set when the manifest already exists
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    """Sources left out as unreadable (corpus.on_bad_source=skip): name -> reason."""

    @functools.cached_property
    def commits(self) -> CommitLog:
        return CommitLog(self.fs, self.root)

    @property
    def pending(self) -> list[WorkUnit]:
        """The units not finished yet, in index order."""
        return [u for u in self.work if u.index not in self.units]


def _plan_difference(recorded: PlanRecord, planned: PlanRecord) -> str:
    """The first difference between two plans, for the error message."""
    if recorded.unit_mib != planned.unit_mib:
        return f"corpus.unit_mib {recorded.unit_mib} then, {planned.unit_mib} now"
    for then, now in zip(recorded.units, planned.units, strict=False):
        if then != now:
            return f"unit {then.unit} was {then}, now {now}"
    return f"{len(recorded.units)} unit(s) then, {len(planned.units)} now"


def _unit_plan(
    spec: JobSpec,
    commits: CommitLog,
    sources: list[Source],
    finished: dict[int, UnitRecord],
    log: Callable[[str], None],
) -> list[WorkUnit]:
    """The job's work units: planned (:func:`labelgen.units.plan_units`) and recorded on the
    first run; on a resume, planned again and checked against the record. An output with
    commit records but no plan record was written before units could be parts: its units
    are its sources (:func:`labelgen.units.legacy_plan`), so it resumes exactly."""
    recorded = commits.plan()
    if recorded is None and (finished or commits.count_shards()):
        legacy = legacy_plan(sources)
        _check_legacy(spec, commits, legacy, finished)
        log(f"{spec.output.url} has no {PLAN_RECORD} (written by an earlier labelgen): one unit per source")
        return legacy
    work = plan_units(sources, spec.corpus)
    planned = plan_record(work, spec.corpus)
    if recorded is None:
        commits.write_plan(planned)
    elif recorded != planned:
        raise JobError(
            f"the work units planned now differ from those this job started with "
            f"({commits.path(PLAN_RECORD)}): {_plan_difference(recorded, planned)}. The sources' names "
            "and sizes are unchanged, so a Parquet file's row groups or a saved dataset's Arrow files "
            "changed, or this labelgen plans units differently from the release that started the job; "
            "restore the corpus, or resume with that release, or use a new output.url"
        )
    return work


def _check_legacy(
    spec: JobSpec, commits: CommitLog, legacy: list[WorkUnit], finished: dict[int, UnitRecord]
) -> None:
    """Refuse to read an output without a plan record as one unit per source unless its
    records say exactly that (a lost plan record of a split job would otherwise finish as
    a dataset missing the parts and sources its unit numbers no longer name)."""
    problems = [
        f"unit record {unit} ({record.source}, part {record.part + 1}/{record.parts})"
        for unit, record in sorted(finished.items())
        if unit >= len(legacy)
        or record.parts != 1
        or record.range_kind != "file"
        or record.source != legacy[unit].source.url
    ]
    problems += [
        f"shard {shard.path} of unit {shard.unit}" for shard in commits.shards() if shard.unit >= len(legacy)
    ]
    if problems:
        raise JobError(
            f"{spec.output.url} has no {commits.path(PLAN_RECORD)} but its commit records are not one "
            f"unit per source ({'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}): the plan "
            "record was lost or the output was written by another job; restore the record, or use a new "
            "output.url"
        )


def plan_job(spec: JobSpec, log: Callable[[str], None] = lambda msg: None) -> JobPlan:
    """List and check the sources, check the model path and the output, read the commit records.

    Unreadable corpus URLs and sources (:func:`labelgen.corpus.check_sources`) and a
    missing model fail here, before any model loads; with ``corpus.on_bad_source: skip``
    unreadable sources are left out (and listed in :attr:`JobPlan.skipped`).
    """
    # A generation job's sources are read as prompts, and checked for the prompt fields.
    corpus = spec.corpus if spec.generate is None else prompt_corpus(spec)
    sources, skipped = check_sources(resolve_sources(spec.corpus), corpus)
    for name, reason in skipped.items():
        log(f"skipping corpus source {name}: {reason}")
    check_model_path(spec.teacher.model)
    if spec.generate is not None:
        Checker(spec.generate)  # imports the user's check and score: an error shows before any model loads
    tokenizer = load_tokenizer(spec.teacher)
    fs, root = fsspec.core.url_to_fs(spec.output.url)
    done = _prepare_output(spec, fs, root, sources)
    if done is not None:
        return JobPlan(spec, sources, tokenizer, fs, root, {}, done=done, skipped=skipped)
    commits = CommitLog(fs, root)
    units = commits.units()
    work = _unit_plan(spec, commits, sources, units, log)
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
    plan = JobPlan(spec, sources, tokenizer, fs, root, units, work, skipped=skipped)
    left_out = f" ({len(skipped)} unreadable, skipped)" if skipped else ""
    log(
        f"{len(sources)} source(s){left_out} in {len(work)} unit(s), {len(units)} already labeled, "
        f"{len(plan.pending)} to go"
    )
    return plan


def record_teacher(plan: JobPlan, provenance: dict[str, Any]) -> None:
    """Save the running teacher's provenance for the manifest (written before any unit)."""
    plan.commits.write_teacher(provenance)


def finish_job(plan: JobPlan) -> Manifest:
    """Build the manifest from the commit records and write it, last."""
    shards, units = plan.commits.committed()
    generations: list[GenerationShardRecord] = []
    if plan.spec.generate is not None:
        generations = plan.commits.generations()
        shards = [g.labels for g in generations if g.labels is not None]
    missing = [u.index for u in plan.work if u.index not in units]
    if missing:
        raise JobError(f"units {missing} of {plan.spec.output.url} are not finished; re-run the job")
    teacher_info = plan.commits.teacher()
    if teacher_info is None:
        raise JobError(
            f"{plan.spec.output.url} has every unit finished but no teacher record: the commit log "
            "is incomplete; delete the output (or set output.overwrite=true) and run the job again"
        )
    manifest = _build_manifest(plan, shards, units, teacher_info, generations)
    write_text_atomic(plan.fs, join_url(plan.root, MANIFEST_NAME), manifest.to_json())
    return manifest


@dataclass(frozen=True)
class _Batch:
    """One teacher call's sequences, with the reader's progress when it was formed."""

    sequences: list[PackedSequence]
    source_bytes: int
    rejected: int


def run_unit(
    spec: JobSpec,
    unit: WorkUnit,
    tokenizer: Any,
    teacher: Teacher,
    committed: list[ShardRecord],
    progress: UnitProgress,
    depth: int = DEFAULT_DEPTH,
) -> UnitRecord:
    """Label one work unit (a source or a part of one); resumes after the sequences held by
    ``committed`` shards. Packing starts afresh in the unit, so its sequences and their
    unit-local indices do not depend on any other unit."""
    committed = [r for i, r in enumerate(sorted(committed, key=lambda r: r.index)) if r.index == i]
    resume_at = committed[-1].next_sequence if committed else 0
    writer = ShardWriter(
        spec.output.url,
        unit.index,
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
    counts: dict[str, Any] = {"sequences": 0, "tokens": 0}

    def records():
        for item in read_unit(unit, spec.corpus):
            position["bytes"] = item.progress
            yield item

    def batches() -> Iterator[_Batch]:
        """Read, tokenize, pack and group (the prepare stage; skips committed sequences)."""
        batch: list[PackedSequence] = []
        for index, seq in enumerate(pack(unit.sample_prefix, records(), tokenizer, spec.packing, rejected)):
            counts["sequences"] += 1
            counts["tokens"] += len(seq.input_ids)
            if index < resume_at:
                continue  # already in a committed shard
            batch.append(seq)
            if len(batch) >= spec.teacher.batch_sequences:
                yield _Batch(batch, position["bytes"], sum(rejected.values()))
                batch = []
        if batch:
            yield _Batch(batch, position["bytes"], sum(rejected.values()))
        # Hashed here, while the engine labels the last batches: a part hashes its own
        # bytes, never its whole file.
        counts["sha256"] = unit_sha256(unit)

    def store(batch: _Batch, labels: list[SequenceLabels]) -> None:
        """Encode, write and commit (the store stage)."""
        for seq, lab in zip(batch.sequences, labels, strict=True):
            writer.add(seq, lab)
        writer.end_batch()
        tokens = sum(len(s.input_ids) for s in batch.sequences)
        progress.update(batch.source_bytes, len(batch.sequences), tokens, batch.rejected)

    progress.start_unit(unit.index)
    clock = progress.clock
    clock.start()  # the whole unit: the loop, then the last shard's commit
    run_overlapped(
        batches(),
        lambda batch: teacher.label([s.input_ids for s in batch.sequences]),
        store,
        depth=depth,
        clock=clock,
    )
    count, tokens, sha256 = counts["sequences"], counts["tokens"], counts["sha256"]
    progress.update(unit.size, rejected=sum(rejected.values()))
    shards = committed + writer.close()
    clock.stop()
    record = UnitRecord(
        unit=unit.index,
        source=unit.source.url,
        sequences=count,
        tokens=tokens,
        shards=len(shards),
        rejected=dict(sorted(rejected.items())),
        source_sha256=sha256 if unit.whole else "",
        part=unit.part,
        parts=unit.parts,
        range_kind=unit.kind,
        range_start=unit.start,
        range_stop=unit.stop,
        range_sha256="" if unit.whole else sha256,
        engine_s=round(clock.busy_s, 3),
        wall_s=round(clock.wall_s, 3),
    )
    writer.commits.write_unit(record)
    return record


def run_work_unit(
    spec: JobSpec,
    unit: WorkUnit,
    tokenizer: Any,
    teacher: Teacher,
    commits: CommitLog,
    progress: UnitProgress,
    depth: int = DEFAULT_DEPTH,
) -> UnitRecord:
    """Run one work unit of the job, whichever kind it is: :func:`run_unit` for a labeling
    job, :func:`labelgen.generation.run_generation_unit` for a generation job (both resume
    after the unit's committed shards); every executor calls this."""
    if spec.generate is None:
        return run_unit(spec, unit, tokenizer, teacher, commits.shards(unit.index), progress, depth)
    generator = typing.cast("Generator", teacher)
    return run_generation_unit(
        spec, unit, tokenizer, generator, commits.generations(unit.index), progress, depth
    )


def run_job(
    spec: JobSpec,
    show_progress: bool = True,
    teacher_factory: Callable[[JobSpec], Teacher] = load_teacher,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    depth: int = DEFAULT_DEPTH,
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
        job = JobProgress(plan.work, dict(plan.units))
        desc = "labeling" if spec.generate is None else "generating"
        bar = ProgressBar(job, sum(u.size for u in pending), show_progress, desc)
        state = "failed"
        try:
            for unit in pending:
                job.finish_unit(run_work_unit(spec, unit, plan.tokenizer, teacher, plan.commits, bar, depth))
                job.write(plan.fs, plan.root)
            state = "done"
        finally:
            bar.close()
            teacher.close()
            job.write(plan.fs, plan.root, state)
    return finish_job(plan)


def _manifest_sources(
    sources: list[Source], work: list[WorkUnit], units: dict[int, UnitRecord]
) -> list[dict[str, Any]]:
    """The manifest's ``corpus.sources``: {url, size, sha256} of a source labeled whole; for a
    split source sha256 null and ``parts``, each part's unit, range and sha256."""
    by_source: dict[str, list[WorkUnit]] = {}
    for unit in work:
        by_source.setdefault(unit.source.url, []).append(unit)
    out = []
    for source in sources:
        mine = by_source[source.url]
        if len(mine) == 1 and mine[0].whole:
            out.append({"url": source.url, "size": source.size, "sha256": units[mine[0].index].source_sha256})
            continue
        parts = [
            {
                "unit": u.index,
                "kind": u.kind,
                "start": u.start,
                "stop": u.stop,
                "offset": u.offset,
                "size": u.size,
                "sha256": units[u.index].range_sha256,
            }
            for u in mine
        ]
        out.append({"url": source.url, "size": source.size, "sha256": None, "parts": parts})
    return out


def _build_manifest(
    plan: JobPlan,
    shards: list[ShardRecord],
    units: dict[int, UnitRecord],
    teacher_info: dict[str, Any],
    generations: list[GenerationShardRecord],
) -> Manifest:
    spec, sources, tokenizer = plan.spec, plan.sources, plan.tokenizer
    keep = []
    kept_generations = []
    for unit, record in sorted(units.items()):
        # A generation job's shards are its generation records (each with its label shard).
        if spec.generate is None:
            unit_shards = [s for s in shards if s.unit == unit and s.index < record.shards]
            found = len(unit_shards)
        else:
            unit_generations = [g for g in generations if g.unit == unit and g.index < record.shards]
            kept_generations.extend(unit_generations)
            unit_shards = [g.labels for g in unit_generations if g.labels is not None]
            found = len(unit_generations)
        if found != record.shards:
            raise JobError(
                f"unit {unit} of {spec.output.url} records {record.shards} shard(s) but "
                f"{found} shard record(s) are committed: the commit log lost records; delete "
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
        "sources": _manifest_sources(sources, plan.work, units),
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
        generation=generation_manifest_part(spec, kept_generations) if spec.generate is not None else {},
    )
