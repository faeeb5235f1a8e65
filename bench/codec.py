"""Benchmark: the top-k label codecs (plain, compact-v1, compact-v2) on real teacher labels.

Builds tiny Llama teachers locally (nothing is downloaded), computes their labels with
transformers (fp32 forward → log_softmax → top-k, the same numbers vLLM returns), writes
one label shard per codec through labelgen's ShardWriter and prints, per teacher and k:

    labels B/pos   bytes of the top-k + target log-prob columns / label positions
    shard B/pos    bytes of the whole shard file (ids, mask, sample ids too) / positions
    KL mean/max    KL(exact || stored) in nats per position over the k+1 buckets
                   (top-k + tail), against the exact full-vocabulary distribution;
                   T=2: the mean after softening both sides at temperature 2
    top-1          fraction of positions whose decoded top-1 id is the teacher's
    decode         positions/s of reading the shard's label columns and decoding them
                   (`pq.read_table` + the codec's `decode`), and its ratio to plain

Teachers: random-init (as bench/extraction.py: wide logits, no frequency skew, the worst
case for id coding) and briefly pretrained ones (skewed top-k sets like a real teacher's):

    random-512   vocab 512, random tokens         trained-512  BPE 512 on stdlib docstrings
    random-32k   vocab 32,000, random tokens      trained-32k  BPE 32,000 on stdlib docstrings
                                                               + source, held-out text

    .venv/bin/python bench/codec.py                                 # all four (~15 min on 2 cores)
    .venv/bin/python bench/codec.py --models random-512 trained-512 --steps 100   # a quick look
"""

from __future__ import annotations

import argparse
import glob
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

# name: (vocab, hidden, layers, heads, intermediate, trained)
MODELS = {
    "random-512": (512, 128, 2, 4, 256, False),
    "trained-512": (512, 128, 2, 4, 256, True),
    "random-32k": (32000, 512, 4, 8, 1408, False),
    "trained-32k": (32000, 128, 2, 4, 256, True),
}


def corpus(vocab: int) -> list[str]:
    """Docstrings of the standard library; for a 32k vocabulary also its source files."""
    from labelgen.testing import stdlib_texts

    texts = stdlib_texts()
    if vocab > 10_000:  # the docstrings alone only make a ~9k-token BPE vocabulary
        root = sysconfig.get_paths()["stdlib"]
        for path in sorted(glob.glob(f"{root}/**/*.py", recursive=True)):
            if "/test" not in path and "site-packages" not in path:
                texts.append(Path(path).read_text(encoding="utf-8", errors="replace"))
    return texts


def build_teacher(
    directory: Path, name: str, steps: int, sequences: int, seq_len: int
) -> tuple[Path, list[list[int]]]:
    """Build (and for trained-* pretrain) a teacher; returns it and the token sequences to label."""
    from labelgen.testing import build_llama, build_tokenizer, pretrain

    vocab, hidden, layers, heads, inter, trained = MODELS[name]
    out = directory / name
    if not trained:
        build_llama(
            out,
            None,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=1024,
            initializer_range=0.2,
            extra_vocab=vocab,
        )
        rng = np.random.default_rng(0)
        return out, [rng.integers(0, vocab, seq_len).tolist() for _ in range(sequences)]
    texts = corpus(vocab)
    tokenizer = build_tokenizer(out, texts, vocab_size=vocab)
    build_llama(
        out,
        tokenizer,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=1024,
    )
    start = time.perf_counter()
    losses = pretrain(out, texts[0::2], steps=steps, seq_len=128, batch_size=8)
    print(
        f"  {name}: BPE vocab {len(tokenizer)}, pretrained {steps} steps in "
        f"{time.perf_counter() - start:.0f}s, ce {losses['first_loss']:.2f} -> {losses['last_loss']:.2f}"
    )
    ids: list[int] = []
    for text in texts[1::2]:  # held-out half
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= sequences * seq_len:
            break
    return out, [ids[i * seq_len : (i + 1) * seq_len] for i in range(sequences)]


