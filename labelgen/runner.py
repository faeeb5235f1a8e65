"""Labeling jobs: plan, run the work units, write the manifest last; the local executor.

A job is planned (:func:`plan_job`: sources listed, output checked against the spec,
commit records read), its pending work units are run by an executor, and it is
finished (:func:`finish_job`: the manifest, written last). Work units are the job's
sources, in sorted order. :func:`run_unit` labels one unit: it reads and packs its
source, sends sequences to the teacher in batches of ``teacher.batch_sequences`` and
writes shards. Committed shards and finished units leave records under
``_commits/``; a re-run of the same spec skips finished units, and inside an
unfinished unit skips the sequences its committed shards already hold, so a killed
job re-run ends with exactly the rows of an uninterrupted run.

Executors only decide where units run: :func:`run_job` runs them one after another
in this process; :mod:`labelgen.cluster` runs them on Ray actors. Both call
:func:`run_unit`, and report through :class:`JobProgress`, which also rewrites
``<output>/_progress.json`` for ``labelgen status``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import yaml
from tqdm import tqdm

from labelgen.contract.format import (
    COMMITS_DIR,
    MANIFEST_NAME,
    SPEC_NAME,
    TOKENIZER_RECORD,
    Manifest,
    ShardRecord,
    UnitRecord,
    join_url,
    list_fresh,
)
from labelgen.corpus import Source, read_source, resolve_sources, source_sha256
from labelgen.object_store import retry
from labelgen.packing import Sequence, pack
from labelgen.provenance import check_model_path, load_tokenizer, tokenizer_info, weights_fingerprint
from labelgen.spec import JobSpec
from labelgen.teacher import Teacher, load_teacher
from labelgen.writer import ShardWriter, write_json_atomic, write_text_atomic

__all__ = [
    "JobError",
    "JobPlan",
    "JobProgress",
    "UnitProgress",
    "PROGRESS_NAME",
    "format_progress",
    "plan_job",
    "finish_job",
    "record_teacher",
    "run_job",
    "run_unit",
    "read_commits",
    "unit_commits",
]

PROGRESS_NAME = "_progress.json"
"""Progress snapshot under the output URL (not part of the dataset; read by `labelgen status`)."""


class JobError(RuntimeError):
    """The job cannot run as specified (output conflict, changed corpus, ...)."""


def read_commits(fs: Any, root: str) -> tuple[list[ShardRecord], dict[int, UnitRecord]]:
    """Committed shard records (sorted) and finished unit records under ``root``."""
    return _read_records(fs, root, ("part-", "unit-"))


def unit_commits(fs: Any, root: str, unit: int) -> list[ShardRecord]:
    """Committed shard records of one unit, read fresh (another process may have written them)."""
    return _read_records(fs, root, (f"part-{unit:05d}-",))[0]


def _read_json(fs: Any, path: str) -> Any:
    return retry(lambda: json.loads(fs.cat_file(path)), f"read {path}")


def _read_records(
    fs: Any, root: str, prefixes: tuple[str, ...]
) -> tuple[list[ShardRecord], dict[int, UnitRecord]]:
    directory = join_url(root, COMMITS_DIR)
    shards, units = [], {}
    common = prefixes[0] if len(prefixes) == 1 else ""
    for path in retry(lambda: list_fresh(fs, directory, common), f"list {directory}"):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".json") or not name.startswith(prefixes):
            continue
        data = _read_json(fs, path)
        if name.startswith("part-"):
            shards.append(ShardRecord(**data))
        elif name.startswith("unit-"):
            record = UnitRecord(**data)
            units[record.unit] = record
    shards.sort(key=lambda r: (r.unit, r.index))
    return shards, units


def _prepare_output(spec: JobSpec, fs: Any, root: str, sources: list[Source]) -> Manifest | None:
    """Check the output against this spec; returns the manifest if the job is already done."""
    spec_hash = spec.content_hash()
    spec_path = join_url(root, SPEC_NAME)
    if fs.exists(spec_path):
        with fs.open(spec_path, "r") as f:
            stored = yaml.safe_load(f.read()) or {}
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
        with fs.open(manifest_path, "r") as f:
            return Manifest.from_json(f.read(), where=manifest_path)
    fs.makedirs(root, exist_ok=True)
    if not fs.exists(spec_path):
        body = {"spec_sha256": spec_hash, **spec.to_dict()}
        write_text_atomic(fs, spec_path, yaml.safe_dump(body, sort_keys=False))
    listing = [{"url": s.url, "name": s.name, "format": s.format, "size": s.size} for s in sources]
    listing_path = join_url(root, COMMITS_DIR, "sources.json")
    if fs.exists(listing_path):
        with fs.open(listing_path, "r") as f:
            before = json.load(f)
        if before != listing:
            raise JobError(
                f"the corpus changed since this job started (sources or sizes differ from "
                f"{listing_path}); restore it, or use a new output.url"
            )
    else:
        write_json_atomic(fs, listing_path, listing)
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

    @property
    def pending(self) -> list[tuple[int, Source]]:
        return [(i, s) for i, s in enumerate(self.sources) if i not in self.units]


def plan_job(spec: JobSpec, log: Callable[[str], None] = lambda msg: None) -> JobPlan:
    """List the sources, check the model path and the output, read the commit records.

    Unreadable corpus URLs and a missing model fail here, before any model loads.
    """
    sources = resolve_sources(spec.corpus)
    check_model_path(spec.teacher.model)
    tokenizer = load_tokenizer(spec.teacher)
    fs, root = fsspec.core.url_to_fs(spec.output.url)
    done = _prepare_output(spec, fs, root, sources)
    if done is not None:
        return JobPlan(spec, sources, tokenizer, fs, root, {}, done)
    _, units = read_commits(fs, root)
    # The tokenizer before any shard, so a student can check it while the job still writes.
    tok_info = tokenizer_info(tokenizer, spec.teacher.tokenizer or spec.teacher.model)
    write_json_atomic(fs, join_url(root, COMMITS_DIR, TOKENIZER_RECORD), tok_info)
    plan = JobPlan(spec, sources, tokenizer, fs, root, units)
    log(f"{len(sources)} source(s), {len(units)} already labeled, {len(plan.pending)} to go")
    return plan


def record_teacher(plan: JobPlan, provenance: dict[str, Any]) -> None:
    """Save the running teacher's provenance for the manifest (written before any unit)."""
    write_json_atomic(plan.fs, join_url(plan.root, COMMITS_DIR, "teacher.json"), provenance)


