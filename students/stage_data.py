"""What each training stage reads: checked manifests, the held-out split, the stage's stream.

    read_manifests()   every training / teacher dataset's manifest, tokenizer-checked once
    held_out_split()   data.eval_url, else the last row groups of the first training dataset
    build_stream()     a stage's LabelStream, MixtureStream over several, or EnsembleStream

The trainer reads batches from a stream with :func:`students.loader.make_loader`. In
follow mode a dataset still being written has no manifest yet (None): its tokenizer is
checked against the job's pending record, and its stream picks up shards as they land.
Imports no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import fsspec

from labelgen.contract.commits import CommitLog
from labelgen.contract.dataset import read_manifest_if_complete
from labelgen.contract.format import FormatError, Manifest
from students.compatibility import check_tokenizer
from students.config import DataConfig, StageConfig
from students.ensemble import EnsembleStream
from students.mixture import MixtureStream
from students.stream import LabelStream, RowGroupRef, open_dataset, row_group_refs

__all__ = [
    "HeldOut",
    "build_stream",
    "ensemble_weights",
    "held_out_split",
    "label_urls",
    "read_checked",
    "read_manifests",
    "reads_ensemble",
    "row_group_counts",
]

Log = Callable[[str], None]


class HeldOut(NamedTuple):
    """The evaluation set: a dataset and the row groups of it to evaluate on."""

    url: str
    manifest: Manifest | None
    """None only in follow mode without data.eval_url (then ``refs`` is empty)."""
    refs: list[RowGroupRef]
    """Empty: no held-out set (``Trainer.evaluate`` reports nothing)."""


def label_urls(stages: list[StageConfig], data: DataConfig) -> list[str]:
    """Every training dataset of every stage, then every data.teachers dataset, each once."""
    urls = [source.url for stage in stages for source in stage.mixture or []]
    return list(dict.fromkeys([*urls, *(t.url for t in data.teachers)]))


def read_checked(url: str, tokenizer: Any, tokenizer_path: str) -> Manifest:
    """The manifest of the complete dataset ``url``, checked against the student's tokenizer."""
    manifest, _, _ = open_dataset(url)
    check_tokenizer(manifest.tokenizer, tokenizer, tokenizer_path, url)
    return manifest


def read_manifests(
    urls: list[str], follow: bool, tokenizer: Any, tokenizer_path: str, log: Log
) -> dict[str, Manifest | None]:
    """{url: manifest} of ``urls``, each checked against the student's tokenizer.

    With ``follow`` a dataset whose labeling job still writes maps to None, its tokenizer
    checked against the job's pending record; otherwise every dataset must be complete.

    Raises:
        TokenizerMismatchError: a dataset was made with another tokenizer (the first found).
        FormatError: a dataset is missing (or, following, its job has not started).
    """
    manifests: dict[str, Manifest | None] = {}
    for url in urls:
        if not follow:
            manifests[url] = read_checked(url, tokenizer, tokenizer_path)
            continue
        fs, root = fsspec.core.url_to_fs(url)
        manifest = read_manifest_if_complete(fs, root)
        if manifest is None:
            check_tokenizer(_pending_tokenizer(fs, root, url), tokenizer, tokenizer_path, url)
            log(f"following {url}: the labeling job is still writing; new shards are read as they land")
        else:
            check_tokenizer(manifest.tokenizer, tokenizer, tokenizer_path, url)
        manifests[url] = manifest
    return manifests


def _pending_tokenizer(fs: Any, root: str, url: str) -> dict[str, Any]:
    """The tokenizer record of a job that is still writing ``url`` (written before the first shard)."""
    record = CommitLog(fs, root).tokenizer()
    if record is None:
        raise FormatError(
            f"{url} has no manifest and no tokenizer record: it is not a labeling job's output (or the "
            "job has not started); check data.url"
        )
    return record


def row_group_counts(manifests: Mapping[str, Manifest | None]) -> dict[str, int]:
    """{url: row groups} of the complete datasets."""
    return {url: len(row_group_refs(m)) for url, m in manifests.items() if m is not None}


