"""The frozen base gathered for the evaluation's generation, where it fits.

Under ZeRO-3 every forward gathers each layer's partitions and frees them after: decoding token by token
would gather the whole model once per token. The evaluation's samples and answers therefore gather every
parameter once, up front, for all their prompts -- a full copy of the model on every rank beside its shard
(the planner's "evaluation by generation" term). On a GPU that copy may not fit: a 70B base in bf16 is 140 GB
per rank. There each rank asks its free device memory, and unless every rank holds the copy with
``HEADROOM`` to spare, none gathers up front and each forward gathers its layers as in training (slower, but
it fits). Collective: every rank calls it and all decide the same."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from adamole_dist.adapters.files import gathered
from adamole_dist.parallel import collectives

HEADROOM = 1.1  # the gathered copy and 10 % more must be free (generation's own buffers are small beside it)


def gathered_bytes(params: list[torch.nn.Parameter]) -> int:
    """Bytes a whole gather of ZeRO-3 partitioned ``params`` allocates (0 where nothing is partitioned)."""
    return sum(p.ds_numel * p.element_size() for p in params if hasattr(p, "ds_id"))


def fits_here(need: int, device: torch.device) -> bool:
    """Does this rank's device have ``need`` bytes (times HEADROOM) free? Host memory is not asked."""
    if device.type != "cuda" or need == 0:
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return free >= need * HEADROOM


def generation_gather(model, device: torch.device, say: Callable[[str], None] | None = None):
    """The context to generate in: the whole model gathered when it fits on every rank, else nothing up front
    (``say`` is told why). Collective."""
    net = getattr(model, "module", model)
    params = list(net.parameters())
    need = gathered_bytes(params)
    if need == 0:
        return contextlib.nullcontext()
    (misses,) = collectives.sum_over_ranks([0.0 if fits_here(need, device) else 1.0])
    if misses > 0:
        if say is not None:
            say(f"generating layer by layer: the whole model gathered ({need / 2**30:.1f} GiB) does not fit the "
                f"free device memory of {int(misses)} rank(s)")
        return contextlib.nullcontext()
    return gathered(params)
