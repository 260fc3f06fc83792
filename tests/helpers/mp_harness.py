"""Run a function in real processes joined by a gloo process group, with a time bound."""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from tests.helpers.launch_utils import free_port


def _entry(fn, rank, world, port, args, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        raise


def run_ranks(fn, world: int, *args, timeout: float = 240.0) -> None:
    """fn(rank, world, *args) in ``world`` spawned processes; fails on error or after ``timeout`` s."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    problems = []
    while not errors.empty():
        rank, tb = errors.get()
        problems.append(f"rank {rank}:\n{tb}")
    assert not hung, f"ranks {hung} still running after {timeout} s (hang)\n" + "\n".join(problems)
    bad = [r for r, p in enumerate(procs) if p.exitcode != 0]
    assert not bad, f"ranks {bad} failed\n" + "\n".join(problems)
