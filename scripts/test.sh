#!/usr/bin/env bash
# Set up (idempotent; no reinstall while .venv is current) and run the whole test
# suite: unit tests and the integration tests on the real parts (vLLM on CPU,
# transformers, full KD runs). Lint is `make lint` (CI runs both: .ci/run).
# Pass pytest arguments through, e.g. `bash scripts/test.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-cpu.sh
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
exec .venv/bin/python -m pytest "$@"
