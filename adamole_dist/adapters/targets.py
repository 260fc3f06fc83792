"""Which modules of a model get adapters: the default targets per architecture, the shorthands, the
matching of names, and the one place that knows a GPT-2 ``Conv1D`` stores its weight transposed.

``adapter.target_modules`` entries are module names (the last component, or a dotted suffix such as
``attention.output.dense``) or one of the shorthands:

* ``attention``  — every adaptable layer inside an attention module of a block;
* ``mlp``        — every other adaptable layer of a block (the feed-forward; a MoE's shared expert);
* ``all-linear`` — both (PEFT's convention).

A block is a module of the model's layer stack: its path holds a layer index (``model.layers.3``).
The shorthands therefore never take the LM head, a task head (``score``, ``classifier``) or an
encoder's pooler, and they leave out the routers and gates of a mixture-of-experts base (``gate``,
``router``, ``shared_expert_gate``): those decide which frozen experts run, and adapting them would
change the base's routing rather than add to its outputs. Adaptable layers are ``nn.Linear`` (its
subclasses, bitsandbytes' quantized layers included) and transformers' ``Conv1D``; a MoE base whose
experts are fused 3-D parameters (Mixtral, Qwen-MoE, DeepSeek-V3 in transformers 5) has no such layer
in its experts, so ``mlp`` and ``all-linear`` there take only the shared expert's layers; a target naming the
fused experts (``experts``, ``gate_up_proj``, ``down_proj``), or ``mlp`` with no shared expert, is refused
with what can be adapted. Why not a LoRA per base expert: the gate/up LoRA would sit inside the expert's
activation, so its delta is not added to the experts' output; the adapted forward would re-implement every
model's expert maths (chunked or interleaved gate/up, biases, clamps) around transformers' expert kernels, and
gather the 3-D parameters under ZeRO-3 outside the module that owns them.

An empty ``target_modules`` takes the model type's row of ``DEFAULT_TARGETS``: the attention
projections (the paper's q, k, v, o) under each family's own names.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from adamole_dist.base_model.quantize import is_quantized
from adamole_dist.config.fields import ConfigError

SHORTHANDS = ("attention", "mlp", "all-linear")
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # a MoE base's routing layers: never adapted by a shorthand

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
QKV_OUT = ["q_proj", "k_proj", "v_proj", "out_proj"]
FUSED_QKV = ["query_key_value", "self_attention.dense"]  # one fused projection, then the output's
BERT_LIKE = ["query", "key", "value", "attention.output.dense"]
# model_type -> default targets (the attention projections; tests/unit/adapters/test_architectures.py builds
# a tiny model of each type and checks every name matches, and that they are exactly its `attention` layers).
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "olmo", "olmo2", "olmo3", "granite", "granitemoe", "starcoder2", "cohere", "cohere2", "stablelm",
         "llama4_text", "exaone4", "smollm3", "glm4", "gpt_oss"], QKVO),
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],  # q_lora_rank set
    "gpt_neox": ["query_key_value", "attention.dense"],
    "falcon": FUSED_QKV,
    "bloom": FUSED_QKV,
    "gptj": QKV_OUT,
    "opt": QKV_OUT,
    "gpt2": ["c_attn", "attn.c_proj"],  # Conv1D layers; mlp.c_proj is the MLP's
    "bert": BERT_LIKE,
    "roberta": BERT_LIKE,
}


@functools.cache
def _conv1d_type() -> type:
    from transformers.pytorch_utils import Conv1D  # imported on first use: `import adamole_dist` stays light

    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D``: y = x @ W + b with W stored [in, out], a Linear transposed."""
    return isinstance(module, _conv1d_type())


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_shape(layer: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an adaptable layer, also when ZeRO-3 has partitioned its weight
    (``ds_shape``) or bitsandbytes has packed it (a 4-bit weight is stored [out * in / 2, 1])."""
    if is_quantized(layer):
        return int(getattr(layer, "out_features")), int(getattr(layer, "in_features"))
    w = getattr(layer, "weight")
    shape = getattr(w, "ds_shape", None) or w.shape
    return (int(shape[1]), int(shape[0])) if is_conv1d(layer) else (int(shape[0]), int(shape[1]))


def weight_OI(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as out x in (a view: writing it writes the layer's own weight)."""
    w = getattr(layer, "weight")
    return w.t() if is_conv1d(layer) else w


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def block_path(name: str) -> list[str] | None:
    """The components after the last layer index (``mlp.up_proj`` of ``model.layers.3.mlp.up_proj``);
    None for a module outside the layer stack."""
    parts = name.split(".")
    indices = [i for i, part in enumerate(parts) if part.isdigit()]
    return parts[indices[-1] + 1:] if indices else None


def shorthand_part(name: str) -> str | None:
    """'attention' or 'mlp' for an adaptable layer a shorthand takes, None for one it leaves out."""
    path = block_path(name)
    if not path or path[-1] in ROUTER_NAMES:
        return None
    return "attention" if any("attn" in p or "attention" in p for p in path[:-1]) else "mlp"


def takes(name: str, target: str) -> bool:
    if target in SHORTHANDS:
        part = shorthand_part(name)
        return part is not None and (target == "all-linear" or part == target)
    return matches(name, target)


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(
            f"adapter.target_modules is empty and model type {model_type!r} has no default; name the modules "
            f"to adapt, or one of {', '.join(SHORTHANDS)} (candidates: {', '.join(linear_candidates(model))})"
        )
    return list(DEFAULT_TARGETS[model_type])


def linear_candidates(model: nn.Module) -> list[str]:
    """Names that would match the model's adaptable layers (last component, and the suffix after the
    layer index, e.g. attention.output.dense), for error messages."""
    names = set()
    for name, module in model.named_modules():
        if is_adaptable(module) and name:
            parts = name.split(".")
            names.add(parts[-1])
            suffix = block_path(name) or parts[-2:]
            if len(suffix) > 1:
                names.add(".".join(suffix))
    return sorted(names)


def fused_experts(model: nn.Module) -> dict[str, list[str]]:
    """Module name -> its 3-D parameters ('gate_up_proj [4, 64, 32]'): a MoE base's experts fused into
    [experts, out, in] tensors (transformers 5's MixtralExperts and kin); ``ds_shape`` under ZeRO-3."""
    found = {}
    for name, module in model.named_modules():
        shapes = {pname: list(getattr(p, "ds_shape", p.shape)) for pname, p in module.named_parameters(recurse=False)}
        fused = [f"{pname} {shape}" for pname, shape in shapes.items() if len(shape) == 3]
        if fused:
            found[name] = fused
    return found


def fused_refusal(model: nn.Module, target: str, fused: dict[str, list[str]]) -> ConfigError:
    """Why ``target`` gets no adapter on a base with fused experts, and what can be adapted instead."""
    name, params = next(iter(fused.items()))
    return ConfigError(
        f"adapter.target_modules: {target!r} asks for the base's routed experts, which are fused 3-D parameters "
        f"({name}: {', '.join(params)}), not linear layers: adapters go on linear layers only. Adaptable here: "
        f"attention (the attention projections), mlp (a shared expert's layers, where the base has one), or any "
        f"of {', '.join(linear_candidates(model))}"
    )


def asks_for_fused(target: str, fused: dict[str, list[str]]) -> bool:
    """Whether ``target`` names one of the fused experts' 3-D parameters (gate_up_proj, down_proj)."""
    return any(p.split()[0] == target for params in fused.values() for p in params)


def find_target_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """Every module taken by a target (a name or a shorthand); every target must take at least one
    adaptable layer, and a name must not match anything else. A base's fused experts take none: a target
    naming them, or ``mlp`` finding nothing else, is refused saying what can be adapted."""
    found: list[tuple[str, nn.Module]] = []
    hit = {t: 0 for t in targets}
    fused = fused_experts(model)
    for name, module in model.named_modules():
        adaptable = is_adaptable(module)
        matched = [t for t in targets if (takes(name, t) if adaptable else t not in SHORTHANDS and matches(name, t))]
        if not matched:
            continue
        if not adaptable and name in fused:
            raise fused_refusal(model, matched[0], fused)
        if not adaptable:
            raise ConfigError(
                f"adapter.target_modules: {matched[0]!r} matches {name!r}, a {type(module).__name__}, "
                "not an nn.Linear (or Conv1D)"
            )
        for t in matched:
            hit[t] += 1
        found.append((name, module))
    missing = [t for t, n in hit.items() if n == 0]
    for t in missing:  # mlp with no shared expert, or a fused parameter's name (gate_up_proj) matching no layer
        if fused and (t == "mlp" or (t not in SHORTHANDS and asks_for_fused(t, fused))):
            raise fused_refusal(model, t, fused)
    if missing:
        raise ConfigError(
            f"adapter.target_modules: {', '.join(map(repr, missing))} matched no module of this model; "
            f"candidates: {', '.join(linear_candidates(model))} (or {', '.join(SHORTHANDS)})"
        )
    return found


def resolved_names(names: list[str]) -> list[str]:
    """The adapted modules as target names that select exactly them again: each one's suffix after its layer
    index (``self_attn.q_proj``), or its full name outside the layer stack. Recorded in the adapter's config."""
    return sorted({".".join(block_path(n) or [n]) for n in names})
