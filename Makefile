# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so nothing resolves a different (CUDA, multi-GB) build on CPU machines.
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/wanbot demo

lint: $(STAMP)
	$(BIN)/ruff check bot engine tests bench
	$(BIN)/ruff format --check bot engine tests bench

# Three test processes on two cores: much of the suite waits on subprocesses, sockets and timers, not the CPU.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n 3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
