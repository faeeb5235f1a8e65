"""A stage's training objective, built once from its LossConfig out of small terms.

Per label position::

    loss = alpha · KD_T(teacher, student) · T² + (1 - alpha) · CE  [+ hidden.weight · hidden]

:meth:`Objective.build` chooses, once per stage:

- the KD term: :class:`TopKDivergence` (``students.losses.kd_loss``, the stored top-k
  plus the tail), :class:`SampledKD` (``sampled_kd``, the stored random draws),
  :class:`EnsembleKD` (``multi_teacher_kd``, data.url's teacher and data.teachers), or
  none when alpha == 0;
- where it is computed: :class:`OnLogits` (the model's full logits, the plain path) or
  :class:`FusedChunks` (``students.chunked_loss.chunked_kd_loss``: fused with the output
  projection in ``loss.chunk_tokens`` rows, when > 0);
- the optional :class:`HiddenStateTerm` (a stage's ``HiddenStateDistiller``).

Calling the objective on ``(model, lm_head, batch, temperature)`` returns
``{"loss", "kd", "ce"}`` scalars, plus ``"hidden"`` (detached) with a hidden-state term,
plus, with ``watch=True``, ``"kl"`` and ``"top1"`` (detached, :func:`teacher_match`: how
close the student is to the teacher at T=1 on this batch; the trainer asks on the steps
it logs).

Batch tensors (``students.stream.collate``; N = B · (T-1) label positions):
``input_ids`` (B, T); ``next_ids``, ``label_mask`` (B, T-1); ``topk_ids``,
``topk_logprobs`` (B, T-1, K); ``draw_ids``, ``draw_counts`` (B, T-1, U) with draws;
``topk_ids@j``, ``topk_logprobs@j`` (B, T-1, K_j) for ensemble teacher j >= 1;
``hidden_row``, ``hidden_pos`` (P,) and ``hidden_layer_<t>`` (P, D_t) with hidden states.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from labelgen.contract.format import Manifest
from students.chunked_loss import chunked_kd_loss
from students.compatibility import teacher_hidden_dims
from students.config import LossConfig, StageConfig
from students.hidden_losses import HiddenStateDistiller
from students.losses import bucket_kl, kd_loss, masked_cross_entropy, multi_teacher_kd, sampled_kd

__all__ = [
    "EnsembleKD",
    "FusedChunks",
    "HiddenStateTerm",
    "KDTerm",
    "Objective",
    "OnLogits",
    "SampledKD",
    "TopKDivergence",
    "build_hidden_heads",
    "teacher_match",
]

Batch = Mapping[str, torch.Tensor]
Parts = dict[str, torch.Tensor]


def _flat(values: torch.Tensor) -> torch.Tensor:
    """(B, T-1, W) → (N, W)."""
    return values.reshape(-1, values.shape[-1])


WATCH_ROWS = 1024
"""Positions per chunk in :func:`teacher_match` (bounds its extra memory to WATCH_ROWS × V)."""


@torch.no_grad()
def teacher_match(
    logits_of: Callable[[slice], torch.Tensor],
    batch: Batch,
    mask: torch.Tensor,
    rows: int = WATCH_ROWS,
) -> Parts:
    """How close the student is to the (first) teacher on a batch, at T=1, no gradient.

    Args:
        logits_of: the student's logits (n, V) of the positions in a slice of the N label
            positions (a view of the full logits, or the output projection of a chunk).
        batch: with ``topk_ids``, ``topk_logprobs`` (B, T-1, K).
        mask: (N,) 1 for the positions that count.
        rows: positions per chunk.

    Returns:
        ``{"kl": mean bucket KL(teacher || student) over the top-k + tail (as evaluate()),
        "top1": share of positions where the student's argmax is the teacher's top-1}``,
        scalars over the masked positions (0 when none are).
    """
    ids, lps = _flat(batch["topk_ids"]), _flat(batch["topk_logprobs"])  # (N, K) each
    keep = mask.bool()
    kl = torch.zeros((), dtype=torch.float64, device=mask.device)
    agree = torch.zeros((), dtype=torch.float64, device=mask.device)
    for start in range(0, ids.shape[0], rows):
        part = slice(start, start + rows)
        logits = logits_of(part).float()  # (n, V)
        here = keep[part]
        # where, not a product: a masked position's padding labels may give a non-finite KL.
        kl += torch.where(here, bucket_kl(logits, ids[part], lps[part]), 0.0).sum()
        agree += (here & (logits.argmax(-1) == ids[part, 0])).sum()
    count = keep.sum().clamp_min(1)
    return {"kl": (kl / count).float(), "top1": (agree / count).float()}


class KDTerm(Protocol):
    """A KD term on full logits: scalar (× T²) from ``logits`` (N, V), a batch, ``mask`` (N,)."""

    def __call__(self, logits: torch.Tensor, batch: Batch, mask: torch.Tensor, temperature: float) -> Any: ...


@dataclass(frozen=True)
class TopKDivergence:
    """Divergence ``kind`` over the stored top-k plus the tail bucket (``kd_loss``)."""

    kind: str
    beta: float = 0.5
    skew: float = 0.1

    def __call__(self, logits: torch.Tensor, batch: Batch, mask: torch.Tensor, temperature: float) -> Any:
        ids, lps = _flat(batch["topk_ids"]), _flat(batch["topk_logprobs"])  # (N, K) each
        return kd_loss(self.kind, logits, ids, lps, mask, temperature, beta=self.beta, skew=self.skew)

    def fused_args(self, batch: Batch) -> dict[str, Any]:
        """This term's arguments to ``chunked_kd_loss``."""
        return {
            "kind": self.kind,
            "beta": self.beta,
            "skew": self.skew,
            "topk_ids": _flat(batch["topk_ids"]),
            "topk_logprobs": _flat(batch["topk_logprobs"]),
        }


