"""--activation_offload: the tensors autograd saves in the forward go to pinned host memory and come back in the
backward (torchtune's activation offloading, in its simplest form).

Used with gradient checkpointing (TrainConfig requires it): the checkpointed blocks save nothing of their own, so
what reaches these hooks is each block's input (kept by the checkpoint to replay the block) and the few tensors
saved outside the blocks; on the device remains one block's activations at a time, replayed in the backward.

The copy to the host runs on a side CUDA stream, so it overlaps the forward's next kernels: the side stream first
waits for the main one (the tensor is written there), and ``record_stream`` keeps the tensor's block from the
caching allocator until the copy has read it. The copy back runs on the side stream when the backward asks for the
tensor; the main stream waits for it, and the new tensor is recorded on the main stream. Tensors under
``MIN_OFFLOAD_BYTES`` (masks, router statistics) and parameters (the frozen base: ZeRO-3 gathers it again) stay as
they are: their copies would cost more launches than they free bytes. Only tensors on the run's device are moved;
the device logic sits in ``to_host`` / ``to_device``, so the pack/unpack round trip is tested on the CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adamole_dist.config.fields import ConfigError

MIN_OFFLOAD_BYTES = 2**16


def check_activation_offload(enabled: bool, device: torch.device) -> None:
    """ConfigError where --activation_offload cannot run: it moves device memory to the host."""
    if enabled and device.type != "cuda":
        raise ConfigError(f"--activation_offload needs a CUDA GPU: it moves saved activations from device memory to "
                          f"pinned host memory, and this run trains on the {device.type}, whose activations are "
                          "host memory already; leave it off")


@dataclass
class OnHost:
    """A saved tensor's host copy, where it came from, and the event that marks the copy done (None on the CPU)."""

    host: torch.Tensor
    device: torch.device
    copied: torch.cuda.Event | None


class ActivationOffload:
    """Saved-tensor hooks for the forward: ``with offload.hooks(): loss = forward(...)``."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.device = torch.device(device)
        self.min_bytes = min_bytes
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.offloaded_bytes = 0  # moved to the host since construction

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def moves(self, t: torch.Tensor) -> bool:
        is_parameter = isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)
        return (t.device.type == self.device.type and not is_parameter
                and t.numel() * t.element_size() >= self.min_bytes)

    def pack(self, t: torch.Tensor) -> torch.Tensor | OnHost:
        if not self.moves(t):
            return t
        self.offloaded_bytes += t.numel() * t.element_size()
        return self.to_host(t)

    def unpack(self, packed: torch.Tensor | OnHost) -> torch.Tensor:
        return packed if isinstance(packed, torch.Tensor) else self.to_device(packed)

    def to_host(self, t: torch.Tensor) -> OnHost:
        if self.stream is None:  # a CPU tensor: the copy is the host copy (the round trip without streams)
            return OnHost(t.detach().clone(), t.device, None)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))  # t is written on the main stream
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
        t.record_stream(self.stream)  # the allocator keeps t's block until the side stream has read it
        return OnHost(host, t.device, self.stream.record_event())

    def to_device(self, packed: OnHost) -> torch.Tensor:
        if self.stream is None:
            return packed.host
        main = torch.cuda.current_stream(packed.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(packed.copied)
            t = packed.host.to(packed.device, non_blocking=True)
        main.wait_stream(self.stream)  # NOTE: the backward waits for this tensor's copy back, not for later ones
        t.record_stream(main)
        return t
