"""Engine busy fraction with a simulated accelerator: today's serial loop vs the overlapped one.

The teacher here *sleeps* for the time a modelled accelerator needs per batch
(``tokens / --gpu-tokens-per-s``) and uses no CPU while it does; its labels come from
a pool built once (top-k log-probs shaped like a real teacher's, draws, hidden
states), so everything the host does is the real work of a job: reading jsonl,
tokenizing, packing, compact-v2 encoding, draws and hidden-state columns, zstd,
sha256 and the commit records. Both runs label the same corpus into fresh outputs
with the same spec; the labels are checked identical, and the script prints the
engine busy fraction of each run (as the manifest records it) and their ratio::

    python bench/pipeline.py                       # defaults below, ~1 min on 2 cores
    python bench/pipeline.py --gpu-tokens-per-s 20000 --tokens 300000

Nothing is downloaded: the tokenizer is trained on the standard library's docstrings
(a small vocabulary tokenizes faster than a real one, so on a real tokenizer the host
does more per token).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from labelgen.labels import SequenceLabels


class SimulatedAccelerator:
    """A teacher that sleeps ``tokens / tokens_per_s`` per batch and returns pooled labels.

    Labels of a sequence of T tokens are rows ``[r, r + T - 1)`` of a pool of
    ``pool_rows`` positions, with ``r`` from the sequence's first tokens, so they are a
    pure function of the sequence (both runs get the same labels) and cost a slice.
    """

    def __init__(
        self,
        k: int,
        tokens_per_s: float,
        draws: int = 0,
        layers: tuple[int, ...] = (),
        dim: int = 896,
        vocab: int = 151_936,
        pool_rows: int = 8192,
    ):
        self.k, self.tokens_per_s = k, tokens_per_s
        self.draws, self.layers = draws, tuple(layers)
        self.sleep_s = 0.0
        rng = np.random.default_rng(0)
        self.pool_rows = pool_rows
        offsets = rng.choice(vocab, k, replace=False)  # k distinct ids per row, shifted per row
        base = rng.integers(0, vocab, 2 * pool_rows)
        self.topk_ids = ((base[:, None] + offsets[None, :]) % vocab).astype(np.int32)
        # Log-probs of a peaked distribution, sorted descending, as a teacher's top-k are.
        raw = np.sort(rng.standard_normal((2 * pool_rows, k)).astype(np.float32) * 2.5, axis=1)[:, ::-1]
        self.topk_logprobs = np.ascontiguousarray(raw - np.logaddexp.reduce(raw, axis=1, keepdims=True) - 0.3)
        self.target = self.topk_logprobs[:, 0].copy()
        if draws:
            self.draw_num = np.minimum(rng.geometric(0.35, 2 * pool_rows), draws).astype(np.int32)
            self.draw_offsets = np.concatenate([[0], np.cumsum(self.draw_num)])
            self.draw_ids = np.sort(rng.integers(0, vocab, int(self.draw_offsets[-1]))).astype(np.int32)
            self.draw_counts = np.ones(int(self.draw_offsets[-1]), np.int32)
        self.hidden_pool = rng.standard_normal((2 * pool_rows // 16 + 1, dim)).astype(np.float32)

    def label(self, batch: list[np.ndarray]) -> list[SequenceLabels]:
        tokens = sum(len(ids) for ids in batch)
        time.sleep(tokens / self.tokens_per_s)  # the modelled accelerator: no CPU used
        self.sleep_s += tokens / self.tokens_per_s
        return [self._labels(ids) for ids in batch]

    def _labels(self, ids: np.ndarray) -> SequenceLabels:
        n = len(ids) - 1
        r = int(ids[0]) * 7 + int(ids[1]) if n else 0
        r %= self.pool_rows
        extra: dict = {}
        if self.draws:
            a, b = self.draw_offsets[r], self.draw_offsets[r + n]
            extra.update(
                draw_num=self.draw_num[r : r + n],
                draw_ids=self.draw_ids[a:b],
                draw_counts=self.draw_counts[a:b],
            )
        if self.layers:
            positions = np.arange(r % 16, len(ids), 16, dtype=np.int64)
            rows = self.hidden_pool[(r // 16) : (r // 16) + len(positions)]
            extra.update(hidden_positions=positions, hidden={layer: rows for layer in self.layers})
        return SequenceLabels(
            topk_ids=self.topk_ids[r : r + n],
            topk_logprobs=self.topk_logprobs[r : r + n],
            target_logprobs=self.target[r : r + n],
            **extra,
        )

    def provenance(self) -> dict:
        return {"engine": "simulated", "model_vocab_size": 151_936, "hidden_size": self.hidden_pool.shape[1]}

    def close(self) -> None:
        pass


def build_inputs(work: Path, tokens: int) -> tuple[Path, Path]:
    """A tokenizer + tiny model directory and a jsonl corpus of about ``tokens`` tokens."""
    from labelgen.testing import build_llama, build_tokenizer, stdlib_texts, write_jsonl_corpus

    texts = stdlib_texts()
    model = work / "model"
    tok = build_tokenizer(model, texts, vocab_size=512)
    build_llama(model, tok, hidden_size=64, num_heads=2, num_layers=2, intermediate_size=128)
    corpus = work / "corpus"
    corpus.mkdir()
    per_copy = sum(len(t) for t in texts) // 4  # ~4 characters per token at vocabulary 512
    copies = max(1, -(-tokens // per_copy))
    write_jsonl_corpus(corpus / "corpus.jsonl", texts * copies)
    return model, corpus


def run(model: Path, corpus: Path, out: str, depth: int, args: argparse.Namespace) -> tuple[dict, float]:
    """Label the corpus into ``out`` with pipeline ``depth``; (the manifest's labeling record, wall s)."""
    from labelgen.contract.configs import load_config
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec

    spec = load_config(
        JobSpec,
        {
            "teacher": {
                "model": str(model),
                "batch_sequences": args.batch_sequences,
                "engine_args": {"enforce_eager": True},
            },
            "corpus": {"sources": [str(corpus / "corpus.jsonl")]},
            "packing": {"seq_len": args.seq_len},
            "labels": {"k": args.k, "codec": "compact-v2", "draws": args.draws},
            "hidden": {"layers": [1, 2], "every": 16},
            "output": {"url": out, "shard_mib": 64, "row_group_mib": 16},
        },
    )
    teacher = SimulatedAccelerator(args.k, args.gpu_tokens_per_s, args.draws, layers=(1, 2))
    began = time.monotonic()
    manifest = run_job(
        spec, show_progress=False, teacher_factory=lambda s: teacher, log=lambda m: None, depth=depth
    )
    return manifest.labeling, time.monotonic() - began


def shard_tables(root: str) -> list:
    """Every label and hidden-state shard of a dataset as a pyarrow table, in manifest order."""
    import pyarrow.parquet as pq

    from labelgen.contract.dataset import read_manifest
    from labelgen.contract.format import join_url

    manifest = read_manifest(root)
    tables = []
    for shard in manifest.shards:
        tables.append(pq.read_table(join_url(root, shard.path)))
        if shard.hidden_path:
            tables.append(pq.read_table(join_url(root, shard.hidden_path)))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu-tokens-per-s", type=float, default=20_000, help="modelled accelerator rate")
    parser.add_argument("--tokens", type=int, default=300_000, help="corpus size, about")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-sequences", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="labelgen-bench-pipeline-"))
    try:
        model, corpus = build_inputs(work, args.tokens)
        results = {}
        for name, depth in (("serial", 0), ("overlapped", 2)):
            out = str(work / f"out-{name}")
            results[name] = (*run(model, corpus, out, depth, args), out)
        serial, overlapped = results["serial"], results["overlapped"]
        same = all(
            a.equals(b) for a, b in zip(shard_tables(serial[2]), shard_tables(overlapped[2]), strict=True)
        )
        print(
            f"simulated accelerator at {args.gpu_tokens_per_s:,.0f} tokens/s; compact-v2, k={args.k}, "
            f"draws={args.draws}, hidden layers [1, 2] every 16; seq_len {args.seq_len}, "
            f"batch_sequences {args.batch_sequences}; {os.cpu_count()} CPUs"
        )
        for name, (labeling, wall, _) in results.items():
            print(
                f"{name:>10}: engine busy fraction {labeling['engine_busy_fraction']:.3f} "
                f"({labeling['engine_s']:.1f} s busy of {labeling['wall_s']:.1f} s labeling; "
                f"job wall {wall:.1f} s)"
            )
        ratio = overlapped[0]["engine_busy_fraction"] / serial[0]["engine_busy_fraction"]
        print(
            f"overlapped / serial busy fraction: {ratio:.2f}x; job wall serial / overlapped: "
            f"{serial[1] / overlapped[1]:.2f}x; shards identical: {same}"
        )
        if not same:
            raise SystemExit("the overlapped run wrote different shards than the serial one")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
