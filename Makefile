# digitops: `make help` lists the targets. Everything runs inside .venv/ (made by `make setup`).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# This checkout's BentoML store (the bento stage defaults to it too): `make serve` serves the
# champion this checkout promoted, not what another clone imported into ~/bentoml.
export BENTOML_HOME ?= $(CURDIR)/bentoml_home
# make cluster-up: how many replicas behind nginx, and nginx's port.
REPLICAS ?= 2
PORT ?= 8080

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv/ and install the project (editable) with dev tools, pinned by constraints.txt

$(STAMP): pyproject.toml constraints.txt
	python3.11 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

data: $(STAMP) ## fetch + verify MNIST into data/, version it with DVC (data.dvc)
	$(PY) -m pipelines.data
	$(DVC) add -q data

train: data ## train and evaluate (DVC stages up to `evaluate`; skipped when nothing changed)
	$(DVC) repro evaluate

repro: data ## run the whole DVC pipeline
	$(DVC) repro

ingest: $(STAMP) ## move validated user feedback into data/feedback, version it (dvc add + push)
	$(PY) -m pipelines.ingest_feedback

# Idle connections stay open 75 s, longer than clients and nginx keep theirs
# (KEEP_ALIVE_SECONDS in src/digitops/inference/settings.py says why).
serve: $(STAMP) ## serve the model on http://127.0.0.1:3000 (web page + API; docs at /docs)
	$(VENV)/bin/bentoml serve serving.service:DigitService --timeout-keep-alive 75

test: $(STAMP) ## every tier: unit, slow (pipeline on small data) and e2e (servers, browser)
	$(PY) -m pytest -n auto --dist loadfile --durations=15

test-fast: $(STAMP) ## unit tests only: no server, database or training (about a minute)
	$(PY) -m pytest -m "not slow and not e2e"

bench: data ## training speed, accuracy via the API, forward pass, serving latency/throughput, load, replicas, GET /monitor at 1M predictions -> artifacts/bench/
	@command -v wrk >/dev/null || { echo "bench needs wrk (apt-get install wrk)"; exit 1; }
	$(PY) -m benchmarks.bench_training
	$(PY) -m benchmarks.bench_accuracy
	$(PY) -m benchmarks.bench_forward
	$(PY) -m benchmarks.bench_serving
	$(PY) -m benchmarks.bench_load
	$(PY) -m benchmarks.bench_cluster
	$(PY) -m benchmarks.bench_monitor

soak: $(STAMP) ## long runs: 20,000 requests + a 10-minute soak (RSS), active learning on all of MNIST -> artifacts/bench/
	$(PY) -m benchmarks.bench_load --soak-minutes 10
	$(PY) -m benchmarks.active_learning

cluster-up: $(STAMP) ## PostgreSQL, MLflow server, REPLICAS=2 replicas, nginx on 127.0.0.1:PORT=8080; in var/cluster/
	$(PY) -m deploy.cluster up --replicas $(REPLICAS) --port $(PORT)

cluster-down: $(STAMP) ## stop what cluster-up started (safe to repeat)
	$(PY) -m deploy.cluster down

lint: $(STAMP) ## ruff lint + format check
	$(VENV)/bin/ruff check src pipelines serving tests benchmarks deploy
	$(VENV)/bin/ruff format --check src pipelines serving tests benchmarks deploy

mlflow-ui: $(STAMP) ## browse and compare runs on http://127.0.0.1:5000 (same store as training)
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port 5000

clean: ## remove logs, benchmark reports and caches (keeps .venv/, data/, DVC outputs, MLflow)
	rm -rf logs artifacts/bench artifacts/screenshots .pytest_cache

.PHONY: help setup data train repro ingest serve test test-fast bench soak cluster-up cluster-down lint mlflow-ui clean