@dataclass(frozen=True)
class SampledKD:
    """Cross-entropy to the stored random draws at their temperature (``sampled_kd``)."""

    def __call__(self, logits: torch.Tensor, batch: Batch, mask: torch.Tensor, temperature: float) -> Any:
        ids, counts = _flat(batch["draw_ids"]), _flat(batch["draw_counts"])  # (N, U) each
        return sampled_kd(logits, ids, counts, mask, temperature)

    def fused_args(self, batch: Batch) -> dict[str, Any]:
        """This term's arguments to ``chunked_kd_loss``."""
        return {
            "kind": "sampled",
            "topk_ids": None,
            "topk_logprobs": None,
            "draw_ids": _flat(batch["draw_ids"]),
            "draw_counts": _flat(batch["draw_counts"]),
        }


@dataclass(frozen=True)
class EnsembleKD:
    """Weighted divergence ``kind`` to several teachers' top-k (``multi_teacher_kd``).

    ``weights[0]`` is data.url's own teacher (``topk_ids``), ``weights[j]`` the j-th of
    data.teachers (``topk_ids@j``); normalised by ``multi_teacher_kd``."""

    kind: str
    weights: tuple[float, ...]
    beta: float = 0.5
    skew: float = 0.1

    def __call__(self, logits: torch.Tensor, batch: Batch, mask: torch.Tensor, temperature: float) -> Any:
        teachers = [(self.weights[0], _flat(batch["topk_ids"]), _flat(batch["topk_logprobs"]))]
        for j, weight in enumerate(self.weights[1:], start=1):
            teachers.append((weight, _flat(batch[f"topk_ids@{j}"]), _flat(batch[f"topk_logprobs@{j}"])))
        return multi_teacher_kd(
            self.kind, logits, teachers, mask, temperature, beta=self.beta, skew=self.skew
        )


