"""Do the label datasets, the student model and the loss fit together? Every problem at once.

A training config can be valid on its own (``students validate``) and still not fit the
data it names: sampled KD on labels made without draws, a hidden-state loss on layers the
teacher did not store, a held-out split that leaves nothing to train on. Those rules live
here, as a pure function of what the trainer has already read: the config, the
manifests (``None`` = the dataset is still being written, follow mode), the student's
transformers config and the row-group counts. :func:`check_compatibility` raises one
:class:`CompatibilityError` listing every problem, one per line, the way
:class:`labelgen.contract.configs.ConfigError` does for the config itself.

The tokenizer check is separate (:func:`check_tokenizer`, raising
:class:`TokenizerMismatchError`): it runs as each manifest is read, before anything else.

Imports no torch or transformers: the model config is any object with the attributes
transformers configs have (``num_hidden_layers``, ``final_logit_softcapping``, ...).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from labelgen.contract.format import Manifest, tokenizer_fingerprint
from students.config import StageConfig, TrainConfig

__all__ = [
    "CompatibilityError",
    "TokenizerMismatchError",
    "check_compatibility",
    "check_tokenizer",
    "compatibility_problems",
]

SCALED_LOGIT_FIELDS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
"""Model config fields that make logits differ from ``hidden @ W`` (no fused chunked loss)."""


class TokenizerMismatchError(ValueError):
    """The labels were made with a different tokenizer than the student's."""


class CompatibilityError(ValueError):
    """All problems between the label datasets, the student model and the loss, one per line."""

    def __init__(self, errors: Sequence[str], source: str = "this training run"):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{source} has {len(self.errors)} problem(s):\n{lines}")


def check_tokenizer(labels: dict[str, Any], tokenizer: Any, tokenizer_path: str, url: str) -> None:
    """Refuse labels whose tokenizer fingerprint differs from the student tokenizer's.

    Args:
        labels: the labels' tokenizer record (``Manifest.tokenizer``, or the job's
            ``_commits/tokenizer.json`` while it still writes).
        tokenizer: the student's tokenizer (anything with ``get_vocab()`` and ``len``).
        tokenizer_path: where it was loaded from (for the message).
        url: the label dataset (for the message).

    Raises:
        TokenizerMismatchError: the fingerprints differ.
    """
    mine = tokenizer_fingerprint(tokenizer)
    theirs = labels.get("fingerprint")
    if mine != theirs:
        raise TokenizerMismatchError(
            f"the labels at {url} were made with tokenizer {theirs} "
            f"({labels.get('path')}, vocab {labels.get('vocab_size')}), "
            f"but the student's tokenizer {tokenizer_path} is {mine} (vocab {len(tokenizer)}); "
            "token ids would not line up. Use the teacher's tokenizer for the student, or label "
            "the corpus again with a teacher that shares the student's tokenizer"
        )


def check_compatibility(
    cfg: TrainConfig,
    manifests: Mapping[str, Manifest | None],
    model_config: Any,
    row_groups: Mapping[str, int],
) -> None:
    """Raise :class:`CompatibilityError` listing every problem :func:`compatibility_problems` finds."""
    problems = compatibility_problems(cfg, manifests, model_config, row_groups)
    if problems:
        raise CompatibilityError(problems)


def compatibility_problems(
    cfg: TrainConfig,
    manifests: Mapping[str, Manifest | None],
    model_config: Any,
    row_groups: Mapping[str, int],
) -> list[str]:
    """Every dataset-vs-model-vs-loss problem of ``cfg``, in stage order, without duplicates.

    Args:
        cfg: the (already valid) training config.
        manifests: {url: manifest} of every training dataset (each stage's mixture) and
            every ``data.teachers`` dataset; None where the dataset is still being written.
        model_config: the student's transformers config (``model.config``).
        row_groups: {url: row groups in the dataset}; needed for the first training
            dataset when it provides the held-out split (``data.eval_url`` unset).

    Returns:
        One message per problem (empty when everything fits).
    """
    stages = cfg.resolved_stages()
    problems: list[str] = []
    for stage in stages:
        problems += _sampled_problems(stage, manifests)
        problems += _chunk_problems(stage, model_config)
    problems += _teacher_problems(cfg, manifests)
    for stage in stages:
        problems += _hidden_problems(stage, manifests, model_config)
    problems += _holdout_problems(cfg, stages, manifests, row_groups)
    return list(dict.fromkeys(problems))  # two stages on one dataset report it once


