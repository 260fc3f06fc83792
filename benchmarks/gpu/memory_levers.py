"""gpu_check's memory section: each memory lever on the trainer's own step, its measured peak beside the
memory planner's prediction for the same run (on a GPU torch.cuda.max_memory_allocated, which the plan predicts;
on a CPU, --smoke, the code runs and only the plan is reported).

Levers (adamole 8 x r=4 on q/k/v/o of the random-initialised Llama, ZeRO-3 at world 1, bf16 on a GPU):
the plain loss (the full [tokens x vocabulary] logits) against the chunked one, an nf4 and an int8 base
(bitsandbytes, where installed), gradient checkpointing, and gradient checkpointing with --activation_offload
(a GPU only). The trainer's order: the base quantized, the adapters injected, checkpointing enabled, the
chunked head installed, the engine built (train/assembly.py).
"""

from __future__ import annotations

import importlib.util
import traceback

import torch

from adamole_dist import AdapterConfig, inject_adapters
from adamole_dist.adapters.checkpointing import enable_gradient_checkpointing
from adamole_dist.base_model.chunked_loss import install
from adamole_dist.base_model.quantize import QuantSpec, quantize_base
from adamole_dist.parallel.device_timer import wall_seconds
from adamole_dist.planning.memory_plan import MB, plan_memory
from adamole_dist.planning.model_shape import shape_from_config
from adamole_dist.planning.plan_config import PlanConfig
from adamole_dist.train.activation_offload import ActivationOffload
from adamole_dist.train.step import train_step
from benchmarks.gpu.training import ChunkedRandomTokensLM, RandomTokensLM, random_batch, zero3_engine

CHUNK_TOKENS = 1024
# (label, chunked loss, --quantize_base, gradient checkpointing, --activation_offload)
LEVERS = [("plain loss", False, "none", False, False), ("chunked loss", True, "none", False, False),
          ("chunked, nf4 base", True, "nf4", False, False), ("chunked, int8 base", True, "int8", False, False),
          ("chunked, checkpointing", True, "none", True, False),
          ("chunked, checkpointing, activation offload", True, "none", True, True)]


def why_not(quantize: str, offload: bool, device: torch.device) -> str | None:
    if quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if offload and device.type != "cuda":
        return "activation offload needs a CUDA GPU"
    return None


def planned_mb(config: dict, micro: int, seq: int, chunked: bool, quantize: str, checkpointing: bool,
               offload: bool, device: torch.device) -> float:
    cuda = device.type == "cuda"
    plan = PlanConfig(model="gpu_check", micro_batch_size=micro, max_length=seq, precision="bf16" if cuda else "fp32",
                      quantize_base=quantize, gradient_checkpointing=checkpointing, activation_offload=offload,
                      chunked_loss=chunked, loss_chunk_tokens=CHUNK_TOKENS, device="cuda" if cuda else "cpu")
    shape = shape_from_config({"model_type": "llama", "tie_word_embeddings": False, **config}, "gpu_check")
    return round(plan_memory(shape, plan).device_total / MB, 1)


def measure_lever(args, device, info, llama, config: dict, micro: int, seq: int, lever: tuple) -> dict:
    """One lever's record: tokens/s of a step after --warmup ones, the step's peak, the plan beside it."""
    label, chunked, quantize, checkpointing, offload = lever
    record = {"section": "memory", "lever": label, "micro_batch": micro, "seq": seq,
              "planned_mb": planned_mb(config, micro, seq, chunked, quantize, checkpointing, offload, device)}
    skipped = why_not(quantize, offload, device)
    if skipped:
        return {**record, "skipped": skipped}
    cuda = device.type == "cuda"
    model = llama(args, device)
    if quantize != "none":
        quantize_base(model, QuantSpec(scheme=quantize))  # every linear but the LM head, on the weights' device
    adapters = inject_adapters(model, AdapterConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                    method="adamole", num_experts=8, rank=4))
    adapters.expert_module.to(device)
    if checkpointing:
        enable_gradient_checkpointing(model, adapters.context)
    task = ChunkedRandomTokensLM(install(model, CHUNK_TOKENS)) if chunked else RandomTokensLM()
    engine, expert_opt = zero3_engine(model, adapters.engine_parameters(), adapters.expert_parameters(), micro, info,
                                      cuda)
    batch = random_batch(config["vocab_size"], micro, seq, device)
    offloading = ActivationOffload(device) if offload else None

    def step():
        train_step(engine, task, adapters, expert_opt, [batch], adapters.cfg.aux_loss_coeff, offload=offloading)

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    seconds = wall_seconds(step, device)
    adapters.context.pop_stats()
    record["tokens_per_s"] = round(micro * seq / seconds, 1)
    if cuda:
        measured = torch.cuda.max_memory_allocated(device) / MB
        record.update(peak_memory_mb=round(measured, 1), plan_error=round(record["planned_mb"] / measured - 1, 3))
    return record


def bench_memory(args, device, info, llama, config: dict) -> list[dict]:
    """Every lever's record (the plain loss first: the others' ``vs_plain_peak`` is against it)."""
    micro, seq = (2, 16) if args.smoke else (4, 1024)
    records = []
    for lever in LEVERS:
        try:
            records.append(measure_lever(args, device, info, llama, config, micro, seq, lever))
        except Exception as e:  # noqa: BLE001 -- one lever failing on a lent GPU must not lose the others' records
            traceback.print_exc()
            records.append({"section": "memory", "lever": lever[0], "micro_batch": micro, "seq": seq,
                            "failed": f"{type(e).__name__}: {e}"[:300]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plain = records[0].get("peak_memory_mb")
    for r in records:
        if plain and r.get("peak_memory_mb"):
            r["vs_plain_peak"] = round(r["peak_memory_mb"] / plain, 3)
    return records
