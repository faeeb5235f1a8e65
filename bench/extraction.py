"""Benchmark: ways of getting top-k labels out of vLLM, on the same model and tokens.

Prints tokens/s and ratios measured in one run (timings on shared machines are noisy;
compare ratios, not absolute numbers):

    prefill      plain prefill, no logprobs (for scale)
    bound        logits at every position and nothing more (the inherent cost of labels)
    dict         vLLM's default prompt-logprobs output (a dict per position) → arrays
    flat         vLLM's flat output (flat_logprobs=True) → arrays (labelgen's fallback)
    hook         labelgen's on-device extraction (top-k + target log-prob)
    hook+hidden  the same plus hidden states of 2 layers at 1 position in 16
    hook+draws   the same plus 32 random-sampling draws per position

It also checks that the hook's labels equal the flat path's, and reports bytes per
label position on disk (zstd Parquet, the plain layout) for top-k and for draws.

    .venv/bin/python bench/extraction.py                  # both models, k = 8 and 64
    .venv/bin/python bench/extraction.py --sequences 8    # a quicker look
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = {
    # name: (vocab, hidden, layers, heads, intermediate)
    "small-vocab": (512, 128, 2, 4, 256),
    "vocab-32k": (32000, 512, 4, 8, 1408),
}


def build_model(directory: Path, vocab: int, hidden: int, layers: int, heads: int, inter: int) -> Path:
    from labelgen.testing import build_llama

    build_llama(
        directory,
        None,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_size=inter,
        max_position_embeddings=1024,
        initializer_range=0.2,
        extra_vocab=vocab,
    )
    print(f"  built {directory.name}: vocab {vocab}, hidden {hidden}, {layers} layers, {heads} heads")
    return directory


def dict_to_arrays(output, k: int):
    """What a user of the default output does: Python objects → arrays."""
    rows = output.prompt_logprobs[1:]
    ids = np.zeros((len(rows), k), np.int32)
    lps = np.zeros((len(rows), k), np.float32)
    for t, entry in enumerate(rows):
        ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in entry.items() if lp.rank <= k)[:k]
        for j, (_, tok, value) in enumerate(ranked):
            ids[t, j], lps[t, j] = tok, value
    return ids, lps


def flat_to_arrays(output, k: int):
    flat = output.prompt_logprobs
    n = len(flat.start_indices) - 1
    ids = np.asarray(flat.token_ids, np.int32).reshape(n, k + 1)
    lps = np.asarray(flat.logprobs, np.float32).reshape(n, k + 1)
    return ids[:, 1:], lps[:, 1:]


def codec_kl(item: dict, encoded: tuple) -> float:
    """Mean KL(exact || compact-v1) over the k+1 buckets (top-k + tail) of one sequence."""
    from labelgen.contract.codecs.compact_v1 import decode_arrays

    ids_q, lps_q = decode_arrays(*encoded)
    ids, lps = item["topk_ids"], item["topk_logprobs"]
    p = np.exp(np.take_along_axis(lps, np.argsort(ids, 1), 1).astype(np.float64))
    q = np.exp(np.take_along_axis(lps_q, np.argsort(ids_q, 1), 1).astype(np.float64))
    p_tail, q_tail = np.clip(1 - p.sum(1), 0, 1), np.clip(1 - q.sum(1), 1e-300, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * np.log(p_tail / q_tail), 0.0)
    return float(((p * np.log(p / q)).sum(1) + tail).mean())


def bytes_per_position(tables: list, directory: str) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from labelgen.contract.codecs import CODECS
    from labelgen.writer import parquet_write_options

    table = pa.concat_tables(tables)
    path = os.path.join(directory, "t.parquet")
    options = parquet_write_options(3)
    for codec in CODECS.values():  # the tables hold plain and compact top-k columns
        options["column_encoding"].update(codec.column_encodings())
    options["column_encoding"] = {
        k: v for k, v in options["column_encoding"].items() if k.split(".")[0] in table.column_names
    }
    options["write_statistics"] = False
    pq.write_table(table, path, **options)
    return os.path.getsize(path)


def run_model(
    name: str, spec: tuple, sequences: int, seq_len: int, ks: list[int], work: Path, args_repeats: int
) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    vocab, hidden, layers, heads, inter = spec
    model_dir = build_model(work / name, vocab, hidden, layers, heads, inter)
    llm = LLM(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=seq_len + 1,
        max_logprobs=max(ks),
        logprobs_mode="raw_logprobs",
        enable_prefix_caching=False,
        enforce_eager=True,
        worker_extension_cls="labelgen.extraction.LabelExtractor",
        seed=0,
    )
    rng = np.random.default_rng(0)
    prompts = [
        TokensPrompt(prompt_token_ids=rng.integers(0, vocab, seq_len).tolist()) for _ in range(sequences)
    ]
    tokens = sequences * seq_len

    def timed(params, convert=None, fetch=False, repeats=args_repeats):
        """Best of ``repeats`` runs: tokens/s including the conversion to arrays."""
        best, result = 0.0, None
        for _ in range(repeats):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            if fetch:
                result = [
                    item for blob in llm.collective_rpc("labelgen_fetch") for item in pickle.loads(blob)
                ]
            elif convert is not None:
                result = [convert(o) for o in outs]
            best = max(best, tokens / (time.perf_counter() - start))
        return best, result

    def install(k: int, active: bool = True, **options) -> None:
        llm.collective_rpc("labelgen_install", args=({"k": k, **options},))
        llm.collective_rpc("labelgen_set_active", args=(active,))

    plain = SamplingParams(max_tokens=1, detokenize=False)
    hook_params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    install(8, active=False)
    timed(plain)  # warm-up
    for k in ks:
        print(f"\n  {name}, k={k}, {sequences} x {seq_len} tokens")
        results: dict[str, float] = {}
        install(k, active=False)
        results["prefill"], _ = timed(plain)
        dict_params = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False)
        flat_params = SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
        results["dict"], _ = timed(dict_params, lambda o, k=k: dict_to_arrays(o, k))
        results["flat"], flat = timed(flat_params, lambda o, k=k: flat_to_arrays(o, k))
        install(k, logits_only=True)
        results["bound"], _ = timed(hook_params, fetch=True)
        install(k)
        results["hook"], hooked = timed(hook_params, fetch=True)
        install(k, layers=[1, layers], hidden_every=16)
        results["hook+hidden"], _ = timed(hook_params, fetch=True)
        install(k, draws=32)
        results["hook+draws"], drawn = timed(hook_params, fetch=True)
        install(k, active=False)

        from labelgen.contract.format import token_hash

        by_hash = {item["prompt_hash"]: item for item in hooked}
        same = total = 0
        worst = 0.0
        for prompt, (ids, lps) in zip(prompts, flat, strict=True):
            item = by_hash[token_hash(np.asarray(prompt["prompt_token_ids"]))]
            same += int((item["topk_ids"] == ids).sum())
            total += ids.size
            worst = max(worst, float(np.abs(item["topk_logprobs"] - lps).max()))
        for path in ("prefill", "bound", "dict", "flat", "hook", "hook+hidden", "hook+draws"):
            rate = results[path]
            print(
                f"    {path:<12} {rate:>10,.0f} tok/s   {rate / results['flat']:5.2f}x flat"
                f"   {rate / results['dict']:5.2f}x dict   {rate / results['prefill']:5.2f}x prefill"
            )
        print(f"    hook vs flat labels: {same}/{total} ids identical, max |logprob diff| {worst:.2e}")
        import pyarrow as pa

        from labelgen.contract.codecs import compact_v1

        positions = sequences * (seq_len - 1)
        with tempfile.TemporaryDirectory() as tmp:
            topk = pa.table(
                {
                    "topk_ids": pa.array([i["topk_ids"].ravel() for i in hooked], pa.list_(pa.int32())),
                    "topk_logprobs": pa.array(
                        [i["topk_logprobs"].ravel() for i in hooked], pa.list_(pa.float32())
                    ),
                    "target_logprobs": pa.array(
                        [i["target_logprobs"] for i in hooked], pa.list_(pa.float32())
                    ),
                }
            )
            draws = pa.table(
                {
                    "draw_num": pa.array(
                        [i["draw_num"].astype(np.uint8) for i in drawn], pa.list_(pa.uint8())
                    ),
                    "draw_ids": pa.array([i["draw_ids"] for i in drawn], pa.list_(pa.int32())),
                    "draw_counts": pa.array(
                        [i["draw_counts"].astype(np.uint8) for i in drawn], pa.list_(pa.uint8())
                    ),
                }
            )
            top_bytes = bytes_per_position([topk], tmp) / positions
            encoded = [compact_v1.encode_arrays(i["topk_ids"], i["topk_logprobs"]) for i in hooked]
            compact = pa.table(
                {
                    **compact_v1.CODEC.encode(
                        np.concatenate([i["topk_ids"] for i in hooked]),
                        np.concatenate([i["topk_logprobs"] for i in hooked]),
                        np.array([len(i["target_logprobs"]) for i in hooked]),
                    ),
                    "target_logprobs": pa.array(
                        [i["target_logprobs"] for i in hooked], pa.list_(pa.float32())
                    ),
                }
            )
            compact_bytes = bytes_per_position([compact], tmp) / positions
            kl = np.mean([codec_kl(i, e) for i, e in zip(hooked, encoded, strict=True)])
            draw_bytes = bytes_per_position([draws], tmp) / positions
        print(
            f"    compact-v1 codec: top-{k} + target {compact_bytes:.1f} B/position, "
            f"KL(exact || stored) {kl:.2e} nats/position (over top-k + tail)"
        )
        mean_unique = np.mean([i["draw_num"].mean() for i in drawn])
        print(
            f"    on disk (zstd-3 Parquet, plain layout): top-{k} + target {top_bytes:.1f} B/position "
            f"(uncompressed {8 * k + 4} B); 32 draws {draw_bytes:.1f} B/position "
            f"({mean_unique:.1f} unique ids per position); stored top-k is exact (KL 0)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=2, help="runs per path; the best counts")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            run_model(name, MODELS[name], args.sequences, args.seq_len, args.k, Path(tmp), args.repeats)


if __name__ == "__main__":
    main()
