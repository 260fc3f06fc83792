"""Process groups for expert parallelism, built once at start-up and passed in explicitly.

    DP  = the whole world: routers, LoRA and the task head are replicated over it.
    EP  = groups of ep_size consecutive ranks: each EP rank owns N / ep_size experts of every
          adapted layer, and tokens are exchanged (all-to-all) inside the group.
    EDP = ranks holding the same experts, striding by ep_size: expert gradients are summed here.

With world 4 and ep_size 2: EP groups {0,1} {2,3}; EDP groups {0,2} {1,3}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adamole_dist.config.fields import ConfigError
from adamole_dist.parallel import collectives


@dataclass(frozen=True)
class ParallelLayout:
    rank: int
    world_size: int
    ep_size: int
    ep_group: Any = None  # None when ep_size == 1 (no exchange)
    edp_group: Any = None  # None means the whole world

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size

    def expert_slice(self, num_experts: int) -> tuple[int, int]:
        """(first global expert id, count) owned by this rank."""
        per_rank = num_experts // self.ep_size
        return self.ep_rank * per_rank, per_rank


def check_sizes(world_size: int, ep_size: int, num_experts: int) -> None:
    if ep_size < 1:
        raise ConfigError(f"ep_size ({ep_size}) must be >= 1")
    if world_size % ep_size:
        raise ConfigError(f"ep_size ({ep_size}) does not divide the world size ({world_size})")
    if num_experts % ep_size:
        raise ConfigError(f"adapter.num_experts ({num_experts}) is not divisible by ep_size ({ep_size})")


def build_layout(ep_size: int, num_experts: int) -> ParallelLayout:
    """Collective when ep_size > 1: every rank creates every group, in the same order."""
    world = collectives.world_size()
    rank = collectives.rank()
    check_sizes(world, ep_size, num_experts)
    if ep_size == 1:
        return ParallelLayout(rank=rank, world_size=world, ep_size=1)
    ep_group = edp_group = None
    for start in range(0, world, ep_size):
        group = collectives.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = group
    for offset in range(ep_size):
        ranks = list(range(offset, world, ep_size))
        group = collectives.new_group(ranks) if len(ranks) > 1 else None
        if rank % ep_size == offset:
            edp_group = group
    return ParallelLayout(rank=rank, world_size=world, ep_size=ep_size, ep_group=ep_group,
                          edp_group=edp_group if world > ep_size else _SINGLE)


class _Single:
    """Marker: an EDP group of one rank (ep_size == world): nothing to reduce."""

    def __repr__(self) -> str:
        return "<single-rank group>"


_SINGLE = _Single()


def is_single(group) -> bool:
    return group is _SINGLE
