"""Benchmark: peak memory and time of the KD + CE loss, plain vs chunked, forward + backward.

The student's logits are ``hidden (N, D) @ W.T (V, D)``; the plain path materialises them
for all N tokens (``students.chunked_loss.unchunked_kd_loss``), the chunked path
(``chunked_kd_loss``) holds ``chunk_tokens`` rows at a time. Each path runs in a fresh
subprocess; memory is the process's RSS high-water mark (``ru_maxrss``) minus the RSS
once the inputs exist, so it is the loss's own working memory (torch allocations are
invisible to tracemalloc), with glibc's mmap threshold fixed at 1 MiB so that freed
tensors leave RSS (``--glibc-dynamic-mmap`` keeps the default, which inflates both
paths' RSS with heap holes). Time is the fastest of ``--repeats`` forward + backward calls.
Both paths use the same inputs and must agree on the loss and the gradient norms.

Prints, from one run, the figures per path and the chunked/plain ratios (timings on a
shared machine are noisy: compare ratios, not absolute numbers):

    .venv/bin/python bench/loss_memory.py --plain-tokens 2048   # 8k tokens, V=128k, D=512, k=64
    .venv/bin/python bench/loss_memory.py --tokens 1024 --vocab 32768   # a quick look (~1 min)

The plain path keeps ~6 float32 copies of the (N, V) logits (8k × 128k: ~25 GiB), more
than a 24 GiB machine has. ``--plain-tokens M`` runs it at M/2 and M tokens instead
(its memory is linear in tokens: a + b·N) and the chunked path at M tokens (with the
same chunk, and with the chunk scaled to the same fraction of the tokens) and at N
tokens; the N-token plain figures are then printed as extrapolations, marked as such.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_kib() -> int:
    """Current resident set size (KiB), from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(args: argparse.Namespace) -> dict:
    """One path, in this (fresh) process: build inputs, run fwd + bwd, report memory and time."""
    import torch

    sys.path.insert(0, str(REPO))
    from students.chunked_loss import chunked_kd_loss, unchunked_kd_loss

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, v, d, k = args.tokens, args.vocab, args.hidden, args.k
    hidden = (torch.randn(n, d, generator=gen)).requires_grad_(True)
    weight = (torch.randn(v, d, generator=gen) * d**-0.5).requires_grad_(True)
    # Teacher labels: k distinct ids per row (a random offset plus a stride) and the
    # log-probs of a random distribution over k + 1 categories (the last one is the tail).
    offset = torch.randint(0, v, (n, 1), generator=gen)
    ids = (offset + torch.arange(k) * (v // k)) % v
    vals = (
        torch.log_softmax(torch.randn(n, k + 1, generator=gen) * 2, -1)[:, :k]
        .sort(-1, descending=True)
        .values
    )
    targets = ids[:, 0].clone()
    mask = torch.ones(n)
    fn = chunked_kd_loss if args.path == "chunked" else unchunked_kd_loss
    base = rss_kib()
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        out = fn(
            hidden, weight, ids, vals, targets, mask, args.kind, args.alpha, args.temperature, args.chunk
        )
        out["loss"].backward()
        times.append(time.perf_counter() - start)
        loss = out["loss"].item()
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "path": args.path,
        "tokens": n,
        "loss": loss,
        "grad_hidden_norm": hidden.grad.norm().item(),
        "grad_weight_norm": weight.grad.norm().item(),
        "time_s": min(times),
        "peak_mib": peak / 1024,
        "base_mib": base / 1024,
        "loss_mib": (peak - base) / 1024,
    }


def run_path(args: argparse.Namespace, path: str, tokens: int, chunk: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, "--tokens", str(tokens), "--chunk", str(chunk)]
    cmd += ["--repeats", str(repeats)]
    for name in ("vocab", "hidden", "k", "kind", "alpha", "temperature", "threads"):
        cmd += [f"--{name}", str(getattr(args, name))]
    env = dict(os.environ)
    if not args.glibc_dynamic_mmap:
        # A fixed mmap threshold: big tensors are mmapped and unmapped when freed, so RSS
        # tracks live tensors. glibc's default moves the threshold up to 32 MiB after a
        # free, then serves chunk-sized tensors from the heap, whose freed holes stay
        # resident: RSS then overstates what is alive (for both paths).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{path} at {tokens} tokens failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    label = f"chunked/{chunk}" if path == "chunked" else "plain"
    print(
        f"  {label:13s} {tokens:>6,} tokens | loss {result['loss']:.6f} | "
        f"fwd+bwd {result['time_s']:7.2f} s | "
        f"peak RSS {result['peak_mib']:7,.0f} MiB | loss working memory {result['loss_mib']:7,.0f} MiB",
        flush=True,
    )
    return result


def compare(plain: dict, chunked: dict) -> str:
    for key in ("loss", "grad_hidden_norm", "grad_weight_norm"):
        if abs(plain[key] - chunked[key]) > 1e-4 * max(1.0, abs(plain[key])):
            raise SystemExit(f"the paths disagree on {key}: plain {plain[key]}, chunked {chunked[key]}")
    return (
        f"working memory {chunked['loss_mib'] / plain['loss_mib']:.3f}x, peak RSS "
        f"{chunked['peak_mib'] / plain['peak_mib']:.3f}x, time {chunked['time_s'] / plain['time_s']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument(
        "--plain-tokens",
        type=int,
        default=None,
        help="run the plain path on this many tokens (default: --tokens)",
    )
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=1024, help="chunk_tokens of the chunked path")
    parser.add_argument("--kind", default="forward_kl")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="fwd+bwd calls per path; the fastest is reported"
    )
    parser.add_argument(
        "--glibc-dynamic-mmap", action="store_true", help="keep glibc's default (dynamic) mmap threshold"
    )
    parser.add_argument("--child", choices=["plain", "chunked"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.path = args.child
        print(json.dumps(child(args)))
        return

    n, small = args.tokens, args.plain_tokens or args.tokens
    print(
        f"loss {args.kind} (alpha {args.alpha}, T {args.temperature}) | V {args.vocab:,} | D {args.hidden} | "
        f"k {args.k} | {args.threads} threads | fastest of {args.repeats}"
    )
    if small == n:
        plain = run_path(args, "plain", n, args.chunk, args.repeats)
        chunked = run_path(args, "chunked", n, args.chunk, args.repeats)
        print(
            f"chunked/{args.chunk} vs plain at {n:,} tokens (measured): {compare(plain, chunked)}; "
            "results agree"
        )
        return
    # The plain path does not fit at n tokens: measure it at small/2 and small tokens (its
    # memory is a + b·tokens), measure the chunked path at small tokens (with the same chunk,
    # and with the chunk scaled to the same fraction of the tokens as at n) and at n tokens.
    half = run_path(args, "plain", small // 2, args.chunk, args.repeats)
    plain = run_path(args, "plain", small, args.chunk, args.repeats)
    scaled_chunk = max(1, args.chunk * small // n)
    same = run_path(args, "chunked", small, args.chunk, args.repeats)
    frac = run_path(args, "chunked", small, scaled_chunk, args.repeats)
    big = run_path(args, "chunked", n, args.chunk, 1)
    print(
        f"chunked/{args.chunk} vs plain at {small:,} tokens (measured): {compare(plain, same)}; results agree"
    )
    print(
        f"chunked/{scaled_chunk} vs plain at {small:,} tokens (measured; chunk = the same fraction of the "
        f"tokens as {args.chunk} of {n:,}): {compare(plain, frac)}; results agree"
    )
    slope = (plain["loss_mib"] - half["loss_mib"]) / (small - small // 2)
    estimate = plain["loss_mib"] + slope * (n - small)
    time_estimate = plain["time_s"] * n / small
    print(
        f"chunked/{args.chunk} at {n:,} tokens (measured): {big['loss_mib']:,.0f} MiB working memory, "
        f"{big['time_s']:.1f} s; plain at {n:,} tokens (extrapolated from {small // 2:,} and {small:,}, "
        "not run): "
        f"~{estimate:,.0f} MiB, ~{time_estimate:.0f} s -> ratios ~{big['loss_mib'] / estimate:.3f}x memory, "
        f"~{big['time_s'] / time_estimate:.2f}x time"
    )


if __name__ == "__main__":
    main()
