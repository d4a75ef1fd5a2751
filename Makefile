# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The demo model trained by recipes/demo (about 17M parameters, 35 MB, in the repository).
DEMO_MODEL ?= models/cpm4-demo
# torch is pinned for the CPU set-up (a local wheel on these machines); the library itself needs torch>=2.6.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint clean

$(BIN)/cpm4: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/cpm4

demo: $(BIN)/cpm4
	$(BIN)/cpm4 generate --model $(DEMO_MODEL) --chat --max-tokens 64 --temperature 0 \
		"What does the json module do?"

# Two worker processes of one thread each (tests/conftest.py): 411 s against 710 s in one process of two threads
# on the 2-core CI machine (the interpreter-run Triton tests are single-threaded Python). The slowest tests are
# collected first and an idle worker steals pending tests from the other, so both end together.
test: $(BIN)/cpm4
	$(BIN)/python -m pytest -n 2 --dist worksteal tests

lint: $(BIN)/cpm4
	$(BIN)/ruff check cpm4 tests benchmarks

clean:
	rm -rf $(VENV)
