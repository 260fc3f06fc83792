"""Export a trained adapter directory for use outside this package.

Three forms (``launch/export.py`` is the command line):

* ``peft``    — method lora only: a PEFT LoRA directory (``adapter_config.json`` with a LoraConfig,
  ``adapter_model.safetensors`` under PEFT's key names) that ``peft.PeftModel.from_pretrained(base, DIR)``
  loads. Written from our files alone: neither peft nor the base model is needed to export.
* ``merged``  — method lora only: the base model with ``W + (alpha / r) * B A`` folded into every adapted
  weight (a GPT-2 Conv1D's, stored transposed, through targets.weight_OI), saved with ``save_pretrained``
  (safetensors) beside the tokenizer, so plain ``AutoModelForCausalLM.from_pretrained`` (or vLLM, or
  llama.cpp's converter) reads it.
* ``adamole`` — any method: our adapter files, the base model's id/path (already in adapter_config.json)
  and the tokenizer (with the chat template training used), for ``load_adapter``.

A mixture of experts cannot become a PEFT LoRA or be merged: which experts apply, and with what weight,
is decided per token by the router, so there is no single low-rank delta to write.

Every export folder gets a model card (``model_card.py``). Inputs are checked before anything is
written; the folder appears whole or not at all (``write_dir_atomically``), and records the files it
holds (``.written_files.json``): ``--overwrite`` replaces only such a folder, never a training run, the
adapter's own folder or a folder holding anything else.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adamole_dist.adapters.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from adamole_dist.adapters.model_card import card_inputs, write_model_card
from adamole_dist.adapters.peft_import import PEFT_PREFIX  # the key layout PEFT saves, read and written alike
from adamole_dist.adapters.pretrained import base_model_of
from adamole_dist.adapters.targets import SHORTHANDS, is_adaptable, matches, weight_OI
from adamole_dist.atomic_files import WRITTEN_FILES, foreign_entries, write_dir_atomically
from adamole_dist.base_model.builtin_models import BUILTIN_GGUF, builtin_gguf_note
from adamole_dist.base_model.quantize import COMPUTE_DTYPES, QuantSpec
from adamole_dist.config.adapter import AdapterConfig
from adamole_dist.config.fields import ConfigError
from adamole_dist.moe.experts import expert_key

log = logging.getLogger(__name__)

FORMATS = ("peft", "adamole")
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}
LOADER_HINT = ("use --format adamole and load it with adamole_dist.from_pretrained(DIR) "
               "(or adapters.files.load_adapter on the base model)")


# -- reading and checking the source ---------------------------------------------------------------
class AdapterSource:
    """An adapter directory written by training, read and checked once."""

    def __init__(self, adapter_dir: str | Path) -> None:
        self.dir = Path(adapter_dir)
        if not self.dir.is_dir():
            raise ConfigError(f"adapter directory {self.dir} does not exist")
        if not (self.dir / CONFIG_NAME).is_file() or not (self.dir / WEIGHTS_NAME).is_file():
            raise ConfigError(f"{self.dir} is not an adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
        try:
            self.doc = read_adapter_config(self.dir)
            self.cfg = AdapterConfig.from_dict(self.doc["adapter"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.dir / CONFIG_NAME} is not an adapter config: {type(e).__name__}: {e}") from None
        # The loader's rule (pretrained.base_model_of): the name training was given while it loads here,
        # else the folder it resolved to, so export, generate and from_pretrained find the same base.
        self.base_model = base_model_of(self.doc, self.dir)
        self.task_type = self.doc.get("task_type", "causal_lm")
        self.trainable_modules = list(self.doc.get("trainable_modules") or [])

    @property
    def method(self) -> str:
        return self.cfg.method

    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / WEIGHTS_NAME))

    def require_single_lora(self, what: str) -> None:
        if self.cfg.is_moe:
            raise ConfigError(
                f"{what} needs method lora; this adapter is {self.method!r}, a mixture of experts whose router "
                f"picks experts per token, so there is no single low-rank delta to fold in or write: {LOADER_HINT}")

    def lora_modules(self, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (A R x D, B O x R)} in the usual LoRA orientation (file layout, files.py)."""
        suffix = ".experts.0.lora_A"
        out = {}
        for key in tensors:
            if key.endswith(suffix):
                name = key[: -len(suffix)]
                out[name] = (tensors[key], tensors[expert_key(name, 0, "lora_B")])  # files hold B as O x R
        if not out:
            raise ConfigError(f"{self.dir / WEIGHTS_NAME} holds no LoRA tensors (*{suffix})")
        return out

    def head_tensors(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Task-head parameters trained in full (``modules_to_save.<parameter name>``)."""
        prefix = "modules_to_save."
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """The library's own guard (the command checks more first: run_files/writable.check_output_folder):
    a non-empty ``out`` is replaced only on ``overwrite`` and only when an earlier export wrote it and
    it holds nothing else (WRITTEN_FILES)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
        if foreign_entries(out) != []:
            raise ConfigError(f"--out {out}: --overwrite replaces only a folder an earlier export wrote and that "
                              f"holds nothing else ({WRITTEN_FILES} lists its files)")
    return out


# -- PEFT ------------------------------------------------------------------------------------------------
def peft_target_modules(src: AdapterSource, modules: list[str]) -> list[str]:
    """Our target names when the config lists them (PEFT matches a name exactly or as a dotted suffix,
    as targets.matches does, so they select the same modules); else (a default, or a shorthand such as
    all-linear, which PEFT would resolve by its own rules) the adapted modules' full names."""
    named = [t for t in src.cfg.target_modules if t not in SHORTHANDS]
    targets = named if named and len(named) == len(src.cfg.target_modules) else sorted(modules)
    unmatched = [m for m in modules if not any(matches(m, t) for t in targets)]
    if unmatched:  # only if the config and the weights disagree
        raise ConfigError(f"{src.dir}: adapted module {unmatched[0]!r} matches no target_modules entry {targets}")
    return targets


def peft_base_id(src: AdapterSource) -> str:
    """The base as anyone can resolve it: the name training was given (a hub id, a folder or .gguf path made
    absolute), not this machine's cache folder of a dequantised GGUF; a built-in GGUF (smollm2-135m, ...) is
    named by its source checkpoint (the model card says the LoRA trained against the GGUF's weights: ``gguf_note``)."""
    name = str(src.doc.get("base_model") or src.base_model)
    return BUILTIN_GGUF[name].source if name in BUILTIN_GGUF else name


def gguf_note(src: AdapterSource) -> str:
    """How to get the exact base of an adapter trained on a GGUF (its dequantised weights), else ""."""
    name = str(src.doc.get("base_model") or "")
    if name in BUILTIN_GGUF:
        return builtin_gguf_note(name)
    if name.lower().endswith(".gguf"):
        return (f" The base is the GGUF file `{Path(name).name}`, dequantised: "
                "`AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=NAME)` reads it.")
    return ""


def quantization_note(src: AdapterSource) -> str:
    """How to load the base as an adapter trained on a quantized one (``--quantize_base``) saw it, else "":
    transformers' BitsAndBytesConfig for the recorded spec, which gives our quantization codes (quantize.py).
    int8 needs ``llm_int8_threshold=0.0`` (ours keeps no fp16 outlier columns; transformers' default is 6.0)."""
    spec = QuantSpec.from_record(src.doc.get("quantization"), str(src.dir / CONFIG_NAME))
    if not spec.enabled:
        return ""
    if spec.scheme == "int8":
        config = "BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)"
    else:
        config = (f"BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{spec.scheme}\", "
                  f"bnb_4bit_use_double_quant={spec.double_quant}, "
                  f"bnb_4bit_compute_dtype={COMPUTE_DTYPES[spec.compute_dtype]})")
    return (f" The LoRA was trained on the base quantized to {spec.scheme}: load the base with "
            f"`quantization_config={config}` to get the weights it trained against.")


def peft_config(src: AdapterSource, modules: list[str]) -> dict:
    """peft's LoraConfig as saved by save_pretrained (fields of peft 0.21's LoraConfig)."""
    if src.task_type not in PEFT_TASK_TYPES:
        raise ConfigError(f"task_type {src.task_type!r} has no PEFT task type (known: {', '.join(PEFT_TASK_TYPES)})")
    heads = sorted({name.split(".")[0] for name in src.head_tensors(src.tensors())})
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[src.task_type],
        "base_model_name_or_path": peft_base_id(src),
        "r": src.cfg.rank,
        "lora_alpha": src.cfg.alpha,  # scaling alpha / r, as ours (no rsLoRA)
        "lora_dropout": src.cfg.dropout,
        "target_modules": peft_target_modules(src, modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": heads or None,
    }


def peft_tensors(src: AdapterSource, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved key names: ``base_model.model.<module>.lora_A.weight`` (adapter name left out), and
    a modules_to_save head under its plain name (PEFT's wrapper drops ``modules_to_save.default.``)."""
    out = {}
    for name, (A_RD, B_OR) in src.lora_modules(tensors).items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A_RD.contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B_OR.contiguous()
    for pname, p in src.head_tensors(tensors).items():
        out[f"{PEFT_PREFIX}{pname}"] = p.contiguous()
    return out


def export_peft(src: AdapterSource, out: Path) -> None:
    src.require_single_lora("--format peft")
    tensors = src.tensors()
    modules = sorted(src.lora_modules(tensors))
    config, weights = peft_config(src, modules), peft_tensors(src, tensors)

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        _card(src, tmp, library_name="peft",
              extra="Load with `PeftModel.from_pretrained(base, DIR)`." + gguf_note(src) + quantization_note(src))

    write_dir_atomically(out, write, record=_written_by(src))


# -- merged -----------------------------------------------------------------------------------------------
@torch.no_grad()
def merge_into(model: torch.nn.Module, src: AdapterSource, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Fold ``scaling * B A`` into each adapted Linear's weight and copy the head; returns the module names."""
    modules = dict(model.named_modules())
    merged = []
    for name, (A_RD, B_OR) in src.lora_modules(tensors).items():
        layer = modules.get(name)
        if layer is None or not is_adaptable(layer):
            raise ConfigError(f"adapter module {name!r} is not an nn.Linear (or Conv1D) of base model {src.base_model}")
        delta_OD = src.cfg.scaling * (B_OR.double() @ A_RD.double())
        w_OD = weight_OI(layer)  # a view: a Conv1D's weight is stored transposed
        if tuple(delta_OD.shape) != tuple(w_OD.shape):
            raise ConfigError(f"adapter module {name!r} has shape {tuple(delta_OD.shape)}, "
                              f"base model {src.base_model}'s is {tuple(w_OD.shape)}")
        w_OD.copy_((w_OD.double() + delta_OD).to(w_OD.dtype))
        merged.append(name)
    params = dict(model.named_parameters())
    for pname, p in src.head_tensors(tensors).items():
        if pname not in params or params[pname].shape != p.shape:
            raise ConfigError(f"head parameter {pname!r} does not fit base model {src.base_model}")
        params[pname].copy_(p)
    return merged


def export_merged(src: AdapterSource, out: Path, model=None, tokenizer=None) -> None:
    """``model``/``tokenizer``: the base model and its tokenizer if already loaded (else loaded here)."""
    src.require_single_lora("--merge")
    if src.task_type == "seq_cls" and src.doc.get("pooling", "cls") != "cls":
        raise ConfigError(f"pooling {src.doc.get('pooling')!r} is not part of a plain transformers model; "
                          "merge needs pooling 'cls' (or " + LOADER_HINT + ")")
    tensors = src.tensors()
    quantized = (src.doc.get("quantization") or {}).get("scheme")
    if quantized:  # merging into 4/8-bit codes would re-quantize the LoRA away: merge into the full-precision base
        log.warning(f"--merge: the LoRA was trained on a {quantized}-quantized base; it is merged into the "
                    f"full-precision base {src.base_model} (the quantization error it trained against is not in it)")
    if model is None:
        from adamole_dist.base_model.model_loading import load_model_and_tokenizer

        model, tokenizer, _, _ = load_model_and_tokenizer(src.base_model, src.task_type)
    merge_into(model, src, tensors)
    tokenizer = _with_training_template(tokenizer, src)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _card(src, tmp, library_name="transformers",
              extra="The LoRA is merged into the weights: load with `AutoModelForCausalLM.from_pretrained(DIR)`.")

    write_dir_atomically(out, write, record=_written_by(src))


# -- adamole ------------------------------------------------------------------------------------------------
def export_adamole(src: AdapterSource, out: Path, tokenizer=None) -> None:
    if tokenizer is None:
        from transformers import AutoTokenizer

        from adamole_dist.base_model.model_loading import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(src.base_model))
    tokenizer = _with_training_template(tokenizer, src)

    def write(tmp: Path) -> None:
        shutil.copy2(src.dir / WEIGHTS_NAME, tmp / WEIGHTS_NAME)
        doc = dict(src.doc)
        doc.setdefault("base_model_path", src.base_model)  # the base is recorded either way
        (tmp / CONFIG_NAME).write_text(json.dumps(doc, indent=2))
        tokenizer.save_pretrained(tmp)
        _card(src, tmp, library_name="adamole_dist",
              extra=f"Load with `adamole_dist.from_pretrained(DIR)`; base model: `{src.base_model}`.")

    write_dir_atomically(out, write, record=_written_by(src))


# -- helpers --------------------------------------------------------------------------------------------------
def _with_training_template(tokenizer, src: AdapterSource):
    """The tokenizer with the chat template training rendered with (when one was supplied)."""
    template = src.doc.get("chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def _written_by(src: AdapterSource) -> dict:
    """What the export folder records of itself (atomic_files.WRITTEN_FILES): a later --overwrite replaces it."""
    return {"written_by": "adamole_dist export", "adapter": str(src.dir.resolve())}


def _card(src: AdapterSource, folder: Path, *, library_name: str, extra: str) -> None:
    datasets, metrics = card_inputs(src.dir)
    write_model_card(folder, base_model=peft_base_id(src), method=src.method,
                     adapter_cfg=src.cfg.to_dict(), datasets=datasets, metrics=metrics, extra=extra,
                     library_name=library_name)


def export(adapter_dir: str | Path, out: str | Path, *, fmt: str = "adamole", merge: bool = False,
           overwrite: bool = False) -> Path:
    """Check everything (ConfigError on bad input, nothing written), then write ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format ({fmt!r}) must be one of {', '.join(FORMATS)}")
    src = AdapterSource(adapter_dir)
    out = check_output_dir(out, overwrite)
    if out.resolve() == src.dir.resolve() or out.resolve() in src.dir.resolve().parents:
        raise ConfigError(f"--out {out} is or holds the adapter directory {src.dir}: export to another folder")
    if merge:
        export_merged(src, out)
    elif fmt == "peft":
        export_peft(src, out)
    else:
        export_adamole(src, out)
    return out
