# Two commands for a fresh machine:  `make demo` (install + a real search)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
QS     := $(VENV)/bin/qsearch
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test test-slow bench lint dataset install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Debian's dataset-fashion-mnist, when absent and apt is available (no download at run time).
dataset:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	  else \
	    echo "note: $(FMNIST) absent and apt unavailable: pass --data-root DIR to qsearch"; \
	  fi; \
	fi

demo: install dataset
	$(QS) run --strategy uniform --budget 32KB --out runs/demo-$$(date +%Y%m%d-%H%M%S)

test: install dataset
	$(PY) -m pytest -q --durations=15

test-slow: install dataset
	$(PY) -m pytest -q -m slow

bench: install dataset
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: install
	$(VENV)/bin/ruff check qsearch strategies spaces tests benchmarks
