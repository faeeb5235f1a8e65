"""The student training config: frozen dataclasses loaded from YAML and validated at load.

Example (``manifests/students/tiny-cpu.yaml`` is a complete one)::

    model: {path: /models/student-0.5b}
    data: {url: s3://bucket/labels/run-1, batch_sequences: 16}
    loss: {alpha: 0.5, temperature: 1.0}
    optim: {lr: 3.0e-4, max_steps: 10000}
    train: {output_dir: runs/student-1}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from labelgen.contract.configs import load_config_file
from students.loss_kinds import LOSS_KINDS, LossKind

TRUST_NEEDS = ("signed", "audited")
"""What ``data.require`` may ask of a served dataset (see :class:`DataConfig`)."""

__all__ = [
    "TRUST_NEEDS",
    "ModelConfig",
    "SourceConfig",
    "DataConfig",
    "StageConfig",
    "HiddenLossConfig",
    "LOSS_KINDS",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_train_config",
]


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    """Local directory of a Hugging Face causal LM (weights + tokenizer) to start from."""
    init: dict[str, Any] | None = None
    """Instead of ``path``: a transformers config (must include ``model_type``, e.g. llama)
    to initialise a fresh student from. Needs ``tokenizer``."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``path``. Must match the labels' tokenizer."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""

    def check(self):
        if (self.path is None) == (self.init is None):
            yield "path", "xor model.init must be set (a checkpoint to start from, or a config to initialise)"
        if self.init is not None and "model_type" not in self.init:
            yield "init.model_type", "is required (e.g. llama, qwen2)"
        if self.init is not None and self.tokenizer is None:
            yield "tokenizer", "is required with model.init (the tokenizer the labels were made with)"


@dataclass(frozen=True)
class SourceConfig:
    url: str
    """A label dataset URL (local path, s3://, gs://, http(s)://) written by `labelgen run`."""
    weight: float = 1.0
    """Relative sampling weight in a mixture (normalised over the mixture)."""

    def check(self):
        if not self.weight > 0:
            yield "weight", f"must be > 0, got {self.weight}"


