"""The local runner: run a labeling job's work units in this process, resumably.

Work units are the job's sources, in sorted order. A unit reads and packs its source,
sends sequences to the teacher in batches of ``teacher.batch_sequences`` and writes
shards. Committed shards and finished units leave records under ``_commits/``; a
re-run of the same spec skips finished units, and inside an unfinished unit skips
the sequences its committed shards already hold, so a killed job re-run ends with
exactly the rows of an uninterrupted run. ``manifest.json`` is written last.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import fsspec
import yaml
from tqdm import tqdm

from labelgen.contract.format import (
    COMMITS_DIR,
    MANIFEST_NAME,
    SPEC_NAME,
    Manifest,
    ShardRecord,
    UnitRecord,
    join_url,
)
from labelgen.corpus import Source, read_source, resolve_sources, source_sha256
from labelgen.packing import Sequence, pack
from labelgen.provenance import check_model_path, load_tokenizer, tokenizer_info, weights_fingerprint
from labelgen.spec import JobSpec
from labelgen.teacher import Teacher, load_teacher
from labelgen.writer import ShardWriter, write_json_atomic, write_text_atomic

__all__ = ["JobError", "run_job", "run_unit", "read_commits"]


class JobError(RuntimeError):
    """The job cannot run as specified (output conflict, changed corpus, ...)."""


def read_commits(fs: Any, root: str) -> tuple[list[ShardRecord], dict[int, UnitRecord]]:
    """Committed shard records (sorted) and finished unit records under ``root``."""
    directory = join_url(root, COMMITS_DIR)
    if not fs.exists(directory):
        return [], {}
    shards, units = [], {}
    for path in sorted(fs.ls(directory, detail=False)):
        name = path.rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            continue
        with fs.open(path, "r") as f:
            data = json.load(f)
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


class _Progress:
    """One progress bar over the bytes of all pending sources, with token counters."""

    def __init__(self, total_bytes: int, enabled: bool):
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            desc="labeling",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.sequences = self.tokens = self.rejected = 0
        self.start = time.monotonic()
        self._base = 0

    def start_unit(self) -> None:
        self._base = self.bar.n

    def update(self, source_bytes: int, sequences: int = 0, tokens: int = 0, rejected: int = 0) -> None:
        self.sequences += sequences
        self.tokens += tokens
        self.rejected = rejected
        self.bar.update(self._base + source_bytes - self.bar.n)
        rate = self.tokens / max(time.monotonic() - self.start, 1e-9)
        self.bar.set_postfix_str(
            f"seq={self.sequences} tok={self.tokens} tok/s={rate:,.0f} rejected={self.rejected}",
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
    progress: _Progress,
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

    progress.start_unit()
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
    progress.update(source.size)
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
    """Run (or finish) a labeling job on this machine and return its manifest."""
    sources = resolve_sources(spec.corpus)  # unreadable corpus URLs fail before the model loads
    check_model_path(spec.teacher.model)
    tokenizer = load_tokenizer(spec.teacher)
    fs, root = fsspec.core.url_to_fs(spec.output.url)
    done = _prepare_output(spec, fs, root, sources)
    if done is not None:
        log(f"{spec.output.url} is already complete ({done.totals['rows']} sequences); nothing to do")
        return done
    shards, units = read_commits(fs, root)
    pending = [(i, s) for i, s in enumerate(sources) if i not in units]
    log(f"{len(sources)} source(s), {len(units)} already labeled, {len(pending)} to go")
    teacher_path = join_url(root, COMMITS_DIR, "teacher.json")
    if pending:
        teacher = teacher_factory(spec)
        write_json_atomic(fs, teacher_path, teacher.provenance())
        progress = _Progress(sum(s.size for _, s in pending), show_progress)
        try:
            for unit, source in pending:
                mine = [r for r in shards if r.unit == unit]
                units[unit] = run_unit(spec, unit, source, tokenizer, teacher, mine, progress)
        finally:
            progress.close()
            teacher.close()
        shards, units = read_commits(fs, root)
    with fs.open(teacher_path, "r") as f:
        teacher_info = json.load(f)
    manifest = _build_manifest(spec, sources, tokenizer, shards, units, teacher_info)
    write_text_atomic(fs, join_url(root, MANIFEST_NAME), manifest.to_json())
    return manifest


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
