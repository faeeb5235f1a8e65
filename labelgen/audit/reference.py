"""The teacher, run again: re-scored labels of the audited sequences.

Two references, one interface (:meth:`score`):

- :class:`VllmReference` starts the dataset's teacher through :func:`labelgen.teacher.load_teacher`
  with the job's own spec (engine arguments, dtype, extraction path, hidden layers and
  seed), so the numbers come out of the same code that labeled the dataset. It asks for
  ``k + margin`` log-probs, so a stored id that ties with the k-th can be looked up, no
  draws (the draw test needs probabilities, not new draws) and float32 hidden states.
- :class:`TransformersReference` runs a transformers fp32 forward of the same checkpoint
  (independent of vLLM): exact log-probs of every stored id, and of the draw classes at
  any draw temperature.

torch, transformers and vLLM are imported when a reference is made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from labelgen.audit.rows import StoredRow
from labelgen.spec import JobSpec

__all__ = ["RefRow", "Reference", "VllmReference", "TransformersReference", "MARGIN"]

MARGIN = 8
"""Ranks beyond k the vLLM reference returns, to look up stored ids that tie with the k-th."""


@dataclass
class RefRow:
    """The re-scored labels of one sequence (P label positions)."""

    top_ids: np.ndarray  # (P, K') int, by rank; K' >= k
    top_logprobs: np.ndarray  # (P, K') float64 raw log-probs
    target_logprobs: np.ndarray  # (P,) float64
    stored_logprobs: np.ndarray | None = None
    """(P, k) the teacher's log-prob of each stored id (transformers); None: look them up in top_ids."""
    draw_probs: np.ndarray | None = None
    """(P, K') probabilities of ``top_ids`` at the draw temperature; None: not available."""
    hidden_positions: np.ndarray | None = None  # (H,) int64
    hidden: dict[int, np.ndarray] | None = None  # layer -> (H, D) float32


class Reference(Protocol):
    name: str
    k: int
    """K': ranks returned per position."""

    def score(self, rows: list[StoredRow]) -> list[RefRow]: ...

    def close(self) -> None: ...


def audit_spec(spec: JobSpec, k: int) -> JobSpec:
    """The job's spec as the vLLM reference runs it: top-``k`` labels, no draws, float32 hidden
    states; everything that shapes the numbers (engine, dtype, extraction, seed) unchanged."""
    labels = dataclasses.replace(spec.labels, k=k, draws=0)
    hidden = dataclasses.replace(spec.hidden, dtype="float32")
    return dataclasses.replace(spec, labels=labels, hidden=hidden, generate=None)


class VllmReference:
    """The dataset's teacher through vLLM and labelgen's extraction path."""

    name = "vllm"

    def __init__(self, spec: JobSpec, vocab: int | None = None, margin: int = MARGIN):
        from labelgen.teacher import load_teacher

        k = spec.labels.k + margin
        self.k = min(k, vocab) if vocab else k
        self._draw_temperature = spec.labels.draw_temperature
        self._teacher = load_teacher(audit_spec(spec, self.k))
        self.extraction = getattr(self._teacher, "extraction", "")

    def score(self, rows: list[StoredRow]) -> list[RefRow]:
        labels = self._teacher.label([r.input_ids for r in rows])
        out = []
        for lab in labels:
            lps = lab.topk_logprobs.astype(np.float64)
            out.append(
                RefRow(
                    top_ids=lab.topk_ids,
                    top_logprobs=lps,
                    target_logprobs=lab.target_logprobs.astype(np.float64),
                    # vLLM returns temperature-1 log-probs of the top ranks only: the draw
                    # classes' probabilities at another temperature need the whole vocabulary
                    draw_probs=np.exp(lps) if self._draw_temperature == 1.0 else None,
                    hidden_positions=lab.hidden_positions,
                    hidden=None
                    if lab.hidden is None
                    else {int(k): np.asarray(v, np.float32) for k, v in lab.hidden.items()},
                )
            )
        return out

    def close(self) -> None:
        self._teacher.close()


class TransformersReference:
    """A transformers fp32 forward of the teacher checkpoint, one sequence at a time.

    Holds (T, V) float64 log-probs of one sequence at a time: fine for audits of tiny to
    mid-size vocabularies and sequence lengths; a 152k vocabulary at 4096 tokens needs
    ~5 GB per sequence.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        k: int,
        draw_temperature: float = 1.0,
        layers: tuple[int, ...] = (),
        revision: str | None = None,
    ):
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError as exc:
            raise ImportError(
                "--reference transformers needs torch and transformers: "
                f"`pip install 'labelgen[student]'` ({exc})"
            ) from exc
        self._torch = torch
        self._model = AutoModelForCausalLM.from_pretrained(
            model, revision=revision, dtype=torch.float32
        ).eval()
        self.k = k
        self._temperature = draw_temperature
        self._layers = tuple(layers)

    def score(self, rows: list[StoredRow]) -> list[RefRow]:
        return [self._one(r) for r in rows]

    def _one(self, row: StoredRow) -> RefRow:
        torch = self._torch
        ids = torch.from_numpy(row.input_ids.astype(np.int64))[None]
        with torch.no_grad():
            out = self._model(input_ids=ids, output_hidden_states=bool(self._layers))
            logits = out.logits[0, :-1].double()  # (P, V)
            lps = torch.log_softmax(logits, -1)
            vocab = lps.shape[-1]
            kk = min(self.k, vocab)
            top_lps, top_ids = lps.topk(kk, dim=-1)
            positions = torch.arange(lps.shape[0])
            target = lps[positions, ids[0, 1:]]
            stored = torch.from_numpy(row.topk_ids.astype(np.int64))
            in_vocab = (stored >= 0) & (stored < vocab)
            stored_lps = torch.where(in_vocab, lps.gather(-1, stored.clamp(0, vocab - 1)), -torch.inf)
            draw_probs = torch.softmax(logits / self._temperature, -1).gather(-1, top_ids)
            hidden = None
            if self._layers and row.hidden_positions is not None:
                at = torch.from_numpy(row.hidden_positions).clamp(0, ids.shape[1] - 1)
                hidden = {layer: out.hidden_states[layer][0, at].float().numpy() for layer in self._layers}
        return RefRow(
            top_ids=top_ids.numpy(),
            top_logprobs=top_lps.numpy(),
            target_logprobs=target.numpy(),
            stored_logprobs=stored_lps.numpy(),
            draw_probs=draw_probs.numpy(),
            hidden_positions=None if row.hidden_positions is None else row.hidden_positions.copy(),
            hidden=hidden,
        )

    def close(self) -> None:
        del self._model


def make_reference(kind: str, spec: JobSpec, manifest_vocab: int | None) -> Any:
    """The reference ``kind`` (vllm or transformers) for the job ``spec`` (its teacher.model
    already the path to load)."""
    if kind == "vllm":
        return VllmReference(spec, manifest_vocab)
    layers = tuple(spec.hidden.layers)
    return TransformersReference(
        spec.teacher.model,
        spec.labels.k + MARGIN,
        spec.labels.draw_temperature,
        layers,
        spec.teacher.revision,
    )
