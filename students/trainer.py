"""The student trainer: one readable loop, KD from streamed labels, checkpoints, eval.

    setup()            process group, student, checked datasets, objectives, optimizer, resume
    train()            the loop over stages: micro-batches → loss → step → log / eval / checkpoint
    evaluate()         KL to the teacher (top-k + tail), top-1 agreement, CE (rank 0)
    save_checkpoint()  model, optimizer, schedule, step, every rank's data cursor, atomically
    load_checkpoint()  the same back, loaded as data only (``weights_only``): never runs code

The pieces live next door: the student (students.student_model), the torchrun bookkeeping
(students.distributed), the dataset-vs-model-vs-loss rules (students.compatibility),
each stage's data (students.stage_data), its loss (students.objective), and the dataset
service (students.lineage: the trust ``data.require`` asks for, checked before anything
is read; the runs and metrics reported to each served version).

Loss per position: ``alpha * D_T(teacher, student) * T² + (1 - alpha) * CE`` where D is
the stage's divergence (students.losses) and T its temperature at this step.
Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA) and each rank streams its own share of the row groups.
One log line per logged step (``kl`` and ``top1``: the student against the teacher on
that step's batches at T=1, as evaluate() measures them on held-out rows)::

    step 40/200 [kd] | loss 2.9 | kd 1.2 | ce 4.6 | kl 0.41 | top1 0.52 | T 1.50 | lr 9.5e-04 | tok/s 5,300
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from labelgen.contract.configs import config_to_dict
from labelgen.contract.format import Manifest
from students.compatibility import check_compatibility
from students.config import StageConfig, TrainConfig
from students.distributed import Dist, pick_device
from students.ensemble import EnsembleStream
from students.lineage import Lineage, check_trust
from students.loader import make_loader
from students.losses import bucket_kl
from students.mixture import MixtureStream
from students.objective import Objective, build_hidden_heads
from students.stage_data import (
    build_stream,
    ensemble_weights,
    held_out_split,
    label_urls,
    read_checked,
    read_manifests,
    row_group_counts,
)
from students.stream import LabelStream
from students.student_model import load_student

__all__ = ["Trainer", "CheckpointError", "CHECKPOINT_FORMAT", "read_checkpoint"]

CHECKPOINT_FORMAT = "labelgen-student-checkpoint/2"
"""Written into every checkpoint; version 1 (no ``format`` key) kept the data cursors as
Python objects, version 2 as one JSON string."""
_CHECKPOINT_KEYS = ("step", "model", "optimizer", "scheduler", "data", "torch_rng")


class CheckpointError(ValueError):
    """A checkpoint file is not one this trainer wrote (or not readable); nothing in it ran."""


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    """Setup, the training loop, evaluation and checkpoints of one student run."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.dist = Dist()
        self.log = log if self.dist.main else (lambda msg: None)
        self.out = Path(cfg.train.output_dir)
        self.step = 0
        self.stages = cfg.resolved_stages()
        self._stream: LabelStream | MixtureStream | EnsembleStream | None = None
        self._stream_stage = -1
        self._data_states: dict[int, Any] = {}
        self.lineage: Lineage | None = None  # rank 0, once setup() reported the run

    # ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Process group, student, checked datasets, objectives, optimizer; resume if a
        checkpoint is there."""
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device, self.dist)
        self.dist.init(self.device)
        check_trust(self._urls, cfg.data.trust_needs, self.dist, self.log)  # before reading anything
        self.model, self.tokenizer, self.tok_path = load_student(cfg, cfg.train.seed)
        self._setup_data()
        distillers = build_hidden_heads(self.stages, self.manifests, self.model.config)
        # Keyed by str(stage index): trained with the student, saved in checkpoints.
        self.hidden_heads = torch.nn.ModuleDict({str(i): d for i, d in distillers.items()})
        self.objectives: list[Objective] = []
        for index, stage in enumerate(self.stages):
            assert stage.loss is not None  # resolved_stages fills it
            weights = ensemble_weights(stage, cfg.data)
            self.objectives.append(Objective.build(stage.loss, weights, distillers.get(index)))
        self.model.to(self.device)
        self.hidden_heads.to(self.device)
        self.ddp: torch.nn.Module = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self._setup_optimizer()
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
            self.lineage = Lineage(self._urls, str(self.out.resolve()), config_to_dict(cfg), self.log)
            self.lineage.report()
        self.dist.barrier()
        ckpt = self.out / "checkpoint" / "state.pt"
        if cfg.train.resume and ckpt.is_file():
            self.load_checkpoint(ckpt)
        self._log_setup()

    def _setup_data(self) -> None:
        """Every dataset's manifest, checked against the student's tokenizer (that error first),
        then against the student and the losses (every problem at once); the held-out split."""
        data = self.cfg.data
        found = read_manifests(
            label_urls(self.stages, data), data.follow, self.tokenizer, self.tok_path, self.log
        )
        # data.eval_url must be complete, also in follow mode.
        eval_manifest = read_checked(data.eval_url, self.tokenizer, self.tok_path) if data.eval_url else None
        check_compatibility(self.cfg, found, self.model.config, row_group_counts(found))
        self.manifests: dict[str, Manifest] = {url: m for url, m in found.items() if m is not None}
        self.eval_args, self.holdout = held_out_split(data, self._first_url, found, eval_manifest)

    @property
    def _urls(self) -> list[str]:
        """Every dataset this run reads: each stage's, data.teachers', data.eval_url."""
        data = self.cfg.data
        return [*label_urls(self.stages, data), *([data.eval_url] if data.eval_url else [])]

    def _setup_optimizer(self) -> None:
        """AdamW over the student and the hidden-state projections (no decay on biases and
        norms), with warm-up and cosine or constant decay over the whole run."""
        params = [*self.model.parameters(), *self.hidden_heads.parameters()]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        o = self.cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.betas[0], o.betas[1]),  # two, checked by OptimConfig
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)

    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, self.cfg.total_steps - o.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    @property
    def _first_url(self) -> str:
        """The first stage's first dataset (the held-out set's source without data.eval_url)."""
        assert self.stages[0].mixture is not None
        return self.stages[0].mixture[0].url

    def _log_setup(self) -> None:
        params = sum(p.numel() for p in self.model.parameters())
        url = self._first_url
        first = self.manifests.get(url)
        what = (
            "still being written"
            if first is None
            else (
                f"{first.totals['rows']} sequences, {first.totals['label_positions']} positions, "
                f"top-{first.k}"
            )
        )
        self.log(
            f"student {params / 1e6:.2f}M params on {self.device} x{self.dist.world} | labels {url}: {what}"
            f" | stages {', '.join(f'{s.name}({s.steps})' for s in self.stages)} | "
            f"eval row groups {len(self.eval_args.refs)} | start step {self.step}"
        )

    # ---------------------------------------------------------------------------------
    def stage_at(self, step: int) -> tuple[int, StageConfig, int]:
        """(stage index, stage, step within the stage) of global step ``step`` (0-based)."""
        first = 0
        for index, stage in enumerate(self.stages):
            if step < first + stage.steps:
                return index, stage, step - first
            first += stage.steps
        return len(self.stages) - 1, self.stages[-1], self.stages[-1].steps - 1

    def temperature(self, stage: StageConfig, in_stage: int) -> float:
        """The KD temperature at step ``in_stage`` of ``stage`` (the draws' own for 'sampled')."""
        assert stage.loss is not None and stage.mixture is not None
        if stage.loss.kind == "sampled":
            return float(self.manifests[stage.mixture[0].url].products["draws"]["temperature"])
        return stage.loss.temperature_at(in_stage, stage.steps)

    def stream(self, index: int) -> LabelStream | MixtureStream | EnsembleStream:
        """The training stream of stage ``index`` (built on first use, at its saved cursor):
        this rank's share of the stage's dataset, or a weighted mixture of several."""
        if self._stream is None or self._stream_stage != index:
            self._stream = build_stream(
                self.stages[index],
                index,
                self.cfg.data,
                self.manifests,
                self.holdout,
                seed=self.cfg.train.seed,
                rank=self.dist.rank,
                world_size=self.dist.world,
                log=self.log,
            )
            if index in self._data_states:
                self._stream.load_state_dict(self._data_states[index])
            self._stream_stage = index
            self._batches = make_loader(self._stream)
        return self._stream

    def next_batch(self, index: int) -> dict[str, torch.Tensor]:
        self.stream(index)
        return _to_device(next(self._batches), self.device)

    def losses(
        self,
        batch: dict[str, torch.Tensor],
        stage: int = 0,
        temperature: float | None = None,
        watch: bool = False,
    ) -> dict[str, torch.Tensor]:
        """KD, CE (and hidden-state) terms and the mixed loss for one batch of stage ``stage``
        at ``temperature`` (default: the stage's first step's), with ``watch`` also ``kl``
        and ``top1`` to the teacher; see students.objective."""
        if temperature is None:
            temperature = self.temperature(self.stages[stage], 0)
        head = self.model.get_output_embeddings()
        return self.objectives[stage](self.ddp, head, batch, temperature, watch=watch)

    # ---------------------------------------------------------------------------------
    @staticmethod
    def _new_window() -> dict[str, float]:
        return {
            "loss": 0.0,
            "kd": 0.0,
            "ce": 0.0,
            "hidden": 0.0,
            "kl": 0.0,
            "top1": 0.0,
            "tokens": 0.0,
            "time": time.monotonic(),
            "n": 0,
        }

    def train(self) -> dict[str, float]:
        cfg, o = self.cfg, self.cfg.optim
        total = cfg.total_steps
        self.ddp.train()
        metrics_file = (self.out / "metrics.jsonl").open("a") if self.dist.main else None
        window = self._new_window()
        last_eval: dict[str, float] = {}
        while self.step < total:
            index, stage, in_stage = self.stage_at(self.step)
            assert stage.loss is not None
            temperature = self.temperature(stage, in_stage)
            logged = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == total
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(o.grad_accum):
                batch = self.next_batch(index)
                parts = self.losses(batch, index, temperature, watch=logged)
                (parts["loss"] / o.grad_accum).backward()
                for key in ("loss", "kd", "ce", "hidden", "kl", "top1"):
                    if key in parts:
                        window[key] += parts[key].item() / o.grad_accum
                window["tokens"] += float(batch["label_mask"].sum().item())
            self.dist.average_gradients(self.hidden_heads.parameters())  # outside DDP
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(
                    [*self.model.parameters(), *self.hidden_heads.parameters()], o.grad_clip
                )
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            window["n"] += 1
            if self.step % cfg.train.log_every == 0 or self.step == total:
                n = window["n"]
                keys = ("loss", "kd", "ce", "hidden", "kl", "top1", "tokens")
                loss_sum, kd_sum, ce_sum, hidden_sum, kl_sum, top1_sum, tokens = self.dist.sum(
                    [window[key] for key in keys]
                )
                w = self.dist.world
                record = {
                    "step": self.step,
                    "stage": stage.name,
                    "loss": loss_sum / n / w,
                    "kd": kd_sum / n / w,
                    "ce": ce_sum / n / w,
                    **({"hidden": hidden_sum / n / w} if stage.loss.hidden is not None else {}),
                    "kl": kl_sum / w,  # measured on this step's micro-batches only
                    "top1": top1_sum / w,
                    "temperature": temperature,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tok_per_s": tokens / max(time.monotonic() - window["time"], 1e-9),
                }
                self.log(
                    f"step {self.step}/{total} [{stage.name}] | loss {record['loss']:.4f} "
                    f"| kd {record['kd']:.4f} | ce {record['ce']:.4f} | kl {record['kl']:.4f} "
                    f"| top1 {record['top1']:.3f} | T {temperature:.2f} "
                    f"| lr {record['lr']:.2e} | tok/s {record['tok_per_s']:,.0f}"
                )
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                if self.lineage:
                    self.lineage.add(record)
                window = self._new_window()
            every = cfg.train.eval_every
            if (every and self.step % every == 0) or self.step == total:
                last_eval = self.evaluate()
                if metrics_file:
                    record = {"step": self.step, **{f"eval_{k}": v for k, v in last_eval.items()}}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                    if self.lineage:
                        self.lineage.add(record)
            ck = cfg.train.checkpoint_every
            if (ck and self.step % ck == 0) or self.step == total:
                self.save_checkpoint()
            if self.lineage and logged:  # after eval: a step's records are sent together
                self.lineage.flush()
        if metrics_file:
            metrics_file.close()
        if self.lineage:
            self.lineage.close()
        self.save_final()
        return last_eval

    # ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics at T=1 (position-weighted means over label positions), on rank 0;
        the other ranks wait and get an empty result."""
        if not self.dist.main:
            self.dist.barrier()
            return {}
        url, manifest, refs = self.eval_args
        if not refs:
            self.log(
                f"eval step {self.step} | no held-out labels (set data.eval_url or data.holdout_row_groups)"
            )
            self.dist.barrier()
            return {}
        stream = LabelStream(
            url,
            manifest,
            refs,
            self.cfg.data.batch_sequences,
            shuffle=False,
            loop=False,
            verify=self.cfg.data.verify,
        )
        was_training = self.model.training
        self.model.eval()
        sums = {"kl": 0.0, "agree": 0.0, "ce": 0.0, "teacher_ce": 0.0, "positions": 0.0}
        for i, np_batch in enumerate(stream):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            b = _to_device(np_batch, self.device)
            logits = self.model(input_ids=b["input_ids"]).logits[:, :-1]
            flat = logits.reshape(-1, logits.shape[-1]).float()
            k = b["topk_ids"].shape[-1]
            ids = b["topk_ids"].reshape(-1, k)
            lps = b["topk_logprobs"].reshape(-1, k)
            mask = b["label_mask"].reshape(-1)
            kl = bucket_kl(flat, ids, lps)
            ce = torch.nn.functional.cross_entropy(flat, b["next_ids"].reshape(-1), reduction="none")
            sums["kl"] += float((kl * mask).sum())
            sums["agree"] += float(((flat.argmax(-1) == ids[:, 0]).float() * mask).sum())
            sums["ce"] += float((ce * mask).sum())
            sums["teacher_ce"] += float((-b["target_logprobs"].reshape(-1) * mask).sum())
            sums["positions"] += float(mask.sum())
        if was_training:
            self.model.train()
        self.dist.barrier()
        n = max(sums.pop("positions"), 1.0)
        result = {key: value / n for key, value in sums.items()}
        result["positions"] = n
        self.log(
            f"eval step {self.step} | kl_to_teacher {result['kl']:.4f} | top1_agree {result['agree']:.3f} "
            f"| ce {result['ce']:.4f} | teacher_ce {result['teacher_ce']:.4f} | positions {int(n)}"
        )
        return result

    # ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Rank 0 writes model, optimizer, schedule, step and every rank's data cursor."""
        directory = self.out / "checkpoint"
        cursor = (self._stream_stage, self._stream.state_dict() if self._stream is not None else None)
        cursors = self.dist.gather(cursor)
        if self.dist.main:
            directory.mkdir(parents=True, exist_ok=True)
            state = {
                "format": CHECKPOINT_FORMAT,
                "step": self.step,
                "world_size": self.dist.world,
                "model": self.model.state_dict(),
                "hidden_heads": self.hidden_heads.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data": json.dumps(cursors),  # plain data: loads under weights_only, always
                "torch_rng": torch.get_rng_state(),
                "config": config_to_dict(self.cfg),
            }
            tmp = directory / f"state.pt.tmp-{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, directory / "state.pt")
        self.dist.barrier()
        return directory / "state.pt"

    def load_checkpoint(self, path: Path) -> None:
        """Resume from ``path`` (written by :meth:`save_checkpoint`).

        Raises:
            CheckpointError: the file is not a checkpoint this trainer wrote: it is loaded
                as data only (tensors, numbers, strings, lists, dicts), so a planted pickle
                is refused before any of its code can run.
            ValueError: it was written by another number of ranks.
        """
        state = read_checkpoint(path)
        if state.get("world_size", 1) != self.dist.world:
            raise ValueError(
                f"{path} was written by {state.get('world_size', 1)} ranks, this run has {self.dist.world}; "
                "resume with the same number of processes (each rank's data cursor is in it), or start "
                "a new output_dir"
            )
        self.model.load_state_dict(state["model"])
        self.hidden_heads.load_state_dict(state.get("hidden_heads", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        data = state["data"]
        cursors = json.loads(data) if isinstance(data, str) else data  # format 1: Python objects
        stage, cursor = cursors[self.dist.rank]
        if cursor is not None:
            self._data_states[stage] = cursor
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.log(f"resumed from {path} at step {self.step}")

    def save_final(self) -> Path:
        directory = self.out / "final"
        if self.dist.main:
            self.model.save_pretrained(str(directory))
            self.tokenizer.save_pretrained(str(directory))
            if len(self.hidden_heads):
                torch.save(self.hidden_heads.state_dict(), directory / "hidden_projections.pt")
        self.dist.barrier()
        return directory


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state dict in a checkpoint file, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: naming the file: it needs code to load (a pickle of other objects,
            refused before anything in it runs), cannot be read as a checkpoint at all, or
            lacks the keys :meth:`Trainer.save_checkpoint` writes.
    """
    fix = f"delete {path} (or set train.output_dir to a new directory, or train.resume=false) and start again"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", str(exc))
        reason = found.group(1).strip() if found else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path} is not a checkpoint this trainer wrote: it holds more than tensors and plain data "
            f"(weights-only load: {reason}); a checkpoint is only ever loaded as data, so nothing in it "
            f"ran and resuming from it is refused; {fix}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint this trainer wrote (no {', '.join(missing)}); {fix}"
        )
    return state
