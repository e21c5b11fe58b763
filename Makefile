# kd-lightning: every target sets up what it needs (a virtual environment in .venv/, the data).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup data test test-fast demo benchmark benchmark-cache benchmark-cache-timing benchmark-specialists study-specialist-cost study-ensembles distill-ensemble distill-specialists benchmark-parallel benchmark-precision benchmark-gpu benchmark-features reproduce lint format clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

setup: $(STAMP) data ## create .venv, install kd-lightning (editable, dev extras) and Fashion-MNIST

data: $(STAMP) ## make Fashion-MNIST available (Debian package as root, else torchvision download)
	$(BIN)/python scripts/fetch_data.py

test: setup ## run the whole test suite
	$(BIN)/python -m pytest

test-fast: setup ## the tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

demo: setup ## the main job (<= 15 min): distillation, ensemble distillation and specialists, each beside its baseline over 2 seeds
	$(BIN)/python scripts/main_job.py

benchmark: setup ## KD benchmark: one teacher, 3 student seeds alone vs distilled
	$(BIN)/python scripts/benchmark_kd.py

benchmark-cache: setup ## soft-target cache: epoch time, build throughput, bytes and accuracy per format
	$(BIN)/python scripts/benchmark_cache.py

benchmark-cache-timing: setup ## cached vs student alone vs a hand-written loop, interleaved (about 5 min)
	$(BIN)/python scripts/benchmark_cache.py --timing

benchmark-specialists: setup ## generalist + specialists on synthetic data and Fashion-MNIST
	$(BIN)/python scripts/benchmark_specialists.py

study-specialist-cost: setup ## generalist + specialists vs single wider/deeper generalists: accuracy against FLOPs and latency, verdict; docs/images/specialist_cost.png
	OMP_NUM_THREADS=1 $(BIN)/python scripts/study_specialist_cost.py

study-ensembles: setup ## single CNNs vs ensembles of smaller CNNs: accuracy against FLOPs and latency, plot
	$(BIN)/python scripts/study_ensembles.py

distill-ensemble: setup ## 3 CNN members -> ensemble -> distilled CNNs at 8 and 20 epochs; share of the ensemble's gain kept
	$(BIN)/python scripts/distill_ensemble.py

distill-specialists: setup ## generalist + specialists (KL combination) distilled into one student, 3 seeds; share of the gain kept
	OMP_NUM_THREADS=1 $(BIN)/python scripts/distill_specialists.py

benchmark-parallel: setup ## ensemble members in 1 vs 2 worker processes against the sequential loop; cost model for more
	OMP_NUM_THREADS=1 $(BIN)/python scripts/benchmark_parallel_ensemble.py

benchmark-precision: setup ## teacher memory and step time, fp32 vs bf16, on this CPU
	$(BIN)/python scripts/benchmark_precision.py

benchmark-gpu: setup ## distillation on a GPU (CPU without one): images/s, peak memory, data wait, FLOP limit; writes runs/benchmarks/gpu.md
	$(BIN)/python scripts/benchmark_gpu.py --out runs/benchmarks/gpu.md

benchmark-features: setup ## intermediate-layer KD on Fashion-MNIST: CNN student alone vs Hinton KD vs FitNets hints vs attention transfer, 3 seeds (~20 min on 2 quiet cores)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/benchmark_features.py

reproduce: setup ## reproduce Hinton et al.'s experiments at small scale through kd stages, two processes; writes docs/reproduction.md (finished stages reused)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/reproduce.py

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP) ## ruff fix and format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean: ## remove runs and caches (keeps .venv)
	rm -rf runs lightning_logs .pytest_cache .ruff_cache
