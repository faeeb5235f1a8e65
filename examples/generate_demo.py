"""The sequence-level distillation demo: the teacher writes the training data.

Run from the repository root (``bash examples/generate_demo.sh`` sets up and runs this):

    .venv/bin/python examples/generate_demo.py [--fresh] [--prompts 1024] [--steps 400]

1. builds a synthetic task with checkable answers (3-digit addition with a short worked
   solution, :mod:`arithmetic`) and a tiny teacher trained on it, which is right often
   but not always when sampled (nothing is downloaded);
2. ``labelgen generate manifests/jobs/arithmetic-generate.yaml``: the teacher answers
   each training prompt 4 times on vLLM (T=0.6); answers are checked against the
   references (format + boxed answer), kept, and labeled with the teacher's top-16;
3. ``labelgen run manifests/jobs/arithmetic-references.yaml``: the reference solutions
   of the same prompts, as a label dataset (the baseline's data);
4. ``students train manifests/students/arithmetic.yaml`` three times, the same student
   for the same steps: (a) SFT on the kept teacher answers, (b) the same answers with
   top-k KD, (c) SFT on the reference solutions;
5. prints, on held-out prompts, each student's accuracy against the references (greedy,
   and one sample at the teacher's T=0.6) and its agreement with the teacher's greedy
   answer.
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
WORK = ROOT / "demo-output" / "arithmetic"
GENERATE = "manifests/jobs/arithmetic-generate.yaml"
REFERENCES = "manifests/jobs/arithmetic-references.yaml"
STUDENT = "manifests/students/arithmetic.yaml"
BIN = Path(sys.executable).parent
HELDOUT = 300

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arithmetic import (  # noqa: E402
    build_teacher,
    check_answer,
    extract_boxed,
    greedy_answers,
    make_records,
    sample_answers,
)


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def sh(*args: str) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(
        [str(BIN / args[0]) if (BIN / args[0]).exists() else args[0], *args[1:]], check=True, cwd=ROOT
    )


def build_inputs(prompts: int) -> None:
    teacher = WORK / "teacher"
    if not (teacher / "config.json").is_file():
        build_teacher(teacher, make_records(20_000, seed=0), seconds=120, seed=0)
    else:
        print(f"reusing {teacher} (pass --fresh to rebuild)")
    # Prompts the teacher answers: training problems (it saw their like, not their answers
    # twice: seed 1 draws other problems than its training set's seed 0, within the split).
    out = WORK / "prompts"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "train.jsonl").open("w") as f:
        for record in make_records(prompts, seed=1):
            chat = [
                {"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["solution"]},
            ]
            f.write(json.dumps({**record, "messages": chat}) + "\n")
    with (out / "heldout.jsonl").open("w") as f:
        for record in make_records(HELDOUT, seed=0, split="heldout"):
            f.write(json.dumps(record) + "\n")
    print(f"{prompts} training prompts and {HELDOUT} held-out prompts under {out}")


def answer(text: str) -> str | None:
    got = extract_boxed(text)
    return got.strip() if got else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fresh", action="store_true", help="delete demo-output/arithmetic first")
    parser.add_argument("--prompts", type=int, default=1024, help="training prompts the teacher answers")
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every student")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.fresh and WORK.exists():
        shutil.rmtree(WORK)
    started = time.monotonic()

    step("1/5 a task with checkable answers and a tiny teacher (local, no downloads)")
    build_inputs(args.prompts)

    step("2/5 the teacher writes: 4 answers per prompt on vLLM, checked, kept, labeled")
    sh("labelgen", "validate", GENERATE)
    sh("labelgen", "generate", GENERATE, "output.overwrite=true")
    manifest = json.loads((WORK / "generated" / "manifest.json").read_text())
    stats = manifest["generation"]["stats"]

    step("3/5 the reference solutions of the same prompts, as a label dataset")
    sh("labelgen", "run", REFERENCES, "output.overwrite=true")

    step("4/5 the same student, the same steps, three datasets")
    runs = {
        "(a) SFT on kept teacher answers": ("student-sft", ["loss.alpha=0.0"]),
        "(b) kept answers + top-k KD": ("student-kd", ["loss.alpha=0.5"]),
        "(c) SFT on reference solutions": (
            "student-ref",
            ["loss.alpha=0.0", "data.url=demo-output/arithmetic/references"],
        ),
    }
    for name, (directory, overrides) in runs.items():
        print(f"-- {name}")
        sh(
            "students",
            "train",
            STUDENT,
            *overrides,
            f"optim.max_steps={args.steps}",
            f"train.output_dir=demo-output/arithmetic/{directory}",
            "train.resume=false",
        )

    step("5/5 held-out prompts: accuracy against the references, agreement with the teacher")
    heldout = [json.loads(line) for line in (WORK / "prompts" / "heldout.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in heldout]
    models = {"teacher": WORK / "teacher"}
    models.update({name: WORK / directory / "final" for name, (directory, _) in runs.items()})
    greedy = {name: greedy_answers(path, prompts, max_new_tokens=96) for name, path in models.items()}
    sampled = {
        name: [s[0] for s in sample_answers(path, prompts, n=1, temperature=0.6, max_new_tokens=96, seed=0)]
        for name, path in models.items()
    }
    teacher_answers = [answer(t) for t in greedy["teacher"]]
    print(
        f"the teacher answered {stats['prompts']} prompts x 4: {stats['passed']} of {stats['samples']} "
        f"samples right (pass@1 {stats['pass@1']:.3f}, pass@4 {stats['pass@n']:.3f}); kept {stats['kept']} "
        f"(exact duplicates of a kept answer dropped)\n"
    )

    def accuracy(outputs: list[str]) -> float:
        return sum(check_answer(o, r["answer"]) for o, r in zip(outputs, heldout, strict=True)) / len(heldout)

    print(f"| {'model':<34} | accuracy, greedy | accuracy, T=0.6 | agrees with teacher (greedy) |")
    print(f"|{'-' * 36}|------------------|-----------------|------------------------------|")
    for name in models:
        agree = sum(
            answer(o) is not None and answer(o) == t
            for o, t in zip(greedy[name], teacher_answers, strict=True)
        )
        print(
            f"| {name:<34} | {accuracy(greedy[name]):>16.1%} | {accuracy(sampled[name]):>15.1%} | "
            f"{agree / len(heldout):>28.1%} |"
        )
    print(
        f"\n{len(heldout)} held-out prompts; demo took {time.monotonic() - started:.0f}s. "
        f"Outputs under {WORK}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
