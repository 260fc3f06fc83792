"""Training checkpoints: DeepSpeed engine state + expert banks + trainer state + RNG, atomically.

Layout of ``<output_dir>/checkpoints/step_0000100/``:
    DeepSpeed's files (engine module/optimizer/scheduler, frozen base excluded)
    engine_state.safetensors    the same trainable state world-independent (engine_state.py), for a
                                resume at another world size (ZeRO-3)
    experts_ep<k>.safetensors   expert params and AdamW moments keyed by global expert id
    trainer_state.json          step, data position, config
    balance_bias.safetensors    aux-loss-free balancing biases (when enabled)
    rng_rank<r>.pt              each rank's RNG states (dropout, data order); a rank the writing run
                                did not have takes rank 0's
    manifest.json               every other file of the checkpoint, the expert layers and count
Everything is written under a hidden temporary tag and renamed into place by rank 0 once every
rank reports its part written; ``latest`` is replaced atomically last. A part that cannot be
written (disk full) is reported by every rank together (CheckpointWriteError, exit 74): the
temporary tag is removed at once, not left to the next save. A crash mid-save leaves the previous
checkpoint and ``latest`` untouched. Re-saving an existing tag moves the old copy aside
(``.replaced_step_N``) before the new one is renamed in, and deletes it only after: a crash in
between leaves a complete copy, which ``resolve_latest`` finds (and the next save restores).
Before loading, rank 0 checks that every file of the checkpoint reads (``check_readable``) and
that nothing is missing (``check_complete``: every file the manifest names, every expert of every
layer), so a damaged or incomplete checkpoint is named, with the newest other complete checkpoint,
instead of failing inside a collective load.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adamole_dist.adapters.handle import Adapters
from adamole_dist.atomic_files import write_text_atomically
from adamole_dist.config.training import STATE_FILE
from adamole_dist.moe.experts import EXPERT_KEY_RE, EXPERT_TENSORS, expert_key, file_orientation
from adamole_dist.parallel import collectives
from adamole_dist.runtime.stopping import CheckpointWriteError
from adamole_dist.train.engine_state import (
    ENGINE_FILE,
    engine_state,
    load_engine_state,
    set_engine_step,
    supports_engine_state,
)
from adamole_dist.train.expert_optimizer import ExpertOptimizer

LATEST = "latest"
BIAS_FILE = "balance_bias.safetensors"
MANIFEST = "manifest.json"
TAG_RE = re.compile(r"^step_(\d+)$")
REPLACED = ".replaced_"  # prefix of a tag moved aside while its re-save is renamed in


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def expert_state(adapters: Adapters, opt: ExpertOptimizer) -> dict[str, torch.Tensor]:
    """Expert params and their AdamW state, one entry per global expert id (moe/experts.py: expert_key,
    file orientation)."""
    out: dict[str, torch.Tensor] = {}
    state = opt.optimizer.state if opt.optimizer is not None else {}
    for name, bank in adapters.expert_banks.items():
        for tensor in EXPERT_TENSORS:
            p = getattr(bank, tensor)
            moments = state.get(p, {})
            for i, gid in enumerate(bank.expert_ids):
                key = expert_key(name, gid, tensor)
                out[key] = file_orientation(tensor, p[i].detach()).cpu().contiguous()
                for m in ("exp_avg", "exp_avg_sq"):
                    if m in moments:
                        out[f"{key}.{m}"] = file_orientation(tensor, moments[m][i].detach()).cpu().contiguous()
                if "step" in moments:
                    out[f"{key}.step"] = torch.as_tensor(moments["step"], dtype=torch.float64).reshape(1).cpu()
    return out


def load_expert_state(adapters: Adapters, opt: ExpertOptimizer, tensors: dict[str, torch.Tensor]) -> bool:
    """Load this rank's experts by global id; returns whether optimizer moments were restored."""
    restored = True

    def rows(keys: list[str], tensor: str, suffix: str = "") -> torch.Tensor:
        return torch.stack([file_orientation(tensor, tensors[k + suffix]) for k in keys])

    with torch.no_grad():
        for name, bank in adapters.expert_banks.items():
            for tensor in EXPERT_TENSORS:
                p = getattr(bank, tensor)
                keys = [expert_key(name, gid, tensor) for gid in bank.expert_ids]
                missing = [k for k in keys if k not in tensors]
                if missing:
                    raise KeyError(f"checkpoint lacks expert tensors, e.g. {missing[0]!r}")
                p.copy_(rows(keys, tensor))
                if opt.optimizer is None:
                    continue
                if all(f"{k}.exp_avg" in tensors for k in keys):
                    opt.optimizer.state[p] = {
                        "step": torch.tensor(float(tensors[f"{keys[0]}.step"].item())),
                        "exp_avg": rows(keys, tensor, ".exp_avg").to(p.device, p.dtype),
                        "exp_avg_sq": rows(keys, tensor, ".exp_avg_sq").to(p.device, p.dtype),
                    }
                else:
                    restored = False
    return restored


