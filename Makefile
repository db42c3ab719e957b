# One-command entry points. Every target installs into .venv first if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
# One worker per core, for sweeps (a digits cell pins one thread, so a grid's wall time is its cell time /
# cores) and for tests (pytest-xdist; most tests wait on small models and subprocesses).
JOBS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install demo test test-slow test-all lint smoke leaderboard rerender site-screenshot regress bench

install: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/diffbench run --method dense --dataset digits

test: $(STAMP)
	$(BIN)/pytest -q -n $(JOBS) --durations=10

test-slow: $(STAMP)
	$(BIN)/pytest -q -n $(JOBS) -m slow --durations=10

test-all: $(STAMP)
	$(BIN)/pytest -q -n $(JOBS) -m "" --durations=10

lint: $(STAMP)
	$(BIN)/ruff check diffprune_bench tests benchmarks

smoke: $(STAMP)
	$(BIN)/diffbench run --method dense --dataset digits --base-steps 100 --num-samples 200 --sample-steps 10 \
		--results-dir /tmp/diffbench-smoke --cache-dir /tmp/diffbench-smoke-cache

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_base.py

# Sweep the digits suite (resumes: cells with an ok record are skipped), then refresh the committed raw data
# results/data/digits and render results/ from it, even when some cells failed (they are listed apart); the
# exit status still reports the failures. `make rerender` renders the committed data again, running no model.
# Tables of the other committed suites (results/data/<suite>: fashion, digits-ft1000) are rendered beside it.
COMMITTED_SUITES := $(sort digits $(notdir $(patsubst %/manifest.json,%,$(wildcard results/data/*/manifest.json))))

leaderboard: $(STAMP)
	$(BIN)/diffbench sweep benchmarks/digits.yaml --jobs $(JOBS); status=$$?; \
	$(BIN)/diffbench leaderboard $(foreach suite,$(COMMITTED_SUITES),--suite $(suite)) && exit $$status

rerender: $(STAMP)
	$(BIN)/diffbench leaderboard $(foreach suite,$(COMMITTED_SUITES),--from-data results/data/$(suite))

# The picture of results/site/index.html the docs show (headless Chromium; fails on a blank page or JS error).
site-screenshot: $(STAMP)
	$(BIN)/python -m diffprune_bench.report.browser results/site/index.html results/site/screenshot.png

regress: $(STAMP)
	$(BIN)/diffbench regress --suite benchmarks/digits-ci.yaml --baseline results/ci-baseline.json --jobs $(JOBS)
