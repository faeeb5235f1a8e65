"""Generation shard writer: the kept and rejected samples of a unit, with their labels, committed together.

One shard of a generation job is up to four files (:mod:`labelgen.contract.generation`):
the kept samples (``generations/``), the rejected ones (``rejected/``, with
``generate.keep_rejected``), and the label shard of the kept samples with its hidden-state
file (``shards/``, ``hidden/``, with ``generate.labels``; written by a
:class:`labelgen.writer.ShardWriter` that leaves its records to this writer). All are
written to local temporary files and published when the shard is due; the one
:class:`~labelgen.contract.generation.GenerationShardRecord` that names them is written
last, so a shard is committed whole or not at all. Shards close only at batch
boundaries, so a prompt's samples always share a shard, and a resumed unit forms the
same batches.

A shard is due when its generation file or its label shard reaches ``output.shard_mib``.
A shard whose samples were all rejected has no label shard (its record's ``labels`` is
null); label shards are numbered 0, 1, ... within the unit by themselves (as a labeling
job's are), so a label shard's number may be below its generation shard's.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from labelgen.checks import GenerationStats, Verdict
from labelgen.contract.commits import CommitLog
from labelgen.contract.format import ShardRecord, join_url, shard_name
from labelgen.contract.generation import (
    CHECK_NAMES,
    GENERATIONS_DIR,
    REJECTED_DIR,
    GenerationShardRecord,
    first_response_position,
    generation_schema,
    label_sample_id,
)
from labelgen.contract.storage import MIB, publish_file
from labelgen.labels import Generation, SequenceLabels
from labelgen.packing import PackedSequence
from labelgen.prompts import Prompt
from labelgen.spec import JobSpec
from labelgen.writer import ShardWriter, _sha256_file

__all__ = ["GenerationWriter", "SampleRow", "ResumePoint", "resume_point"]


@dataclass(frozen=True)
class SampleRow:
    """One sample as it is stored (kept or rejected)."""

    prompt: Prompt
    sample: int
    seed: int
    output: Generation
    verdict: Verdict
    passed: int  # samples of its prompt that passed the checks


class _ParquetFile:
    """Rows buffered and written a row group at a time to a local temporary file."""

    def __init__(self, path: str, schema: pa.Schema, compression_level: int, row_group_bytes: int):
        self.path, self.schema = path, schema
        self.row_group_bytes = row_group_bytes
        self._sink = pa.OSFile(path, "wb")
        self._writer = pq.ParquetWriter(
            self._sink, schema, compression="zstd", compression_level=compression_level
        )
        self._rows: list[dict[str, Any]] = []
        self._buffered = 0
        self.flushed = 0

    @property
    def rows(self) -> int:
        """Rows added, flushed or not."""
        return self.flushed + len(self._rows)

    def add(self, row: dict[str, Any], size: int) -> None:
        self._rows.append(row)
        self._buffered += size
        if self._buffered >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        if self._rows:
            table = pa.Table.from_pylist(self._rows, schema=self.schema)
            self._writer.write_table(table, row_group_size=table.num_rows)
            self.flushed += table.num_rows
            self._rows.clear()
            self._buffered = 0

    def written(self) -> int:
        return self._sink.tell() + self._buffered // 4

    def close(self) -> None:
        self.flush()
        self._writer.close()
        self._sink.close()


class GenerationWriter:
    """Writes the shards of one generation unit (see the module doc)."""

    def __init__(
        self,
        spec: JobSpec,
        unit: int,
        first_shard: int,
        first_prompt: int,
        first_sequence: int,
        first_label_shard: int,
    ):
        assert spec.generate is not None
        self.spec, self.gen, self.unit = spec, spec.generate, unit
        self.fs, self.root = fsspec.core.url_to_fs(spec.output.url)
        self.commits = CommitLog(self.fs, self.root)
        out = spec.output
        self.shard_bytes = int(out.shard_mib * MIB)
        self.row_group_bytes = int(out.row_group_mib * MIB)
        self.next_shard = first_shard
        self.next_prompt = first_prompt
        self.committed: list[GenerationShardRecord] = []
        self.labels: ShardWriter | None = None
        if self.gen.labels:
            self.labels = ShardWriter(
                out.url,
                unit,
                spec.labels.k,
                first_shard=first_label_shard,
                first_sequence=first_sequence,
                shard_mib=out.shard_mib,
                row_group_mib=out.row_group_mib,
                compression_level=out.compression_level,
                draws=spec.labels.draws > 0,
                codec=spec.labels.codec,
                hidden_layers=tuple(spec.hidden.layers),
                hidden_dtype=spec.hidden.dtype,
                record_commits=False,
            )
        self._tmp_dir = tempfile.mkdtemp(prefix="labelgen-gen-")
        self._kept: _ParquetFile | None = None
        self._rejected: _ParquetFile | None = None
        self._open_shard()

    # -- rows -------------------------------------------------------------------------
    def add(self, row: SampleRow, labels: SequenceLabels | None) -> None:
        """Add one sample: kept ones go to the generation file (and with ``labels`` to the
        label shard), rejected ones to the rejected file when the job keeps them."""
        kept = row.verdict.kept
        if kept:
            assert self._kept is not None
            if self.labels is not None:
                assert labels is not None, "kept samples of a job with labels have labels"
                self.labels.add(self._sequence(row), labels)
            self._kept.add(self._row(row), self._size(row))
        elif self._rejected is not None:
            self._rejected.add(self._row(row), self._size(row))
        self._samples += 1
        self._tokens += len(row.output.token_ids)

    def end_batch(self, prompts: int, stats: GenerationStats) -> None:
        """After each batch of ``prompts`` prompts (whose verdicts ``stats`` counts): commit the
        shard if it is due."""
        self.next_prompt += prompts
        self._stats.merge(stats)
        assert self._kept is not None
        due = self._kept.written() >= self.shard_bytes
        due = due or (self._rejected is not None and self._rejected.written() >= self.shard_bytes)
        if self.labels is not None:
            self.labels.flush_full_row_group()
            due = due or self.labels.shard_due()
        if due:
            self._commit()

    def close(self) -> list[GenerationShardRecord]:
        """Commit what is left; returns the records this writer committed."""
        if self.next_prompt > self._first_prompt:
            self._commit()
        self._discard()  # the shard opened after the last commit: empty
        if self.labels is not None:
            self.labels.close()
        os.rmdir(self._tmp_dir)
        return self.committed

    # -- internals --------------------------------------------------------------------
    def _sequence(self, row: SampleRow) -> PackedSequence:
        """The label row of a kept sample: prompt + response, only response tokens targets."""
        import numpy as np

        prompt, response = row.prompt.ids, row.output.token_ids
        ids = np.concatenate([prompt, response]).astype(np.int32)
        mask = np.zeros(len(ids) - 1, dtype=np.uint8)
        mask[first_response_position(len(prompt)) :] = 1
        return PackedSequence(label_sample_id(row.prompt.prompt_id, row.sample), ids, mask)

    def _row(self, row: SampleRow) -> dict[str, Any]:
        p, out, v = row.prompt, row.output, row.verdict
        messages = [{"role": m["role"], "content": m["content"]} for m in p.messages]
        return {
            "prompt_id": p.prompt_id,
            "sample": row.sample,
            "messages": [*messages, {"role": "assistant", "content": out.text}],
            "prompt": messages,
            "prompt_ids": p.ids.tolist(),
            "response": out.text,
            "response_ids": out.token_ids.tolist(),
            "finish_reason": out.finish_reason,
            "mean_logprob": out.mean_logprob if math.isfinite(out.mean_logprob) else None,
            "seed": row.seed,
            "reference": p.reference,
            "answer": v.answer,
            "checks": {name: v.results.get(name) for name in CHECK_NAMES},
            "reject_reason": v.reason,
            "check_detail": v.detail,
            "score": v.score,
            "prompt_samples": self.gen.n,
            "prompt_passed": row.passed,
            "label_sample_id": label_sample_id(p.prompt_id, row.sample) if v.kept and self.labels else None,
        }

    @staticmethod
    def _size(row: SampleRow) -> int:
        text = sum(len(m["content"]) for m in row.prompt.messages) * 2 + len(row.output.text) * 2
        return text + 4 * (len(row.prompt.ids) + len(row.output.token_ids)) + 128

    def _open_shard(self) -> None:
        name = shard_name(self.unit, self.next_shard)
        level = self.spec.output.compression_level
        schema = generation_schema()
        self._kept = _ParquetFile(
            os.path.join(self._tmp_dir, f"{name}.parquet"), schema, level, self.row_group_bytes
        )
        self._rejected = None
        if self.gen.keep_rejected:
            self._rejected = _ParquetFile(
                os.path.join(self._tmp_dir, f"{name}.rejected.parquet"), schema, level, self.row_group_bytes
            )
        self._first_prompt = self.next_prompt
        self._samples = self._tokens = 0
        self._stats = GenerationStats()

    def _discard(self) -> None:
        for part in (self._kept, self._rejected):
            if part is not None:
                part.close()
                os.remove(part.path)
        self._kept = self._rejected = None

    def _publish(self, part: _ParquetFile, directory: str) -> tuple[str, int, str]:
        part.close()
        rel = f"{directory}/{shard_name(self.unit, self.next_shard)}.parquet"
        size, digest = os.path.getsize(part.path), _sha256_file(part.path)
        publish_file(self.fs, part.path, join_url(self.root, rel))
        return rel, size, digest

    def _commit(self) -> None:
        assert self._kept is not None
        labels: ShardRecord | None = self.labels.commit_shard() if self.labels is not None else None
        rejected: dict[str, Any] = {}
        if self._rejected is not None:
            rows = self._rejected.rows
            path, size, digest = self._publish(self._rejected, REJECTED_DIR)
            rejected = {
                "rejected_path": path,
                "rejected_rows": rows,
                "rejected_bytes": size,
                "rejected_sha256": digest,
            }
        rows = self._kept.rows
        path, size, digest = self._publish(self._kept, GENERATIONS_DIR)
        record = GenerationShardRecord(
            path=path,
            unit=self.unit,
            index=self.next_shard,
            rows=rows,
            bytes=size,
            sha256=digest,
            first_prompt=self._first_prompt,
            next_prompt=self.next_prompt,
            samples=self._samples,
            tokens=self._tokens,
            stats=self._stats.to_dict(),
            labels=labels,
            **rejected,
        )
        self.commits.write_generation(record)
        self.committed.append(record)
        self.next_shard += 1
        self._open_shard()


@dataclass(frozen=True)
class ResumePoint:
    """Where a unit's writer starts again, from its committed generation records."""

    committed: list[GenerationShardRecord]  # numbered 0, 1, ... without a gap, as the writer left them
    next_prompt: int
    next_sequence: int  # the next label row's unit-local index
    next_label_shard: int


def resume_point(committed: list[GenerationShardRecord]) -> ResumePoint:
    """The resume point of a unit with these committed generation records."""
    usable = [r for i, r in enumerate(sorted(committed, key=lambda r: r.index)) if r.index == i]
    with_labels = [r.labels for r in usable if r.labels is not None]
    return ResumePoint(
        committed=usable,
        next_prompt=usable[-1].next_prompt if usable else 0,
        next_sequence=with_labels[-1].next_sequence if with_labels else 0,
        next_label_shard=len(with_labels),
    )
