"""Test and demo fixtures, not library API: tiny local models, tokenizers and corpora.

Nothing here downloads anything: the corpus is built from the docstrings of the
Python standard library, the tokenizer is a byte-level BPE trained with
``tokenizers`` on that corpus, and the models are randomly initialised
Llama-architecture checkpoints saved with ``transformers``. They load through the
same code paths as a real model directory (``vllm.LLM(model=path)``,
``AutoModelForCausalLM.from_pretrained(path)``).
"""

from __future__ import annotations

import importlib
import json
import random
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "CHAT_TEMPLATE",
    "stdlib_texts",
    "write_jsonl_corpus",
    "build_tokenizer",
    "build_llama",
    "pretrain",
]

# A minimal chat template with the prefix property (rendering the first n messages
# is a prefix of rendering n+1), which the chat masking relies on.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_MODULES = [
    "json",
    "csv",
    "argparse",
    "pathlib",
    "collections",
    "functools",
    "itertools",
    "subprocess",
    "logging",
    "dataclasses",
    "typing",
    "random",
    "statistics",
    "textwrap",
    "string",
    "re",
    "datetime",
    "decimal",
    "fractions",
    "heapq",
    "bisect",
    "shutil",
    "tempfile",
    "zipfile",
    "tarfile",
    "gzip",
    "hashlib",
    "hmac",
    "secrets",
    "socket",
    "threading",
    "queue",
    "sched",
    "contextlib",
    "abc",
    "enum",
    "copy",
    "pprint",
    "inspect",
    "ast",
    "tokenize",
    "difflib",
    "calendar",
    "uuid",
    "base64",
    "struct",
]


def stdlib_texts(min_chars: int = 200) -> list[str]:
    """Docstrings of standard-library modules, classes and functions, in a fixed order."""
    texts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated aliases (typing.io, ...) warn on access
        for name in _MODULES:
            _module_texts(importlib.import_module(name), min_chars, texts)
    return texts


def _module_texts(mod, min_chars: int, texts: list[str]) -> None:
    """Append the module's docstring and its public members' docstrings, unseen ones only."""
    if mod.__doc__ and len(mod.__doc__) >= min_chars:
        texts.append(mod.__doc__.strip())
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        doc = getattr(getattr(mod, attr), "__doc__", None)
        if isinstance(doc, str) and len(doc) >= min_chars and doc.strip() not in texts:
            texts.append(doc.strip())


def write_jsonl_corpus(path: str | Path, texts: list[str], chat_every: int = 0, seed: int = 0) -> Path:
    """Write ``{"text": ...}`` lines; every ``chat_every``-th record becomes a chat record."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, text in enumerate(texts):
            record: dict = {"id": i, "text": text}
            if chat_every and i % chat_every == 0:
                cut = rng.randint(20, max(21, len(text) // 2))
                record["messages"] = [
                    {"role": "user", "content": "Explain: " + text[:cut]},
                    {"role": "assistant", "content": text[cut:]},
                ]
            f.write(json.dumps(record) + "\n")
    return path


def build_tokenizer(out_dir: str | Path, texts: list[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``texts`` and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_llama(
    out_dir: str | Path,
    tokenizer: Any | None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    initializer_range: float = 0.02,
    extra_vocab: int = 0,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised Llama model (fp32) plus ``tokenizer`` to ``out_dir``.

    ``extra_vocab`` pads the embedding beyond the tokenizer's vocabulary, as real
    checkpoints often do; with ``tokenizer=None`` the vocabulary is ``extra_vocab`` and no
    tokenizer is saved (load such a model with ``skip_tokenizer_init=True``).
    Head size is ``hidden_size // num_heads`` and must be >= 32
    for vLLM's CPU attention.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = hidden_size // num_heads
    if head_dim < 32:
        raise ValueError(
            f"hidden_size / num_heads = {head_dim}, but vLLM's CPU attention needs head_dim >= 32; "
            "raise hidden_size or lower num_heads"
        )
    torch.manual_seed(seed)
    specials = {
        name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")
    }
    config = LlamaConfig(
        vocab_size=(len(tokenizer) if tokenizer is not None else 0) + extra_vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        **specials,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    model.save_pretrained(str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def pretrain(
    model_dir: str | Path,
    texts: list[str],
    steps: int = 200,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    log=None,
) -> dict[str, float]:
    """Train the saved model at ``model_dir`` on ``texts`` with plain CE and save it back.

    Makes a tiny teacher that has actually learned its corpus, so its labels carry
    information a student can distil. Returns the first and last training loss.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    data = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for step in range(steps):
        rows = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        loss = model(input_ids=data[rows], labels=data[rows]).loss
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % max(steps // 5, 1) == 0:
            log(f"  teacher pretraining step {step + 1}/{steps} | ce {loss.item():.3f}")
    model.save_pretrained(str(model_dir), safe_serialization=True)
    return {"first_loss": losses[0], "last_loss": losses[-1]}
