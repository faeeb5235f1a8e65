"""The labels a teacher returns for one token sequence, as numpy arrays.

Position t holds the distribution of token t+1 given tokens 0..t (the label format's
convention, :mod:`labelgen.contract.format`). Any teacher (vLLM, a test fake, your
own) returns one :class:`SequenceLabels` per sequence; the writer checks its shapes. A
generation job's teacher returns one :class:`Generation` per sampled response.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SequenceLabels", "Generation"]


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

    def validate(
        self, num_tokens: int, k: int, draws: bool = False, hidden_layers: tuple[int, ...] = ()
    ) -> None:
        """Raise ValueError naming the array, its shape and the expected one if these labels
        do not fit a sequence of ``num_tokens`` tokens labeled with top-``k`` (and the
        products asked for)."""
        positions = num_tokens - 1
        problems = []
        for name, expected in (
            ("topk_ids", (positions, k)),
            ("topk_logprobs", (positions, k)),
            ("target_logprobs", (positions,)),
        ):
            shape = tuple(np.shape(getattr(self, name)))
            if shape != expected:
                problems.append(f"{name} has shape {shape}, expected {expected}")
        if draws or self.draw_num is not None:
            if self.draw_num is None or self.draw_ids is None or self.draw_counts is None:
                problems.append("draw_num, draw_ids and draw_counts are missing (labels.draws > 0)")
            elif np.shape(self.draw_num) != (positions,):
                problems.append(f"draw_num has shape {np.shape(self.draw_num)}, expected ({positions},)")
            elif not len(self.draw_ids) == len(self.draw_counts) == int(np.sum(self.draw_num)):
                problems.append(
                    f"draw_ids / draw_counts hold {len(self.draw_ids)} / {len(self.draw_counts)} entries, "
                    f"draw_num sums to {int(np.sum(self.draw_num))}"
                )
        if hidden_layers:
            missing = sorted(set(hidden_layers) - set(self.hidden or {}))
            if self.hidden_positions is None or missing:
                problems.append(f"hidden states of layers {missing or list(hidden_layers)} are missing")
        if problems:
            raise ValueError(
                f"the teacher's labels for a sequence of {num_tokens} tokens (k={k}) do not fit: "
                + "; ".join(problems)
                + ". A Teacher must return one SequenceLabels per sequence with these shapes "
                "(labelgen/labels.py)"
            )


@dataclass(frozen=True)
class Generation:
    """One sampled response."""

    token_ids: np.ndarray  # (R,) int32 response tokens (an EOS that ended it included)
    text: str  # the detokenized response (a stop string that ended it excluded)
    finish_reason: str  # "stop" (EOS, a stop string or id), "length" (max_tokens), or the engine's own
    mean_logprob: float  # mean raw log-prob (temperature 1) of the response tokens; NaN if not asked
