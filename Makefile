# Fresh-machine entry points. Each target sets up .venv on first use.
#   make train   - the embedded default run (MiniLM-L6, generated data, ZeRO-3, ~5 min on 2 CPU cores)
#   make test    - the default test suite (unit + single-process; a few minutes)
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

.PHONY: setup train test test-slow

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed launch/train.py --ds_config ds_configs/zero3.json --overwrite $(ARGS)

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not slow" $(ARGS)

test-slow: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m slow $(ARGS)
