"""The plan as text (adamole-plan, train --plan, the trainer's log) and as JSON (adamole-plan --json)."""

from __future__ import annotations

import dataclasses

from adamole_dist.planning.cards import USABLE, card_table
from adamole_dist.planning.memory_plan import MemoryPlan, plan_memory
from adamole_dist.planning.model_shape import ModelShape
from adamole_dist.planning.plan_config import PlanConfig

ROWS = (("base_shard", "frozen base shard (ZeRO-3)"), ("engine_states", "trainable engine params + AdamW states"),
        ("experts", "experts + AdamW moments"), ("activations", "activations (saved for backward)"),
        ("logits_and_loss", "logits and loss"), ("temporary", "temporary buffers (gathers, buckets, backward)"))


def plan_record(shape: ModelShape, plan: PlanConfig) -> dict:
    memory = plan_memory(shape, plan)
    cards = card_table(shape, plan) if plan.device == "cuda" else []  # a CPU plan is RSS, baseline included
    return {"inputs": dataclasses.asdict(plan), "per_rank_mb": memory.as_mb(), "cards": cards}


def plan_text(shape: ModelShape, plan: PlanConfig) -> str:
    memory: MemoryPlan = plan_memory(shape, plan)
    mb = memory.as_mb()
    where = "device" if plan.device == "cuda" else "CPU peak RSS"
    lines = [f"memory plan (prediction) for {plan.model}: {memory.params_total / 1e9:.3f} B params, "
             f"world {plan.world_size}, ep_size {plan.ep_size}, micro batch {plan.micro_batch_size} x "
             f"{plan.max_length} tokens, {plan.precision}, base {plan.quantize_base}, {plan.method} "
             f"{plan.experts}x r={plan.rank}, per rank:"]
    lines += [f"  {label:<48}{mb[key]:>12,.0f} MB" for key, label in ROWS]
    if memory.generation:
        kept = "on top of the step's" if plan.device == "cpu" else "into free memory only, else layer by layer"
        lines.append(f"  {'evaluation by generation: the base gathered':<48}{mb['generation']:>12,.0f} MB ({kept})")
    if memory.host_offloaded:
        lines.append(f"  {'offloaded to host (not on the device)':<48}{mb['host_offloaded']:>12,.0f} MB")
    if memory.process_baseline:
        lines.append(f"  {'process baseline (imports)':<48}{mb['process_baseline']:>12,.0f} MB")
    lines.append(f"  {'total, ' + where:<48}{mb['device_total']:>12,.0f} MB")
    if plan.device == "cpu":  # its total holds the process baseline and the CPU heap's retention: no card's measure
        lines.append("  (a CPU plan, process baseline included: no card fit; for cards: adamole-plan --device cuda)")
        return "\n".join(lines)
    for row in card_table(shape, plan):
        verdict = "fits" if row["fits"] else "does not fit"
        lines.append(f"  {row['card_gb']:>3} GB card: {verdict:<13} largest micro batch that fits: "
                     f"{row['largest_micro_batch']} (of {USABLE:.0%} of the card)")
    return "\n".join(lines)
