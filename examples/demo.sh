#!/usr/bin/env bash
# One command on a fresh machine: set up, label a corpus with a tiny teacher on vLLM,
# train a student from the shard URL (KD and a CE-only baseline), print what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
exec .venv/bin/python examples/demo.py "$@"
