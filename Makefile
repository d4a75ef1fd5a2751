# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-model
# torch is pinned for the CPU set-up (a local wheel on these machines); the library itself needs torch>=2.6.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint clean

$(BIN)/cpm4: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/cpm4

$(DEMO_DIR)/config.json: | $(BIN)/cpm4
	$(BIN)/cpm4 init --config tiny --out $(DEMO_DIR) --seed 0

demo: $(BIN)/cpm4 $(DEMO_DIR)/config.json
	$(BIN)/cpm4 generate --model $(DEMO_DIR) --max-tokens 32 --temperature 0 "The MiniCPM4 model"

test: $(BIN)/cpm4
	$(BIN)/python -m pytest tests

lint: $(BIN)/cpm4
	$(BIN)/ruff check cpm4 tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR)
