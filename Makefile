# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# One thread per process: a run is the trainer plus two built-in servers, and at 2 threads each they oversubscribe a
# 2-core machine (a 12-step low-OT DW run took 80 s against 20 s, docs/records/threads-ab.txt, docs/FIDELITY.md
# "Fifth round"). DeepSpeed picks its CPU accelerator.
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup test demo models bench clean test-sglang

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Real SGLang 0.5.23 on the CPU (own venv .venv-sglang, see scripts/sglang_cpu.sh and docs/ENGINES.md),
# then the same conformance suite as `make test` runs against the built-in server.
test-sglang: $(STAMP)
	bash scripts/sglang_cpu.sh test

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

models: $(STAMP)
	$(BIN)/topd-ds make-models --out models/arith --force

clean:
	rm -rf runs/ .pytest_cache
