"""This process's place in a ``torchrun`` job, and the few collectives the trainer needs.

Without torchrun (no WORLD_SIZE) it is rank 0 of 1 and every collective is a no-op, so
the trainer runs the same code on one CPU process and on N GPUs. Under torchrun the
process group is gloo on CPU and nccl on CUDA; each rank takes ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["Dist", "pick_device"]


class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device: torch.device | None = None  # set by init()

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs and writes files."""
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Join the process group (nccl on CUDA, gloo on CPU) when there is more than one rank."""
        import torch.distributed as dist

        self.device = device
        if device.type == "cuda":  # object collectives (gather, broadcast) use the current device
            torch.cuda.set_device(device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a list with one entry without torchrun)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (``obj`` itself without torchrun): the other ranks'
        argument is ignored, so only rank 0 needs to compute it."""
        if self.world == 1:
            return obj
        box = [obj if self.main else None]
        device = self.device  # nccl sends the pickled bytes from this rank's GPU
        torch.distributed.broadcast_object_list(
            box, src=0, device=device if device and device.type == "cuda" else None
        )
        return box[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64)."""
        if self.world == 1:
            return values
        device = self.device if self.device is not None and self.device.type == "cuda" else None
        t = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
        torch.distributed.all_reduce(t)
        return t.tolist()

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average ``params``' gradients over ranks, for parameters that live outside the
        DDP-wrapped model (DDP only syncs its own); a missing gradient counts as zero."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world


def pick_device(name: str, dist: Dist) -> torch.device:
    """The device for ``train.device`` (auto | cpu | cuda): ``cuda:LOCAL_RANK`` or cpu."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but torch sees no CUDA device; use train.device=cpu or auto")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")
