# Two commands on a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# The CPU wheel of torch 2.13.0 satisfies the project's pin without a multi-GB CUDA download.
# On a GPU machine, override: make TORCH_SPEC="torch==2.9.1" ...
TORCH_SPEC ?= torch==2.13.0
STAMP    = $(VENV)/.installed

.PHONY: venv demo test faults soak lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/pdserve demo

test: $(STAMP)
	$(BIN)/ruff check pdserve tests benchmarks
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

faults: $(STAMP)
	$(BIN)/python -m pytest -q tests/faults --faults-full

soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

lint: $(STAMP)
	$(BIN)/ruff check pdserve tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
