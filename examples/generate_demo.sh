#!/usr/bin/env bash
# One command on a fresh machine: set up, train a tiny teacher on a checkable task, let it
# write and check its own training data on vLLM, train three students, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
exec .venv/bin/python examples/generate_demo.py "$@"
