"""How far a re-scored number may sit from the stored one: the one home of the audit's bounds.

A stored value is compared with the teacher's value computed again (through vLLM, or a
transformers fp32 forward). They differ by the teacher's arithmetic (its dtype: kernels,
batch composition and reduction order change the last bits) and, for a lossy top-k codec,
by the codec's quantisation. Every number the audit allows lives here:

- :data:`LOGPROB_TOLERANCE`: per teacher dtype, ``abs + rel * |logprob|`` nats on a top-k
  or target log-prob (float32 follows the bar docs/FORMAT.md holds the extraction to,
  1e-4, with a margin for other kernels; float16 / bfloat16 follow their mantissas:
  log-probs over a few-thousand-term log-sum-exp move by tens of ulps).
- each codec's ``value_bound`` (:func:`codec_levels` in words): per lossy codec, one
  quantisation level plus half a level of renormalisation slack, in the codec's own
  space (compact-v1: nats; compact-v2: sqrt(p)). The audit encodes the re-scored top-k
  with the dataset's codec and decodes it, so both sides carry the same quantisation and
  may differ by at most one level where the teacher's arithmetic moved a value across a
  rounding boundary.
- :data:`HIDDEN_TOLERANCE` + :data:`HIDDEN_STORAGE`: relative error ``|h - h'| / |h'|`` of a
  hidden-state vector, per teacher dtype plus the rounding of the stored dtype.
- :data:`DRAW_P_VALUE`: the draw test fails below this p-value (:mod:`labelgen.audit.draws`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from labelgen.contract.codecs import CODEC_NAMES, get_codec

__all__ = [
    "LOGPROB_TOLERANCE",
    "codec_levels",
    "HIDDEN_TOLERANCE",
    "HIDDEN_STORAGE",
    "DRAW_P_VALUE",
    "Tolerance",
    "tolerance_for",
]

LOGPROB_TOLERANCE: dict[str, tuple[float, float]] = {
    "float32": (5e-4, 1e-5),
    "float16": (3e-2, 0.0),
    "bfloat16": (1.5e-1, 0.0),
}
"""Teacher dtype -> (abs nats, relative to |logprob|) allowed on a log-prob."""

HIDDEN_TOLERANCE: dict[str, float] = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
"""Teacher dtype -> relative error allowed on a hidden-state vector (its arithmetic)."""

HIDDEN_STORAGE: dict[str, float] = {"float32": 0.0, "float16": 2.0**-11, "bfloat16": 2.0**-8}
"""Stored hidden dtype -> relative rounding of each element (added to the above)."""

DRAW_P_VALUE = 1e-6
"""The draw test fails when its p-value is below this (one false alarm in a million audits)."""


def _codec_level(codec: str, k: int) -> tuple[str, float]:
    """(space, bound) a lossy codec's stored value may differ by from the re-scored value
    passed through the same codec: the codec's own ``Codec.value_bound``."""
    return get_codec(codec).value_bound(k)


def codec_levels() -> dict[str, str]:
    """What each registered codec adds, in words, for docs and reports."""
    return {name: get_codec(name).value_bound_text() for name in CODEC_NAMES}


@dataclass(frozen=True)
class Tolerance:
    """The bounds one audit applies (a teacher dtype and a codec)."""

    dtype: str
    codec: str
    k: int
    logprob_abs: float
    logprob_rel: float
    codec_space: str
    """``nats`` or ``sqrt_p``: where :attr:`codec_level` is measured."""
    codec_level: float
    hidden_rel: float
    """Arithmetic part only; :meth:`hidden` adds the stored dtype's rounding."""

    def logprob(self, reference: np.ndarray) -> np.ndarray:
        """Allowed |stored - reference| in nats on exact (not quantised) values, e.g. target
        log-probs. ``reference``: any shape."""
        return self.logprob_abs + self.logprob_rel * np.abs(reference)

    def topk_excess(self, stored: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """How far each stored top-k value sits outside its bound: ``|error| / allowed`` (a
        value > 1 fails). Both arrays are log-probs of the same ids, any equal shape;
        ``reference`` has been through the codec already (:func:`labelgen.audit.compare`)."""
        stored = stored.astype(np.float64)
        reference = reference.astype(np.float64)
        if self.codec_space == "nats":
            allowed = self.logprob(reference) + self.codec_level
            return np.abs(stored - reference) / allowed
        u_s, u_r = np.exp(stored / 2), np.exp(reference / 2)
        # d sqrt(p) = sqrt(p) * d logprob / 2: the dtype's bound carried into sqrt(p)
        allowed = self.codec_level + u_r * np.expm1(self.logprob(reference) / 2)
        return np.abs(u_s - u_r) / allowed

    def hidden(self, stored_dtype: str) -> float:
        """Allowed relative error of a hidden vector stored as ``stored_dtype``."""
        return self.hidden_rel + HIDDEN_STORAGE.get(stored_dtype, 0.0)

    def describe(self) -> dict[str, Any]:
        """The report's ``tolerance`` entry."""
        return {
            "dtype": self.dtype,
            "codec": self.codec,
            "logprob": f"{self.logprob_abs:g} + {self.logprob_rel:g} * |logprob| nats",
            "codec_level": f"{self.codec_level:.6g} ({self.codec_space})",
            "hidden_rel": self.hidden_rel,
            "draw_p_value": DRAW_P_VALUE,
        }


def tolerance_for(dtype: str, codec: str, k: int) -> Tolerance:
    """The bounds for a teacher run in ``dtype`` whose labels are stored with ``codec`` at top-``k``.

    Raises:
        ValueError: ``dtype`` is not float32, float16 or bfloat16 (the manifest's teacher
            dtype is what vLLM reported), or the codec has no bound here.
    """
    name = str(dtype).replace("torch.", "")
    if name not in LOGPROB_TOLERANCE:
        raise ValueError(
            f"teacher dtype {dtype!r} has no audit tolerance; known: {', '.join(LOGPROB_TOLERANCE)} "
            "(the manifest's teacher.dtype)"
        )
    space, level = _codec_level(codec, k)
    abs_tol, rel_tol = LOGPROB_TOLERANCE[name]
    return Tolerance(name, codec, k, abs_tol, rel_tol, space, level, HIDDEN_TOLERANCE[name])
