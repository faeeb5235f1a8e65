"""The student trainer: one readable loop, KD from streamed labels, checkpoints, eval.

    setup()            model, tokenizer check, optimizer, data streams, resume
    train()            the loop: micro-batches → loss → step → log / eval / checkpoint
    evaluate()         KL to the teacher (top-k + tail), top-1 agreement, CE
    save_checkpoint()  model, optimizer, schedule, step and data cursor, atomically

Loss per position: ``alpha * KL_T(teacher || student) * T² + (1 - alpha) * CE``.
One log line per logged step::

    step 40/200 | loss 2.9 | kd 1.2 | ce 4.6 | lr 9.5e-04 | tok/s 5,300
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from labelgen.contract.configs import config_to_dict
from labelgen.contract.format import Manifest, tokenizer_fingerprint
from students.config import TrainConfig
from students.data import LabelStream, open_dataset, row_group_refs
from students.losses import bucket_kl, masked_cross_entropy, sampled_kd, topk_forward_kl

__all__ = ["Trainer", "TokenizerMismatchError", "check_tokenizer", "load_student"]


class TokenizerMismatchError(ValueError):
    """The labels were made with a different tokenizer than the student's."""


def check_tokenizer(manifest: Manifest, tokenizer: Any, tokenizer_path: str, url: str) -> None:
    """Refuse labels whose tokenizer fingerprint differs from the student tokenizer's."""
    mine = tokenizer_fingerprint(tokenizer)
    theirs = manifest.tokenizer.get("fingerprint")
    if mine != theirs:
        raise TokenizerMismatchError(
            f"the labels at {url} were made with tokenizer {theirs} "
            f"({manifest.tokenizer.get('path')}, vocab {manifest.tokenizer.get('vocab_size')}), "
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


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.out = Path(cfg.train.output_dir)
        self.step = 0

    # ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.manifest, _, _ = open_dataset(cfg.data.url)
        self.model, self.tokenizer, tok_path = load_student(cfg, cfg.train.seed)
        check_tokenizer(self.manifest, self.tokenizer, tok_path, cfg.data.url)
        self.kd_temperature = cfg.loss.temperature
        if cfg.loss.kind == "sampled":
            draws = self.manifest.products.get("draws")
            if not draws:
                raise ValueError(
                    f"loss.kind=sampled needs random-sampling labels, but {cfg.data.url} has none; "
                    "label with labels.draws=N (e.g. 32), or use loss.kind=forward_kl"
                )
            if cfg.loss.temperature not in (1.0, draws["temperature"]):
                raise ValueError(
                    f"loss.temperature={cfg.loss.temperature} but the draws at {cfg.data.url} were made at "
                    f"temperature {draws['temperature']}; sampled KD uses the draws' temperature"
                )
            self.kd_temperature = float(draws["temperature"])
        refs = row_group_refs(self.manifest)
        if cfg.data.eval_url:
            eval_manifest, _, _ = open_dataset(cfg.data.eval_url)
            check_tokenizer(eval_manifest, self.tokenizer, tok_path, cfg.data.eval_url)
            train_refs, eval_refs, eval_url = refs, row_group_refs(eval_manifest), cfg.data.eval_url
        else:
            n = cfg.data.holdout_row_groups
            if n >= len(refs):
                raise ValueError(
                    f"data.holdout_row_groups={n} leaves nothing to train on ({len(refs)} row groups); "
                    "lower it or set data.eval_url"
                )
            train_refs, eval_refs, eval_url = refs[: len(refs) - n], refs[len(refs) - n :], cfg.data.url
            eval_manifest = self.manifest
        self.train_stream = LabelStream(
            cfg.data.url,
            self.manifest,
            train_refs,
            cfg.data.batch_sequences,
            seed=cfg.train.seed,
            prefetch=cfg.data.prefetch_row_groups,
        )
        self.eval_args = (eval_url, eval_manifest, eval_refs)
        decay = [p for n, p in self.model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim < 2]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        ckpt = self.out / "checkpoint" / "state.pt"
        if cfg.train.resume and ckpt.is_file():
            self.load_checkpoint(ckpt)
        params = sum(p.numel() for p in self.model.parameters())
        t = self.manifest.totals
        self.log(
            f"student {params / 1e6:.2f}M params | labels {cfg.data.url}: {t['rows']} sequences, "
            f"{t['label_positions']} positions, top-{self.manifest.k} | train row groups "
            f"{len(train_refs)}, eval row groups {len(eval_refs)} | start step {self.step}"
        )

    def _lr_factor(self, step: int) -> float:
        o = self.cfg.optim
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = (step - o.warmup_steps) / max(1, o.max_steps - o.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    # ---------------------------------------------------------------------------------
    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """KD, CE and the mixed loss for one batch (shapes in students.data.collate)."""
        logits = self.model(input_ids=batch["input_ids"]).logits[:, :-1]  # (B, T-1, V)
        n_vocab = logits.shape[-1]
        flat = logits.reshape(-1, n_vocab)  # (N, V)
        mask = batch["label_mask"].reshape(-1)
        k = batch["topk_ids"].shape[-1]
        loss_cfg = self.cfg.loss
        ce = masked_cross_entropy(flat, batch["next_ids"].reshape(-1), mask)
        if loss_cfg.alpha > 0 and loss_cfg.kind == "sampled":
            width = batch["draw_ids"].shape[-1]
            kd = sampled_kd(
                flat,
                batch["draw_ids"].reshape(-1, width),
                batch["draw_counts"].reshape(-1, width),
                mask,
                self.kd_temperature,
            )
        elif loss_cfg.alpha > 0:
            kd = topk_forward_kl(
                flat,
                batch["topk_ids"].reshape(-1, k),
                batch["topk_logprobs"].reshape(-1, k),
                mask,
                self.kd_temperature,
            )
        else:
            kd = torch.zeros((), dtype=ce.dtype)
        return {"loss": loss_cfg.alpha * kd + (1 - loss_cfg.alpha) * ce, "kd": kd, "ce": ce}

    def train(self) -> dict[str, float]:
        cfg, o = self.cfg, self.cfg.optim
        self.model.train()
        batches = iter(self.train_stream)
        metrics_file = (self.out / "metrics.jsonl").open("a")
        window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0, "time": time.monotonic(), "n": 0}
        last_eval: dict[str, float] = {}
        while self.step < o.max_steps:
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(o.grad_accum):
                batch = _to_torch(next(batches))
                parts = self.losses(batch)
                (parts["loss"] / o.grad_accum).backward()
                for key in ("loss", "kd", "ce"):
                    window[key] += parts[key].item() / o.grad_accum
                window["tokens"] += int(batch["label_mask"].sum().item())
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            window["n"] += 1
            if self.step % cfg.train.log_every == 0 or self.step == o.max_steps:
                elapsed = time.monotonic() - window["time"]
                n = window["n"]
                record = {
                    "step": self.step,
                    "loss": window["loss"] / n,
                    "kd": window["kd"] / n,
                    "ce": window["ce"] / n,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tok_per_s": window["tokens"] / max(elapsed, 1e-9),
                }
                self.log(
                    f"step {self.step}/{o.max_steps} | loss {record['loss']:.4f} | kd {record['kd']:.4f} "
                    f"| ce {record['ce']:.4f} | lr {record['lr']:.2e} | tok/s {record['tok_per_s']:,.0f}"
                )
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                window = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "tokens": 0, "time": time.monotonic(), "n": 0}
            every = cfg.train.eval_every
            if (every and self.step % every == 0) or self.step == o.max_steps:
                last_eval = self.evaluate()
                metrics_file.write(
                    json.dumps({"step": self.step, **{f"eval_{k}": v for k, v in last_eval.items()}}) + "\n"
                )
                metrics_file.flush()
            ck = cfg.train.checkpoint_every
            if (ck and self.step % ck == 0) or self.step == o.max_steps:
                self.save_checkpoint()
        metrics_file.close()
        self.save_final()
        return last_eval

    # ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out metrics at T=1 (position-weighted means over label positions)."""
        url, manifest, refs = self.eval_args
        stream = LabelStream(url, manifest, refs, self.cfg.data.batch_sequences, shuffle=False, loop=False)
        was_training = self.model.training
        self.model.eval()
        sums = {"kl": 0.0, "agree": 0.0, "ce": 0.0, "teacher_ce": 0.0, "positions": 0.0}
        for i, np_batch in enumerate(stream):
            if self.cfg.train.eval_batches and i >= self.cfg.train.eval_batches:
                break
            b = _to_torch(np_batch)
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
        directory = self.out / "checkpoint"
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "data": self.train_stream.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": config_to_dict(self.cfg),
        }
        tmp = directory / f"state.pt.tmp-{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, directory / "state.pt")
        return directory / "state.pt"

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_stream.load_state_dict(state["data"])
        torch.set_rng_state(state["torch_rng"])
        self.step = state["step"]
        self.log(f"resumed from {path} at step {self.step}")

    def save_final(self) -> Path:
        directory = self.out / "final"
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        return directory
