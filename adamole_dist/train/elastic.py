"""Resume at another world size: the global batch kept, the run's identity checked.

The global batch G = micro_batch_size x world size x gradient_accumulation_steps is part of a run's
identity: the data order cuts each epoch into steps of G examples (data/sampler.py), so step s sees
the same examples at any world size that keeps G, and the mean loss over them -- hence every
gradient, clipped norm and AdamW update -- is the same. On a resume the checkpoint's G is kept by
``--elastic``: accumulation changes gradient_accumulation_steps, micro_batch changes
micro_batch_size, off keeps the options given (which must then keep G themselves). What shapes the
parameters (the base model, the adapter's method, experts and rank) may not change at all.

These are pure functions of the checkpoint's trainer state and the new options; the assembly
(assembly.py) applies them before the DeepSpeed config and the sampler are built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig

STEP_ORDER = "steps"  # trainer_state["data_order"] of checkpoints whose sampler cuts epochs into steps
# What shapes the trained tensors: a checkpoint continues only under the same values.
IDENTITY = ("model", "adapter.method", "adapter.num_experts", "adapter.rank")


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch_size: int
    world_size: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulation

    def __str__(self) -> str:
        return (f"micro batch {self.micro_batch_size} x world {self.world_size} x accumulation "
                f"{self.accumulation}")


def keep_global_batch(saved: BatchGeometry, asked: BatchGeometry, mode: str) -> BatchGeometry:
    """The geometry to run at: ``asked`` when it keeps ``saved``'s global batch, else the one ``mode``
    allows; ConfigError naming the numbers when no integer choice keeps it."""
    target = saved.global_batch
    if asked.global_batch == target:
        return asked
    world = asked.world_size
    if mode == "accumulation":
        per_step = asked.micro_batch_size * world
        if target % per_step == 0:
            return dataclasses.replace(asked, accumulation=target // per_step)
        why = f"{target} is not a multiple of micro_batch_size x world size = {per_step}"
    elif mode == "micro_batch":
        per_micro = asked.accumulation * world
        if target % per_micro == 0:
            return dataclasses.replace(asked, micro_batch_size=target // per_micro)
        why = f"{target} is not a multiple of gradient_accumulation_steps x world size = {per_micro}"
    else:
        why = "--elastic off changes neither micro_batch_size nor gradient_accumulation_steps"
    raise ConfigError(f"--resume: the checkpoint's global batch {target} ({saved}) cannot be kept with {asked} "
                      f"(--elastic {mode}): {why}")


def _lookup(config: dict, path: str):
    value = config
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def check_identity(saved_config: dict, config: dict, ckpt) -> None:
    """ConfigError naming the first field of IDENTITY that differs from the checkpoint's run."""
    for path in IDENTITY:
        before, now = _lookup(saved_config, path), _lookup(config, path)
        if before is not None and before != now:
            raise ConfigError(f"--resume: checkpoint {ckpt} was trained with {path} {before!r}, this run has "
                              f"{now!r}; the trained tensors depend on it: resume with {path} {before!r} or "
                              "start a new run in another output_dir")


def layout_note(cfg: TrainConfig, saved: BatchGeometry, new: BatchGeometry, saved_ep: int | None) -> str:
    """What of the results depends on the layout itself: capacity is per EP group and micro batch, a
    global aux loss per world micro batch, a local one per rank micro batch."""
    notes = []
    if cfg.adapter.effective_capacity_factor > 0 and (saved_ep != cfg.ep_size or saved != new):
        notes.append("expert capacity is counted per EP group and micro batch, so drops (and results) differ")
    if cfg.adapter.aux_loss_coeff > 0:
        if cfg.adapter.aux_loss_scope == "global" and (saved.micro_batch_size * saved.world_size
                                                       != new.micro_batch_size * new.world_size):
            notes.append("the global aux loss is over each world micro batch, which now holds other examples")
        if cfg.adapter.aux_loss_scope == "local" and saved.micro_batch_size != new.micro_batch_size:
            notes.append("the local aux loss is over each rank's micro batch, which now holds other examples")
    return ("; " + "; ".join(notes)) if notes else ""


@dataclass(frozen=True)
class ResumePlan:
    """How the checkpoint continues here: the options to run with, whether its data order is the legacy
    one (checkpoints from before steps were the sampler's unit), and the line to log (None: nothing
    changed)."""

    cfg: TrainConfig
    legacy_order: bool
    note: str | None


def plan_geometry(cfg: TrainConfig, state: dict, world_size: int, ckpt) -> ResumePlan:
    """The plan for resuming the checkpoint whose trainer state is ``state`` at ``world_size``."""
    saved_config = state.get("config", {})
    check_identity(saved_config, cfg.to_dict(), ckpt)
    saved = BatchGeometry(saved_config.get("micro_batch_size", cfg.micro_batch_size), state["world_size"],
                          saved_config.get("gradient_accumulation_steps", cfg.gradient_accumulation_steps))
    asked = BatchGeometry(cfg.micro_batch_size, world_size, cfg.gradient_accumulation_steps)
    legacy = state.get("data_order") != STEP_ORDER
    if legacy and world_size != saved.world_size:
        raise ConfigError(f"--resume: checkpoint {ckpt} was written with world size {saved.world_size} by a version "
                          f"without world-independent checkpoints; this run has {world_size}: resume it with "
                          f"{saved.world_size} ranks")
    new = keep_global_batch(saved, asked, cfg.elastic)
    if legacy and new != saved:  # its position counts micro batches of the writing run's size
        raise ConfigError(f"--resume: checkpoint {ckpt} was written by a version without world-independent "
                          f"checkpoints with {saved}; resume it with the same micro_batch_size and "
                          "gradient_accumulation_steps")
    run_cfg = dataclasses.replace(cfg, micro_batch_size=new.micro_batch_size,
                                  gradient_accumulation_steps=new.accumulation)
    if new == saved and cfg.ep_size == saved_config.get("ep_size", cfg.ep_size):
        return ResumePlan(run_cfg, legacy, None)
    note = (f"--resume: {saved} -> {new} (ep_size {ep_name(saved_config.get('ep_size'))} -> {ep_name(cfg.ep_size)}) "
            f"keeps the global batch {new.global_batch}" + layout_note(cfg, saved, new, saved_config.get("ep_size")))
    return ResumePlan(run_cfg, legacy, note)


def ep_name(ep_size: int | None) -> str:
    """An ep_size as the user wrote it: 0 is --ep_size auto (decided by the cost model when the run starts)."""
    return "auto" if ep_size == 0 else str(ep_size)


def batch_in_epoch(state: dict, accumulation: int) -> int:
    """The checkpoint's data position in micro batches of this run: it was saved at a step boundary,
    a whole number of the writing run's accumulation steps into the epoch."""
    saved_accumulation = state.get("config", {}).get("gradient_accumulation_steps", accumulation)
    return state["batch_in_epoch"] // saved_accumulation * accumulation