# Shards written since lora_B is stored in file orientation (O x R) say so; older shards (no
# metadata) kept the bank's rows (R x O) and are turned on reading, so their runs still resume.
EXPERT_SHARD_METADATA = {"lora_B": "out_x_rank"}


def read_expert_shards(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every EP shard's expert tensors of a checkpoint, in file orientation."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt).glob("experts_ep*.safetensors")):
        with safe_open(str(f), framework="pt") as shard:
            legacy = (shard.metadata() or {}).get("lora_B") != EXPERT_SHARD_METADATA["lora_B"]
            for key in shard.keys():
                t = shard.get_tensor(key)
                if legacy and ".lora_B" in key and not key.endswith(".step"):  # bank rows -> file orientation
                    t = file_orientation("lora_B", t).contiguous()
                tensors[key] = t
    return tensors


def balance_biases(adapters: Adapters) -> dict[str, torch.Tensor]:
    """Aux-loss-free balancing biases (identical on every rank)."""
    return {f"{name}.router.selection_bias": r.selection_bias.detach().cpu().clone()
            for name, r in adapters.routers().items() if r.selection_bias is not None}


def load_balance_biases(adapters: Adapters, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, r in adapters.routers().items():
            if r.selection_bias is not None:
                r.selection_bias.copy_(tensors[f"{name}.router.selection_bias"])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_latest(root: Path, tag: str) -> None:
    write_text_atomically(root / LATEST, tag)


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def is_complete(ckpt: Path) -> bool:
    """Renamed into place only when every rank had written its part; the trainer state is rank 0's."""
    return (Path(ckpt) / STATE_FILE).is_file()


def step_of(ckpt: Path) -> int:
    return int(Path(ckpt).name.removeprefix(REPLACED).split("_")[1])


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first, including a copy moved aside by an interrupted re-save."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name.removeprefix(REPLACED))
             and is_complete(p)]
    return sorted(found, key=lambda p: (step_of(p), not p.name.startswith(REPLACED)))


def resolve_latest(root: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume from, a note when it is not the one ``latest`` names)."""
    pointer = root / LATEST
    named = root / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and is_complete(named):
        return named, None
    complete = complete_checkpoints(root)
    if not complete:
        if named is not None:
            raise FileNotFoundError(f"{pointer} names {named.name}, which is missing or incomplete, and {root} "
                                    "holds no complete checkpoint")
        return None, None
    chosen = complete[-1]
    why = f"'latest' names {named.name}, which is missing or incomplete" if named is not None else \
        "there is no 'latest' pointer"
    return chosen, f"{why}; using the newest complete checkpoint, {chosen}"


def check_readable(ckpt: Path) -> str | None:
    """None if every file of the checkpoint reads, else 'file: error' for the first that does not."""
    for f in sorted(Path(ckpt).rglob("*")):
        if not f.is_file():
            continue
        try:
            if f.suffix == ".pt":
                torch.load(f, map_location="cpu", weights_only=False, mmap=True)
            elif f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix == ".json":
                json.loads(f.read_text())
        except Exception as e:  # torch/safetensors/json raise many types for a damaged file
            return f"{f}: {type(e).__name__}: {str(e).strip()[:200]}"
    return None


def check_complete(ckpt: Path) -> str | None:
    """None if nothing is missing, else what is: a file the manifest names, or an expert of a layer.
    A checkpoint from before manifests is checked against the layers and experts its shards hold."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text()) if (ckpt / MANIFEST).is_file() else {}
    except (OSError, ValueError) as e:
        return f"{ckpt / MANIFEST} does not read ({type(e).__name__})"
    missing = [f for f in manifest.get("files", []) if not (ckpt / f).is_file()]
    if missing:
        more = f", and {len(missing) - 1} more files," if len(missing) > 1 else ""
        return f"{ckpt / missing[0]}{more} is missing (named in its {MANIFEST})"
    keys: set[str] = set()
    for f in ckpt.glob("experts_ep*.safetensors"):
        try:
            with safe_open(str(f), framework="pt") as shard:
                keys.update(shard.keys())
        except Exception as e:  # a damaged header (check_readable names it in detail)
            return f"{f} does not read ({type(e).__name__})"
    found = [m for m in map(EXPERT_KEY_RE.match, keys) if m]
    layers = manifest.get("expert_layers") or sorted({m["layer"] for m in found})
    total = manifest.get("num_experts") or max((int(m["gid"]) + 1 for m in found), default=0)
    for layer in layers:
        for gid in range(total):
            for tensor in EXPERT_TENSORS:
                if expert_key(layer, gid, tensor) not in keys:
                    return f"expert {gid} of {layer} ({tensor}) is in none of its experts_ep*.safetensors"
    return None


def write_manifest(tmp_dir: Path, adapters: Adapters, trainer_state: dict) -> None:
    """Rank 0, after every rank wrote its part: what ``check_complete`` later expects to find."""
    files = sorted(p.relative_to(tmp_dir).as_posix() for p in tmp_dir.rglob("*") if p.is_file())
    total = trainer_state.get("config", {}).get("adapter", {}).get("num_experts")
    record = {"files": files, "expert_layers": sorted(adapters.expert_banks), "num_experts": total}
    (tmp_dir / MANIFEST).write_text(json.dumps(record, indent=1))



def save_checkpoint(
    root: Path,
    step: int,
    engine,
    adapters: Adapters,
    expert_opt: ExpertOptimizer,
    trainer_state: dict,
    *,
    rank: int,
    expert_writer: bool,
    expert_shard: int,
    keep: int,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint directory. CheckpointWriteError on
    every rank when any rank could not write its part (disk full, quota): the partial folder removed,
    the previous checkpoint and ``latest`` untouched."""
    root = Path(root)
    tag = tag_for(step)
    tmp_dir = root / f".tmp_{tag}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left by a save that crashed
            shutil.rmtree(stale, ignore_errors=True)
        restore_replaced(root)
    collectives.barrier()
    # the engine's trainable state, world-independent (engine_state.py): gathered by every rank (a collective,
    # outside the per-rank writes that may fail), written by rank 0
    consolidated = engine_state(engine, adapters.engine_parameters()) if supports_engine_state(engine) else None
    failed = write_failure(lambda: write_parts(tmp_dir, engine, adapters, expert_opt, trainer_state, rank=rank,
                                               expert_writer=expert_writer, expert_shard=expert_shard,
                                               consolidated=consolidated))
    failures = [f for f in collectives.all_gather_objects(failed) if f]  # every rank learns whether all wrote
    if not failures:  # rank 0 lists what every rank wrote; its verdict reaches everyone
        listed = write_failure(lambda: write_manifest(tmp_dir, adapters, trainer_state)) if rank == 0 else None
        failures = [f for f in [collectives.broadcast_object(listed)] if f]
    if failures:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        collectives.barrier()
        raise CheckpointWriteError(write_error_message(root, step, failures[0]))
    final = root / tag
    if rank == 0:
        put_in_place(root, tag, tmp_dir, keep)
    collectives.barrier()
    return final


def write_parts(tmp_dir: Path, engine, adapters: Adapters, expert_opt: ExpertOptimizer, trainer_state: dict, *,
                rank: int, expert_writer: bool, expert_shard: int, consolidated: dict | None) -> None:
    """This rank's files of the checkpoint, into the temporary tag: DeepSpeed's own (frozen base excluded),
    the consolidated engine state (rank 0), the experts, the RNG states, the trainer state."""
    engine.save_checkpoint(str(tmp_dir.parent), tag=tmp_dir.name, client_state={}, save_latest=False,
                           exclude_frozen_parameters=True)
    if consolidated is not None and rank == 0:
        save_file(consolidated, str(tmp_dir / ENGINE_FILE))
    if expert_writer and adapters.expert_banks:
        save_file(expert_state(adapters, expert_opt), str(tmp_dir / f"experts_ep{expert_shard}.safetensors"),
                  metadata=EXPERT_SHARD_METADATA)
    torch.save(rng_state(), tmp_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        (tmp_dir / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))
        biases = balance_biases(adapters)
        if biases:
            save_file(biases, str(tmp_dir / BIAS_FILE))


def write_failure(write) -> str | None:
    """None when ``write()`` wrote its files, else what went wrong in one line. Every error counts: a full
    disk surfaces as OSError, safetensors' SafetensorError or torch's RuntimeError from its stream writer."""
    try:
        write()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def write_error_message(root: Path, step: int, failure: str) -> str:
    previous = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free on its filesystem"
    except OSError:
        free = ""
    return (f"the checkpoint of step {step} could not be written to {root} ({failure}{free}); its partial folder "
            "was removed and " + (f"the previous checkpoint, {root / previous}, and 'latest' are intact: free "
                                  "space, then --resume latest" if previous else
                                  "no earlier checkpoint exists: free space and start again"))


def put_in_place(root: Path, tag: str, tmp_dir: Path, keep: int) -> None:
    """Rank 0: rename the complete temporary tag into place, point ``latest`` at it, drop old ones."""
    final, aside = root / tag, root / f"{REPLACED}{tag}"
    if final.exists():  # a re-save: the old copy stays complete until the new one is in place
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp_dir, final)
    write_latest(root, tag)
    shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def restore_replaced(root: Path) -> None:
    """After a re-save that crashed between its renames: put the complete old copy back in place."""
    for aside in root.glob(f"{REPLACED}step_*"):
        final = root / aside.name.removeprefix(REPLACED)
        if not final.exists() and is_complete(aside):
            os.replace(aside, final)
        else:
            shutil.rmtree(aside, ignore_errors=True)


def owes_evaluation(ckpt: Path | None) -> bool:
    """The checkpoint was written by a stop during its step's evaluation (its state says
    "evaluation_owed"): the resumed run evaluates first. False for None (no checkpoint)."""
    if ckpt is None:
        return False
    return bool(json.loads((ckpt / STATE_FILE).read_text()).get("evaluation_owed"))


def load_checkpoint(ckpt: Path, engine, adapters: Adapters, expert_opt: ExpertOptimizer, *, rank: int,
                    world_size: int) -> dict:
    """Restore engine, experts, RNG; returns the trainer state saved with the checkpoint. At the world size
    that wrote it the engine loads DeepSpeed's own files, at another one the world-independent file
    (the assembly checked that the checkpoint has it)."""
    ckpt = Path(ckpt)
    state_file = ckpt / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{ckpt} is not a complete checkpoint (no {STATE_FILE})")
    trainer_state = json.loads(state_file.read_text())
    if trainer_state["world_size"] == world_size:
        load_path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt}")
    else:
        load_engine_state(engine, adapters.engine_parameters(), load_file(str(ckpt / ENGINE_FILE)))
        set_engine_step(engine, trainer_state["step"])
    if adapters.expert_banks:
        load_expert_state(adapters, expert_opt, read_expert_shards(ckpt))
    if (ckpt / BIAS_FILE).is_file():
        load_balance_biases(adapters, load_file(str(ckpt / BIAS_FILE)))
    expert_opt.set_step(trainer_state["step"])
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if not rng_file.is_file():  # a rank the writing run did not have
        rng_file = ckpt / "rng_rank0.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
