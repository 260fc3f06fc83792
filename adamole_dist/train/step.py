"""The training step. Every loop calls it: the Trainer, benchmarks/scaling/step_worker.py (timing each
phase through a PhaseClock) and benchmarks/accuracy/accuracy.py (through a one-process engine).

``engine`` is anything shaped like DeepSpeed's engine: ``engine(**batch)`` through ``task.loss``,
``backward(loss)`` and ``step()`` per micro batch (the update applies at the accumulation
boundary), ``get_global_grad_norm()`` after it. The expert banks that live outside the engine
(docs/zero3_experts.md) step after the engine, then the aux-loss-free balance bias moves.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from adamole_dist.adapters.handle import Adapters
from adamole_dist.parallel import collectives
from adamole_dist.parallel.device_timer import timed
from adamole_dist.train.activation_offload import ActivationOffload


def micro_batch_loss(model, task, adapters: Adapters | None, batch: dict,
                     aux_loss_coeff: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(task loss + coeff x aux loss, task loss, aux loss or None) of one micro batch."""
    task_loss = task.loss(model, batch)
    aux = adapters.aux_loss() if adapters is not None else None
    total = task_loss + aux_loss_coeff * aux if aux is not None else task_loss
    return total, task_loss, aux


@dataclass
class PhaseClock:
    """Seconds per phase of the last step (forward, backward, optimizer), for benchmarks. Each phase
    is timed with the device synchronised on both sides (parallel/device_timer.py): on a GPU the
    kernels' time, not their launches'; the trainer itself runs without a clock."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str):
        with timed(self.device) as t:
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + t.seconds

    def reset(self) -> None:
        self.seconds = {}


@contextmanager
def _untimed(name: str):
    yield


def train_step(engine, task, adapters: Adapters | None, expert_opt, micro_batches: list[dict],
               aux_loss_coeff: float, clock: PhaseClock | None = None,
               offload: ActivationOffload | None = None) -> dict:
    """One optimizer step over the accumulation's micro batches; returns the mean task and aux
    losses over them, the engine's gradient norm and the experts' (0.0 where there is none).

    Host reads of device values (each a sync on a GPU): the losses are summed on the device and read
    once, together with the engine's norm, at the end of the step; the expert optimizer reads its
    norm once (clipping and the non-finite check need it). Two per step, whatever the depth and the
    number of micro batches (tests/unit/train/test_host_syncs.py). ``offload``: the forward runs under its
    saved-tensor hooks (--activation_offload)."""
    phase = clock.phase if clock is not None else _untimed
    task_sum, aux_sum = None, None
    for batch in micro_batches:
        with phase("forward"), offload.hooks() if offload is not None else nullcontext():
            loss, task_loss, aux = micro_batch_loss(engine, task, adapters, batch, aux_loss_coeff)
        with phase("backward"):
            engine.backward(loss)
        with phase("optimizer"):
            engine.step()
        task_sum = _add(task_sum, task_loss)
        aux_sum = _add(aux_sum, aux)
    with phase("optimizer"):
        expert_norm = expert_opt.step() if expert_opt is not None else None
        if adapters is not None:
            adapters.update_balance_bias(collectives.all_reduce_sum)
    n = len(micro_batches)
    engine_norm = engine.get_global_grad_norm()
    device_values = [task_sum.float() / n, aux_sum.float() / n if aux_sum is not None else torch.zeros_like(task_sum)]
    if isinstance(engine_norm, torch.Tensor):
        device_values.append(engine_norm.detach().float().reshape(()).to(task_sum.device))
    host = torch.stack([v.reshape(()) for v in device_values]).tolist()  # NOTE: the step's one read of its losses
    if not isinstance(engine_norm, torch.Tensor):
        host.append(float(engine_norm) if engine_norm is not None else 0.0)
    return {"task_loss": host[0], "aux_loss": host[1], "grad_norm": host[2],
            "expert_grad_norm": expert_norm if expert_norm is not None else 0.0}


def _add(total: torch.Tensor | None, value: torch.Tensor | None) -> torch.Tensor | None:
    """A running sum on the device, outside autograd."""
    if value is None:
        return total
    value = value.detach()
    return value if total is None else total + value
