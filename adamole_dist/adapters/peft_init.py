"""A training run started from a trained PEFT LoRA (peft_import.py reads the folder).

``--init_from_peft DIR`` (method lora): the run's LoRA is the folder's, factor for factor; the same
adapted modules and rank are required, and checked. A modules_to_save head the folder holds is loaded too.

``--init_experts_from_peft DIR`` (a mixture method): the LoRA's rank R is split into the N experts of
rank r (R = N r required). With A (R x in) and B (out x R) cut into rank blocks A_i = A[i r:(i+1) r],
B_i = B[:, i r:(i+1) r], B A = sum_i B_i A_i, so the LoRA's delta is s_L sum_i B_i A_i x (s_L =
lora_alpha / R). The mixture computes sum_i w_i s B_i' A_i x (s = alpha / r). Every expert starts with
A_i and B_i' = c B_i, c = N s_L / s, and the gate W_g starts at zero, so p is uniform (1/N each). For
adamole, tau < tau_max <= 1/N (the default tau_max = 1/N; sigmoid < 1), every a_i = 1/N - tau > 0 is
equal, so w_i = 1/N and the delta is (c s / N) sum_i B_i A_i x = s_L B A x: the LoRA's, exactly. The
threshold network keeps its own init (tau moves no weight while p is uniform). mole_threshold with a
threshold <= 1/N is the same case; top-k methods (mole_topk, sira) start from the mean of the k chosen
blocks' c-scaled deltas, not the LoRA's, since only k experts fire. Training then moves the gate off
uniform: the experts differ, so W_g has a gradient from the first step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from adamole_dist.adapters.files import CONFIG_NAME, gathered, head_parameters, load_bank_tensors, read_adapter_config
from adamole_dist.adapters.handle import Adapters
from adamole_dist.adapters.peft_import import PEFT_WEIGHTS, lora_factors, ours_from_peft
from adamole_dist.config.fields import ConfigError
from adamole_dist.moe.experts import expert_key


def read_peft_lora(folder: Path, option: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(our document, PEFT's tensors) of the PEFT LoRA folder ``option`` names; ConfigError naming it."""
    try:
        doc = read_adapter_config(folder)
    except ConfigError as e:
        raise ConfigError(f"{option} ({folder}): {e}") from None
    if not doc.get("peft"):
        raise ConfigError(f"{option} ({folder}) is an adamole_dist adapter, not a PEFT LoRA folder "
                          f"({CONFIG_NAME} without peft_type); --resume continues a run of ours")
    return doc, load_file(str(folder / PEFT_WEIGHTS))


def check_same_modules(adapters: Adapters, factors: dict, option: str, folder: Path) -> None:
    ours, theirs = set(adapters.layers), set(factors)
    if ours != theirs:
        only = sorted(theirs - ours)[:3] or sorted(ours - theirs)[:3]
        side = "the PEFT LoRA adapts" if theirs - ours else "this run adapts"
        raise ConfigError(f"{option} ({folder}): the adapted modules differ ({side} {', '.join(only)} and the other "
                          f"does not); pass --target_modules naming the LoRA's modules ({len(theirs)})")


def init_from_peft(adapters: Adapters, folder: Path, option: str = "init_from_peft") -> None:
    """The run's LoRA (method lora) set to the PEFT LoRA's factors, and its head where the folder has one."""
    doc, peft_tensors = read_peft_lora(folder, option)
    check_same_modules(adapters, lora_factors(peft_tensors), option, folder)
    if doc["adapter"]["rank"] != adapters.cfg.rank:
        raise ConfigError(f"{option} ({folder}): the PEFT LoRA has rank r={doc['adapter']['rank']}, this run's "
                          f"--rank is {adapters.cfg.rank}; pass --rank {doc['adapter']['rank']}")
    tensors = ours_from_peft(peft_tensors)
    try:
        for name, layer in adapters.layers.items():
            with gathered([layer.lora.lora_A, layer.lora.lora_B], modifier_rank=0):
                load_bank_tensors(name, layer.lora, tensors)
    except ConfigError as e:
        raise ConfigError(f"{option} ({folder}): {e}") from None
    for pname, p in head_parameters(adapters).items():
        if f"modules_to_save.{pname}" in tensors:
            with gathered([p], modifier_rank=0), torch.no_grad():
                p.copy_(tensors[f"modules_to_save.{pname}"])


def split_by_rank(factors: dict, num_experts: int, rank: int, b_scale: float) -> dict[str, torch.Tensor]:
    """Every expert's (A_i, c B_i) under the file layout (files.py): rank block i of each LoRA."""
    out = {}
    for module, (A_RD, B_OR) in factors.items():
        for i in range(num_experts):
            block = slice(i * rank, (i + 1) * rank)
            out[expert_key(module, i, "lora_A")] = A_RD[block]
            out[expert_key(module, i, "lora_B")] = B_OR[:, block] * b_scale
    return out


def init_experts_from_peft(adapters: Adapters, folder: Path, option: str = "init_experts_from_peft") -> None:
    """Every expert from a rank block of the PEFT LoRA, the gates at zero (the module docstring's maths)."""
    doc, peft_tensors = read_peft_lora(folder, option)
    cfg, lora = adapters.cfg, doc["adapter"]
    factors = lora_factors(peft_tensors)
    check_same_modules(adapters, factors, option, folder)
    if lora["rank"] != cfg.num_experts * cfg.rank:
        raise ConfigError(f"{option} ({folder}): the PEFT LoRA's rank r={lora['rank']} must equal --num_experts x "
                          f"--rank ({cfg.num_experts} x {cfg.rank} = {cfg.num_experts * cfg.rank}), each expert "
                          "one rank block")
    lora_scaling = lora["alpha"] / lora["rank"]
    tensors = split_by_rank(factors, cfg.num_experts, cfg.rank, cfg.num_experts * lora_scaling / cfg.scaling)
    try:
        for name, layer in adapters.layers.items():
            load_bank_tensors(name, layer.experts, tensors)  # this rank's experts, by global id
            gate = layer.router.gate_weight
            with gathered([gate], modifier_rank=0), torch.no_grad():
                gate.zero_()
    except ConfigError as e:
        raise ConfigError(f"{option} ({folder}): {e}") from None
