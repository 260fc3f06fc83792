"""Guarding the output directory: never mix two runs' files, never lose a run to a bad retry,
never half-write the run record.

``check_output_dir`` runs before anything is written (and before the model loads): it refuses a
directory that holds another run (unless --resume or --overwrite), a non-empty directory that is
not one of our runs (even with --overwrite: it could be a parent folder of several runs), a run
that also holds entries the trainer does not write (on --overwrite), a directory a live run holds
(ops/run_lock.py), and a place this process cannot write. ``prepare_output_dir`` runs once the new
run has validated and holds the lock; on --overwrite it moves the old run's entries aside, writes
the new run record, and only then deletes the old.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from adamole_dist.atomic_files import write_text_atomically
from adamole_dist.config.fields import ConfigError
from adamole_dist.config.training import TrainConfig
from adamole_dist.run_files.run_lock import LOCK_FILE, check_unlocked
from adamole_dist.run_files.writable import RUN_CONFIG, check_creatable_folder, enclosing_run

TRAIN_DATA = "train_data"  # run_config.json's record of the training split: {"file", "fingerprint"} (content hash)
# What the trainer (and launch/plot.py's default --out) writes into an output dir; --overwrite
# replaces a run only when it holds nothing else.
TRAINER_ENTRIES = {RUN_CONFIG, "metrics.jsonl", "final_metrics.json", "preempted.json", "checkpoints", "adapter",
                   "wandb", "tensorboard", "plots", LOCK_FILE}
REPLACED = ".replaced-"  # the old run's entries, moved aside while an --overwrite puts the new record in
TEMPORARY = re.compile(r"^\.(?P<name>.+?)\.(tmp|tmp-\d+|old-\d+)$")  # atomic_files.py's temporaries


def comparable(config: dict) -> dict:
    """The parts of a run's config that must match to continue it (not bookkeeping options)."""
    skip = {"resume", "overwrite", "output_dir", "max_steps", "epochs", "save_interval", "eval_interval",
            "log_interval", "progress", "report_to", "keep_checkpoints", "eval_at_start", "peer_timeout",
            "comm_timeout", "dist_backend", "debug", "allow_data_change", "elastic",
            TRAIN_DATA,  # compared on its own: changed_training_data
            "ep_size",  # experts reshard by global id, so a run may continue at another ep_size
            # the global batch they make with the world size is checked against the checkpoint instead
            # (train/elastic.py), which knows the world size that wrote it
            "micro_batch_size", "gradient_accumulation_steps"}
    return {k: v for k, v in config.items() if k not in skip}


def differing(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, nested ones named by their path (adapter.num_experts)."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differing(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def with_defaults(record: dict) -> dict:
    """A run record with the options it predates filled in with their defaults (what the older version
    did), so adding an option does not make earlier runs look different."""
    defaults = TrainConfig().to_dict()
    merged = {**defaults, **record}
    if isinstance(record.get("adapter"), dict):
        merged["adapter"] = {**defaults["adapter"], **record["adapter"]}
    return merged


def check_output_dir(output_dir: Path, config: dict, *, overwrite: bool, resume: str) -> None:
    """Refuse an output_dir that holds another run unless --overwrite or --resume says otherwise."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir ({output_dir}) exists and is not a directory")
    outer = enclosing_run(output_dir.resolve().parent)
    if outer is not None:  # a run inside a run: the outer run's --overwrite or a clean-up would take it along
        raise ConfigError(f"output_dir ({output_dir}) is inside the training run {outer}, whose folder holds only "
                          "that run's files; choose a folder outside it")
    check_creatable_folder(output_dir, "output_dir")
    if not output_dir.exists():
        return
    check_unlocked(output_dir)
    if not [p for p in output_dir.iterdir() if p.name != LOCK_FILE]:
        return
    record = output_dir / RUN_CONFIG
    if not record.is_file():
        raise ConfigError(f"output_dir ({output_dir}) is not empty and holds no {RUN_CONFIG}: it is not one of "
                          "our runs (--overwrite replaces only a run made by this trainer); choose another directory")
    if overwrite:
        # Refused rather than kept: files beside a run are usually about that run (notes, an export),
        # so a replaced run would leave them describing a run that is gone; the user decides.
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir()
                         if not is_trainer_entry(p.name))
        if foreign:
            raise ConfigError(f"--overwrite: output_dir ({output_dir}) also holds {', '.join(foreign)}, which this "
                              "trainer did not write (--overwrite deletes only a run's own files); move "
                              f"{'it' if len(foreign) == 1 else 'them'} out or choose another directory")
        return
    try:
        previous = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"output_dir ({output_dir}): {record} cannot be read ({e}); pass --overwrite to "
                          "replace that run") from None
    if resume:
        previous = with_defaults(previous)
        if comparable(previous) != comparable(config):
            diff = differing(comparable(previous), comparable(config))
            raise ConfigError(f"--resume: output_dir ({output_dir}) holds a run with different options "
                              f"({', '.join(diff)}); resume with the same options or use another directory")
        return
    raise ConfigError(f"output_dir ({output_dir}) already holds a run; pass --resume latest to continue it or "
                      "--overwrite to replace it")


def is_trainer_entry(name: str) -> bool:
    temporary = TEMPORARY.match(name)
    return (name in TRAINER_ENTRIES or name.startswith(REPLACED)
            or bool(temporary and temporary["name"] in TRAINER_ENTRIES))


def prepare_output_dir(output_dir: Path, config: dict, *, overwrite: bool) -> None:
    """Rank 0, once the new run has validated and holds the lock: replace the old run on --overwrite
    (its entries moved aside first, deleted after the new record is in place; the lock stays), then
    record the run's config atomically."""
    output_dir = Path(output_dir)
    old = None
    entries = [p for p in output_dir.iterdir() if p.name != LOCK_FILE] if output_dir.is_dir() else []
    if overwrite and entries:
        old = output_dir / f"{REPLACED}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        old.mkdir()
        for entry in entries:
            os.replace(entry, old / entry.name)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(output_dir / RUN_CONFIG, json.dumps(config, indent=1, default=str))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def changed_training_data(output_dir: Path, config: dict) -> str | None:
    """--resume: what changed in the training split since the run in ``output_dir`` started ("the training
    data FILE changed since ..."), None when its content hash is the one recorded (or either side
    records none: a run from before the record, a hub dataset). The data order is a seeded
    permutation of the split's records, so an edited file silently trains on another order."""
    try:
        before = json.loads((Path(output_dir) / RUN_CONFIG).read_text()).get(TRAIN_DATA)
    except (OSError, ValueError, AttributeError):
        return None
    now = config.get(TRAIN_DATA)
    if not isinstance(before, dict) or not now or before.get("fingerprint") == now["fingerprint"]:
        return None
    return (f"the training data {now['file']} changed since this run started (content hash "
            f"{str(before.get('fingerprint'))[:19]}... then, {now['fingerprint'][:19]}... now)")


def recorded_run(adapter_dir: Path) -> TrainConfig | None:
    """The options of the run that trained ``adapter_dir`` (the run_config.json of its output dir, beside
    it) as a TrainConfig: what the record lacks takes TrainConfig's defaults, keys this version does not
    know are ignored; None without a record. ConfigError for a record that is not JSON."""
    run_config = Path(adapter_dir).parent / RUN_CONFIG
    if not run_config.is_file():
        return None
    try:
        record = json.loads(run_config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{run_config} is not valid JSON ({e})") from None
    return TrainConfig.from_record(record, origin=str(run_config))
