"""The student training config: frozen dataclasses loaded from YAML and validated at load.

Example (``manifests/students/tiny-cpu.yaml`` is a complete one)::

    model: {path: /models/student-0.5b}
    data: {url: s3://bucket/labels/run-1, batch_sequences: 16}
    loss: {alpha: 0.5, temperature: 1.0}
    optim: {lr: 3.0e-4, max_steps: 10000}
    train: {output_dir: runs/student-1}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from labelgen.contract.configs import load_config_file

__all__ = [
    "ModelConfig",
    "DataConfig",
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
class DataConfig:
    url: str
    """Label dataset URL (local path, s3://, gs://, http(s)://) written by `labelgen run`."""
    batch_sequences: int = 8
    """Sequences per micro-batch."""
    eval_url: str | None = None
    """Held-out label dataset for evaluation. None: hold out the last row groups of ``url``."""
    holdout_row_groups: int = 1
    """With eval_url unset: how many row groups (from the end of the dataset) to hold out."""
    prefetch_row_groups: int = 2
    """Row groups read ahead in a background thread."""

    def check(self):
        if self.batch_sequences < 1:
            yield "batch_sequences", f"must be >= 1, got {self.batch_sequences}"
        if self.holdout_row_groups < 0:
            yield "holdout_row_groups", f"must be >= 0, got {self.holdout_row_groups}"
        if self.prefetch_row_groups < 0:
            yield "prefetch_row_groups", f"must be >= 0, got {self.prefetch_row_groups}"


@dataclass(frozen=True)
class LossConfig:
    kind: Literal["forward_kl", "sampled"] = "forward_kl"
    """'forward_kl': KL over the stored top-k plus the tail bucket. 'sampled': cross-entropy
    to the stored random draws (unbiased for the full-vocabulary KL gradient; needs labels
    made with labels.draws > 0; the temperature is the draws' own)."""
    alpha: float = 0.5
    """Weight of the KD term; CE on the real next token gets 1 - alpha. 1.0 = pure KD,
    0.0 = plain CE (no teacher)."""
    temperature: float = 1.0
    """Softening T of both distributions; the KD term is multiplied by T²."""

    def check(self):
        if not 0.0 <= self.alpha <= 1.0:
            yield "alpha", f"must be in [0, 1], got {self.alpha}"
        if self.temperature <= 0:
            yield "temperature", f"must be > 0, got {self.temperature}"


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
    max_steps: int = 1000
    """Optimizer steps."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""

    def check(self):
        if self.lr <= 0:
            yield "lr", f"must be > 0, got {self.lr}"
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            yield "betas", f"must be two numbers in [0, 1), got {list(self.betas)}"
        if self.max_steps < 1:
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


def load_train_config(path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Load and validate a student config; raises ConfigError listing every problem."""
    return load_config_file(TrainConfig, path, overrides)