def finish_job(plan: JobPlan) -> Manifest:
    """Build the manifest from the commit records and write it, last."""
    shards, units = read_commits(plan.fs, plan.root)
    missing = [i for i in range(len(plan.sources)) if i not in units]
    if missing:
        raise JobError(f"units {missing} of {plan.spec.output.url} are not finished; re-run the job")
    teacher_info = _read_json(plan.fs, join_url(plan.root, COMMITS_DIR, "teacher.json"))
    manifest = _build_manifest(plan.spec, plan.sources, plan.tokenizer, shards, units, teacher_info)
    write_text_atomic(plan.fs, join_url(plan.root, MANIFEST_NAME), manifest.to_json())
    return manifest


class UnitProgress:
    """Counters of the unit being labeled; an executor may read them from another thread."""

    def __init__(self) -> None:
        self.unit = -1
        self.source_bytes = self.sequences = self.tokens = self.rejected = 0

    def start_unit(self, unit: int = -1) -> None:
        self.unit = unit
        self.source_bytes = self.sequences = self.tokens = self.rejected = 0

    def update(self, source_bytes: int, sequences: int = 0, tokens: int = 0, rejected: int = 0) -> None:
        self.source_bytes = source_bytes
        self.sequences += sequences
        self.tokens += tokens
        self.rejected = max(self.rejected, rejected)

    def snapshot(self) -> dict[str, int]:
        return {
            "unit": self.unit,
            "source_bytes": self.source_bytes,
            "sequences": self.sequences,
            "tokens": self.tokens,
            "rejected": self.rejected,
        }


