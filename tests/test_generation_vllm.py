"""Generation jobs on real vLLM: labels of generated tokens, reproducibility, kill + resume, checks.

Marked ``integration``. ``gen_job`` runs ``labelgen generate`` once (every sample kept
or stored as rejected); a second job over the same prompts, with references built from
the first job's answers, is SIGKILLed and re-run, and must ask and get the same answers
(same seeds), judge them as the checks say, and count them in its manifest.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import REPO, dataset_rows, generated_rows, student_config, write_spec
from labelgen.contract.dataset import read_manifest
from labelgen.contract.format import COMMITS_DIR

pytestmark = pytest.mark.integration

PROMPTS = 24
N = 3


def _spec(teacher_dir: Path, prompts: Path, out: Path, **generate) -> dict:
    return {
        "teacher": {
            "model": str(teacher_dir),
            "dtype": "float32",
            "max_model_len": 256,
            "engine_args": {"enforce_eager": True},
        },
        "corpus": {"sources": [str(prompts)]},
        "labels": {"k": 8},
        "output": {"url": str(out), "shard_mib": 0.004, "row_group_mib": 0.002},
        "generate": {
            "n": N,
            "temperature": 0.8,
            "top_p": 0.95,
            "max_tokens": 24,
            "chat_template": False,
            "batch_prompts": 4,
            "keep_rejected": True,
            **generate,
        },
    }


def _generate(spec: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "labelgen.cli", "generate", str(spec), "--no-progress"],
        capture_output=True,
        text=True,
        check=check,
        env=env,
        **kw,
    )


@pytest.fixture(scope="module")
def gen_job(teacher_dir, texts, tmp_path_factory) -> tuple[Path, Path]:
    """``labelgen generate`` over short prompts cut from the corpus texts: every sample kept
    (only the length check is on), dedup off."""
    work = tmp_path_factory.mktemp("gen-job")
    prompts = work / "prompts" / "p.jsonl"
    prompts.parent.mkdir()
    with prompts.open("w") as f:
        for text in texts[:PROMPTS]:
            f.write(json.dumps({"prompt": " ".join(text.split()[:6])}) + "\n")
    spec = _spec(teacher_dir, prompts, work / "out", checks={"finished": False, "dedup": "none"})
    out = _generate(write_spec(work / "gen.yaml", spec))
    assert "generated" in out.stdout, out.stderr[-3000:]
    return prompts, work / "out"


def test_labels_of_generated_tokens_match_transformers_fp32_with_the_prompt_masked(gen_job, teacher_dir):
    from transformers import AutoModelForCausalLM

    _, url = gen_job
    manifest = read_manifest(str(url))
    stats = manifest.generation["stats"]
    assert stats["samples"] == PROMPTS * N and stats["kept"] == PROMPTS * N
    rows = {r["label_sample_id"]: r for r in generated_rows(str(url))}
    labels = dataset_rows(url)
    assert len(labels) == PROMPTS * N and set(rows) == {lab["sample_id"] for lab in labels}
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    k = manifest.k
    for lab in labels[:: max(1, len(labels) // 10)]:
        gen = rows[lab["sample_id"]]
        ids = np.array(lab["input_ids"])
        assert ids.tolist() == gen["prompt_ids"] + gen["response_ids"]
        p, t = len(gen["prompt_ids"]), len(ids)
        mask = np.array(lab["label_mask"])
        assert not mask[: p - 1].any() and mask[p - 1 :].all()
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor(ids)[None]).logits[0, :-1].double(), -1)
        ref_vals, _ = ref.topk(k, dim=-1)
        top_lps = torch.tensor(lab["topk_logprobs"], dtype=torch.float64).view(t - 1, k)
        torch.testing.assert_close(top_lps, ref_vals, atol=1e-4, rtol=0)
        target = torch.tensor(lab["target_logprobs"], dtype=torch.float64)
        torch.testing.assert_close(target, ref[torch.arange(t - 1), torch.tensor(ids[1:])], atol=1e-4, rtol=0)
        # With labels, the mean log-prob is the labels' (the other test compares it with
        # generation-time log-probs).
        assert gen["mean_logprob"] == pytest.approx(float(target[p - 1 :].mean()), abs=1e-5)


def _last_word(text: str) -> str | None:
    words = text.split()
    return words[-1] if words else None


def test_a_killed_job_asks_the_same_questions_again_and_its_checks_judge_real_answers(
    gen_job, teacher_dir, tmp_path
):
    """Same prompts and seeds as gen_job: the same answers. Half the prompts get sample 0's
    last word as their reference, half a word no answer ends with; then a format check and a
    user check (even token counts) on top. SIGKILL after the first commit, re-run."""
    prompts, first_url = gen_job
    first = {(r["prompt_id"], r["sample"]): r for r in generated_rows(str(first_url))}
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    work = tmp_path / "prompts"
    work.mkdir()
    with (work / prompts.name).open("w") as f:  # the same file name: the same prompt ids, the same seeds
        for i, record in enumerate(records):
            answer = _last_word(first[(f"{prompts.name}#{i}", 0)]["response"])
            f.write(json.dumps({**record, "ref": (answer or "-") if i % 2 == 0 else "no-such-word"}) + "\n")
    checks = {
        "finished": False,
        "dedup": "none",
        "format": r".*[aeiou]{2}.*",  # two vowels in a row: about 60% of these answers
        "reference": {"field": "ref", "extract": "regex", "pattern": r"(\S+)\s*$"},
        "user": "gen_checks:even_tokens",
    }
    out = tmp_path / "out"
    # No labels: the samples' mean log-probs then come from generation-time log-probs, which
    # must equal the first job's, taken from its labels (a prefill of prompt + response).
    raw = _spec(teacher_dir, work / prompts.name, out, checks=checks, labels=False)
    spec = write_spec(tmp_path / "gen.yaml", raw)
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "labelgen.cli", "generate", str(spec), "--no-progress"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if list((out / COMMITS_DIR).glob("gen-*.json")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, (
        f"the job ended before it could be killed:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (out / "manifest.json").exists(), "the job finished before it could be killed"
    done = _generate(spec)
    assert "generated" in done.stdout, done.stderr[-3000:]

    rows = generated_rows(str(out)) + generated_rows(str(out), "rejected")
    assert sorted((r["prompt_id"], r["sample"]) for r in rows) == sorted(first)  # none lost, none twice
    counts: dict[str, int] = {}
    seen = {"format": set(), "reference": set(), "user": set()}
    for row in rows:
        again = first[(row["prompt_id"], row["sample"])]
        assert (row["response_ids"], row["seed"]) == (again["response_ids"], again["seed"])
        assert row["mean_logprob"] == pytest.approx(again["mean_logprob"], abs=1e-3)
        text = row["response"]
        want = None
        if not re.fullmatch(checks["format"], text, re.DOTALL):
            want = "format"
        else:
            seen["format"].add(True)
            answer = _last_word(text)
            if answer is None:
                want = "no_answer"
            elif answer != row["reference"]:
                want = "wrong_answer"
            else:
                seen["reference"].add(True)
                want = None if len(row["response_ids"]) % 2 == 0 else "user"
                seen["user"].add(want is None)
        if want in ("format", "wrong_answer"):
            seen[want if want == "format" else "reference"].add(False)
        assert row["reject_reason"] == want, (row["prompt_id"], row["sample"], text)
        counts[want or "kept"] = counts.get(want or "kept", 0) + 1
    assert seen == {"format": {True, False}, "reference": {True, False}, "user": {True, False}}, seen
    stats = read_manifest(str(out)).generation["stats"]
    assert stats["kept"] == counts.pop("kept")
    assert {k: v for k, v in stats["rejected"].items() if v} == counts


def test_students_train_on_generated_data_by_sft_and_by_kd(gen_job, teacher_dir, tmp_path):
    from students.trainer import Trainer

    _, url = gen_job
    for name, alpha in (("sft", 0.0), ("kd", 0.5)):
        cfg = student_config(str(url), teacher_dir, tmp_path / name, alpha, max_steps=30, holdout=1)
        trainer = Trainer(cfg, log=print)
        trainer.setup()
        metrics = trainer.train()
        print(name, metrics)
        assert np.isfinite(metrics["ce"]) and (alpha == 0 or np.isfinite(metrics["kl"]))
