# The two set-up commands of the README are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
DATA ?= data
RUNS ?= runs
TRAIN_CUTOUTS ?= 44000
TEST_CUTOUTS ?= 6000
# Cutouts with a seeing range far wider than DES's, for the OOD score's seeing estimator.
SEEING_CUTOUTS ?= 12000
# Folder of FITS cutouts for `make bench`: the repository's samples.
BENCH_CUTOUTS ?= examples/cutouts/clean

.PHONY: serve test lint models samples bench loadtest install-serve install-test install-train clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Serving installs only what serving needs: no TensorFlow.
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $@

$(VENV)/.train: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train]'
	touch $@

install-serve: $(VENV)/.serve
install-test: $(VENV)/.test
install-train: $(VENV)/.train

serve: $(VENV)/.serve
	$(BIN)/lensserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.test
	$(BIN)/ruff check service training tests tools
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# Open-loop overload of a fresh local server (2x its measured capacity for 60 s); a command,
# not a CI test: figures in docs/reliability.md. Fails on any answer but 200/503 or a socket error.
LOADTEST_S ?= 60
loadtest: $(VENV)/.serve
	$(BIN)/python tools/loadtest.py --duration-s $(LOADTEST_S) --out loadtest.json

# Rebuild the three shipped models from scratch: simulate, train, evaluate, export.
models: $(VENV)/.train
	$(BIN)/python -m training simulate --out $(DATA)/train --n $(TRAIN_CUTOUTS) --seed 1
	$(BIN)/python -m training simulate --out $(DATA)/test --n $(TEST_CUTOUTS) --seed 2
	$(BIN)/python -m training simulate --out $(DATA)/seeing --n $(SEEING_CUTOUTS) --seed 4 \
		--seeing-factor-range 0.3 3.3 --seeing-log-sigma 0.7
	$(BIN)/python -m training train --data $(DATA)/train --runs $(RUNS)
	$(BIN)/python -m training evaluate --data $(DATA)/test --runs $(RUNS)
	$(BIN)/python -m training export --runs $(RUNS) --models models --data $(DATA)/train $(DATA)/test
	$(BIN)/python -m training seeing --data $(DATA)/train $(DATA)/seeing --models models
	$(BIN)/python -m training ood --models models --fit-data $(DATA)/train --threshold-data $(DATA)/test

# The sample cutouts of examples/cutouts, bit for bit (training/samples.py).
SAMPLES_SEED ?= 13
samples: $(VENV)/.train
	$(BIN)/python -m training samples --out examples/cutouts --seed $(SAMPLES_SEED)

# Throughput table of issue 5 (docs/performance.md); needs wrk on PATH for the HTTP rows.
bench: $(VENV)/.bench
	$(BIN)/lensserve bench $(if $(BENCH_CUTOUTS),--cutouts $(BENCH_CUTOUTS))

$(VENV)/.bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

clean:
	rm -rf $(DATA) $(RUNS) .pytest_cache .ruff_cache
