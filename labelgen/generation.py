"""Generation units: the teacher writes responses, they are checked, kept and labeled.

:func:`run_generation_unit` is the generation job's counterpart of
:func:`labelgen.runner.run_unit`; the planning, executors (local, Ray), resume and the
manifest-last finish are the labeling job's (:mod:`labelgen.runner`). One unit runs
the overlapped loop of :mod:`labelgen.pipeline`:

- *prepare*: read the unit's records as prompts (:mod:`labelgen.prompts`), skip the
  prompts its committed shards hold, group ``generate.batch_prompts`` prompts;
- *engine*: ``n`` requests per prompt, each with its own seed
  (:func:`labelgen.prompts.sample_seed`); the samples of each prompt are judged
  (:class:`labelgen.checks.Checker`: checks, dedup, the keep policy); with
  ``generate.labels`` the kept samples' prompt + response go through the labeling path
  once more (one prefill, the same extraction hook, draws and hidden states as any
  labeling job: docs/GENERATE.md says why a prefill rather than generation-time
  log-probs);
- *store*: the samples and labels are written by a
  :class:`labelgen.generation_writer.GenerationWriter`, which commits whole batches.

A resumed unit skips the prompts of its committed shards and asks the engine the same
questions the same way (same prompts, batches and seeds).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from labelgen.checks import Checker, GenerationStats, Sample
from labelgen.contract.format import UnitRecord
from labelgen.contract.generation import GenerationShardRecord, first_response_position
from labelgen.corpus import Rejected
from labelgen.generation_writer import GenerationWriter, SampleRow, resume_point
from labelgen.labels import Generation, SequenceLabels
from labelgen.pipeline import DEFAULT_DEPTH, run_overlapped
from labelgen.progress import UnitProgress
from labelgen.prompts import Prompt, build_prompt, prompt_corpus, sample_seed
from labelgen.spec import JobSpec
from labelgen.teacher import Generator
from labelgen.units import WorkUnit, read_unit, unit_sha256

__all__ = ["run_generation_unit", "generation_manifest_part"]


@dataclass(frozen=True)
class _PromptBatch:
    prompts: list[Prompt]
    source_bytes: int
    rejected: int


@dataclass(frozen=True)
class _Judged:
    """One batch after the engine: every sample with its verdict, the kept ones' labels."""

    rows: list[SampleRow]
    labels: dict[int, SequenceLabels]  # row index -> labels (kept rows, generate.labels)
    stats: GenerationStats