@dataclass
class JobProgress:
    """Job-wide progress: units done/total, tokens/s, ETA, rejected records, retries.

    ``tokens`` and the rate count what this run labeled (resumed work shows in
    units_done only). The ETA extrapolates source bytes consumed per second over the
    source bytes left.
    """

    sources: list[Source]
    finished: dict[int, UnitRecord]
    replicas: int = 1
    executor: str = "local"
    start: float = field(default_factory=time.monotonic)
    retries: int = 0
    live: dict[int, dict[str, int]] = field(default_factory=dict)
    tokens_done: int = 0  # tokens labeled by this run in the units it finished
    bytes_done: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update_unit(self, snapshot: dict[str, int]) -> None:
        with self._lock:
            self.live[snapshot["unit"]] = dict(snapshot)

    def finish_unit(self, record: UnitRecord, tokens: int | None = None) -> None:
        """``tokens``: labeled by this attempt (default: the unit's last reported count)."""
        with self._lock:
            live = self.live.pop(record.unit, None)
            self.finished[record.unit] = record
            self.tokens_done += tokens if tokens is not None else live["tokens"] if live else 0
            self.bytes_done += self.sources[record.unit].size

    def drop_unit(self, unit: int) -> None:
        """The unit's attempt died: its committed shards stay, the rest is redone."""
        with self._lock:
            self.live.pop(unit, None)
            self.retries += 1

    def snapshot(self, state: str = "running") -> dict[str, Any]:
        with self._lock:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            live = list(self.live.values())
            tokens = self.tokens_done + sum(u["tokens"] for u in live)
            consumed = self.bytes_done + sum(u["source_bytes"] for u in live)
            left = sum(s.size for i, s in enumerate(self.sources) if i not in self.finished)
            left -= sum(u["source_bytes"] for u in live)
            rejected = sum(sum(r.rejected.values()) for r in self.finished.values())
            rejected += sum(u["rejected"] for u in live)
            rate = consumed / elapsed
            return {
                "state": state,
                "executor": self.executor,
                "replicas": self.replicas,
                "units_done": len(self.finished),
                "units_total": len(self.sources),
                "units_running": sorted(self.live),
                "tokens": tokens,
                "tokens_per_s": round(tokens / elapsed, 1),
                "elapsed_s": round(elapsed, 1),
                "eta_s": round(max(left, 0) / rate, 1) if rate > 0 and state == "running" else None,
                "rejected": rejected,
                "retries": self.retries,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }

    def write(self, fs: Any, root: str, state: str = "running") -> dict[str, Any]:
        """Rewrite ``<root>/_progress.json``; returns the snapshot written."""
        snap = self.snapshot(state)
        write_json_atomic(fs, join_url(root, PROGRESS_NAME), snap)
        return snap


def format_progress(snap: dict[str, Any]) -> str:
    """One log line: ``progress [running] | units 3/10 | tokens 1,234 | tok/s 567 | eta ...``."""
    eta = snap.get("eta_s")
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "-"
    return (
        f"progress [{snap['state']}] | units {snap['units_done']}/{snap['units_total']} | "
        f"tokens {snap['tokens']:,} | tok/s {snap['tokens_per_s']:,.0f} | eta {eta_text} | "
        f"rejected {snap['rejected']} | retries {snap['retries']} | replicas {snap['replicas']}"
    )


class _Bar(UnitProgress):
    """The local executor's progress: a tqdm bar over the bytes of all pending sources."""

    def __init__(self, job: JobProgress, total_bytes: int, enabled: bool):
        super().__init__()
        self.job = job
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="labeling",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self._base = 0
        self._tokens = self._sequences = 0

    def start_unit(self, unit: int = -1) -> None:
        super().start_unit(unit)
        self._base = self.bar.n

    def update(self, source_bytes: int, sequences: int = 0, tokens: int = 0, rejected: int = 0) -> None:
        super().update(source_bytes, sequences, tokens, rejected)
        self.job.update_unit(self.snapshot())
        self._tokens += tokens
        self._sequences += sequences
        self.bar.update(self._base + source_bytes - self.bar.n)
        rate = self._tokens / max(time.monotonic() - self.job.start, 1e-9)
        self.bar.set_postfix_str(
            f"seq={self._sequences} tok={self._tokens} tok/s={rate:,.0f} rejected={rejected}",
            refresh=False,
        )

    def close(self) -> None:
        self.bar.close()


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
    fs, root = fsspec.core.url_to_fs(spec.output.url)
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

    batch: list[Sequence] = []

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
    write_json_atomic(fs, join_url(root, COMMITS_DIR, f"unit-{unit:05d}.json"), asdict(record))
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
        bar = _Bar(job, sum(s.size for _, s in pending), show_progress)
        state = "failed"
        try:
            for unit, source in pending:
                mine = unit_commits(plan.fs, plan.root, unit)
                job.finish_unit(run_unit(spec, unit, source, plan.tokenizer, teacher, mine, bar))
                job.write(plan.fs, plan.root)
            state = "done"
        finally:
            bar.close()
            teacher.close()
            job.write(plan.fs, plan.root, state)
    return finish_job(plan)


def _build_manifest(
    spec: JobSpec,
    sources: list[Source],
    tokenizer: Any,
    shards: list[ShardRecord],
    units: dict[int, UnitRecord],
    teacher_info: dict[str, Any],
) -> Manifest:
    keep = []
    for unit, record in sorted(units.items()):
        unit_shards = [s for s in shards if s.unit == unit and s.index < record.shards]
        assert len(unit_shards) == record.shards, f"unit {unit}: missing shard records"
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
    }
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
            "dim": teacher_info.get("hidden_size"),
            "seed": spec.labels.seed,
            "numbering": "0 = embeddings, i = output of decoder layer i, last = after the final norm",
        }
    return Manifest(
        codec=spec.labels.codec,
        products=products,
        k=spec.labels.k,
        teacher=teacher,
        tokenizer=tok,
        corpus=corpus,
        spec_sha256=spec.content_hash(),
        shards=keep,
        units=[units[u] for u in sorted(units)],
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
