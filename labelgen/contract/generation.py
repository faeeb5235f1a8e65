"""The generation format: what a ``labelgen generate`` job writes beside its label shards.

A generation job (sequence-level distillation) writes, under its output URL::

    generations/part-UUUUU-SSSSS.parquet   the kept samples: a chat SFT set (a ``messages``
                                           column), one row per (prompt, sample)
    rejected/part-UUUUU-SSSSS.parquet      the rejected samples, with their reasons
                                           (only with generate.keep_rejected)
    shards/part-UUUUU-SSSSS.parquet        teacher labels of the kept samples (generate.labels):
    hidden/part-UUUUU-SSSSS.parquet        the ordinary label format, prompt positions masked
    _commits/gen-UUUUU-SSSSS.json          one record per shard: every file above, committed together
    manifest.json                          written last; ``generation`` holds the generation part

``datasets.load_dataset("parquet", data_files=f"{url}/generations/*.parquet")`` reads the
kept samples as a chat SFT set. Label shards are numbered within their unit by themselves
(a shard whose samples were all rejected has none), so ``shards/part-U-S`` need not be the
labels of ``generations/part-U-S``: a generation record names its label shard. The label
row of a kept sample has the sample id ``<prompt_id>.<sample>`` (``prompt_id`` =
``<source>#<record>``), the generation row's ``label_sample_id``; a prompt's samples always
sit in the same shard.

A :class:`GenerationShardRecord` is the commit point of one shard: it is written after
its generation, rejected, label and hidden files are all published, so a crash leaves
either all of them committed or none (a file without a record is rewritten on resume).

This module imports only the standard library and pyarrow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from labelgen.contract.format import (
    ShardRecord,
    _check_optional_path_field,
    _check_path_field,
)
from labelgen.contract.records import parse_record

__all__ = [
    "GENERATIONS_DIR",
    "REJECTED_DIR",
    "CHECK_NAMES",
    "generation_schema",
    "label_sample_id",
    "first_response_position",
    "GenerationShardRecord",
    "manifest_generation_shards",
]

GENERATIONS_DIR = "generations"
REJECTED_DIR = "rejected"
CHECK_NAMES = ("finished", "length", "format", "reference", "user", "unique")
"""The checks a sample's ``checks`` struct reports (null: off, or not reached)."""

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def generation_schema() -> pa.Schema:
    """Columns of a generation (or rejected) shard, one row per sample."""
    return pa.schema(
        [
            ("prompt_id", pa.string()),  # "<source>#<record>"
            ("sample", pa.int32()),  # sample index within the prompt, 0..n-1
            ("messages", pa.list_(_MESSAGE)),  # prompt messages + the assistant response
            ("prompt", pa.list_(_MESSAGE)),  # the prompt's messages (a text prompt: one user message)
            ("prompt_ids", pa.list_(pa.int32())),  # the token ids the engine was given
            ("response", pa.string()),
            ("response_ids", pa.list_(pa.int32())),
            ("finish_reason", pa.string()),  # "stop" (EOS or a stop string/id) | "length" | ...
            ("mean_logprob", pa.float32()),  # teacher mean raw log-prob of the response (null: none)
            ("seed", pa.int64()),  # the sampling seed of this (prompt, sample)
            ("reference", pa.string()),  # the record's reference answer (null: none)
            ("answer", pa.string()),  # the final answer taken from the response (null: none)
            ("checks", pa.struct([(name, pa.bool_()) for name in CHECK_NAMES])),
            ("reject_reason", pa.string()),  # null for kept samples
            ("check_detail", pa.string()),  # the user check's reason, if it gave one
            ("score", pa.float32()),  # the best_of_n score (null under other policies)
            ("prompt_samples", pa.int32()),  # samples drawn for this prompt (n)
            ("prompt_passed", pa.int32()),  # of which passed the checks: pass@n per prompt
            ("label_sample_id", pa.string()),  # its label row's sample_id (null: no labels)
        ]
    )


def first_response_position(prompt_tokens: int) -> int:
    """The label position of a sample's first response token (position t holds token t+1):
    positions before it are the prompt's, masked in the sample's label row."""
    return prompt_tokens - 1


def label_sample_id(prompt_id: str, sample: int) -> str:
    """The label-row sample id of sample ``sample`` of ``prompt_id``."""
    return f"{prompt_id}.{sample}"


@dataclass(frozen=True)
class GenerationShardRecord:
    """One committed shard of a generation job (the kept samples' file, and with it the
    rejected samples' file and the label shard, when the job writes them)."""

    path: str  # generations/part-UUUUU-SSSSS.parquet, relative to the dataset root
    unit: int
    index: int  # shard index within the unit
    rows: int  # kept samples in the file
    bytes: int
    sha256: str
    first_prompt: int  # unit-local index of the first prompt in the shard
    next_prompt: int  # one past the last
    samples: int  # samples drawn for these prompts (kept + rejected)
    tokens: int  # response tokens generated for them
    rejected_path: str = ""  # rejected/part-...parquet, or ""
    rejected_rows: int = 0
    rejected_bytes: int = 0
    rejected_sha256: str = ""
    stats: dict[str, Any] = field(default_factory=dict)  # the shard's sample counts (GenerationStats)
    labels: ShardRecord | None = None  # the label shard of the kept samples, or None

    def __post_init__(self) -> None:
        _check_path_field(self.path, "generation record field 'path'")
        _check_optional_path_field(self.rejected_path, "generation record field 'rejected_path'")

    @classmethod
    def from_dict(cls, data: object, where: str) -> GenerationShardRecord:
        """A record from parsed JSON, every field checked; FormatError naming ``where`` otherwise."""
        return parse_record(cls, data, where)


def manifest_generation_shards(generation: dict[str, Any], where: str) -> list[GenerationShardRecord]:
    """The generation shard records a manifest's ``generation`` section lists (none for a
    labeling job's manifest); FormatError naming ``where`` for a record that is not one."""
    shards = generation.get("shards", [])
    if not isinstance(shards, list):
        from labelgen.contract.errors import FormatError

        raise FormatError(f"{where} field 'generation.shards' must be a list of generation shard records")
    return [
        GenerationShardRecord.from_dict(item, f"{where} generation.shards[{i}]")
        for i, item in enumerate(shards)
    ]
