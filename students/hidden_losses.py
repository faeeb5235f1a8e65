"""Feature distillation: align student hidden states with stored teacher hidden states.

Each mapped student layer goes through its own learned linear projection
student_dim → teacher_dim (TinyBERT's W_h) and is compared with the teacher's vector of
the mapped layer at the same token position, by MSE (TinyBERT) or cosine distance
(DistilBERT). Layer numbering is transformers' ``output_hidden_states``: 0 = the
embeddings, i = the output of decoder layer i (the last one after the final norm), for
both models, as in the hidden-state shards (docs/FORMAT.md).

The data plane joins teacher hidden shards to label rows (sample id + token hash) and
hands over, per batch, P sampled positions as ``(batch_index, position_index)`` pairs
into the student's (B, T) batch plus the teacher's (P, D_t) vectors of each layer at
those positions. Token position t of the student sees the same tokens 0..t as the
teacher's position t, so no shift is applied (unlike next-token labels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["HIDDEN_KINDS", "HiddenStateDistiller", "hidden_state_loss"]

HIDDEN_KINDS = ("mse", "cosine")


def hidden_state_loss(
    kind: str, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Masked mean over positions of a per-position feature distance.

    Args:
        kind: ``mse`` (mean over the D dimensions of the squared difference) or ``cosine``
            (1 - cosine similarity, in [0, 2]).
        student: (P, D) projected student vectors.
        teacher: (P, D) teacher vectors (any float dtype; compared in float32).
        mask: (P,) 1/True where the position counts; None = all.

    Returns:
        Scalar float32; zero (with a graph) when the mask selects nothing.
    """
    if kind not in HIDDEN_KINDS:
        raise ValueError(f"unknown hidden-state loss kind {kind!r}; valid kinds: {', '.join(HIDDEN_KINDS)}")
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher vectors must both be (P, D), got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    student, teacher = student.float(), teacher.float()
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    else:
        per_position = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    if mask is None:
        mask = torch.ones_like(per_position)
    if mask.shape != per_position.shape:
        raise ValueError(f"mask must have shape ({student.shape[0]},), got {tuple(mask.shape)}")
    weights = mask.to(per_position.dtype)
    picked = torch.where(weights != 0, per_position, torch.zeros_like(per_position))
    return (picked * weights).sum() / weights.sum().clamp(min=1.0)


