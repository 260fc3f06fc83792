"""Which cards a plan fits: 24 / 40 / 80 / 141 GB, and the largest micro batch that fits each."""

from __future__ import annotations

import dataclasses

from adamole_dist.planning.memory_plan import plan_memory
from adamole_dist.planning.model_shape import ModelShape
from adamole_dist.planning.plan_config import PlanConfig

CARDS_GB = (24, 40, 80, 141)
USABLE = 0.9  # of a card's bytes: the CUDA context, NCCL buffers and the caching allocator's slack take the rest
MAX_SEARCHED_BATCH = 4096


def card_bytes(gb: int) -> float:
    return gb * 1e9 * USABLE


def device_total(shape: ModelShape, plan: PlanConfig, micro_batch_size: int) -> int:
    return plan_memory(shape, dataclasses.replace(plan, micro_batch_size=micro_batch_size)).device_total


def largest_micro_batch(shape: ModelShape, plan: PlanConfig, capacity: float) -> int:
    """The largest micro batch whose plan fits ``capacity`` bytes (0: not even one sequence); the total grows
    with the micro batch, so a doubling then a bisection finds it."""
    if device_total(shape, plan, 1) > capacity:
        return 0
    low, high = 1, 2
    while high <= MAX_SEARCHED_BATCH and device_total(shape, plan, high) <= capacity:
        low, high = high, high * 2
    high = min(high, MAX_SEARCHED_BATCH + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if device_total(shape, plan, mid) <= capacity else (low, mid)
    return low


def card_table(shape: ModelShape, plan: PlanConfig) -> list[dict]:
    total = plan_memory(shape, plan).device_total
    return [{"card_gb": gb, "fits": total <= card_bytes(gb),
             "largest_micro_batch": largest_micro_batch(shape, plan, card_bytes(gb))} for gb in CARDS_GB]
