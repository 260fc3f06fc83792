"""The DeepSpeed engine's trainable state in a world-independent file, so a checkpoint loads at any
world size (train/elastic.py): every trainable parameter of the engine (routers, LoRA, task head;
the frozen base is not in it) in full, by name, with its fp32 master value and AdamW moments, and
the AdamW step count. The experts are already stored by global id beside it (checkpoint.py).

Why consolidated, not DeepSpeed's universal checkpoint: these tensors are small (they are what
ZeRO-3 does not need to partition for memory), so gathering them once per save costs little, and
the checkpoint is resumable the moment it is renamed into place -- the universal format needs an
offline conversion (ds_to_universal.py) of the whole ZeRO-3 checkpoint before a resume at another
size, one more step a requeued job would have to run and a second copy on disk. Measured on the
tiny test model (docs/elastic_resume.md). DeepSpeed's own files are still written: a resume at the
same world size loads them as before, and checkpoints that predate this file still do.

Loading writes this rank's ZeRO-3 partition of each value straight into the optimizer's fp32 flat
groups and moments (as DeepSpeed's own universal loader does, through the same fields of its
stage-3 optimizer) and sets the module's weights through ``GatheredParameters``, which re-partitions
them (persistent small parameters included). ZeRO-3 only: the trainer's default.
"""

from __future__ import annotations

import torch

ENGINE_FILE = "engine_state.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")
STEP_KEY = "__adamw_step__"


def supports_engine_state(engine) -> bool:
    """A ZeRO-3 engine without optimizer offload: the layout load_engine_state writes into."""
    stage = getattr(engine, "zero_optimization_stage", None)
    opt = getattr(engine, "optimizer", None)
    return (stage is not None and stage() == 3 and hasattr(opt, "fp32_partitioned_groups_flat")
            and not getattr(opt, "offload_optimizer", False))


def trainable_named(engine, params: list[torch.nn.Parameter]) -> list[tuple[str, torch.nn.Parameter]]:
    """``params`` (the engine's trainable ones) with their names in the module, in the module's order
    (every rank the same: gathering them is collective)."""
    wanted = {id(p) for p in params}
    return [(n, p) for n, p in engine.module.named_parameters() if id(p) in wanted]


def _first_state(engine) -> dict:
    opt = engine.optimizer
    return opt.optimizer.state.get(opt.fp32_partitioned_groups_flat[0], {}) if opt.fp32_partitioned_groups_flat \
        else {}


def engine_state(engine, params: list[torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Collective (every rank gathers; rank 0 writes the result): full fp32 values and moments by name."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    first = _first_state(engine)
    with_moments = all(m in first for m in MOMENTS)  # none before the first optimizer step
    out: dict[str, torch.Tensor] = {STEP_KEY: torch.tensor([int(first.get("step", 0))], dtype=torch.int64)}
    for name, p in trainable_named(engine, params):
        out[name] = safe_get_full_fp32_param(p).detach().reshape(p.ds_shape).cpu().clone()
        if with_moments:
            for m in MOMENTS:
                out[f"{name}.{m}"] = safe_get_full_optimizer_state(p, m).detach().reshape(p.ds_shape).cpu().clone()
    return out


def _partition(full: torch.Tensor, numel: int, part_rank: int) -> torch.Tensor:
    """Rank ``part_rank``'s ZeRO-3 partition of ``full`` (numel each; the last one padded with zeros)."""
    flat = full.reshape(-1)
    piece = flat[part_rank * numel:(part_rank + 1) * numel]
    if piece.numel() < numel:
        piece = torch.cat([piece, piece.new_zeros(numel - piece.numel())])
    return piece


def load_engine_state(engine, params: list[torch.nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Collective: this rank's partitions of the fp32 masters and moments, the module's weights (through
    GatheredParameters) and the AdamW step, from ``engine_state``'s output written at any world size."""
    import deepspeed

    opt = engine.optimizer
    named = trainable_named(engine, params)
    missing = [n for n, _ in named if n not in tensors]
    if missing:
        raise KeyError(f"the checkpoint's {ENGINE_FILE} lacks {missing[0]!r} (and {len(missing) - 1} more)")
    step = int(tensors[STEP_KEY].item())
    # torch's Adam(W) (DeepSpeed's choice on CPU) keeps the step as a tensor, FusedAdam as an int
    step_value = torch.tensor(float(step)) if isinstance(opt.optimizer, torch.optim.Adam) else step
    with_moments = all(f"{named[0][0]}.{m}" in tensors for m in MOMENTS) if named else False
    flats = opt.fp32_partitioned_groups_flat
    with torch.no_grad():
        if with_moments:
            for flat in flats:  # the step is kept per flat group (state["step"])
                opt.optimizer.state[flat] = {"step": step_value, **{m: torch.zeros_like(flat) for m in MOMENTS}}
        for name, p in named:
            group, offset, numel = opt.grad_position[opt.get_param_id(p)]
            part_rank = opt._get_param_partition_rank(p)
            flat = flats[group]
            flat.narrow(0, offset, numel).copy_(_partition(tensors[name], numel, part_rank))
            if with_moments:
                for m in MOMENTS:
                    opt.optimizer.state[flat][m].narrow(0, offset, numel).copy_(
                        _partition(tensors[f"{name}.{m}"], numel, part_rank))
        params_only = [p for _, p in named]
        with deepspeed.zero.GatheredParameters(params_only, modifier_rank=0):
            if torch.distributed.get_rank() == 0:
                for name, p in named:
                    p.data.copy_(tensors[name].reshape(p.shape).to(p.dtype))


def set_engine_step(engine, step: int) -> None:
    """The engine's step count and lr schedule at optimizer step ``step`` (what DeepSpeed's own load
    restores from its files): LambdaLR's position and the lr of each group."""
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    sched = engine.lr_scheduler
    if sched is None:
        return
    sched.last_epoch = step
    for group, base_lr, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base_lr * fn(step)
    sched._last_lr = [g["lr"] for g in sched.optimizer.param_groups]
