"""Shared fixtures: a tiny tokenizer + Llama teacher built locally, corpora, labeled datasets.

Session-scoped and cached under pytest's tmp dir: nothing is downloaded. Helper
functions the tests call live in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixtures defined elsewhere, available to every test module: `postgres_url` (a fresh,
# empty PostgreSQL database per test) and the session's server check behind it.
from pg_server import postgres_server, postgres_url  # noqa: F401

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def texts() -> list[str]:
    from labelgen.testing import stdlib_texts

    return stdlib_texts()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, texts) -> Path:
    """A 2-layer Llama (hidden 128, head_dim 32), briefly trained, with its tokenizer."""
    from labelgen.testing import build_llama, build_tokenizer, pretrain

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
    from labelgen.testing import write_jsonl_corpus

    out = tmp_path_factory.mktemp("corpus")
    half = len(texts) // 2
    write_jsonl_corpus(out / "a.jsonl", texts[:half], chat_every=6)
    write_jsonl_corpus(out / "b.jsonl", texts[half:])
    with (out / "b.jsonl").open("ab") as f:
        f.write(b'{"text": broken\n{"other": 1}\n{"text": ""}\n\xff\xfe\n{"text": 5}\n')
    return out


@pytest.fixture(scope="session")
def fake_labels(teacher_dir, corpus_dir, tmp_path_factory) -> str:
    """The corpus labeled by the deterministic fake teacher (fast; no vLLM)."""
    from fakes import FakeTeacher
    from helpers import make_spec
    from labelgen.contract.configs import load_config
    from labelgen.runner import run_job
    from labelgen.spec import JobSpec

    out = str(tmp_path_factory.mktemp("fake-labels") / "ds")
    spec = load_config(JobSpec, make_spec(teacher_dir, corpus_dir, out))
    run_job(spec, show_progress=False, teacher_factory=lambda s: FakeTeacher(s.labels.k))
    return out