class HiddenStateDistiller(nn.Module):
    """Learned projections and the feature loss for a layer map {student_layer: teacher_layer}.

    Args:
        layer_map: {student layer: teacher layer}, HF numbering (0 = embeddings); at least
            one entry; several student layers may map to one teacher layer.
        student_dim: the student's hidden size D_s.
        teacher_dims: the teacher's hidden size D_t (int), or {teacher layer: D_t} covering
            every mapped teacher layer.
        kind: ``mse`` or ``cosine`` (``HIDDEN_KINDS``).
        bias: give each projection a bias.

    The projections are ``nn.Linear(D_s, D_t)`` in ``self.projections[str(student_layer)]``;
    where D_s == D_t they start as the identity. Put the module's parameters in the
    student's optimizer. The loss is the mean over mapped layers of ``hidden_state_loss``.
    """

    def __init__(
        self,
        layer_map: Mapping[int, int],
        student_dim: int,
        teacher_dims: int | Mapping[int, int],
        kind: str = "mse",
        bias: bool = False,
    ) -> None:
        super().__init__()
        if kind not in HIDDEN_KINDS:
            raise ValueError(
                f"unknown hidden-state loss kind {kind!r}; valid kinds: {', '.join(HIDDEN_KINDS)}"
            )
        if not isinstance(layer_map, Mapping) or not layer_map:
            raise ValueError(
                f"layer_map must be a non-empty {{student_layer: teacher_layer}} dict, got {layer_map!r}"
            )
        for s_layer, t_layer in layer_map.items():
            if not (_is_index(s_layer) and _is_index(t_layer)):
                raise ValueError(
                    "layer_map entries must be integer layer ids >= 0 (0 = embeddings), "
                    f"got {s_layer!r}: {t_layer!r}"
                )
        if not (_is_index(student_dim) and student_dim > 0):
            raise ValueError(f"student_dim must be an integer > 0, got {student_dim!r}")
        if isinstance(teacher_dims, Mapping):
            missing = sorted({t for t in layer_map.values() if t not in teacher_dims})
            if missing:
                raise ValueError(
                    f"teacher_dims has no size for teacher layer(s) {missing}; "
                    f"it covers {sorted(teacher_dims)}"
                )
            dims = {t: teacher_dims[t] for t in layer_map.values()}
        else:
            dims = {t: teacher_dims for t in layer_map.values()}
        for t_layer, dim in dims.items():
            if not (_is_index(dim) and dim > 0):
                raise ValueError(f"teacher_dims for layer {t_layer} must be an integer > 0, got {dim!r}")
        self.layer_map = {int(s): int(t) for s, t in sorted(layer_map.items())}
        self.student_dim = int(student_dim)
        self.teacher_dims = {int(t): int(d) for t, d in dims.items()}
        self.kind = kind
        self.projections = nn.ModuleDict()
        for s_layer, t_layer in self.layer_map.items():
            proj = nn.Linear(self.student_dim, self.teacher_dims[t_layer], bias=bias)
            if self.student_dim == self.teacher_dims[t_layer]:
                with torch.no_grad():
                    proj.weight.copy_(torch.eye(self.student_dim))
                    if proj.bias is not None:
                        proj.bias.zero_()
            self.projections[str(s_layer)] = proj

    def per_layer(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        batch_index: torch.Tensor,
        position_index: torch.Tensor,
        teacher_hidden: Mapping[int, torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> dict[int, torch.Tensor]:
        """{student layer: scalar loss}; arguments as in ``forward``."""
        n_states = len(student_hidden_states)
        if batch_index.ndim != 1 or batch_index.shape != position_index.shape:
            raise ValueError(
                f"batch_index and position_index must both be (P,), got {tuple(batch_index.shape)} and "
                f"{tuple(position_index.shape)}"
            )
        n_pos = batch_index.shape[0]
        losses: dict[int, torch.Tensor] = {}
        for s_layer, t_layer in self.layer_map.items():
            if s_layer >= n_states:
                raise ValueError(
                    f"layer_map uses student layer {s_layer}, but the student returned {n_states} hidden "
                    f"states (0 = embeddings .. {n_states - 1}); call the model with "
                    "output_hidden_states=True"
                )
            if t_layer not in teacher_hidden:
                raise ValueError(
                    f"no teacher vectors for teacher layer {t_layer} (mapped from student layer {s_layer}); "
                    f"got layers {sorted(teacher_hidden)}"
                )
            states = student_hidden_states[s_layer]  # (B, T, D_s)
            if states.ndim != 3 or states.shape[-1] != self.student_dim:
                raise ValueError(
                    f"student hidden states of layer {s_layer} must be (B, T, {self.student_dim}), "
                    f"got {tuple(states.shape)}"
                )
            target = teacher_hidden[t_layer]
            expected = (n_pos, self.teacher_dims[t_layer])
            if tuple(target.shape) != expected:
                raise ValueError(
                    f"teacher vectors of layer {t_layer} must be {expected} (P, D_t), "
                    f"got {tuple(target.shape)}"
                )
            proj = self.projections[str(s_layer)]
            assert isinstance(proj, nn.Linear)  # built in __init__; ModuleDict is typed as Module
            picked = states[batch_index.long(), position_index.long()]  # (P, D_s)
            projected = proj(picked.to(proj.weight.dtype))  # (P, D_t)
            losses[s_layer] = hidden_state_loss(self.kind, projected, target.to(projected.device), mask)
        return losses

    def forward(
        self,
        student_hidden_states: Sequence[torch.Tensor],
        batch_index: torch.Tensor,
        position_index: torch.Tensor,
        teacher_hidden: Mapping[int, torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mean over mapped layers of the masked feature loss.

        Args:
            student_hidden_states: the ``hidden_states`` tuple of a transformers forward
                with ``output_hidden_states=True``: (num_layers + 1) tensors of (B, T, D_s).
            batch_index: (P,) int, the sequence in the batch of each sampled position.
            position_index: (P,) int, the token position within that sequence.
            teacher_hidden: {teacher layer: (P, D_t) tensor} at the same positions, in any
                float dtype (float16/bfloat16 as stored; compared in float32).
            mask: (P,) 1/True for positions that count (e.g. 0 for padding); None = all.

        Returns:
            Scalar float32; zero (with a graph) when the mask selects nothing.
        """
        losses = self.per_layer(student_hidden_states, batch_index, position_index, teacher_hidden, mask)
        return torch.stack(list(losses.values())).mean()


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