def _sampled_problems(stage: StageConfig, manifests: Mapping[str, Manifest | None]) -> Iterator[str]:
    """Sampled KD needs each dataset complete, labeled with draws, at the loss's temperature."""
    assert stage.mixture is not None and stage.loss is not None  # resolved_stages fills them
    if stage.loss.kind != "sampled":
        return
    for source in stage.mixture:
        manifest = manifests[source.url]
        if manifest is None:  # follow mode, the job is still writing
            yield (
                f"{source.url} is still being written; loss.kind=sampled needs its manifest "
                "(the draws' temperature): wait for the job, or use loss.kind=forward_kl"
            )
            continue
        draws = manifest.products.get("draws")
        if not draws:
            yield (
                f"stage {stage.name!r} uses loss.kind=sampled, but {source.url} has no "
                "random-sampling labels; label with labels.draws=N (e.g. 32), "
                "or use loss.kind=forward_kl"
            )
        elif stage.loss.temperature not in (1.0, draws["temperature"]):
            yield (
                f"loss.temperature={stage.loss.temperature} but the draws at {source.url} were made "
                f"at temperature {draws['temperature']}; sampled KD uses the draws' temperature"
            )


def _chunk_problems(stage: StageConfig, model_config: Any) -> Iterator[str]:
    """The fused chunked loss computes logits as ``hidden @ W``: no softcapping or scaling."""
    assert stage.loss is not None
    if not stage.loss.chunk_tokens:
        return
    for name in SCALED_LOGIT_FIELDS:
        value = getattr(model_config, name, None)
        if value not in (None, 1.0):
            yield (
                f"stage {stage.name!r}: loss.chunk_tokens needs logits = hidden @ W, but this "
                f"student's config sets {name}={value}; set loss.chunk_tokens=0"
            )


def _teacher_problems(cfg: TrainConfig, manifests: Mapping[str, Manifest | None]) -> Iterator[str]:
    """An ensemble joins complete datasets only."""
    for source in cfg.data.teachers:
        if manifests[source.url] is None:
            yield f"data.teachers: {source.url} is still being written; an ensemble needs it complete"


def teacher_hidden_dims(stage: StageConfig, manifests: Mapping[str, Manifest | None]) -> list[int]:
    """The distinct teacher hidden sizes of a stage's datasets that carry hidden states, sorted."""
    assert stage.mixture is not None  # resolved_stages fills it
    products = [m.products.get("hidden") for s in stage.mixture if (m := manifests[s.url]) is not None]
    return sorted({int(p["dim"]) for p in products if p})


def _hidden_problems(
    stage: StageConfig, manifests: Mapping[str, Manifest | None], model_config: Any
) -> Iterator[str]:
    """A hidden-state loss needs the product in every dataset, the mapped teacher layers
    stored, one teacher hidden size, and student layers the student has."""
    assert stage.mixture is not None and stage.loss is not None
    spec = stage.loss.hidden
    if spec is None:
        return
    for source in stage.mixture:
        manifest = manifests[source.url]
        product = manifest.products.get("hidden") if manifest is not None else None
        if not product:
            yield (
                f"stage {stage.name!r} has loss.hidden, but {source.url} has no hidden-state samples "
                "(or is still being written); label with hidden.layers set, or drop loss.hidden"
            )
            continue
        missing = sorted(set(spec.layer_map.values()) - set(product["layers"]))
        if missing:
            yield (
                f"loss.hidden.layer_map uses teacher layer(s) {missing}, but {source.url} stores "
                f"layers {product['layers']}; map to stored layers"
            )
    dims = teacher_hidden_dims(stage, manifests)
    if len(dims) > 1:
        yield f"stage {stage.name!r}: its datasets' teacher hidden sizes differ ({sorted(dims)})"
    n_states = model_config.num_hidden_layers + 1
    bad = sorted(s for s in spec.layer_map if s >= n_states)
    if bad:
        yield (
            f"loss.hidden.layer_map uses student layer(s) {bad}, but the student has "
            f"{n_states - 1} layers (0 = embeddings .. {n_states - 1})"
        )


def _holdout_problems(
    cfg: TrainConfig,
    stages: Sequence[StageConfig],
    manifests: Mapping[str, Manifest | None],
    row_groups: Mapping[str, int],
) -> Iterator[str]:
    """Without data.eval_url the first training dataset gives up its last row groups."""
    n = cfg.data.holdout_row_groups
    if cfg.data.eval_url or n == 0:
        return
    assert stages[0].mixture is not None
    url = stages[0].mixture[0].url
    if manifests[url] is None:  # still being written: no held-out set (evaluate() reports none)
        return
    count = row_groups[url]
    if n >= count:
        yield (
            f"data.holdout_row_groups={n} leaves nothing to train on ({count} row groups in {url}); "
            "lower it or set data.eval_url"
        )
