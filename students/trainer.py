"""The student trainer: one readable loop, KD from streamed labels, checkpoints, eval.

    setup()            process group, model, tokenizer checks, optimizer, eval set, resume
    train()            the loop over stages: micro-batches → loss → step → log / eval / checkpoint
    evaluate()         KL to the teacher (top-k + tail), top-1 agreement, CE (rank 0)
    save_checkpoint()  model, optimizer, schedule, step, every rank's data cursor, atomically

Loss per position: ``alpha * D_T(teacher, student) * T² + (1 - alpha) * CE`` where D is
the stage's divergence (students.losses) and T its temperature at this step.
Under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA) and each rank streams its own share of the row groups.
One log line per logged step::

    step 40/200 [kd] | loss 2.9 | kd 1.2 | ce 4.6 | T 1.50 | lr 9.5e-04 | tok/s 5,300
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
import yaml

from labelgen.contract.commits import CommitLog
from labelgen.contract.configs import config_to_dict
from labelgen.contract.dataset import read_manifest_if_complete
from labelgen.contract.format import FormatError, Manifest, tokenizer_fingerprint
from students.chunked_loss import chunked_kd_loss
from students.config import LossConfig, StageConfig, TrainConfig
from students.ensemble import EnsembleStream
from students.hidden_losses import HiddenStateDistiller
from students.loader import make_loader
from students.losses import bucket_kl, kd_loss, masked_cross_entropy, multi_teacher_kd, sampled_kd
from students.mixture import MixtureStream
from students.stream import LabelStream, open_dataset, row_group_refs

__all__ = ["Trainer", "TokenizerMismatchError", "check_tokenizer", "load_student"]


class TokenizerMismatchError(ValueError):
    """The labels were made with a different tokenizer than the student's."""


def check_tokenizer(labels: dict[str, Any], tokenizer: Any, tokenizer_path: str, url: str) -> None:
    """Refuse labels whose tokenizer fingerprint differs from the student tokenizer's.

    ``labels`` is the labels' tokenizer record (``Manifest.tokenizer``, or the job's
    ``_commits/tokenizer.json`` while it still writes)."""
    mine = tokenizer_fingerprint(tokenizer)
    theirs = labels.get("fingerprint")
    if mine != theirs:
        raise TokenizerMismatchError(
            f"the labels at {url} were made with tokenizer {theirs} "
            f"({labels.get('path')}, vocab {labels.get('vocab_size')}), "
            f"but the student's tokenizer {tokenizer_path} is {mine} (vocab {len(tokenizer)}); "
            "token ids would not line up. Use the teacher's tokenizer for the student, or label "
            "the corpus again with a teacher that shares the student's tokenizer"
        )


