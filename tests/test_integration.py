"""Acceptance tests on the real parts: vLLM on CPU, transformers, the CLIs, a full KD run.

Marked ``integration``; they build a tiny teacher, run ``labelgen run`` in a
subprocess (vLLM's engine core is its own process), and take a few minutes in all.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import dataset_rows, make_spec, student_config, write_spec
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import COMMITS_DIR

pytestmark = pytest.mark.integration


def cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    module = {"labelgen": "labelgen.cli", "students": "students.cli"}[args[0]]
    return subprocess.run(
        [sys.executable, "-m", module, *args[1:]], capture_output=True, text=True, check=check, **kw
    )


@pytest.fixture(scope="module")
def vllm_job(teacher_dir, corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    """The corpus labeled once by the real vLLM teacher through `labelgen run`."""
    work = tmp_path_factory.mktemp("vllm-job")
    spec = write_spec(work / "job.yaml", make_spec(teacher_dir, corpus_dir, str(work / "labels")))
    out = cli("labelgen", "run", str(spec), "--no-progress")
    assert "labeled" in out.stdout, out.stderr[-3000:]
    return spec, work / "labels"


def test_labels_match_transformers_fp32(vllm_job, teacher_dir):
    from transformers import AutoModelForCausalLM

    _, url = vllm_job
    m = read_manifest(str(url))
    assert m.teacher["engine"] == "vllm" and m.teacher["logprobs_mode"] == "raw_logprobs"
    assert m.tokenizer["model_vocab_size"] == 528 and m.tokenizer["vocab_size"] == 512
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    rows = dataset_rows(url)
    picked = rows[:6] + rows[-4:]  # includes chat records (unit 0) and a short last sequence
    k, checked, exact = m.k, 0, 0
    for row in picked:
        ids = np.array(row["input_ids"])
        t = len(ids)
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor(ids)[None]).logits[0, :-1].double(), -1)
        ref_vals, ref_ids = ref.topk(k, dim=-1)
        top_ids = torch.tensor(row["topk_ids"]).view(t - 1, k)
        top_lps = torch.tensor(row["topk_logprobs"], dtype=torch.float64).view(t - 1, k)
        target = torch.tensor(row["target_logprobs"], dtype=torch.float64)
        torch.testing.assert_close(top_lps, ref_vals, atol=1e-4, rtol=0)
        torch.testing.assert_close(target, ref[torch.arange(t - 1), torch.tensor(ids[1:])], atol=1e-4, rtol=0)
        # Ids exact up to ties: a stored id's reference log-prob equals the rank's value.
        torch.testing.assert_close(ref.gather(-1, top_ids), ref_vals, atol=1e-4, rtol=0)
        exact += int((top_ids == ref_ids).sum())
        checked += top_ids.numel()
    assert exact / checked > 0.99, f"only {exact}/{checked} ids identical"


def test_sigkill_and_rerun_gives_the_same_dataset(vllm_job, teacher_dir, corpus_dir, tmp_path):
    _, reference = vllm_job
    out = tmp_path / "labels"
    spec = write_spec(tmp_path / "job.yaml", make_spec(teacher_dir, corpus_dir, str(out)))
    seed = int(os.environ.get("LABELGEN_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    for attempt in range(2):
        before = len(list((out / COMMITS_DIR).glob("part-*.json"))) if out.exists() else 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "labelgen.cli", "run", str(spec), "--no-progress"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list((out / COMMITS_DIR).glob("part-*.json"))) > before:
                break
            time.sleep(0.05)
        delay = rng.uniform(0.0, 1.5)
        time.sleep(delay)
        finished = proc.poll() is not None
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(
            f"kill seed {seed}, attempt {attempt}: SIGKILL {delay:.2f}s after a commit, finished={finished}"
        )
    final = cli("labelgen", "run", str(spec), "--no-progress")
    assert "labeled" in final.stdout
    a, b = dataset_rows(reference), dataset_rows(out)
    assert len(a) == len(b)
    assert [r["sample_id"] for r in a] == [r["sample_id"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert x == y, f"row {x['sample_id']} differs after kill + rerun (seed {seed})"
    assert read_manifest(str(reference)).rejected == read_manifest(str(out)).rejected


def test_inspect_and_validate_cli(vllm_job):
    spec, url = vllm_job
    out = cli("labelgen", "inspect", str(url)).stdout
    assert "top-8 raw log-probs" in out and "rejected    empty_text=1" in out and "mean entropy" in out
    assert "OK" in cli("labelgen", "validate", str(spec)).stdout
    bad = cli("labelgen", "validate", str(spec), "labels.k=0", "nope=1", check=False)
    assert (
        bad.returncode == 2 and "labels.k must be >= 1" in bad.stderr and "nope is not a known" in bad.stderr
    )
    missing = cli("labelgen", "inspect", str(url) + "-nothing", check=False)
    assert missing.returncode == 2 and "no label dataset" in missing.stderr


def test_kd_student_ends_closer_to_the_teacher_than_ce_student(vllm_job, teacher_dir, tmp_path):
    """Same student, same tokens, same steps: KD from stored top-k vs CE alone.

    Closeness is the exact full-vocabulary KL(teacher || student) on the held-out
    sequences, with the teacher run by transformers (not the stored labels).
    """
    from transformers import AutoModelForCausalLM

    from students.trainer import Trainer

    _, url = vllm_job
    runs = {}
    for name, alpha in (("kd", 0.5), ("ce", 0.0)):
        trainer = Trainer(student_config(str(url), teacher_dir, tmp_path / name, alpha), log=print)
        trainer.setup()
        runs[name] = (trainer, trainer.train())
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    trainer = runs["kd"][0]
    eval_url, eval_manifest, eval_refs = trainer.eval_args
    from students.stream import LabelStream

    kl = {"kd": 0.0, "ce": 0.0}
    positions = 0.0
    for batch in LabelStream(eval_url, eval_manifest, eval_refs, 8, shuffle=False, loop=False):
        ids = torch.from_numpy(batch["input_ids"])
        mask = torch.from_numpy(batch["label_mask"])
        with torch.no_grad():
            t = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1, :512].double(), -1)
            for name in kl:
                s = torch.log_softmax(runs[name][0].model(input_ids=ids).logits[:, :-1].double(), -1)
                kl[name] += float(((t.exp() * (t - s)).sum(-1) * mask).sum())
        positions += float(mask.sum())
    kl = {name: value / positions for name, value in kl.items()}
    print(f"held-out full-vocab KL to teacher over {int(positions)} positions: {kl}")
    print(f"stored-label eval: kd {runs['kd'][1]} | ce {runs['ce'][1]}")
    assert kl["kd"] < kl["ce"]
    assert runs["kd"][1]["kl"] < runs["ce"][1]["kl"]
