"""The end-to-end demo: label a corpus with a tiny teacher on vLLM, train students from it.

Run from the repository root (``bash examples/demo.sh`` sets up and runs this):

    .venv/bin/python examples/demo.py [--fresh]

1. builds a corpus (Python standard-library docstrings, a few chat records and a few
   broken lines), a BPE tokenizer and a small Llama teacher trained briefly on it,
   all under demo-output/ (nothing is downloaded);
2. ``labelgen run manifests/jobs/tiny-cpu.yaml``: top-k labels with vLLM on the CPU,
   sharded Parquet under demo-output/labels, then ``labelgen inspect``;
3. ``students train manifests/students/tiny-cpu.yaml``: a fresh student trained by KD
   from the shard URL, and the same student trained by CE alone on the same tokens;
4. prints how close each student got to the teacher on held-out labels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "demo-output"
JOB = "manifests/jobs/tiny-cpu.yaml"
STUDENT = "manifests/students/tiny-cpu.yaml"
BIN = Path(sys.executable).parent


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def sh(*args: str) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(
        [str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *args[1:]], check=True, cwd=ROOT
    )


def build_inputs() -> None:
    from labelgen.testing import build_llama, build_tokenizer, pretrain, stdlib_texts, write_jsonl_corpus

    teacher = WORK / "teacher"
    if (teacher / "config.json").is_file():
        print(f"reusing {teacher} (pass --fresh to rebuild)")
        return
    texts = stdlib_texts()
    half = len(texts) // 2
    corpus = WORK / "corpus"
    write_jsonl_corpus(corpus / "docs-a.jsonl", texts[:half], chat_every=7)
    write_jsonl_corpus(corpus / "docs-b.jsonl", texts[half:])
    with (corpus / "docs-b.jsonl").open("ab") as f:  # bad input is counted, never fatal
        f.write(b'{"text": "unterminated\n{"body": "no text field"}\n{"text": ""}\n\xff\xfe\n')
    print(f"corpus: {len(texts)} documents in {corpus} (+4 broken lines)")
    tokenizer = build_tokenizer(teacher, texts, vocab_size=1024)
    build_llama(teacher, tokenizer, hidden_size=128, num_heads=4, num_layers=2, intermediate_size=256)
    t0 = time.monotonic()
    result = pretrain(teacher, texts, steps=300, log=print)
    print(
        f"teacher: 2-layer Llama, hidden 128, trained {time.monotonic() - t0:.0f}s on the corpus "
        f"(CE {result['first_loss']:.2f} → {result['last_loss']:.2f})"
    )


def final_eval(run_dir: Path) -> dict[str, float]:
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in evals if "eval_kl" in e][-1]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fresh", action="store_true", help="delete demo-output/ first")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.fresh and WORK.exists():
        shutil.rmtree(WORK)
    started = time.monotonic()

    step("1/4 build a corpus, a tokenizer and a tiny teacher (local, no downloads)")
    build_inputs()

    step("2/4 label the corpus with the teacher on vLLM")
    sh("labelgen", "validate", JOB)
    sh("labelgen", "run", JOB, "output.overwrite=true")  # a changed spec relabels; the same spec resumes
    sh("labelgen", "inspect", "demo-output/labels")

    step("3/4 train students from the shard URL")
    print("-- KD student (alpha=0.5: half KL to the teacher's top-k + tail, half CE)")
    sh("students", "train", STUDENT, "train.resume=false")
    print("-- CE-only baseline (alpha=0: same student, same tokens, no teacher)")
    sh(
        "students",
        "train",
        STUDENT,
        "loss.alpha=0.0",
        "train.output_dir=demo-output/student-ce",
        "train.resume=false",
    )

    step("4/4 what happened")
    kd, ce = final_eval(WORK / "student-kd"), final_eval(WORK / "student-ce")
    print(f"{'held-out labels':<26}{'KD student':>12}{'CE student':>12}")
    for key, name in (
        ("eval_kl", "KL to teacher (nats)"),
        ("eval_agree", "top-1 agreement"),
        ("eval_ce", "CE on real tokens"),
    ):
        print(f"{name:<26}{kd[key]:>12.4f}{ce[key]:>12.4f}")
    print(f"{'teacher CE':<26}{kd['eval_teacher_ce']:>12.4f}")
    verdict = "closer to" if kd["eval_kl"] < ce["eval_kl"] else "NOT closer to"
    print(
        f"\nthe KD student ended {verdict} the teacher than the CE-only student "
        f"({kd['eval_kl']:.4f} vs {ce['eval_kl']:.4f} nats/token); "
        f"demo took {time.monotonic() - started:.0f}s. Outputs under {WORK}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