@dataclass(frozen=True)
class DataConfig:
    url: str | None = None
    """Label dataset URL (local path, s3://, gs://, http(s)://) written by `labelgen run`.
    Set this or ``mixture``."""
    mixture: list[SourceConfig] = field(default_factory=list)
    """Instead of ``url``: several label datasets sampled by weight (domain mixing, several
    teachers sharing one tokenizer). The first one provides the held-out set."""
    teachers: list[SourceConfig] = field(default_factory=list)
    """A teacher ensemble: other teachers' label datasets over the same corpus, packing
    and tokenizer. Their labels are joined to every row of ``url`` (by token hash) and
    the KD term becomes the weighted multi-teacher loss (each teacher's divergence over
    its own top-k + tail, weights normalised). Empty: one teacher."""
    teacher_weight: float = 1.0
    """With ``teachers``: the weight of ``url``'s own teacher in the ensemble."""
    batch_sequences: int = 8
    """Sequences per micro-batch (per rank)."""
    eval_url: str | None = None
    """Held-out label dataset for evaluation. None: hold out the last row groups of the
    (first) training dataset."""
    holdout_row_groups: int = 1
    """With eval_url unset: how many row groups (from the end of the dataset) to hold out."""
    prefetch_row_groups: int = 2
    """Row groups read ahead in a background thread."""
    verify: Literal["error", "skip", "off"] = "error"
    """Shard checksums against the manifest: 'error' stops on a corrupt or truncated shard
    (naming the file), 'skip' leaves it out and counts it, 'off' trusts the bytes."""
    follow: bool = False
    """Train while the labeling job is still writing: read committed shards, pick up new
    ones as they land, stop waiting once the manifest says the job is complete."""
    poll_seconds: float = 10.0
    """Follow mode: seconds between looks for newly committed shards."""
    follow_timeout_seconds: float | None = None
    """Follow mode: give up (error) after this long without a new commit (None: wait)."""
    num_workers: int = 0
    """DataLoader worker processes per rank reading and decoding row groups (0: a
    background thread in the training process)."""
    require: list[Any] | str = field(default_factory=list)
    """What must vouch for every dataset this run reads before training starts: 'signed'
    (a valid signature by a key of the dataset's team on its manifest) and/or 'audited' (a
    passing ``labelgen audit`` the service trusts). Checked with the dataset service for
    every URL the run reads (url, mixture, teachers, stages, eval_url), which therefore
    must all be ``labelgen://`` URLs: a plain path or bucket URL has no signatures or
    audits and is refused. A missing one stops the run, naming it. Empty: no check;
    ``require: signed`` is short for ``[signed]``."""

    def check(self):
        if (self.url is None) == (not self.mixture):
            yield "url", "xor data.mixture must be set (one label dataset, or a weighted list of them)"
        if self.batch_sequences < 1:
            yield "batch_sequences", f"must be >= 1, got {self.batch_sequences}"
        if self.holdout_row_groups < 0:
            yield "holdout_row_groups", f"must be >= 0, got {self.holdout_row_groups}"
        if self.prefetch_row_groups < 0:
            yield "prefetch_row_groups", f"must be >= 0, got {self.prefetch_row_groups}"
        if self.num_workers < 0:
            yield "num_workers", f"must be >= 0, got {self.num_workers}"
        if self.teachers and self.url is None:
            yield (
                "teachers",
                "needs data.url (the dataset whose rows the other teachers' labels are joined to)",
            )
        if self.teachers and self.follow:
            yield "teachers", "cannot be used with data.follow (every teacher's dataset must be complete)"
        if self.teacher_weight < 0:
            yield "teacher_weight", f"must be >= 0, got {self.teacher_weight}"
        if self.follow and len(self.sources) > 1:
            yield "follow", "works with one dataset (data.url), not a mixture"
        if self.poll_seconds <= 0:
            yield "poll_seconds", f"must be > 0, got {self.poll_seconds}"
        if self.follow and self.eval_url is None and self.holdout_row_groups:
            yield "eval_url", "is required with data.follow (the held-out rows must exist before training)"
        single = isinstance(self.require, str)
        for i, need in enumerate([self.require] if single else self.require):
            if need not in TRUST_NEEDS:
                yield (
                    "require" if single else f"require[{i}]",
                    f"must be one of {', '.join(TRUST_NEEDS)}, got {need!r} "
                    "(e.g. data.require=[signed, audited])",
                )

    @property
    def trust_needs(self) -> tuple[str, ...]:
        """``require`` as a tuple, each need once, in the order given (a string is one need)."""
        given = [self.require] if isinstance(self.require, str) else list(self.require)
        return tuple(dict.fromkeys(given))

    @property
    def sources(self) -> list[SourceConfig]:
        """The training datasets as a list (one entry when ``url`` is set)."""
        return [SourceConfig(self.url)] if self.url is not None else list(self.mixture)


@dataclass(frozen=True)
class HiddenLossConfig:
    layer_map: dict[int, int]
    """{student layer: teacher layer}, HF numbering (0 = embeddings, i = output of layer i);
    the teacher layers must be among the dataset's hidden.layers."""
    weight: float = 1.0
    """Weight of the hidden-state term, added to the KD/CE mix."""
    kind: Literal["mse", "cosine"] = "mse"
    """'mse' on the projected student state, or 'cosine' distance (1 - cos)."""

    def check(self):
        if not self.layer_map:
            yield "layer_map", "must map at least one student layer to a teacher layer, e.g. {2: 16}"
        for s_layer, t_layer in self.layer_map.items():
            if not (isinstance(s_layer, int) and isinstance(t_layer, int) and s_layer >= 0 and t_layer >= 0):
                yield "layer_map", f"entries must be integer layer ids >= 0, got {s_layer!r}: {t_layer!r}"
        if self.weight < 0:
            yield "weight", f"must be >= 0, got {self.weight}"


