# scaletrain — `make train` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A pinned torch is installed first: an unpinned one pulls several GB of CUDA wheels.
TORCH_PIN ?= torch==2.13.0
CONFIG ?= configs/tiny.yaml
STAMP  := $(VENV)/.installed

.PHONY: install train sft distill dpo rm test test-slow check lint typecheck golden bench-gpu mutants clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q mpich
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/scaletrain train $(CONFIG)

# Fine-tune `make train`'s checkpoint into a chat model (configs/sft-tiny.yaml).
sft: $(STAMP)
	test -d runs/tiny/checkpoints || $(MAKE) train
	$(VENV)/bin/scaletrain sft configs/sft-tiny.yaml

# A smaller student distilled from the `make train` checkpoint (configs/distill-tiny.yaml).
distill: $(STAMP)
	test -d runs/tiny/checkpoints || $(MAKE) train
	$(VENV)/bin/scaletrain distill configs/distill-tiny.yaml

# Preference stages on the checkpoint of `make sft` (runs/sft-tiny).
dpo: $(STAMP)
	test -d runs/sft-tiny/checkpoints || $(MAKE) sft
	$(VENV)/bin/scaletrain dpo configs/dpo-tiny.yaml

rm: $(STAMP)
	test -d runs/sft-tiny/checkpoints || $(MAKE) sft
	$(VENV)/bin/scaletrain rm configs/rm-tiny.yaml

check: lint typecheck

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) check
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow" tests

# Regenerate the checked-in golden loss curve (only after an intended numerics change).
golden: $(STAMP)
	$(PY) -m tests.golden --write

# One GPU: 1B / MoE throughput through `scaletrain train`, vs transformers, attention paths
# (bench/suite.py; <= 8 minutes on one H200; results in bench/results/).
bench-gpu:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m bench.suite

# Curated bugs (tests/mutants.yaml) that the tests must catch; not part of `make test`.
mutants: $(STAMP)
	$(PY) -m tests.mutation

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