@dataclass(frozen=True)
class OnLogits:
    """KD and CE on the model's full logits (N, V): the plain path."""

    kd: KDTerm | None
    """None: alpha == 0 (``kd`` is then a zero scalar)."""
    alpha: float

    def __call__(
        self,
        model: nn.Module,
        lm_head: nn.Module,
        batch: Batch,
        temperature: float,
        hidden_states: bool,
        watch: bool = False,
    ) -> tuple[Parts, Sequence[torch.Tensor] | None]:
        """(``{"loss", "kd", "ce"}`` (+ ``"kl"``, ``"top1"`` when ``watch``), the model's
        hidden states when ``hidden_states``)."""
        out = model(input_ids=batch["input_ids"], output_hidden_states=hidden_states)
        logits = out.logits[:, :-1]  # (B, T-1, V)
        flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
        mask = batch["label_mask"].reshape(-1)  # (N,)
        ce = masked_cross_entropy(flat, batch["next_ids"].reshape(-1), mask)
        if self.kd is not None:
            kd = self.kd(flat, batch, mask, temperature)
        else:
            kd = torch.zeros((), dtype=ce.dtype, device=ce.device)
        parts = {"loss": self.alpha * kd + (1 - self.alpha) * ce, "kd": kd, "ce": ce}
        if watch:
            parts.update(teacher_match(lambda rows: flat[rows].detach(), batch, mask))
        return parts, out.hidden_states


@dataclass(frozen=True)
class FusedChunks:
    """KD and CE fused with the output projection, ``chunk_tokens`` rows of logits at a time
    (``chunked_kd_loss``); the model runs its head on one position only."""

    kd: TopKDivergence | SampledKD | None
    """None: alpha == 0 (CE only)."""
    alpha: float
    chunk_tokens: int

    def __call__(
        self,
        model: nn.Module,
        lm_head: nn.Module,
        batch: Batch,
        temperature: float,
        hidden_states: bool,
        watch: bool = False,
    ) -> tuple[Parts, Sequence[torch.Tensor]]:
        """(``{"loss", "kd", "ce"}`` (+ ``"kl"``, ``"top1"`` when ``watch``), the model's
        hidden states); ``kd`` and ``ce`` detached."""
        # Final hidden states (after the final norm) instead of logits; logits_to_keep=1 keeps the
        # head inside the (DDP) forward for one position only.
        out = model(input_ids=batch["input_ids"], output_hidden_states=True, logits_to_keep=1)
        last = out.hidden_states[-1][:, :-1]  # (B, T-1, D)
        no_kd = {"topk_ids": None, "topk_logprobs": None}  # alpha == 0: chunked_kd_loss reads no labels
        labels = self.kd.fused_args(batch) if self.kd is not None else no_kd
        weight = lm_head.weight  # (V, D)
        assert isinstance(weight, torch.Tensor)  # a parameter, not a submodule
        parts = chunked_kd_loss(
            last.reshape(-1, last.shape[-1]),  # (N, D)
            weight,
            targets=batch["next_ids"].reshape(-1),
            mask=batch["label_mask"].reshape(-1),
            alpha=self.alpha,
            temperature=temperature,
            chunk_tokens=self.chunk_tokens,
            lm_head_bias=getattr(lm_head, "bias", None),
            **labels,
        )
        if watch:  # the projection again, chunk by chunk: the full logits still never exist
            states, bias = last.reshape(-1, last.shape[-1]).detach(), getattr(lm_head, "bias", None)

            def logits_of(rows: slice) -> torch.Tensor:
                logits = states[rows] @ weight.detach().T  # (n, V)
                return logits if bias is None else logits + bias.detach()

            mask = batch["label_mask"].reshape(-1)
            parts.update(teacher_match(logits_of, batch, mask, rows=self.chunk_tokens))
        return parts, out.hidden_states


