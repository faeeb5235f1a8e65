"""The student: a transformers causal LM loaded from ``model.path`` or built from ``model.init``.

Loaded on CPU in ``model.dtype``; the trainer moves it to its device. The tokenizer
comes from ``model.tokenizer`` (default ``model.path``) and must fit in the student's
vocabulary; whether it matches the labels' tokenizer is
:func:`students.compatibility.check_tokenizer`'s job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from students.config import TrainConfig

__all__ = ["load_student"]


def load_student(cfg: TrainConfig, seed: int) -> tuple[Any, Any, str]:
    """(model, tokenizer, tokenizer path) for the config, on CPU; ``seed`` seeds a fresh init."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    m = cfg.model
    tok_path = m.tokenizer or m.path
    assert tok_path is not None  # guaranteed by ModelConfig.check
    for field_name, path in (("model.path", m.path), ("model.tokenizer", m.tokenizer)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{field_name} {path!r} does not exist; give a local model directory")
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    dtype = getattr(torch, m.dtype)
    torch.manual_seed(seed)
    if m.path is not None:
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype)
    else:
        init = dict(m.init or {})
        config = AutoConfig.for_model(init.pop("model_type"), **init)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < len(tokenizer):
        raise ValueError(
            f"the student's vocabulary ({vocab}) is smaller "
            f"than its tokenizer's ({len(tokenizer)}); set model.init.vocab_size >= {len(tokenizer)}"
        )
    return model, tokenizer, tok_path
