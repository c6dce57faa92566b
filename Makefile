# vgstudy: `make study` runs every notebook (tiny profile) into runs/; `make test` is the full check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The install is redone only when the project's pins change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.py))
export TQDM_DISABLE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: help install study test test-long bench lint format sync execute lab site clean

help:
	@echo "make study      install if needed, run every notebook (tiny profile) into runs/study/"
	@echo "make test       ruff, pytest (unit + notebook hygiene), nbval over the committed notebooks"
	@echo "make test-long  the slow tests too"
	@echo "make bench      data-loader and model benchmarks (CPU: under 10 minutes) -> runs/bench/models/results.md"
	@echo "make sync       regenerate each notebooks/*.ipynb from its .py source (jupytext)"
	@echo "make execute    sync, then execute every notebook in place (what is committed)"
	@echo "make site       the executed notebooks as a static HTML site (offline) -> runs/site/index.html"
	@echo "make lab        open the notebooks in JupyterLab (installed into .venv on first use)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

study: $(STAMP)
	@mkdir -p runs/study
	@for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .py); \
	  echo "== $$name"; \
	  $(PY) -m papermill --cwd notebooks --log-level WARNING notebooks/$$name.ipynb runs/study/$$name.ipynb -p profile tiny || exit 1; \
	done
	@echo "Executed notebooks: runs/study/*.ipynb; results and model cache: runs/"

# Data loading first (short settings), then every model; models.py keeps itself inside --budget-s.
# One torch thread by default (figures that compare across machines); `make bench BENCH_THREADS=8` for more.
BENCH_THREADS ?= 1
bench: $(STAMP)
	@mkdir -p runs/bench/models
	$(PY) benchmarks/data_throughput.py --n 256 --out runs/bench/models/data.json
	$(PY) benchmarks/models.py --budget-s 480 --threads $(BENCH_THREADS) --data-json runs/bench/models/data.json \
	  --out runs/bench/models

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow" tests
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks/

test-long: $(STAMP) lint
	VGSTUDY_FUZZ=long $(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks/

site: $(STAMP)
	$(PY) -m vgstudy site --notebooks notebooks --out runs/site

sync: $(STAMP)
	$(VENV)/bin/jupytext --sync $(NOTEBOOKS)

execute: sync
	@for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .py); \
	  echo "== $$name"; \
	  $(PY) -m papermill --cwd notebooks --log-level WARNING notebooks/$$name.ipynb notebooks/$$name.ipynb || exit 1; \
	done

lab: $(STAMP)
	@test -x $(VENV)/bin/jupyter-lab || $(PY) -m pip install --quiet jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs/study .pytest_cache .ruff_cache