@dataclass(frozen=True)
class LossConfig:
    kind: LossKind = "forward_kl"
    """The KD term, over the stored top-k plus the tail bucket: 'forward_kl' KL(p||q),
    'reverse_kl' KL(q||p), 'jsd' generalized Jensen-Shannon (``beta``), 'skew_kl' /
    'skew_reverse_kl' (``skew``), 'tvd' total variation. 'sampled': cross-entropy to the
    stored random draws (unbiased for the full-vocabulary KL gradient; needs labels made
    with labels.draws > 0; the temperature is the draws' own). See docs/LOSSES.md."""
    alpha: float = 0.5
    """Weight of the KD term; CE on the real next token gets 1 - alpha. 1.0 = pure KD,
    0.0 = plain CE (no teacher)."""
    temperature: float = 1.0
    """Softening T of both distributions (the start value under a schedule); the KD term
    is multiplied by T²."""
    temperature_end: float | None = None
    """With a schedule: T at the end of the stage (None = constant ``temperature``)."""
    temperature_schedule: Literal["linear", "cosine"] = "linear"
    """How T moves from ``temperature`` to ``temperature_end`` over the stage's steps."""
    beta: float = 0.5
    """'jsd' only: the mixture weight of the generalized JSD (0 and 1 are KL limits)."""
    skew: float = 0.1
    """'skew_kl' / 'skew_reverse_kl' only: the mixing weight of the skewed distribution."""
    hidden: HiddenLossConfig | None = None
    """Feature distillation: match the teacher's stored hidden states (labels made with
    hidden.layers) through a learned projection per mapped layer. None: off."""
    chunk_tokens: int = 0
    """> 0: compute the loss fused with the output projection in chunks of this many tokens,
    so the full-vocabulary logits are never held for the whole batch (large vocabularies).
    0: plain path."""

    def check(self):
        if not 0.0 <= self.alpha <= 1.0:
            yield "alpha", f"must be in [0, 1], got {self.alpha}"
        if self.temperature <= 0:
            yield "temperature", f"must be > 0, got {self.temperature}"
        if self.temperature_end is not None and self.temperature_end <= 0:
            yield "temperature_end", f"must be > 0, got {self.temperature_end}"
        if self.temperature_end is not None and self.kind == "sampled":
            yield "temperature_end", "cannot be used with kind 'sampled' (the draws fix the temperature)"
        if not 0.0 <= self.beta <= 1.0:
            yield "beta", f"must be in [0, 1], got {self.beta}"
        if not 0.0 <= self.skew < 1.0:
            yield "skew", f"must be in [0, 1), got {self.skew}"
        if self.chunk_tokens < 0:
            yield "chunk_tokens", f"must be >= 0, got {self.chunk_tokens}"

    def temperature_at(self, step: int, steps: int) -> float:
        """T at ``step`` (0-based) of a stage of ``steps`` steps."""
        if self.temperature_end is None:
            return self.temperature
        progress = min(step / max(steps - 1, 1), 1.0)
        if self.temperature_schedule == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * progress))
        return self.temperature + (self.temperature_end - self.temperature) * progress


