"""The names of the KD losses, in one place that imports no torch.

``students.config`` (which must load without torch) types ``loss.kind`` with
``LossKind``; ``students.losses`` and ``students.chunked_loss`` check their ``kind``
argument against the same tuples. Formulas in docs/LOSSES.md.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Divergence", "LossKind", "DIVERGENCES", "LOSS_KINDS"]

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
"""A divergence between the teacher's and the student's top-k + tail distributions."""

LossKind = Literal[Divergence, "sampled"]
"""What ``loss.kind`` may name: a divergence, or ``sampled`` (CE to the stored random draws)."""

DIVERGENCES: tuple[str, ...] = get_args(Divergence)
"""The divergences, in documentation order (``students.losses.KD_KINDS``)."""

LOSS_KINDS: tuple[str, ...] = get_args(LossKind)
"""Every loss kind: the divergences, then ``sampled`` (``students.chunked_loss.CHUNKED_KINDS``)."""
