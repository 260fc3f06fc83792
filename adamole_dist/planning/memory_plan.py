"""Bytes per rank of one training step, by component (the plan), from a ModelShape and a PlanConfig.

Constants, measured here (2-core CPU, torch 2.13, transformers 5, deepspeed 0.19; see docs/memory_planner.md):
PROCESS_BASELINE_MB is the RSS of a trainer process after its imports (torch, transformers, deepspeed, the
package), before any model; CPU_HEAP_RETENTION is the measured peak RSS over the live tensors of a step on the
CPU (glibc keeps freed chunks mapped, fragmented; fit on benchmarks/results/memory.json and the e2e records,
where it ranges 1.16 to 1.24). On a GPU the plan is what torch.cuda.max_memory_allocated counts, with no factor."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from adamole_dist.planning.activations import offload_in_flight_bytes, saved_activation_bytes, target_dims
from adamole_dist.planning.model_shape import ModelShape
from adamole_dist.planning.plan_config import PlanConfig

PROCESS_BASELINE_MB = 400
CPU_HEAP_RETENTION = 1.2
ADAMW_STATE_BYTES = 16  # per trainable parameter: weight + gradient + 2 fp32 moments (fp32), or bf16 weight +
# bf16 gradient + fp32 master + 2 fp32 moments (bf16): 16 bytes either way
OFFLOADED_STATE_BYTES = 8  # the moments; bf16 also its fp32 master (+4), see engine_bytes
ZERO3_PREFETCH_BUCKET = 5e7  # ds_configs/zero3.json: stage3_prefetch_bucket_size (elements)
ZERO3_REDUCE_BUCKET = 5e7  # reduce_bucket_size (elements)
QUANT_BLOCK = 64  # bitsandbytes 4-bit block
MB = 2**20


@dataclass
class MemoryPlan:
    """Bytes per rank. ``device`` is what the accelerator holds (or, on a CPU, the tensors); ``host`` is
    what offloading moves to host memory."""
    base_shard: int
    engine_states: int
    experts: int
    activations: int
    logits_and_loss: int
    temporary: int
    generation: int  # the whole base gathered while the evaluation generates (0: it does not)
    host_offloaded: int
    process_baseline: int
    device_total: int
    params_total: int
    trainable_engine_params: int
    expert_params: int

    def as_mb(self) -> dict:
        return {k: (v / MB if k not in ("params_total", "trainable_engine_params", "expert_params") else v)
                for k, v in asdict(self).items()}


def base_bytes(shape: ModelShape, plan: PlanConfig) -> int:
    """The frozen base as stored: embeddings, norms and the LM head in the run's precision; the blocks'
    linear layers packed by --quantize_base (4-bit: half a byte a weight plus one scale per 64-weight block,
    8-bit with double quantization, fp32 without; int8: a byte a weight plus an fp32 scale per row)."""
    dense = plan.weight_bytes
    linear = shape.layers * shape.block_linear_params()
    rest = shape.total_params() - linear
    if plan.quantize_base in ("nf4", "fp4"):
        scale = 1 + 4 / 256 if plan.quant_double else 4
        packed = linear * (0.5 + scale / QUANT_BLOCK)
    elif plan.quantize_base == "int8":
        packed = linear + 4 * shape.layers * sum(out for _, out in shape.linears().values())
    else:
        packed = linear * dense
    return int(packed + rest * dense)


def adapter_params(shape: ModelShape, plan: PlanConfig) -> tuple[int, int]:
    """(engine parameters: routers, or lora's one expert; the expert bank) over all blocks."""
    engine, bank = 0, 0
    for d_in, d_out in target_dims(shape, plan.target_modules).values():
        experts = plan.experts * plan.rank * (d_in + d_out)
        if plan.method == "lora":
            engine += experts
            continue
        bank += experts
        engine += plan.num_experts * d_in + (d_in + 1 if plan.method == "adamole" else 0)  # gate, threshold
    return shape.layers * engine, shape.layers * bank


def logits_bytes(shape: ModelShape, plan: PlanConfig) -> int:
    """A causal LM's fp32 logits, their log-softmax and their gradient: over every token with the plain loss,
    over one chunk of at most loss_chunk_tokens of the target tokens with the chunked one (it leaves the positions
    without a target out before the head). An encoder's 1-logit head: nothing to count."""
    if shape.is_encoder:
        return 0
    tokens = plan.micro_batch_size * plan.max_length
    if plan.chunked_loss:
        tokens = min(math.ceil(tokens * plan.target_fraction), plan.loss_chunk_tokens)
    return 3 * tokens * shape.vocab * 4


def temporary_bytes(shape: ModelShape, plan: PlanConfig, one_block: int, engine_params: int) -> int:
    """ZeRO-3's gathered weights (the block running plus what it prefetches: up to the prefetch bucket's elements
    of the modules that come next, the whole rest of a model smaller than the bucket), its gradient reduce bucket,
    and the backward's gradients of one block's activations."""
    dense = plan.weight_bytes
    block = shape.block_linear_params() + shape.block_other_params()
    prefetched = min(ZERO3_PREFETCH_BUCKET, shape.total_params() - block)
    gathered = (block + prefetched) * dense if plan.world_size > 1 else 0
    return int(gathered + min(engine_params, ZERO3_REDUCE_BUCKET) * 4 + one_block)


def plan_memory(shape: ModelShape, plan: PlanConfig) -> MemoryPlan:
    engine, bank = adapter_params(shape, plan)
    activations, one_block = saved_activation_bytes(shape, plan)
    offloaded = 0
    if plan.activation_offload:
        kept = min(activations, offload_in_flight_bytes(shape, plan, one_block))
        offloaded += activations - kept
        activations = kept
    engine_states = engine * ADAMW_STATE_BYTES // plan.world_size
    if plan.optimizer_offload:
        moved = engine * (OFFLOADED_STATE_BYTES + (4 if plan.precision == "bf16" else 0)) // plan.world_size
        engine_states -= moved
        offloaded += moved
    parts = dict(base_shard=base_bytes(shape, plan) // plan.world_size, engine_states=engine_states,
                 experts=bank * ADAMW_STATE_BYTES // plan.ep_size, activations=activations,
                 logits_and_loss=logits_bytes(shape, plan),
                 temporary=temporary_bytes(shape, plan, one_block, engine))
    tensors = sum(parts.values())
    # ZeRO-3 gathers every frozen weight into a buffer of its own beside the shard, once for all the prompts
    generation = base_bytes(shape, plan) if plan.generates else 0
    on_cpu = plan.device == "cpu"
    baseline = PROCESS_BASELINE_MB * MB if on_cpu else 0
    if on_cpu:  # host_memory keep: the step's freed heap stays the process's, the gathered copy comes on top
        total = int(baseline + (tensors + generation) * CPU_HEAP_RETENTION)
    else:  # a GPU gathers only into free memory, else generates layer by layer (train/generation_gather.py)
        total = tensors
    return MemoryPlan(**parts, generation=generation, host_offloaded=offloaded, process_baseline=baseline,
                      device_total=total,
                      params_total=shape.total_params(), trainable_engine_params=engine, expert_params=bank)
