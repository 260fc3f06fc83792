"""Process-group start-up for every launcher: deepspeed, torchrun, mpirun, srun and plain python.

The deepspeed launcher and torchrun export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT.
Under mpirun (no such variables, but MPI's own) rank and world come from mpi4py and rank 0
broadcasts its address and a free port. Inside an ``srun`` step rank and world come from
SLURM_PROCID/SLURM_NTASKS. A plain ``python`` run becomes a world of one.
The backend (``--dist_backend auto``) is mixed with CUDA, ``cpu:gloo,cuda:nccl``: NCCL moves GPU
tensors and gloo serves the host-side values (stop flags, object collectives) without a trip
through the GPU; gloo alone otherwise (DeepSpeed's CPU accelerator). Whatever the backend, the
project's collectives place their tensors where it serves them (collectives.py).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from adamole_dist.config.training import BACKENDS

REQUIRED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MPI_ENV = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MPI_LOCALRANKID")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launcher(env: dict | None = None) -> str:
    """deepspeed/torchrun (they export RANK...), mpi (mpirun/mpiexec), slurm (inside an srun step),
    or python (a single process)."""
    env = os.environ if env is None else env
    if all(k in env for k in REQUIRED_ENV):
        return "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
    if any(k in env for k in MPI_ENV):
        return "mpi"
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    return "python"


def _slurm_env() -> None:
    """One srun task per process: rank and world from SLURM; the address and port must be exported
    by the job script (launch/slurm/train.sbatch derives them from the allocation)."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing and int(os.environ["SLURM_NTASKS"]) > 1:
        raise RuntimeError(f"srun launch: export {' and '.join(missing)} in the job script "
                           "(see launch/slurm/train.sbatch)")
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _mpi_discovery() -> None:
    """Fill the torch.distributed environment from MPI (mpi4py)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    addr_port = None
    if rank == 0:
        host = socket.gethostname()
        try:
            addr = socket.gethostbyname(host)
        except OSError:
            addr = "127.0.0.1"
        addr_port = (addr if size > 1 else "127.0.0.1", free_port())
    addr, port = comm.bcast(addr_port, root=0)
    hosts = comm.allgather(MPI.Get_processor_name())
    local_rank = hosts[:rank].count(hosts[rank])
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=addr, MASTER_PORT=str(port))


def resolve_backend(backend: str, cuda: bool) -> str:
    """'auto' -> mixed gloo/NCCL with CUDA, gloo without; explicit choices pass through."""
    if backend not in BACKENDS:
        raise ValueError(f"dist_backend ({backend!r}) must be one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cpu:gloo,cuda:nccl" if cuda else "gloo"
    return backend


def init_distributed(timeout_s: float = 600.0, backend: str = "auto") -> DistInfo:
    """Start torch.distributed (through DeepSpeed's comm layer) for whichever launcher ran us."""
    import deepspeed

    launcher = detect_launcher()
    if launcher == "mpi":
        _mpi_discovery()
    elif launcher == "slurm":
        _slurm_env()
    elif launcher == "python":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    backend = resolve_backend(backend, torch.cuda.is_available())
    if torch.cuda.is_available():  # before the process group: NCCL binds to the current device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    # Also when torch.distributed is already up (a test harness, an embedding program): DeepSpeed's
    # comm layer then wraps the existing group, and its config checks read the world size from it.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    atexit.register(release_shm_buffer)
    return DistInfo(
        rank=torch.distributed.get_rank(),
        world_size=torch.distributed.get_world_size(),
        local_rank=int(os.environ["LOCAL_RANK"]),
    )


def shm_buffer_path(env: dict | None = None) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for this rank when every rank is
    local (the deepspeed launcher exports LOCAL_SIZE); DeepSpeed 0.19 never unlinks it."""
    env = os.environ if env is None else env
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}"
    return Path("/dev/shm") / f"{name}_{env.get('RANK', '0')}"


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory buffer (about 64 MB each) at exit. The peers mapped
    it when they started, and a mapping outlives the name; left behind, every launch leaks one per
    rank into /dev/shm, i.e. into RAM, until the machine runs out."""
    with contextlib.suppress(OSError):
        shm_buffer_path().unlink(missing_ok=True)


def shutdown_distributed() -> None:
    """Tear the process group down before exit, so no gloo/NCCL thread outlives the interpreter."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_for(dist_info: DistInfo) -> torch.device:
    return torch.device("cuda", dist_info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
