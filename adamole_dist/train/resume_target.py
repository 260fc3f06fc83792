"""Where a run continues from, decided before anything is written (collective; rank 0 reads the shared output
dir and checkpoint for everyone, parallel/rank_zero.py): the output dir checked against the run's record,
the training data against the one the run started on, the checkpoint ``--resume`` names found complete and
readable, and the options the run continues with at this world size (the checkpoint's global batch kept,
elastic.py). A problem stops every rank together with a ConfigError naming it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.parallel.rank_zero import rank0_decides
from adamole_dist.run_files.output_dir import changed_training_data, check_output_dir
from adamole_dist.run_files.run_lock import check_unlocked
from adamole_dist.runtime.process_group import DistInfo
from adamole_dist.train import checkpoint as ckpt_io
from adamole_dist.train.elastic import ResumePlan, plan_geometry
from adamole_dist.train.engine_state import ENGINE_FILE

log = logging.getLogger(__name__)


def resume_options(cfg: TrainConfig, out: Path, dist_info: DistInfo) -> tuple[TrainConfig, ResumePlan | None]:
    """The options to run with (collective): on a resume, the checkpoint's global batch kept at this world
    size, the change logged (elastic.py)."""
    plan = rank0_decides(lambda: plan_elastic(cfg, out, dist_info.world_size), expected=(ConfigError,))
    if plan is None:
        return cfg, None
    if plan.note and dist_info.is_main:
        log.info(plan.note)
    return plan.cfg, plan

def plan_elastic(cfg: TrainConfig, out: Path, world_size: int) -> ResumePlan | None:
    """Rank 0: how the checkpoint ``--resume`` names continues at this world size (elastic.py), from its
    trainer state alone; None when there is none to read (plan_resume later names what is wrong)."""
    if not cfg.resume:
        return None
    if out.is_dir():  # a live run may be writing that checkpoint: say that first
        check_unlocked(out)
    try:
        path = ckpt_io.resolve_latest(out / "checkpoints")[0] if cfg.resume == ckpt_io.LATEST else Path(cfg.resume)
        state = json.loads((path / ckpt_io.STATE_FILE).read_text()) if path is not None else None
    except (OSError, ValueError):
        return None
    return plan_geometry(cfg, state, world_size, path) if isinstance(state, dict) else None

def check_run_target(cfg: TrainConfig, dist_info: DistInfo, out: Path, config_record: dict) -> Path | None:
    """Rank 0 reads the shared output dir and checkpoint for everyone (collective): the checkpoint to
    resume from (None: start afresh); a problem stops every rank."""

    def check() -> Path | None:
        check_output_dir(out, config_record, overwrite=cfg.overwrite, resume=cfg.resume)
        if not cfg.resume:
            return None
        changed = changed_training_data(out, config_record)
        if changed and not cfg.allow_data_change:
            raise ConfigError(f"--resume: {changed}; resuming would train on another data order than the "
                              "interrupted run's: restore the file, or pass --allow_data_change to continue on the "
                              "new data (a warning is logged)")
        if changed:
            log.warning(f"warning: --resume with --allow_data_change: {changed}; the data order from here on is "
                        "not the interrupted run's")
        return plan_resume(cfg, out / "checkpoints", dist_info.world_size)

    return rank0_decides(check, expected=(ConfigError,))

def plan_resume(cfg: TrainConfig, ckpt_root: Path, world_size: int) -> Path | None:
    """Rank 0, before anything is written: the checkpoint to resume from (None: start afresh),
    checked to be complete, readable, and loadable at this world size (plan_elastic checked the rest)."""
    try:
        if cfg.resume == ckpt_io.LATEST:
            path, note = ckpt_io.resolve_latest(ckpt_root)
        else:
            path, note = Path(cfg.resume), None
    except FileNotFoundError as e:
        raise ConfigError(f"--resume latest: {e}") from None
    if path is None:
        log.info(f"--resume latest: no checkpoint in {ckpt_root} yet, starting from scratch")
        return None
    if note:
        log.info(f"--resume latest: {note}")
    others = [p for p in ckpt_io.complete_checkpoints(path.parent) if p != path and ckpt_io.check_complete(p) is None]
    older = f"; the newest other complete checkpoint is {others[-1]} (--resume {others[-1]})" if others else ""
    broken = ckpt_io.check_readable(path)
    if broken:
        raise ConfigError(f"--resume: checkpoint {path} is damaged: {broken}{older}")
    missing = ckpt_io.check_complete(path)
    if missing:
        raise ConfigError(f"--resume: checkpoint {path} is incomplete: {missing}{older}")
    state = json.loads((path / ckpt_io.STATE_FILE).read_text())
    if state["world_size"] != world_size and not (path / ENGINE_FILE).is_file():
        raise ConfigError(f"--resume: checkpoint {path} was written with world size {state['world_size']}, "
                          f"this run has {world_size}, and it holds no {ENGINE_FILE} (the engine's state in a "
                          f"world-independent form, written under ZeRO-3); resume with {state['world_size']} ranks")
    return path