def teacher_labels(model_dir: Path, seqs: list[list[int]], k: int) -> list[dict[str, np.ndarray]]:
    """Per sequence: (T-1, k) top-k ids/log-probs by rank, (T-1,) target log-probs and the
    (T-1,) exact log of the mass outside the top-k (from the full distribution)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq in seqs:
            x = torch.tensor(seq)[None]
            lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)  # (T-1, V)
            values, ids = lp.topk(k, -1)
            rest = lp.scatter(1, ids, float("-inf")).logsumexp(-1)
            out.append(
                {
                    "input_ids": np.asarray(seq, np.int32),
                    "topk_ids": ids.int().numpy(),
                    "topk_logprobs": values.float().numpy(),
                    "target_logprobs": lp.gather(1, x[0, 1:, None])[:, 0].float().numpy(),
                    "tail": rest.numpy(),
                }
            )
    return out


def kl_k_plus_1(exact_ids, exact_lps, exact_tail, ids, lps) -> np.ndarray:
    """(N,) KL(exact || stored) over top-k + tail; exact_tail is the exact log tail mass."""
    p = np.exp(np.take_along_axis(exact_lps, np.argsort(exact_ids, 1), 1).astype(np.float64))
    q = np.exp(np.take_along_axis(lps, np.argsort(ids, 1), 1).astype(np.float64))
    p_tail, q_tail = np.exp(exact_tail), np.clip(1 - q.sum(1), 1e-300, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * np.log(p_tail / q_tail), 0.0)
    return (p * np.log(p / q)).sum(1) + tail


def kl_tempered(exact_ids, exact_lps, exact_tail, ids, lps, temperature: float) -> np.ndarray:
    """(N,) KL over the k+1 buckets after softening both sides by ``temperature`` the way the
    student losses do (each bucket's log-prob / T, renormalised; the tail as one bucket)."""
    sides = []
    for side_ids, side_lps, tail in ((exact_ids, exact_lps, exact_tail), (ids, lps, None)):
        lp = np.take_along_axis(side_lps, np.argsort(side_ids, 1), 1).astype(np.float64)
        if tail is None:
            tail = np.log(np.clip(1 - np.exp(lp).sum(1), 1e-300, 1))
        buckets = np.concatenate([lp, tail[:, None]], 1) / temperature
        sides.append(buckets - np.logaddexp.reduce(buckets, axis=1, keepdims=True))
    return (np.exp(sides[0]) * (sides[0] - sides[1])).sum(1)


def write_shard(directory: str, codec: str, rows: list[dict], k: int, level: int) -> str:
    """One shard (a single row group) through the labelgen writer; returns its path."""
    from labelgen.contract.format import SHARDS_DIR
    from labelgen.labels import SequenceLabels
    from labelgen.packing import PackedSequence
    from labelgen.writer import ShardWriter

    writer = ShardWriter(directory, 0, k, 0, 0, 1024, 1024, level, codec=codec)
    for i, row in enumerate(rows):
        t = len(row["input_ids"])
        labels = SequenceLabels(row["topk_ids"], row["topk_logprobs"], row["target_logprobs"])
        writer.add(PackedSequence(f"bench#{i}.0", row["input_ids"], np.ones(t - 1, np.uint8)), labels)
    (record,) = writer.close()
    return os.path.join(directory, SHARDS_DIR, os.path.basename(record.path))


def measure(name: str, rows: list[dict], k: int, level: int, repeats: int) -> None:
    import pyarrow.parquet as pq

    from labelgen.contract.codecs import CODECS, DEFAULT_CODEC
    from labelgen.contract.format import Columns

    exact_ids = np.concatenate([r["topk_ids"][:, :k] for r in rows])
    exact_lps = np.concatenate([r["topk_logprobs"][:, :k] for r in rows])
    lp64 = np.concatenate([r["topk_logprobs"] for r in rows]).astype(np.float64)
    full_tail = np.concatenate([r["tail"] for r in rows])  # log mass outside the top-K computed
    extra = np.exp(lp64[:, k:]).sum(1)  # entries between k and K belong to the tail of top-k
    exact_tail = np.log(np.exp(full_tail) + extra)
    positions = len(exact_ids)
    k_rows = [
        {**r, "topk_ids": r["topk_ids"][:, :k].copy(), "topk_logprobs": r["topk_logprobs"][:, :k].copy()}
        for r in rows
    ]
    speed = {}
    print(f"\n  {name}, k={k}, {len(rows)} x {len(rows[0]['input_ids'])} tokens, zstd-{level}")
    for codec, coder in sorted(CODECS.items(), key=lambda item: item[0] != DEFAULT_CODEC):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_shard(tmp, codec, k_rows, k, level)
            meta = pq.ParquetFile(path).metadata
            label_columns = {*coder.columns, Columns.TARGET_LOGPROBS}
            label_bytes = sum(
                meta.row_group(g).column(c).total_compressed_size
                for g in range(meta.num_row_groups)
                for c in range(meta.num_columns)
                if meta.schema.column(c).path.split(".")[0] in label_columns
            )
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                table = pq.read_table(path, columns=sorted(label_columns))
                ids, lps = coder.decode(table, k)
                best = min(best, time.perf_counter() - start)
            speed[codec] = positions / best
            kl = kl_k_plus_1(exact_ids, exact_lps, exact_tail, ids, lps)
            kl2 = kl_tempered(exact_ids, exact_lps, exact_tail, ids, lps, 2.0)
            top1 = float((ids[:, 0] == exact_ids[:, 0]).mean())
            print(
                f"    {codec:<11} labels {label_bytes / positions:6.1f} B/pos   shard "
                f"{os.path.getsize(path) / positions:6.1f} B/pos   KL mean {kl.mean():.2e} max {kl.max():.2e}"
                f" (T=2: {kl2.mean():.1e})   top-1 {top1:6.1%}   decode {speed[codec]:>9,.0f} pos/s "
                f"({speed[codec] / speed[DEFAULT_CODEC]:.2f}x {DEFAULT_CODEC})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--k", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps of trained-* teachers")
    parser.add_argument("--level", type=int, default=3, help="zstd level (output.compression_level)")
    parser.add_argument("--repeats", type=int, default=10, help="decode timings; the best counts")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            model_dir, seqs = build_teacher(Path(work), name, args.steps, args.sequences, args.seq_len)
            rows = teacher_labels(model_dir, seqs, max(args.k))
            for k in args.k:
                measure(name, rows, k, args.level, args.repeats)


if __name__ == "__main__":
    main()
