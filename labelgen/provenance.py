"""Provenance of a labeling job: teacher weights and tokenizer fingerprints, model checks.

Everything here runs before the model loads, so a wrong path fails in seconds.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from labelgen.contract.format import tokenizer_fingerprint
from labelgen.contract.storage import MIB
from labelgen.spec import TeacherSpec

__all__ = ["ModelPathError", "check_model_path", "weights_fingerprint", "load_tokenizer", "tokenizer_info"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelPathError(FileNotFoundError):
    """The teacher (or tokenizer) path does not hold a usable checkpoint."""


def check_model_path(path: str, field: str = "teacher.model") -> Path | None:
    """Return the local checkpoint directory, or None for a model id resolved by the HF cache.

    Raises ModelPathError for a path-like value that does not exist or lacks config.json.
    """
    p = Path(path).expanduser()
    looks_local = p.is_absolute() or path.startswith((".", "~")) or p.exists() or path.count("/") > 1
    if not looks_local:
        return None
    if not p.is_dir():
        raise ModelPathError(
            f"{field} {path!r} does not exist; give the directory of a Hugging Face checkpoint "
            "(config.json, tokenizer and weights)"
        )
    if field == "teacher.model" and not (p / "config.json").is_file():
        raise ModelPathError(f"{field} {path!r} has no config.json; is it a Hugging Face checkpoint?")
    return p


def weights_fingerprint(model: str, mode: str) -> dict[str, Any]:
    """Fingerprint of the weight files: sha256 over (name, size, bytes or first/last MiB)."""
    directory = check_model_path(model)
    if directory is None or mode == "none":
        return {"mode": "none" if directory else "model-id", "sha256": None, "files": 0}
    files = sorted(f for f in directory.rglob("*") if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES))
    digest = hashlib.sha256()
    total = 0
    for file in files:
        size = file.stat().st_size
        total += size
        digest.update(f"{file.relative_to(directory)}:{size}\n".encode())
        with file.open("rb") as f:
            if mode == "full" or size <= 2 * MIB:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            else:
                digest.update(f.read(MIB))
                f.seek(size - MIB)
                digest.update(f.read(MIB))
    return {"mode": mode, "sha256": digest.hexdigest(), "files": len(files), "bytes": total}


def load_tokenizer(teacher: TeacherSpec) -> Any:
    """The teacher's tokenizer through transformers (the same one vLLM loads)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError("tokenization needs transformers: `pip install 'labelgen[vllm]'`") from exc
    path = teacher.tokenizer or teacher.model
    check_model_path(path, "teacher.tokenizer" if teacher.tokenizer else "teacher.model")
    return AutoTokenizer.from_pretrained(path, revision=teacher.revision)


def tokenizer_info(tokenizer: Any, path: str) -> dict[str, Any]:
    return {
        "path": os.path.abspath(path) if Path(path).exists() else path,
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
