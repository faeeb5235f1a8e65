"""Benchmark: peak memory of the extraction hook, unchunked vs ``labels.logits_budget_mib``.

vLLM's memory profiling does not count the hook's logits, so their transient comes on
top of everything vLLM reserved. This labels sequences of ``--seq-len`` tokens (one
engine step schedules a whole sequence: ``max_num_batched_tokens`` = seq_len) on a
tiny Llama with a Qwen-sized vocabulary (152,064 ids, built locally, nothing
downloaded), through ``VllmTeacher`` as a job does, twice, each in a fresh process:

    unchunked   logits_budget_mib = 1e9 (one chunk per request and step: the hook before
                the budget existed)
    budget      logits_budget_mib = --budget-mib (default 1024, the spec's default)

Memory is the kernel's RSS high-water mark (``VmHWM`` in /proc/PID/status) of vLLM's
engine-core process, where the model runs (vLLM's V1 engine spawns it; on CPU its
executor runs the worker in that process), reset (``clear_refs`` 5) once the engine
has started, so "peak" is the labeling's own high-water mark and "transient" is peak
minus the RSS just before labeling. Both runs must give bitwise identical labels.

A second table checks :func:`labelgen.extraction.logits_row_bytes`, the rule that turns
the budget into rows per chunk, against the measured peak of one chunk's label
computation (``_label_rows``) for draws off/on and two temperatures.

    .venv/bin/python bench/logits_memory.py                       # seq_len 4096, ~4 min
    .venv/bin/python bench/logits_memory.py --seq-len 1024 --sequences 1   # a quick look

Prints figures from one run; the RSS of a shared machine is exact, timings are not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
VOCAB = 152_064
UNCHUNKED_MIB = 1e9
MIB = 1 << 20


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def engine_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def build_model(directory: Path, hidden: int, max_len: int) -> None:
    from labelgen.testing import build_llama

    build_llama(
        directory,
        None,
        hidden_size=hidden,
        num_layers=1,
        num_heads=hidden // 32,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_len,
        initializer_range=0.2,
        extra_vocab=VOCAB,
    )


def child(args: argparse.Namespace) -> None:
    """One labeling run in this fresh process; prints one JSON line of figures."""
    from labelgen.contract.configs import load_config
    from labelgen.extraction import logits_chunk_rows
    from labelgen.spec import JobSpec
    from labelgen.teacher_vllm import VllmTeacher

    max_len = args.seq_len + 256
    spec = load_config(
        JobSpec,
        {
            "teacher": {
                "model": args.model,
                "dtype": "float32",
                "max_model_len": max_len,
                "batch_sequences": args.sequences,
                "engine_args": {
                    "enforce_eager": True,
                    "skip_tokenizer_init": True,
                    "max_num_batched_tokens": args.seq_len,
                    "max_num_seqs": args.sequences,
                },
            },
            "corpus": {"sources": ["unused.jsonl"]},
            "packing": {"seq_len": args.seq_len},
            "labels": {"k": args.k, "extraction": "hook", "logits_budget_mib": args.budget},
            "output": {"url": str(Path(args.out).parent / "unused")},
        },
    )
    teacher = VllmTeacher(spec)
    pids = engine_pids()
    before = {pid: status_kib(pid) for pid in pids}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, VOCAB, args.seq_len).astype(np.int32) for _ in range(args.sequences)]
    t0 = time.perf_counter()
    labels = teacher.label(batch)
    seconds = time.perf_counter() - t0
    after = {pid: status_kib(pid) for pid in pids}
    engine = max(pids, key=lambda pid: after[pid]["VmHWM"])  # the process that ran the model
    names = ("topk_ids", "topk_logprobs", "target_logprobs")
    np.savez(args.out, **{f"{name}_{i}": getattr(x, name) for i, x in enumerate(labels) for name in names})
    rows = logits_chunk_rows(VOCAB, args.budget * MIB)
    print(
        json.dumps(
            {
                "budget_mib": args.budget,
                "chunk_rows": min(rows, args.seq_len - 1),
                "startup_hwm_kib": before[engine]["VmHWM"],
                "rss_before_kib": before[engine]["VmRSS"],
                "peak_kib": after[engine]["VmHWM"],
                "seconds": seconds,
                "processes": len(pids),
            }
        )
    )
    teacher.close()


def measure_rule(args: argparse.Namespace) -> None:
    """Peak bytes per row of ``_label_rows`` on random (rows, V) float32 logits; one JSON line."""
    import torch

    from labelgen.extraction import ExtractionOptions, _label_rows, _new_request

    rows, draws, temperature = args.rows, args.draws, args.temperature
    opt = ExtractionOptions(k=args.k, draws=draws, draw_temperature=temperature)
    rec = _new_request(list(range(rows + 1)), opt)
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    _label_rows(rec, logits[:2], 0, opt)  # load kernels and libraries before the baseline
    base = status_kib(os.getpid())["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")
    _label_rows(rec, logits, 0, opt)
    peak = status_kib(os.getpid())["VmHWM"]
    # The logits (4 B per id) are part of the rule's peak; here they exist before the baseline.
    print(json.dumps({"bytes_per_row": ((peak - base) * 1024 + logits.numel() * 4) / rows}))


def run_child(extra: list[str]) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env["MALLOC_MMAP_THRESHOLD_"] = str(MIB)  # freed tensors leave RSS (no heap holes)
    out = subprocess.run([sys.executable, __file__, *extra], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"child {extra} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--sequences", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--budget-mib", type=float, default=1024.0)
    parser.add_argument("--rule-rows", type=int, default=256, help="rows for the rule check (0 = skip it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rule", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--draws", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--temperature", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.rule:
        return measure_rule(args)

    from labelgen.extraction import logits_row_bytes

    gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    print(
        f"machine: {os.cpu_count()} CPUs, {gib:.0f} GiB; model: 1-layer Llama, hidden {args.hidden}, "
        f"vocabulary {VOCAB:,}, float32; {args.sequences} x {args.seq_len} tokens, k = {args.k}"
    )
    common = ["--seq-len", str(args.seq_len), "--sequences", str(args.sequences), "--k", str(args.k)]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model, args.hidden, args.seq_len + 256)
        results, labels = {}, {}
        for name, budget in (("unchunked", UNCHUNKED_MIB), ("budget", args.budget_mib)):
            out = Path(tmp) / f"{name}.npz"
            extra = ["--child", "--model", str(model), "--budget", str(budget), "--out", str(out), *common]
            results[name] = run_child(extra)
            labels[name] = dict(np.load(out))
    a, b = labels["unchunked"], labels["budget"]
    identical = a.keys() == b.keys() and all(np.array_equal(a[key], b[key]) for key in a)

    row = logits_row_bytes(VOCAB)
    head = ("run", "rows/chunk", "RSS before", "peak", "transient", "predicted", "time")
    print("\n{:<11}{:>11}{:>12}{:>10}{:>11}{:>11}{:>8}".format(*head))
    print("{:<11}{:>11}{:>12}{:>10}{:>11}{:>11}{:>8}".format("", "", "GiB", "GiB", "GiB", "GiB", "s"))
    for name, r in results.items():
        rows = args.seq_len - 1  # one request per step: its logit rows in near-equal chunks
        rows = -(-rows // -(-rows // r["chunk_rows"]))
        transient = (r["peak_kib"] - r["rss_before_kib"]) / 2**20
        print(
            f"{name:<11}{rows:>11}{r['rss_before_kib'] / 2**20:>12.2f}{r['peak_kib'] / 2**20:>10.2f}"
            f"{transient:>11.2f}{rows * row / 2**30:>11.2f}{r['seconds']:>8.1f}"
        )
    un, bu = results["unchunked"], results["budget"]
    ratio_peak = bu["peak_kib"] / un["peak_kib"]
    ratio_transient = (bu["peak_kib"] - bu["rss_before_kib"]) / (un["peak_kib"] - un["rss_before_kib"])
    ratio_time = bu["seconds"] / un["seconds"]
    print(f"budget / unchunked: peak RSS {ratio_peak:.3f}x, transient {ratio_transient:.3f}x, ", end="")
    print(f"time {ratio_time:.2f}x")
    startup = [r["startup_hwm_kib"] / 2**20 for r in (un, bu)]
    print("engine start-up RSS high-water mark, before labeling: {:.2f} / {:.2f} GiB".format(*startup))
    print(f"labels bitwise identical: {identical}")

    if args.rule_rows:
        print(f"\nrows-per-chunk rule vs measured peak of one chunk ({args.rule_rows} rows, float32 logits)")
        print(
            "{:>6}{:>6}{:>12}{:>16}{:>15}".format(
                "draws", "T", "rule B/row", "measured B/row", "measured/rule"
            )
        )
        for draws, temperature in ((0, 1.0), (64, 1.0), (64, 0.7), (255, 1.0)):
            extra = ["--rule", "--rows", str(args.rule_rows), "--draws", str(draws)]
            measured = run_child([*extra, "--temperature", str(temperature), "--k", str(args.k)])[
                "bytes_per_row"
            ]
            rule = logits_row_bytes(VOCAB, draws, temperature)
            print(f"{draws:>6}{temperature:>6}{rule:>12,}{measured:>16,.0f}{measured / rule:>15.3f}")
    if not identical:
        raise SystemExit("labels differ between the runs")


if __name__ == "__main__":
    main()
