"""Benchmark: generation throughput of ``labelgen generate`` against plain vLLM, and the cost of labels.

One vLLM engine (a random-initialised Llama with a word-level tokenizer of the model's
vocabulary, so every sampled id detokenizes) serves every variant, on the same prompts,
sampling parameters and per-request seeds; variants alternate over ``--repeats`` rounds
and the medians are compared. Printed as ratios measured in this one run (timings on
shared machines are noisy: compare ratios, not absolute numbers):

    vllm             plain ``LLM.generate`` (n requests per prompt, each with its seed)
    vllm+logprob     the same with the sampled tokens' log-probs (``logprobs=0``, flat): what a
                     job without labels asks for, for the samples' mean log-prob
    vllm+top-k       the same with generation-time top-k log-probs (``logprobs=k``, flat):
                     the other way to get labels of generated tokens
    job              ``labelgen generate`` without labels and without the samples' mean
                     log-prob (generate.mean_logprob: false): vllm's sampling parameters; checks
                     (length, format, exact
                     dedup; not "finished": a random model rarely samples EOS, so every
                     sample is kept, the most a job writes and labels) and writing the
                     generation shards included
    job+logprob      the same with the mean log-prob (vllm+logprob's sampling parameters)
    job+labels       the same with top-k labels of every kept sample (one extra prefill of
                     prompt + response through the extraction hook), label shards written;
                     no generation-time log-probs (the mean log-prob comes from the labels)
    job+labels/2     the same with a format check that rejects about half the samples: labels
                     are computed for kept samples only

Throughput is response tokens per second of the whole call (job: the whole job, plan to
manifest, with the engine already started).

    .venv/bin/python bench/generate.py                       # vocab 32k, 64 prompts x 4
    .venv/bin/python bench/generate.py --vocab 512 --prompts 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_word_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer of exactly ``vocab`` ids (``w0`` ... ), EOS = the last id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 1)}
    words["<eos>"] = vocab - 1
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="w0")
    fast.save_pretrained(str(directory))


def build_model(directory: Path, vocab: int) -> Path:
    from labelgen.testing import build_llama

    build_word_tokenizer(directory, vocab)
    build_llama(
        directory,
        None,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        intermediate_size=704,
        max_position_embeddings=1024,
        initializer_range=0.2,
        extra_vocab=vocab,
    )
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = vocab - 1
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def write_prompts(path: Path, count: int, vocab: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(count):
            ids = rng.integers(0, vocab - 1, size=int(rng.integers(16, 48)))
            f.write(json.dumps({"prompt_ids": ids.tolist()}) + "\n")


def job_spec(
    model: Path, prompts: Path, out: Path, args, labels: bool, mean_logprob: bool = True, half=False
):
    from labelgen.contract.configs import load_config
    from labelgen.spec import JobSpec

    return load_config(
        JobSpec,
        {
            "teacher": {"model": str(model), "dtype": "float32", "max_model_len": 512},
            "corpus": {"sources": [str(prompts)]},
            "labels": {"k": args.k},
            "output": {"url": str(out)},
            "generate": {
                "prompt_ids_field": "prompt_ids",
                "n": args.n,
                "temperature": 1.0,
                "top_p": 1.0,
                "max_tokens": args.max_tokens,
                "batch_prompts": args.prompts,
                "labels": labels,
                "mean_logprob": mean_logprob,
                # half: the first word's number ends in 0-4 (the word-level tokenizer's "wN")
                "checks": {
                    "format": r"(?s)\s*w\d*[0-4]\b.*" if half else ".*",
                    "finished": False,
                    "dedup": "exact",
                },
            },
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from labelgen.prompts import sample_seed
    from labelgen.runner import run_job
    from labelgen.teacher_vllm import VllmTeacher

    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    model = build_model(work / "model", args.vocab)
    prompts_path = work / "prompts.jsonl"
    write_prompts(prompts_path, args.prompts, args.vocab)
    prompts = [np.asarray(json.loads(line)["prompt_ids"], np.int32) for line in prompts_path.open()]
    spec = job_spec(model, prompts_path, work / "out", args, labels=True)
    teacher = VllmTeacher(spec)
    gen = spec.generate
    assert gen is not None
    requests = [
        (p, sample_seed(gen.seed, f"prompts.jsonl#{i}", s))
        for i, p in enumerate(prompts)
        for s in range(gen.n)
    ]

    def plain(logprobs: int | None):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=1,
                temperature=1.0,
                top_p=1.0,
                max_tokens=gen.max_tokens,
                seed=seed,
                logprobs=logprobs,
                flat_logprobs=True,
            )
            for _, seed in requests
        ]
        outs = teacher._llm.generate(
            [TokensPrompt(prompt_token_ids=p.tolist()) for p, _ in requests], params, use_tqdm=False
        )
        if logprobs is not None:  # what a user of generation-time log-probs then does: arrays
            for out in outs:
                lp = out.outputs[0].logprobs
                np.asarray(lp.token_ids, np.int32), np.asarray(lp.logprobs, np.float32)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    kept: dict[bool, tuple[int, int]] = {}

    def job(labels: bool, mean_logprob: bool = True, half: bool = False):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        manifest = run_job(
            job_spec(model, prompts_path, out, args, labels, mean_logprob, half),
            show_progress=False,
            teacher_factory=lambda s: teacher,
            log=lambda m: None,
        )
        kept[half] = (manifest.generation["stats"]["kept"], manifest.generation["stats"]["samples"])
        return manifest.generation["totals"]["response_tokens"]

    variants = {
        "vllm": lambda: plain(None),
        "vllm+logprob": lambda: plain(0),
        "vllm+top-k": lambda: plain(args.k),
        "job": lambda: job(False, mean_logprob=False),
        "job+logprob": lambda: job(False),
        "job+labels": lambda: job(True),
        "job+labels/2": lambda: job(True, half=True),
    }
    teacher.close = lambda: None  # the jobs must not close the shared engine
    plain(None)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            tokens[name] = run()
            times[name].append(time.perf_counter() - start)
    print(
        f"\nvocab {args.vocab}, {args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, "
        f"k={args.k}, {args.repeats} rounds (medians)"
    )
    rates = {name: tokens[name] / statistics.median(times[name]) for name in variants}
    for name, rate in rates.items():
        print(
            f"  {name:<14} {tokens[name]:>7} tokens  {rate:>10,.0f} tok/s  {rate / rates['vllm']:6.3f}x vllm"
        )
    for job_name, base in (("job", "vllm"), ("job+logprob", "vllm+logprob"), ("job+labels", "vllm")):
        print(f"  {job_name} / {base} (the same sampling parameters): {rates[job_name] / rates[base]:.3f}")
    print(f"  job+labels/2 kept {kept[True][0]} of {kept[True][1]} samples (job+labels: {kept[False][0]})")
    same = tokens["job"] == tokens["vllm"]
    print(f"  the job generated the same number of tokens as plain vLLM: {same}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
