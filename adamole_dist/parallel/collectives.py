"""Every collective the project issues goes through parallel/: the reductions, broadcasts and
gathers here, the all-to-all machinery of expert parallelism in all_to_all.py (tests/unit/parallel/test_collectives.py
fails if another module calls a torch.distributed collective directly).

Why one home: a collective only runs on a device its process group has a backend for. Under
NCCL alone the group serves CUDA tensors only, and ``all_reduce(cpu_tensor)`` raises "No
backend type associated with device type cpu"; under gloo CPU tensors are native. So every
function here moves its tensors to a device the group serves (:func:`placement`), runs the
collective there and hands the result back on the caller's device. On a GPU machine the
trainer initialises mixed backends (``cpu:gloo,cuda:nccl``, process_group.py), so small host
values (stop flags, object collectives) stay on the CPU and activations go through NCCL.

Every function is a no-op (identity) without an initialised process group of more than one
rank, so single-process code calls them unconditionally.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

# torch.distributed functions that communicate (or, like new_group, must be called by every
# rank): only this module and all_to_all.py may call them (tests/unit/parallel/test_collectives.py
# scans the project for them).
COLLECTIVE_OPS = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "all_gather_coalesced", "_all_gather_base", "all_to_all", "all_to_all_single", "barrier", "monitored_barrier",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "gather", "gather_object", "scatter", "scatter_object_list", "send", "recv", "isend",
    "irecv", "batch_isend_irecv", "send_object_list", "recv_object_list", "new_group", "new_subgroups",
    "new_subgroups_by_enumeration",
})


# -- where tensors must live ---------------------------------------------------------------------
def is_distributed(group=None) -> bool:
    """A process group of more than one rank is up (collectives have someone to talk to)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group=None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


DEFAULT_DEVICES = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "mpi": ("cpu", "cuda"), "ucc": ("cpu", "cuda")}


def parse_backend_config(config: str) -> frozenset[str]:
    """Device types a backend config serves: 'cpu:gloo,cuda:nccl' -> {cpu, cuda}; 'nccl' -> {cuda}."""
    served: set[str] = set()
    for part in str(config).split(","):
        part = part.strip()
        if ":" in part:
            served.add(part.split(":", 1)[0])
        elif part:
            served.update(DEFAULT_DEVICES.get(part, ("cpu",)))
    return frozenset(served)


def served_device_types(group=None) -> frozenset[str]:
    """Device types the group's backends accept tensors on."""
    return parse_backend_config(dist.get_backend_config(group))


def placement(device: torch.device, served: frozenset[str], cuda_device: torch.device | None = None) -> torch.device:
    """Where a tensor on ``device`` must go for a collective on a group serving ``served``:
    where it is if served, else CUDA (NCCL alone), else the CPU. Pure; pinned by unit tests."""
    device = torch.device(device)
    if device.type in served:
        return device
    if "cuda" in served:
        if cuda_device is None:
            cuda_device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
                torch.device("cuda")
        return cuda_device
    if "cpu" in served:
        return torch.device("cpu")
    raise RuntimeError(f"the process group serves only {sorted(served)}: no device to run a collective on")


def comm_device(group=None) -> torch.device:
    """The device to build small host-side values on (flags, counts): the CPU when the group
    serves it, else the current CUDA device."""
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    return placement(torch.device("cpu"), served_device_types(group))


def on_served_device(t: torch.Tensor, group) -> torch.Tensor:
    """``t`` itself if the group serves its device, else a copy on a device it does serve."""
    target = placement(t.device, served_device_types(group))
    return t if target == t.device else t.to(target)


# -- reductions, barriers, objects ---------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the group, in place; returns ``t`` (on its own device)."""
    if not is_distributed(group):
        return t
    staged = on_served_device(t, group)
    dist.all_reduce(staged, group=group)
    if staged is not t:
        t.copy_(staged)
    return t


def sum_over_ranks(values: list[float], group=None) -> list[float]:
    """Several host numbers summed over the group in ONE collective (float64)."""
    if not is_distributed(group):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=comm_device(group))
    dist.all_reduce(t, group=group)
    return t.tolist()  # NOTE: device sync when the group has no CPU backend


def barrier(group=None) -> None:
    if is_distributed(group):
        dist.barrier(group=group)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` (a global rank) on every rank of the group."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_objects(obj: Any, group=None) -> list:
    """Every group member's ``obj``, in group-rank order."""
    if not is_distributed(group):
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def all_gather_stack(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """(size, *t.shape): every group member's tensor, in group-rank order, on ``t``'s device."""
    if size == 1:
        return t.unsqueeze(0)
    staged = on_served_device(t.contiguous(), group)
    out = [torch.empty_like(staged) for _ in range(size)]
    dist.all_gather(out, staged, group=group)
    return torch.stack(out).to(t.device)


def new_group(ranks: list[int]):
    """Collective: every rank of the world calls it with the same ``ranks``, in the same order."""
    return dist.new_group(ranks)
