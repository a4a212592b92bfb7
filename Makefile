# Set-up, tests and the demo. Every target creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0

.PHONY: setup test demo lint clean

# The demo needs only the package; the tests need the dev extras and llama-cpp-python, which compiles llama.cpp
# (minutes), so `make demo` on a fresh clone does not wait for it.
$(BIN)/minimind-v: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.dev: $(BIN)/minimind-v
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install -e ".[llama]" || echo "warning: llama-cpp-python did not build (it compiles llama.cpp:" \
		"needs gcc, g++, cmake); the GGUF tests that load files in llama.cpp will be skipped" >&2
	touch $@

setup: $(VENV)/.dev

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

demo: $(BIN)/minimind-v
	$(BIN)/minimind-v demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
