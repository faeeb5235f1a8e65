"""The end-to-end demo: label a corpus with a tiny teacher on vLLM, train students from it.

Run from the repository root (``bash examples/demo.sh`` sets up and runs this):

    .venv/bin/python examples/demo.py [--fresh]

1. builds a corpus (Python standard-library docstrings, a few chat records and a few
   broken lines), a BPE tokenizer and a small Llama teacher trained briefly on it,
   all under demo-output/ (nothing is downloaded);
2. ``labelgen run manifests/jobs/tiny-cpu.yaml``: top-k labels with vLLM on the CPU,
   sharded Parquet under demo-output/labels, then ``labelgen inspect``;
3. ``labelgen serve``: the dataset service on its embedded SQLite default (a fresh
   catalog under demo-output/service, on a free port of 127.0.0.1); creates team
   ``demo``, publishes the labels as ``demo/tiny@1`` (verified: every shard's size and
   sha256), lists and inspects them by name;
4. ``students train manifests/students/tiny-cpu.yaml``: a fresh student trained by KD
   from ``labelgen://127.0.0.1:PORT/demo/tiny@1`` (streamed through the service), and
   the same student trained by CE alone on the same tokens;
5. prints how close each student got to the teacher on held-out labels.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
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


def start_service() -> tuple[subprocess.Popen, str]:
    """``labelgen serve`` on a fresh catalog under demo-output/service; (process, HOST:PORT).

    The organisation admin's token is made here and given through
    LABELGEN_BOOTSTRAP_TOKEN; the client verbs find it through ``labelgen login``, whose
    credentials file lives under demo-output/service too (LABELGEN_CONFIG_DIR)."""
    home = WORK / "service"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    token = "lgt_" + secrets.token_urlsafe(32)
    env = {**os.environ, "LABELGEN_BOOTSTRAP_TOKEN": token}
    log = (home / "serve.log").open("w")
    cmd = [str(BIN / "labelgen"), "serve", "--data-dir", str(home), "--port", str(port)]
    print("$ " + " ".join(["labelgen", *cmd[1:]]) + f"   (log: {home / 'serve.log'})", flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://{address}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"labelgen serve did not start; see {home / 'serve.log'}")
        time.sleep(0.2)
    os.environ["LABELGEN_CONFIG_DIR"] = str(home / "config")
    print(f"$ labelgen login {address}   (the admin's token on stdin: never on a command line)", flush=True)
    subprocess.run([str(BIN / "labelgen"), "login", address], input=token, text=True, check=True, cwd=ROOT)
    return proc, address


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

    step("1/5 build a corpus, a tokenizer and a tiny teacher (local, no downloads)")
    build_inputs()

    step("2/5 label the corpus with the teacher on vLLM")
    sh("labelgen", "validate", JOB)
    sh("labelgen", "run", JOB, "output.overwrite=true")  # a changed spec relabels; the same spec resumes
    sh("labelgen", "inspect", "demo-output/labels")

    step("3/5 share the labels through the dataset service")
    service, address = start_service()
    try:
        sh("labelgen", "teams", "create", "demo")
        sh("labelgen", "publish", "demo-output/labels", "demo/tiny", "--alias", "stable")
        sh("labelgen", "datasets", "list", "--compatible-with", "demo-output/teacher")
        sh("labelgen", "inspect", "demo/tiny@1")  # a catalog name: read through the service

        step("4/5 train students from the dataset service")
        print(
            f"-- KD student from labelgen://{address}/demo/tiny@1 "
            "(alpha=0.5: half KL to the teacher's top-k + tail, half CE)"
        )
        sh("students", "train", STUDENT, f"data.url=labelgen://{address}/demo/tiny@1", "train.resume=false")
        sh("labelgen", "datasets", "show", "demo/tiny@1")
    finally:
        service.terminate()
        service.wait(timeout=30)
    print("-- CE-only baseline (alpha=0: same student, same tokens, no teacher)")
    sh(
        "students",
        "train",
        STUDENT,
        "loss.alpha=0.0",
        "train.output_dir=demo-output/student-ce",
        "train.resume=false",
    )

    step("5/5 what happened")
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