def held_out_split(
    data: DataConfig,
    first_url: str,
    manifests: Mapping[str, Manifest | None],
    eval_manifest: Manifest | None = None,
) -> tuple[HeldOut, dict[str, int]]:
    """(the held-out set, {url: row groups the training streams leave out}).

    Args:
        data: the data config (``eval_url``, ``holdout_row_groups``).
        first_url: the first stage's first dataset, which gives up its last row groups
            when ``data.eval_url`` is unset.
        manifests: as from :func:`read_manifests`.
        eval_manifest: ``data.eval_url``'s manifest (:func:`read_checked`), when set.
    """
    if data.eval_url:
        assert eval_manifest is not None, "read data.eval_url's manifest first (read_checked)"
        return HeldOut(data.eval_url, eval_manifest, row_group_refs(eval_manifest)), {}
    n = data.holdout_row_groups
    manifest = manifests.get(first_url)
    if n == 0 or manifest is None:  # no held-out set: evaluate() reports nothing
        return HeldOut(first_url, manifest, []), {}
    refs = row_group_refs(manifest)
    assert n < len(refs), "holdout_row_groups is checked by students.compatibility"
    return HeldOut(first_url, manifest, refs[len(refs) - n :]), {first_url: n}


def reads_ensemble(stage: StageConfig, data: DataConfig) -> bool:
    """Whether ``stage`` reads data.url joined with the data.teachers labels (an ensemble)."""
    assert stage.mixture is not None  # resolved_stages fills it
    return bool(data.teachers) and len(stage.mixture) == 1 and stage.mixture[0].url == data.url


def ensemble_weights(stage: StageConfig, data: DataConfig) -> list[float]:
    """The teacher weights of ``stage``'s ensemble, data.url's own teacher first, then
    data.teachers in order; empty when the stage reads one teacher."""
    if not reads_ensemble(stage, data):
        return []
    return [data.teacher_weight, *(t.weight for t in data.teachers)]


def build_stream(
    stage: StageConfig,
    index: int,
    data: DataConfig,
    manifests: Mapping[str, Manifest | None],
    holdout: Mapping[str, int],
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    log: Log | None = None,
) -> LabelStream | MixtureStream | EnsembleStream:
    """The training stream of stage ``index``: this rank's share of its dataset, a weighted
    mixture of several, or data.url joined with the other teachers' labels.

    Args:
        stage: the resolved stage (mixture and loss filled in).
        index: its position in the run; the stream's order seed is ``seed + index``.
        data: the data config (batch size, reader options, follow mode, teachers).
        manifests: as from :func:`read_manifests`.
        holdout: {url: last row groups to leave out} (from :func:`held_out_split`).
        seed: the run's seed (train.seed).
        rank, world_size: this process's data-parallel place.
        log: warnings and follow-mode notes.
    """
    assert stage.mixture is not None
    streams = []
    for source in stage.mixture:
        manifest = manifests.get(source.url)
        refs = None
        if manifest is not None and not data.follow:
            refs = row_group_refs(manifest)
            refs = refs[: len(refs) - holdout.get(source.url, 0)]
        streams.append(
            LabelStream(
                source.url,
                manifest,
                refs,
                data.batch_sequences,
                seed=seed + index,
                prefetch=data.prefetch_row_groups,
                rank=rank,
                world_size=world_size,
                num_workers=data.num_workers,
                verify=data.verify,
                follow=data.follow,
                poll_interval=data.poll_seconds,
                follow_timeout=data.follow_timeout_seconds,
                log=log,
                hidden=stage.loss is not None and stage.loss.hidden is not None,
            )
        )
    if reads_ensemble(stage, data):
        others = []
        for teacher in data.teachers:
            manifest = manifests[teacher.url]
            assert manifest is not None, "incomplete data.teachers are refused by students.compatibility"
            others.append((teacher.url, manifest))
        return EnsembleStream(streams[0], others, verify=data.verify, log=log)
    if len(streams) == 1:
        return streams[0]
    return MixtureStream(
        streams,
        [s.weight for s in stage.mixture],
        seed=seed + index,
        names=[s.url for s in stage.mixture],
    )