@dataclass(frozen=True)
class HiddenStateTerm:
    """Feature distillation through a stage's learned projections (``HiddenStateDistiller``)."""

    distiller: HiddenStateDistiller
    weight: float

    def __call__(self, hidden_states: Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Scalar from the model's (num_layers + 1) hidden states (B, T, D_s) and the batch's
        teacher vectors (P, D_t) at ``hidden_row`` / ``hidden_pos``."""
        teacher = {t: batch[f"hidden_layer_{t}"] for t in set(self.distiller.layer_map.values())}
        return self.distiller(hidden_states, batch["hidden_row"], batch["hidden_pos"], teacher)


class Objective:
    """One stage's loss: a logit path (with its KD term) plus an optional hidden-state term."""

    def __init__(self, logits: OnLogits | FusedChunks, hidden: HiddenStateTerm | None = None) -> None:
        self.logits = logits
        self.hidden = hidden

    @classmethod
    def build(
        cls,
        loss: LossConfig,
        teacher_weights: Sequence[float] = (),
        distiller: HiddenStateDistiller | None = None,
    ) -> Objective:
        """The objective of a stage with ``loss``.

        Args:
            loss: the stage's loss config.
            teacher_weights: the ensemble's weights when the stage reads one
                (``students.stage_data.ensemble_weights``); empty: one teacher.
            distiller: the stage's projections, required exactly when ``loss.hidden`` is set.
        """
        kd = _kd_term(loss, teacher_weights)
        if loss.chunk_tokens:
            if isinstance(kd, EnsembleKD):
                raise ValueError(
                    "loss.chunk_tokens is not supported with data.teachers (the ensemble loss is top-k, "
                    "unchunked); set loss.chunk_tokens=0"
                )
            path: OnLogits | FusedChunks = FusedChunks(kd, loss.alpha, loss.chunk_tokens)
        else:
            path = OnLogits(kd, loss.alpha)
        if (loss.hidden is None) != (distiller is None):
            raise ValueError(
                "loss.hidden and the HiddenStateDistiller go together: pass the stage's projections "
                "(students.objective.build_hidden_heads) exactly when loss.hidden is set"
            )
        hidden = HiddenStateTerm(distiller, loss.hidden.weight) if loss.hidden and distiller else None
        return cls(path, hidden)

    def __call__(
        self, model: nn.Module, lm_head: nn.Module, batch: Batch, temperature: float, watch: bool = False
    ) -> Parts:
        """``{"loss", "kd", "ce"}`` (+ ``"hidden"``; + ``"kl"``, ``"top1"`` with ``watch``)
        scalars for one batch.

        Args:
            model: the student, or its DistributedDataParallel wrapper (called, not unwrapped).
            lm_head: the student's output projection (``get_output_embeddings()``), used by
                the fused chunked path: weight (V, D), optional bias (V,).
            batch: tensors as in the module docstring.
            temperature: the KD temperature at this step.
            watch: also measure the student against the teacher (:func:`teacher_match`).
        """
        parts, states = self.logits(
            model, lm_head, batch, temperature, hidden_states=self.hidden is not None, watch=watch
        )
        if self.hidden is not None:
            assert states is not None  # requested above
            feature = self.hidden(states, batch)
            parts["loss"] = parts["loss"] + self.hidden.weight * feature
            parts["hidden"] = feature.detach()
        return parts


def _kd_term(
    loss: LossConfig, teacher_weights: Sequence[float]
) -> TopKDivergence | SampledKD | EnsembleKD | None:
    if not loss.alpha > 0:
        return None
    if loss.kind == "sampled":
        return SampledKD()
    if teacher_weights:
        return EnsembleKD(loss.kind, tuple(teacher_weights), beta=loss.beta, skew=loss.skew)
    return TopKDivergence(loss.kind, beta=loss.beta, skew=loss.skew)


def build_hidden_heads(
    stages: Sequence[StageConfig], manifests: Mapping[str, Manifest | None], model_config: Any
) -> dict[int, HiddenStateDistiller]:
    """{stage index: HiddenStateDistiller} for the stages with a hidden-state loss.

    The teacher's hidden size comes from the stage's datasets (one size, their layers
    stored: checked by ``students.compatibility``); the student's from ``model_config``.
    """
    heads: dict[int, HiddenStateDistiller] = {}
    for index, stage in enumerate(stages):
        assert stage.loss is not None and stage.mixture is not None  # resolved_stages fills them
        spec = stage.loss.hidden
        if spec is None:
            continue
        (teacher_dim,) = teacher_hidden_dims(stage, manifests)  # one size: checked by compatibility
        heads[index] = HiddenStateDistiller(
            spec.layer_map, model_config.hidden_size, teacher_dim, kind=spec.kind
        )
    return heads