def run_generation_unit(
    spec: JobSpec,
    unit: WorkUnit,
    tokenizer: Any,
    teacher: Generator,
    committed: list[GenerationShardRecord],
    progress: UnitProgress,
    depth: int = DEFAULT_DEPTH,
    checker: Checker | None = None,
) -> UnitRecord:
    """Generate, check, keep and label one work unit; resumes after its committed shards."""
    gen = spec.generate
    assert gen is not None, "run_generation_unit runs generation jobs"
    checker = checker or Checker(gen)
    resume = resume_point(committed)
    usable, resume_at = resume.committed, resume.next_prompt
    writer = GenerationWriter(
        spec, unit.index, len(usable), resume_at, resume.next_sequence, resume.next_label_shard
    )
    corpus = prompt_corpus(spec)
    # Room for the response, and for the one token a labeling request of prompt + response asks.
    max_prompt = teacher.max_model_len - gen.max_tokens - 1
    if max_prompt < 1:
        raise ValueError(
            f"generate.max_tokens ({gen.max_tokens}) leaves no room for a prompt within the engine's "
            f"max_model_len ({teacher.max_model_len}); lower generate.max_tokens or raise "
            "teacher.max_model_len"
        )
    rejected: dict[str, int] = {}
    facts: dict[str, Any] = {"prompts": 0}

    def batches() -> Iterator[_PromptBatch]:
        batch: list[Prompt] = []
        for record in read_unit(unit, corpus):
            item = record if isinstance(record, Rejected) else None
            if item is None:
                built = build_prompt(record, unit.sample_prefix, facts["prompts"], tokenizer, gen, max_prompt)
                if isinstance(built, Rejected):
                    item = built
            if item is not None:
                rejected[item.reason] = rejected.get(item.reason, 0) + 1
                continue
            facts["prompts"] += 1
            if built.index < resume_at:
                continue  # in a committed shard
            batch.append(built)
            if len(batch) >= gen.batch_prompts:
                yield _PromptBatch(batch, built.progress, sum(rejected.values()))
                batch = []
        if batch:
            yield _PromptBatch(batch, batch[-1].progress, sum(rejected.values()))
        facts["sha256"] = unit_sha256(unit)

    # The mean log-prob of a kept sample comes from its labels (the prefill computes every
    # response token's log-prob anyway); generation-time log-probs are asked for only where
    # there are no labels, or where best_of_n needs the score before labeling.
    best_by_logprob = gen.keep == "best_of_n" and gen.score == "mean_logprob"
    generation_logprobs = gen.mean_logprob and (not gen.labels or best_by_logprob)

    def engine(batch: _PromptBatch) -> _Judged:
        requests = [
            (p, i, sample_seed(gen.seed, p.prompt_id, i)) for p in batch.prompts for i in range(gen.n)
        ]
        outputs = teacher.generate(
            [p.ids for p, _, _ in requests], [s for _, _, s in requests], gen, generation_logprobs
        )
        if len(outputs) != len(requests):
            raise RuntimeError(f"the engine returned {len(outputs)} responses for {len(requests)} requests")
        rows: list[SampleRow] = []
        stats = GenerationStats()
        for start in range(0, len(requests), gen.n):
            mine = list(zip(requests[start : start + gen.n], outputs[start : start + gen.n], strict=True))
            verdicts = checker.judge([_sample(p, i, out) for (p, i, _), out in mine])
            stats.add(verdicts)
            passed = sum(v.passed for v in verdicts)
            for ((p, i, seed), out), verdict in zip(mine, verdicts, strict=True):
                rows.append(SampleRow(p, i, seed, out, verdict, passed))
        labels: dict[int, SequenceLabels] = {}
        if gen.labels:
            kept = [j for j, row in enumerate(rows) if row.verdict.kept]
            if kept:
                sequences = [np.concatenate([rows[j].prompt.ids, rows[j].output.token_ids]) for j in kept]
                labels = dict(zip(kept, teacher.label(sequences), strict=True))
            if not generation_logprobs and gen.mean_logprob:
                for j, lab in labels.items():
                    start = first_response_position(len(rows[j].prompt.ids))
                    mean = float(np.mean(lab.target_logprobs[start:], dtype=np.float64))
                    rows[j] = replace(rows[j], output=replace(rows[j].output, mean_logprob=mean))
        return _Judged(rows, labels, stats)

    def store(batch: _PromptBatch, judged: _Judged) -> None:
        for j, row in enumerate(judged.rows):
            writer.add(row, judged.labels.get(j))
        writer.end_batch(len(batch.prompts), judged.stats)
        kept = [row for row in judged.rows if row.verdict.kept]
        tokens = sum(len(row.output.token_ids) for row in judged.rows)
        progress.update(batch.source_bytes, len(kept), tokens, batch.rejected)
        progress.add_generation(judged.stats)

    progress.start_unit(unit.index)
    clock = progress.clock
    clock.start()
    run_overlapped(batches(), engine, store, depth=depth, clock=clock)
    progress.update(unit.size, rejected=sum(rejected.values()))
    shards = usable + writer.close()
    clock.stop()
    stats = GenerationStats()
    for shard in shards:
        stats.merge(GenerationStats.from_dict(shard.stats))
    labeled = [s.labels for s in shards if s.labels is not None]
    record = UnitRecord(
        unit=unit.index,
        source=unit.source.url,
        sequences=sum(s.rows for s in labeled),
        tokens=sum(s.tokens for s in labeled),
        shards=len(shards),
        rejected=dict(sorted(rejected.items())),
        source_sha256=facts["sha256"] if unit.whole else "",
        part=unit.part,
        parts=unit.parts,
        range_kind=unit.kind,
        range_start=unit.start,
        range_stop=unit.stop,
        range_sha256="" if unit.whole else facts["sha256"],
        engine_s=round(clock.busy_s, 3),
        wall_s=round(clock.wall_s, 3),
        generation=stats.to_dict(),
    )
    writer.commits.write_unit(record)
    return record


def _sample(prompt: Prompt, index: int, out: Generation) -> Sample:
    return Sample(
        prompt_id=prompt.prompt_id,
        index=index,
        prompt=prompt.messages,
        response=out.text,
        token_ids=tuple(int(t) for t in out.token_ids),
        finish_reason=out.finish_reason,
        mean_logprob=out.mean_logprob,
        reference=prompt.reference,
        record=prompt.fields,
    )


def generation_manifest_part(spec: JobSpec, shards: list[GenerationShardRecord]) -> dict[str, Any]:
    """The manifest's ``generation`` section: how the samples were drawn, checked and kept,
    their counts, and the generation shards."""
    gen = spec.generate
    assert gen is not None
    stats = GenerationStats()
    for shard in shards:
        stats.merge(GenerationStats.from_dict(shard.stats))
    sampling = {
        name: getattr(gen, name)
        for name in (
            "n",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "max_tokens",
            "stop",
            "stop_token_ids",
            "seed",
        )
    }
    return {
        "sampling": {k: list(v) if isinstance(v, tuple) else v for k, v in sampling.items()},
        "checks": asdict(gen.checks),
        "keep": gen.keep,
        "score": gen.score if gen.keep == "best_of_n" else None,
        "labels": gen.labels,
        "stats": stats.to_dict(),
        "totals": {
            "shards": len(shards),
            "kept": sum(s.rows for s in shards),
            "rejected_stored": sum(s.rejected_rows for s in shards),
            "samples": sum(s.samples for s in shards),
            "response_tokens": sum(s.tokens for s in shards),
            "bytes": sum(s.bytes + s.rejected_bytes for s in shards),
        },
        "shards": [asdict(s) for s in shards],
    }