@dataclass(frozen=True)
class StageConfig:
    steps: int
    """Optimizer steps in this stage."""
    name: str = ""
    """A label for logs and metrics (default: stage<i>)."""
    mixture: list[SourceConfig] | None = None
    """This stage's training data (None: data.url / data.mixture)."""
    loss: LossConfig | None = None
    """This stage's objective, replacing the top-level ``loss`` entirely (fields not given
    take their defaults). None: the top-level loss."""

    def check(self):
        if self.steps < 1:
            yield "steps", f"must be >= 1, got {self.steps}"
        if self.mixture is not None and not self.mixture:
            yield "mixture", "must list at least one dataset (or be left out)"


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate decay after warm-up (cosine decays to 10% of lr)."""
    max_steps: int | None = None
    """Optimizer steps (default 1000). With ``stages``: leave unset (it is their sum)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""

    def check(self):
        if self.lr <= 0:
            yield "lr", f"must be > 0, got {self.lr}"
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"must be two numbers in [0, 1), got {list(self.betas)}"
        if self.max_steps is not None and self.max_steps < 1:
            yield "max_steps", f"must be >= 1, got {self.max_steps}"
        if self.grad_accum < 1:
            yield "grad_accum", f"must be >= 1, got {self.grad_accum}"
        if self.warmup_steps < 0:
            yield "warmup_steps", f"must be >= 0, got {self.warmup_steps}"


@dataclass(frozen=True)
class RunConfig:
    output_dir: str
    """Where checkpoints, metrics.jsonl, the resolved config and the final model go."""
    seed: int = 0
    """Seeds model init, data order and dropout."""
    log_every: int = 10
    """Steps between log lines."""
    eval_every: int = 100
    """Steps between evaluations (and one at the end); 0 = only at the end."""
    eval_batches: int = 50
    """Micro-batches per evaluation (0 = the whole held-out set)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (always one at the end); 0 = only at the end."""
    resume: bool = True
    """Continue from output_dir/checkpoint if present."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the student trains: 'auto' = cuda when available, else cpu. Under torchrun
    each rank takes cuda:LOCAL_RANK."""

    def check(self):
        for name in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"
        if self.log_every == 0:
            yield "log_every", "must be >= 1"


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    """The student model."""
    data: DataConfig
    """Where the teacher labels come from."""
    train: RunConfig
    """Run bookkeeping: output, logging, evaluation, checkpoints."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The training objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The optimizer and schedule."""
    stages: list[StageConfig] = field(default_factory=list)
    """Progressive training: stages run in order, each with its own steps, data mixture
    and loss (e.g. CE warm-up, then KD at falling temperature). Empty: one stage of
    optim.max_steps with ``data`` and ``loss``. The LR schedule spans all stages."""

    def check(self):
        if self.data.teachers:
            for i, stage in enumerate(self.resolved_stages()):
                where = f"stages[{i}]" if self.stages else "loss"
                assert stage.loss is not None
                if self.stages and self.stages[i].mixture is not None:
                    yield (
                        f"stages[{i}].mixture",
                        "cannot be combined with data.teachers (an ensemble reads data.url)",
                    )
                if stage.loss.kind == "sampled" or stage.loss.chunk_tokens:
                    yield (
                        f"{where}.kind" if stage.loss.kind == "sampled" else f"{where}.chunk_tokens",
                        "is not supported with data.teachers (the ensemble loss is top-k, unchunked)",
                    )
        if self.stages and self.optim.max_steps is not None:
            total = sum(s.steps for s in self.stages)
            if self.optim.max_steps != total:
                yield (
                    "optim.max_steps",
                    f"is {self.optim.max_steps} but the stages sum to {total}; leave it unset",
                )

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        if self.stages:
            return sum(s.steps for s in self.stages)
        return self.optim.max_steps or 1000

    def resolved_stages(self) -> list[StageConfig]:
        """The stages with data and loss filled in from the top level."""
        if not self.stages:
            return [
                StageConfig(steps=self.total_steps, name="main", mixture=self.data.sources, loss=self.loss)
            ]
        return [
            StageConfig(
                steps=s.steps,
                name=s.name or f"stage{i}",
                mixture=list(s.mixture) if s.mixture is not None else self.data.sources,
                loss=s.loss or self.loss,
            )
            for i, s in enumerate(self.stages)
        ]


def load_train_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load and validate a student config; raises ConfigError listing every problem."""
    return load_config_file(TrainConfig, path, overrides)
