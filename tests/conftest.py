"""Shared fixtures: a tiny tokenizer + Llama teacher built locally, corpora, specs.

Session-scoped and cached under pytest's tmp dir: nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def texts() -> list[str]:
    from labelgen.tiny import stdlib_texts

    return stdlib_texts()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, texts) -> Path:
    """A 2-layer Llama (hidden 128, head_dim 32), briefly trained, with its tokenizer."""
    from labelgen.tiny import build_llama, build_tokenizer, pretrain

    out = tmp_path_factory.mktemp("teacher")
    tok = build_tokenizer(out, texts, vocab_size=512)
    build_llama(out, tok, hidden_size=128, num_heads=4, num_layers=2, intermediate_size=256, extra_vocab=16)
    pretrain(out, texts, steps=120, seq_len=128, batch_size=16)
    return out


@pytest.fixture(scope="session")
def tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(teacher_dir))


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory, texts) -> Path:
    from labelgen.tiny import write_jsonl_corpus

    out = tmp_path_factory.mktemp("corpus")
    half = len(texts) // 2
    write_jsonl_corpus(out / "a.jsonl", texts[:half], chat_every=6)
    write_jsonl_corpus(out / "b.jsonl", texts[half:])
    with (out / "b.jsonl").open("ab") as f:
        f.write(b'{"text": broken\n{"other": 1}\n{"text": ""}\n\xff\xfe\n{"text": 5}\n')
    return out


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


def dataset_rows(url) -> list[dict]:
    """Every row of a complete label dataset (any fsspec URL), shard by shard in manifest order."""
    import fsspec
    import pyarrow.parquet as pq

    from labelgen.contract.format import join_url, read_manifest

    m = read_manifest(str(url))
    fs, root = fsspec.core.url_to_fs(str(url))
    out: list[dict] = []
    for shard in m.shards:
        with fs.open(join_url(root, shard.path), "rb") as f:
            out.extend(pq.read_table(f).to_pylist())
    return out


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="session")
def fake_labels(teacher_dir, corpus_dir, tmp_path_factory) -> str:
    """The corpus labeled by the deterministic fake teacher (fast; no vLLM)."""
    from fakes import FakeTeacher
    from labelgen.contract.configs import load_config
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec

    out = str(tmp_path_factory.mktemp("fake-labels") / "ds")
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, out))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    return out