def load_student(cfg: TrainConfig, seed: int) -> tuple[Any, Any, str]:
    """(model, tokenizer, tokenizer path) for the config, on CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    m = cfg.model
    tok_path = m.tokenizer or m.path
    assert tok_path is not None  # guaranteed by ModelConfig.check
    for field_name, path in (("model.path", m.path), ("model.tokenizer", m.tokenizer)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{field_name} {path!r} does not exist; give a local model directory")
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    dtype = getattr(torch, m.dtype)
    torch.manual_seed(seed)
    if m.path is not None:
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype)
    else:
        init = dict(m.init or {})
        config = AutoConfig.for_model(init.pop("model_type"), **init)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model.get_output_embeddings().weight.shape[0] < len(tokenizer):
        raise ValueError(
            f"the student's vocabulary ({model.get_output_embeddings().weight.shape[0]}) is smaller "
            f"than its tokenizer's ({len(tokenizer)}); set model.init.vocab_size >= {len(tokenizer)}"
        )
    return model, tokenizer, tok_path


def _pending_tokenizer(fs: Any, root: str, url: str) -> dict[str, Any]:
    """The tokenizer record of a job that is still writing ``url`` (written before the first shard)."""
    record = CommitLog(fs, root).tokenizer()
    if record is None:
        raise FormatError(
            f"{url} has no manifest and no tokenizer record: it is not a labeling job's output (or the "
            "job has not started); check data.url"
        )
    return record


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


class _Dist:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        import torch.distributed as dist

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

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _pick_device(name: str, dist: _Dist) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but torch sees no CUDA device; use train.device=cpu or auto")
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.dist = _Dist()
        self.log = log if self.dist.main else (lambda msg: None)
        self.out = Path(cfg.train.output_dir)
        self.step = 0
        self.stages = cfg.resolved_stages()
        self._stream: Any = None
        self._stream_stage = -1
        self._data_states: dict[int, Any] = {}

    # ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = _pick_device(cfg.train.device, self.dist)
        self.dist.init(self.device)
        self.model, self.tokenizer, self.tok_path = load_student(cfg, cfg.train.seed)
        self.manifests: dict[str, Manifest] = {}
        for stage in self.stages:
            assert stage.mixture is not None and stage.loss is not None  # resolved_stages fills them
            for source in stage.mixture:
                manifest = self._manifest(source.url)
                if manifest is None:  # follow mode, the job is still writing
                    if stage.loss.kind == "sampled":
                        raise ValueError(
                            f"{source.url} is still being written; loss.kind=sampled needs its manifest "
                            "(the draws' temperature): wait for the job, or use loss.kind=forward_kl"
                        )
                    continue
                if stage.loss.kind == "sampled" and not manifest.products.get("draws"):
                    raise ValueError(
                        f"stage {stage.name!r} uses loss.kind=sampled, but {source.url} has no "
                        "random-sampling labels; label with labels.draws=N (e.g. 32), "
                        "or use loss.kind=forward_kl"
                    )
                draws = manifest.products.get("draws")
                if stage.loss.kind == "sampled" and stage.loss.temperature not in (1.0, draws["temperature"]):
                    raise ValueError(
                        f"loss.temperature={stage.loss.temperature} but the draws at {source.url} were made "
                        f"at temperature {draws['temperature']}; sampled KD uses the draws' temperature"
                    )
            if stage.loss.chunk_tokens:
                config = self.model.config
                for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
                    if getattr(config, name, None) not in (None, 1.0):
                        raise ValueError(
                            f"stage {stage.name!r}: loss.chunk_tokens needs logits = hidden @ W, but this "
                            f"student's config sets {name}={getattr(config, name)}; set loss.chunk_tokens=0"
                        )
        for source in cfg.data.teachers:
            if self._manifest(source.url) is None:
                raise ValueError(
                    f"data.teachers: {source.url} is still being written; an ensemble needs it complete"
                )
        self._setup_hidden()
        self._setup_eval()
        self.model.to(self.device)
        self.hidden_heads.to(self.device)
        self.ddp: torch.nn.Module = self.model
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        params = [*self.model.parameters(), *self.hidden_heads.parameters()]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        self.dist.barrier()
        ckpt = self.out / "checkpoint" / "state.pt"
        if cfg.train.resume and ckpt.is_file():
            self.load_checkpoint(ckpt)
        params = sum(p.numel() for p in self.model.parameters())
        url = self.stages[0].mixture[0].url  # type: ignore[index]
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
            f"eval row groups {len(self.eval_args[2])} | start step {self.step}"
        )

    def _manifest(self, url: str) -> Manifest | None:
        """The manifest of ``url``, checked once against the student's tokenizer. In follow
        mode a dataset still being written has none yet (None): its tokenizer is checked
        against the job's pending record instead."""
        if url in self.manifests:
            return self.manifests[url]
        if self.cfg.data.follow:
            fs, root = fsspec.core.url_to_fs(url)
            manifest = read_manifest_if_complete(fs, root)
            if manifest is None:
                check_tokenizer(_pending_tokenizer(fs, root, url), self.tokenizer, self.tok_path, url)
                self.log(
                    f"following {url}: the labeling job is still writing; new shards are read as they land"
                )
                return None
        else:
            manifest, _, _ = open_dataset(url)
        check_tokenizer(manifest.tokenizer, self.tokenizer, self.tok_path, url)
        self.manifests[url] = manifest
        return manifest

    def _setup_hidden(self) -> None:
        """A learned projection set (HiddenStateDistiller) per stage with a hidden-state loss;
        its datasets must carry the mapped teacher layers."""
        self.hidden_heads = torch.nn.ModuleDict()
        for index, stage in enumerate(self.stages):
            assert stage.loss is not None and stage.mixture is not None
            spec = stage.loss.hidden
            if spec is None:
                continue
            dims = set()
            for source in stage.mixture:
                manifest = self.manifests.get(source.url)
                product = manifest.products.get("hidden") if manifest is not None else None
                if manifest is None or not product:
                    raise ValueError(
                        f"stage {stage.name!r} has loss.hidden, but {source.url} has no hidden-state samples "
                        "(or is still being written); label with hidden.layers set, or drop loss.hidden"
                    )
                missing = sorted(set(spec.layer_map.values()) - set(product["layers"]))
                if missing:
                    raise ValueError(
                        f"loss.hidden.layer_map uses teacher layer(s) {missing}, but {source.url} stores "
                        f"layers {product['layers']}; map to stored layers"
                    )
                dims.add(int(product["dim"]))
            if len(dims) != 1:
                raise ValueError(
                    f"stage {stage.name!r}: its datasets' teacher hidden sizes differ ({sorted(dims)})"
                )
            n_states = self.model.config.num_hidden_layers + 1
            bad = sorted(s for s in spec.layer_map if s >= n_states)
            if bad:
                raise ValueError(
                    f"loss.hidden.layer_map uses student layer(s) {bad}, but the student has "
                    f"{n_states - 1} layers (0 = embeddings .. {n_states - 1})"
                )
            self.hidden_heads[str(index)] = HiddenStateDistiller(
                spec.layer_map, self.model.config.hidden_size, dims.pop(), kind=spec.kind
            )

    def _setup_eval(self) -> None:
        """Held-out set: data.eval_url, else the last row groups of the first training dataset
        (which its training streams then leave out)."""
        cfg = self.cfg
        self.holdout: dict[str, int] = {}
        if cfg.data.eval_url:
            manifest, _, _ = open_dataset(cfg.data.eval_url)  # complete, also in follow mode
            check_tokenizer(manifest.tokenizer, self.tokenizer, self.tok_path, cfg.data.eval_url)
            self.eval_args = (cfg.data.eval_url, manifest, row_group_refs(manifest))
            return
        url = self.stages[0].mixture[0].url  # type: ignore[index]
        n = cfg.data.holdout_row_groups
        train_manifest = self._manifest(url)
        if n == 0 or train_manifest is None:  # no held-out set: evaluate() reports nothing
            self.eval_args = (url, train_manifest, [])
            return
        refs = row_group_refs(train_manifest)
        if n >= len(refs):
            raise ValueError(
                f"data.holdout_row_groups={n} leaves nothing to train on ({len(refs)} row groups in {url}); "
                "lower it or set data.eval_url"
            )
        self.holdout[url] = n
        self.eval_args = (url, self.manifests[url], refs[len(refs) - n :])

    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, self.cfg.total_steps - o.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    # ---------------------------------------------------------------------------------
    def stage_at(self, step: int) -> tuple[int, StageConfig, int]:
        """(stage index, stage, step within the stage) of global step ``step`` (0-based)."""
        first = 0
        for index, stage in enumerate(self.stages):
            if step < first + stage.steps:
                return index, stage, step - first
            first += stage.steps
        return len(self.stages) - 1, self.stages[-1], self.stages[-1].steps - 1

    def stream(self, index: int) -> Any:
        """The training stream of stage ``index`` (built on first use, at its saved cursor):
        this rank's share of the stage's dataset, or a weighted mixture of several."""
        if self._stream_stage != index:
            stage = self.stages[index]
            assert stage.mixture is not None
            data = self.cfg.data
            streams = []
            for source in stage.mixture:
                manifest = self.manifests.get(source.url)
                refs = None
                if manifest is not None and not data.follow:
                    refs = row_group_refs(manifest)
                    refs = refs[: len(refs) - self.holdout.get(source.url, 0)]
                streams.append(
                    LabelStream(
                        source.url,
                        manifest,
                        refs,
                        data.batch_sequences,
                        seed=self.cfg.train.seed + index,
                        prefetch=data.prefetch_row_groups,
                        rank=self.dist.rank,
                        world_size=self.dist.world,
                        num_workers=data.num_workers,
                        verify=data.verify,
                        follow=data.follow,
                        poll_interval=data.poll_seconds,
                        follow_timeout=data.follow_timeout_seconds,
                        log=self.log,
                        hidden=stage.loss is not None and stage.loss.hidden is not None,
                    )
                )
            if len(streams) == 1 and data.teachers and stage.mixture[0].url == data.url:
                self._stream = EnsembleStream(
                    streams[0],
                    [(t.url, self.manifests[t.url]) for t in data.teachers],
                    verify=data.verify,
                    log=self.log,
                )
            elif len(streams) == 1:
                self._stream = streams[0]
            else:
                self._stream = MixtureStream(
                    streams,
                    [s.weight for s in stage.mixture],
                    seed=self.cfg.train.seed + index,
                    names=[s.url for s in stage.mixture],
                )
            if index in self._data_states:
                self._stream.load_state_dict(self._data_states[index])
            self._stream_stage = index
            self._batches = make_loader(self._stream)
        return self._stream

    def temperature(self, stage: StageConfig, in_stage: int) -> float:
        """The KD temperature at step ``in_stage`` of ``stage`` (the draws' own for 'sampled')."""
        assert stage.loss is not None and stage.mixture is not None
        if stage.loss.kind == "sampled":
            return float(self.manifests[stage.mixture[0].url].products["draws"]["temperature"])
        return stage.loss.temperature_at(in_stage, stage.steps)

    def next_batch(self, index: int) -> dict[str, torch.Tensor]:
        self.stream(index)
        return _to_device(next(self._batches), self.device)

    # ---------------------------------------------------------------------------------
    def losses(
        self,
        batch: dict[str, torch.Tensor],
        loss: LossConfig | None = None,
        temperature: float | None = None,
        stage: int = 0,
    ) -> dict[str, torch.Tensor]:
        """KD, CE (and hidden-state) terms and the mixed loss for one batch of stage ``stage``
        (shapes in students.stream.collate)."""
        loss = loss or self.stages[stage].loss
        assert loss is not None
        if temperature is None:
            temperature = self.temperature(self.stages[stage], 0)
        mask = batch["label_mask"].reshape(-1)
        targets = batch["next_ids"].reshape(-1)
        k = batch["topk_ids"].shape[-1]
        ids, lps = batch["topk_ids"].reshape(-1, k), batch["topk_logprobs"].reshape(-1, k)
        draws = {}
        if loss.kind == "sampled":
            width = batch["draw_ids"].shape[-1]
            draws = {
                "draw_ids": batch["draw_ids"].reshape(-1, width),
                "draw_counts": batch["draw_counts"].reshape(-1, width),
            }
        if loss.chunk_tokens:
            # Final hidden states (after the final norm) instead of logits; logits_to_keep=1 keeps the
            # head inside the (DDP) forward for one position only.
            out = self.ddp(input_ids=batch["input_ids"], output_hidden_states=True, logits_to_keep=1)
            last = out.hidden_states[-1][:, :-1]  # (B, T-1, D)
            head = self.model.get_output_embeddings()
            parts = chunked_kd_loss(
                last.reshape(-1, last.shape[-1]),
                head.weight,
                ids,
                lps,
                targets,
                mask,
                kind=loss.kind,
                alpha=loss.alpha,
                temperature=temperature,
                chunk_tokens=loss.chunk_tokens,
                beta=loss.beta,
                skew=loss.skew,
                lm_head_bias=getattr(head, "bias", None),
                **draws,
            )
        else:
            out = self.ddp(input_ids=batch["input_ids"], output_hidden_states=loss.hidden is not None)
            logits = out.logits[:, :-1]  # (B, T-1, V)
            flat = logits.reshape(-1, logits.shape[-1])  # (N, V)
            ce = masked_cross_entropy(flat, targets, mask)
            if loss.alpha > 0 and loss.kind == "sampled":
                kd = sampled_kd(flat, draws["draw_ids"], draws["draw_counts"], mask, temperature)
            elif loss.alpha > 0 and "topk_ids@1" in batch:  # a teacher ensemble (data.teachers)
                teachers = [(self.cfg.data.teacher_weight, ids, lps)]
                for j, source in enumerate(self.cfg.data.teachers, start=1):
                    kj = batch[f"topk_ids@{j}"].shape[-1]
                    teachers.append(
                        (
                            source.weight,
                            batch[f"topk_ids@{j}"].reshape(-1, kj),
                            batch[f"topk_logprobs@{j}"].reshape(-1, kj),
                        )
                    )
                kd = multi_teacher_kd(
                    loss.kind, flat, teachers, mask, temperature, beta=loss.beta, skew=loss.skew
                )
            elif loss.alpha > 0:
                kd = kd_loss(loss.kind, flat, ids, lps, mask, temperature, beta=loss.beta, skew=loss.skew)
            else:
                kd = torch.zeros((), dtype=ce.dtype, device=ce.device)
            parts = {"loss": loss.alpha * kd + (1 - loss.alpha) * ce, "kd": kd, "ce": ce}
        if loss.hidden is not None:
            teacher = {t: batch[f"hidden_layer_{t}"] for t in set(loss.hidden.layer_map.values())}
            distiller = self.hidden_heads[str(stage)]
            feature = distiller(out.hidden_states, batch["hidden_row"], batch["hidden_pos"], teacher)
            parts["loss"] = parts["loss"] + loss.hidden.weight * feature
            parts["hidden"] = feature.detach()
        return parts

    @staticmethod
    def _new_window() -> dict[str, float]:
        return {
            "loss": 0.0,
            "kd": 0.0,
            "ce": 0.0,
            "hidden": 0.0,
            "tokens": 0.0,
            "time": time.monotonic(),
            "n": 0,
        }

    def _sync_hidden_heads(self) -> None:
        """Average the projections' gradients over ranks (they live outside the DDP model)."""
        if self.dist.world == 1:
            return
        for p in self.hidden_heads.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.dist.world

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
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(o.grad_accum):
                batch = self.next_batch(index)
                parts = self.losses(batch, stage.loss, temperature, stage=index)
                (parts["loss"] / o.grad_accum).backward()
                for key in ("loss", "kd", "ce", "hidden"):
                    if key in parts:
                        window[key] += parts[key].item() / o.grad_accum
                window["tokens"] += float(batch["label_mask"].sum().item())
            self._sync_hidden_heads()
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
                loss_sum, kd_sum, ce_sum, hidden_sum, tokens = self.dist.sum(
                    [window["loss"], window["kd"], window["ce"], window["hidden"], window["tokens"]]
                )
                w = self.dist.world
                record = {
                    "step": self.step,
                    "stage": stage.name,
                    "loss": loss_sum / n / w,
                    "kd": kd_sum / n / w,
                    "ce": ce_sum / n / w,
                    **({"hidden": hidden_sum / n / w} if stage.loss.hidden is not None else {}),
                    "temperature": temperature,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tok_per_s": tokens / max(time.monotonic() - window["time"], 1e-9),
                }
                self.log(
                    f"step {self.step}/{total} [{stage.name}] | loss {record['loss']:.4f} "
                    f"| kd {record['kd']:.4f} | ce {record['ce']:.4f} | T {temperature:.2f} "
                    f"| lr {record['lr']:.2e} | tok/s {record['tok_per_s']:,.0f}"
                )
                if metrics_file:
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
                window = self._new_window()
            every = cfg.train.eval_every
            if (every and self.step % every == 0) or self.step == total:
                last_eval = self.evaluate()
                if metrics_file:
                    record = {"step": self.step, **{f"eval_{k}": v for k, v in last_eval.items()}}
                    metrics_file.write(json.dumps(record) + "\n")
                    metrics_file.flush()
            ck = cfg.train.checkpoint_every
            if (ck and self.step % ck == 0) or self.step == total:
                self.save_checkpoint()
        if metrics_file:
            metrics_file.close()
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
                "step": self.step,
                "world_size": self.dist.world,
                "model": self.model.state_dict(),
                "hidden_heads": self.hidden_heads.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data": cursors,
                "torch_rng": torch.get_rng_state(),
                "config": config_to_dict(self.cfg),
            }
            tmp = directory / f"state.pt.tmp-{os.getpid()}"
            torch.save(state, tmp)
            os.replace(tmp, directory / "state.pt")
        self.dist.barrier()
        return directory / "state.pt"

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
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
        stage, cursor = state["data"][self.dist.rank]
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
