# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC defaults to the CPU wheel; GPU users: make install TORCH_SPEC="torch>=2.4"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: install demo test test-fast test-compiled benchmark bench-rounds bench-windows bench-gpu frontier clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,tensorboard]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m specdiff_train.demo

test: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=15 -m "not compile_matrix"

test-fast: install
	$(PY) -m pytest -q -m "not slow and not compile_matrix" --timeout=600

# Compiled rounds for every shipped drafter x verifier (about 4 minutes of inductor compilation).
test-compiled: install
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 tests/test_compiled.py

benchmark: install
	$(PY) scripts/benchmark.py

# Where a round's time goes at batch 1 (docs/performance.md): operators, host syncs, wall-clock ratios.
bench-rounds: install
	$(PY) scripts/bench_rounds.py

# window="auto" against every fixed window at batch 1, and against ancestral sampling at batch 64 and 128
# (docs/benchmarks.md "Adaptive windows"; about 15 minutes on a 2-core CPU).
bench-windows: install
	$(PY) scripts/bench_windows.py

# The same on one GPU, eager and compiled (a few minutes); run with the GPU's python:
#   make bench-gpu PY=python3
bench-gpu:
	$(PY) scripts/bench_rounds.py --device cuda --samples 3
	$(PY) scripts/bench_rounds.py --device cuda --compile target --samples 3 --verifiers block
	$(PY) scripts/bench_rounds.py --device cuda --compile all --samples 3 --verifiers block
	$(PY) scripts/bench_windows.py --device cuda --seeds 3 --repeats 3
	$(PY) scripts/bench_windows.py --device cuda --seeds 3 --repeats 3 --compile --batches 64

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache

# docs/frontier.md: quality against sequential target calls for every sampler (about 25 minutes on 2 CPU cores).
frontier: install
	$(PY) scripts/frontier.py --targets toy2d digits --threads 2 --json docs/frontier.json --plot docs/frontier.png --markdown docs/frontier.md
