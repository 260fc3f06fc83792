"""Guarding the output directory: never mix two runs' files, never half-write the run record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .atomic_files import write_text_atomically
from .config import ConfigError

RUN_CONFIG = "run_config.json"


def comparable(config: dict) -> dict:
    """The parts of a run's config that must match to continue it (not bookkeeping options)."""
    skip = {"resume", "overwrite", "output_dir", "max_steps", "epochs", "save_interval", "eval_interval",
            "log_interval", "report_to", "keep_checkpoints", "eval_at_start", "peer_timeout", "comm_timeout",
            "dist_backend", "ep_size"}  # experts reshard by global id, so a run may continue at another ep_size
    return {k: v for k, v in config.items() if k not in skip}


def check_output_dir(output_dir: Path, config: dict, *, overwrite: bool, resume: str) -> None:
    """Refuse an output_dir that holds another run unless --overwrite or --resume says otherwise."""
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise ConfigError(f"output_dir ({output_dir}) exists and is not a directory")
    if overwrite or not any(output_dir.iterdir()):
        return
    record = output_dir / RUN_CONFIG
    if not record.is_file():
        raise ConfigError(f"output_dir ({output_dir}) is not empty and holds no {RUN_CONFIG}: it is not one of "
                          "our runs; choose another directory or pass --overwrite")
    previous = json.loads(record.read_text())
    if resume:
        if comparable(previous) != comparable(config):
            diff = sorted(k for k in set(comparable(previous)) | set(comparable(config))
                          if comparable(previous).get(k) != comparable(config).get(k))
            raise ConfigError(f"--resume: output_dir ({output_dir}) holds a run with different options "
                              f"({', '.join(diff)}); resume with the same options or use another directory")
        return
    raise ConfigError(f"output_dir ({output_dir}) already holds a run; pass --resume latest to continue it or "
                      "--overwrite to replace it")


def prepare_output_dir(output_dir: Path, config: dict, *, overwrite: bool) -> None:
    """Rank 0, after the checks: clear on --overwrite, then record the run's config atomically."""
    if overwrite and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / RUN_CONFIG, json.dumps(config, indent=1, default=str))
