"""Helpers the tests share: job specs, dataset rows, codec test data (fixtures: conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent


def make_spec(teacher_dir: Path, corpus_dir: Path, out_url: str, **sections) -> dict:
    spec = {
        "teacher": {
            "model": str(teacher_dir),
            "dtype": "float32",
            "max_model_len": 512,
            "batch_sequences": 16,
            "engine_args": {"enforce_eager": True},
        },
        "corpus": {"sources": [f"{corpus_dir}/*.jsonl"], "messages_field": "messages"},
        "packing": {"seq_len": 128},
        "labels": {"k": 8},
        "output": {"url": out_url, "shard_mib": 0.25, "row_group_mib": 0.05},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value}
    return spec


def unit_facts(units) -> list:
    """Unit records without their timings (engine and wall seconds differ run to run)."""
    import dataclasses

    return [dataclasses.replace(u, engine_s=0.0, wall_s=0.0) for u in units]


def dataset_rows(url) -> list[dict]:
    """Every row of a complete label dataset (any fsspec URL), shard by shard in manifest order."""
    import fsspec
    import pyarrow.parquet as pq

    from labelgen.contract.dataset import read_manifest
    from labelgen.contract.format import join_url

    m = read_manifest(str(url))
    fs, root = fsspec.core.url_to_fs(str(url))
    out: list[dict] = []
    for shard in m.shards:
        with fs.open(join_url(root, shard.path), "rb") as f:
            out.extend(pq.read_table(f).to_pylist())
    return out


def student_config(
    url: str, tokenizer: Path, out: Path, alpha: float, max_steps: int = 250, holdout: int = 3
):
    """A tiny Llama student's training config (vocabulary 512) on the labels at ``url``."""
    from labelgen.contract.configs import load_config
    from students.config import TrainConfig

    return load_config(
        TrainConfig,
        {
            "model": {
                "tokenizer": str(tokenizer),
                "init": {
                    "model_type": "llama",
                    "vocab_size": 512,
                    "hidden_size": 64,
                    "intermediate_size": 128,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": 256,
                    "tie_word_embeddings": True,
                },
            },
            "data": {"url": url, "batch_sequences": 8, "holdout_row_groups": holdout},
            "loss": {"alpha": alpha, "temperature": 1.0},
            "optim": {"lr": 3e-3, "warmup_steps": 10, "max_steps": max_steps},
            "train": {"output_dir": str(out), "log_every": 50, "eval_every": 0, "eval_batches": 0, "seed": 0},
        },
    )


def generated_rows(url: str, directory: str = "generations") -> list[dict]:
    """Every row of a generation job's kept (or ``rejected``) sample files, in file order."""
    import fsspec
    import pyarrow.parquet as pq

    from labelgen.contract.format import join_url

    fs, root = fsspec.core.url_to_fs(url)
    rows = []
    for path in sorted(fs.glob(join_url(root, directory, "*.parquet"))):
        with fs.open(path, "rb") as f:
            rows.extend(pq.read_table(f).to_pylist())
    return rows


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def codec_labels(rng: np.random.Generator, n: int, vocab: int, k: int, scale: float) -> tuple:
    """(n, vocab) random log-softmax → its (n, k) top-k ids and log-probs by rank, and the full log-probs."""
    logits = rng.standard_normal((n, vocab)) * scale
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top = np.argpartition(-lp, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(lp, top, 1), axis=1), 1).astype(np.int32)
    return top, np.take_along_axis(lp, top, 1).astype(np.float32), lp


def kl_k_plus_1(p_lps: np.ndarray, q_lps: np.ndarray) -> np.ndarray:
    """Per-position KL(p || q) over k + 1 buckets; (n, k) log-probs of the same ids in the same order."""
    p, q = np.exp(p_lps.astype(np.float64)), np.exp(q_lps.astype(np.float64))
    p_tail, q_tail = np.clip(1 - p.sum(1), 0, 1), np.clip(1 - q.sum(1), 1e-300, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 0, p_tail * np.log(p_tail / q_tail), 0.0)
    return (p * np.log(p / q)).sum(1) + tail


def same_ids_in_stored_order(ids, lps, ids_q, lps_q):
    """Stored log-probs re-ordered to the exact labels' id order (asserting equal id sets)."""
    by_id, by_id_q = np.argsort(ids, 1), np.argsort(ids_q, 1)
    np.testing.assert_array_equal(np.take_along_axis(ids, by_id, 1), np.take_along_axis(ids_q, by_id_q, 1))
    return np.take_along_axis(lps, by_id, 1), np.take_along_axis(lps_q, by_id_q, 1)
