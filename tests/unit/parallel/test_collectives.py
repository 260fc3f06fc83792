"""One home for collectives (adamole_dist/parallel/collectives.py and all_to_all.py): no other module of
the project calls a torch.distributed collective, and tensors go to the device the process group's backend serves
(CUDA under NCCL alone, where a CPU tensor raises 'No backend type associated with device type cpu').

CI has no GPU: the device rule is pinned here as a pure function, and on a real one-process
group whose only backend serves CUDA (gloo registered for cuda stands in for NCCL)."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adamole_dist.parallel import all_to_all, collectives
from adamole_dist.parallel.collectives import COLLECTIVE_OPS, parse_backend_config, placement

REPO = Path(__file__).resolve().parents[3]
SCANNED = ["adamole_dist", "launch", "benchmarks"]
HOMES = tuple(REPO / "adamole_dist" / "parallel" / name for name in ("collectives.py", "all_to_all.py"))
DIST_MODULES = ("torch.distributed", "deepspeed.comm")


def direct_collectives(source: str) -> list[str]:
    """'line: call' for every torch.distributed / deepspeed.comm collective called in ``source``."""
    tree = ast.parse(source)
    aliases: set[str] = set()  # names bound to a distributed module
    direct: set[str] = set()  # collectives imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in DIST_MODULES and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in DIST_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in DIST_MODULES and a.name in COLLECTIVE_OPS:
                    direct.add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in direct:
            found.append(f"{node.lineno}: {f.id}")
        elif isinstance(f, ast.Attribute) and f.attr in COLLECTIVE_OPS:
            base = ast.unparse(f.value)
            if base in aliases or base in DIST_MODULES:
                found.append(f"{node.lineno}: {base}.{f.attr}")
    return found


def test_the_scanner_sees_every_spelling():
    src = textwrap.dedent("""
        import torch
        import torch.distributed as dist
        from torch import distributed as d2
        from torch.distributed import all_gather_object as ago
        import deepspeed.comm as dscomm
        dist.all_reduce(t)
        d2.barrier()
        torch.distributed.broadcast_object_list(x, src=0)
        ago(out, obj)
        dscomm.all_to_all_single(a, b)
        dist.get_rank()
        dist.TCPStore("h", 1)
    """)
    assert [c.split(": ")[1] for c in direct_collectives(src)] == [
        "dist.all_reduce", "d2.barrier", "torch.distributed.broadcast_object_list", "ago", "dscomm.all_to_all_single"]


def test_no_module_but_collectives_py_calls_a_collective():
    offenders = {}
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if path in HOMES:
                continue
            found = direct_collectives(path.read_text())
            if found:
                offenders[str(path.relative_to(REPO))] = found
    assert not offenders, f"collectives outside adamole_dist/parallel/collectives.py and all_to_all.py: {offenders}"
    for home in HOMES:
        assert direct_collectives(home.read_text()), f"{home.name} itself must be scanned and found"


@pytest.mark.parametrize("config, served", [
    ("gloo", {"cpu", "cuda"}),
    ("nccl", {"cuda"}),
    ("cuda:nccl", {"cuda"}),
    ("cpu:gloo,cuda:nccl", {"cpu", "cuda"}),
    ("cpu:gloo,cuda:gloo", {"cpu", "cuda"}),
])
def test_backend_configs(config, served):
    assert parse_backend_config(config) == served


CUDA0 = torch.device("cuda", 0)


@pytest.mark.parametrize("config, tensor_device, expected", [
    ("nccl", "cpu", CUDA0),  # the crash this module exists to prevent: flags built on the CPU
    ("nccl", "cuda:0", CUDA0),
    ("gloo", "cpu", torch.device("cpu")),
    ("gloo", "cuda:0", CUDA0),  # gloo also takes CUDA tensors (no copy)
    ("cpu:gloo,cuda:nccl", "cpu", torch.device("cpu")),  # host values stay on the host under mixed
    ("cpu:gloo,cuda:nccl", "cuda:0", CUDA0),  # activations stay on the GPU (NCCL)
])
def test_placement_per_backend(config, tensor_device, expected):
    assert placement(torch.device(tensor_device), parse_backend_config(config), cuda_device=CUDA0) == expected


def test_placement_with_no_usable_device_names_it():
    with pytest.raises(RuntimeError, match="serves only"):
        placement(torch.device("cpu"), frozenset({"xpu"}))


def test_single_process_collectives_are_identities():
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert collectives.sum_over_ranks([1, 2.5]) == [1.0, 2.5]
    assert collectives.broadcast_object({"a": 1}) == {"a": 1}
    assert collectives.all_gather_objects(3) == [3]
    collectives.barrier()


CUDA_ONLY_GROUP = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"])
dist.init_process_group("cuda:gloo", rank=0, world_size=1)   # a group whose only backend serves CUDA
from adamole_dist.parallel import collectives
try:
    dist.all_reduce(torch.ones(1))
    print("direct: ok")
except RuntimeError as e:
    print("direct:", e)
print("served:", sorted(collectives.served_device_types()))
print("comm_device:", collectives.comm_device().type)
try:
    print("staged:", collectives.on_served_device(torch.ones(1), None).device)  # what every collective does first
except (RuntimeError, AssertionError) as e:
    print("staged:", e)
dist.destroy_process_group()
"""


def test_cpu_tensors_are_moved_off_the_cpu_under_a_cuda_only_backend():
    from tests.helpers.launch_utils import free_port

    proc = subprocess.run([sys.executable, "-c", CUDA_ONLY_GROUP], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**__import__("os").environ, "PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "direct: No backend type associated with device type cpu" in out  # what the trainer used to do
    assert "served: ['cuda']" in out
    assert "comm_device: cuda" in out  # where the trainer's flags and counts now go
    if not torch.cuda.is_available():  # the CPU tensor was sent to CUDA rather than to the missing CPU backend
        assert "staged: Torch not compiled with CUDA enabled" in out or "staged: No CUDA GPUs" in out, out
    else:
        assert "staged: cuda" in out


def a2a_worker(rank, world):
    """Uneven splits (some empty), equal splits, a subgroup, and two exchanges in flight at once."""
    # rank r sends (r + j) % 3 rows to rank j, row values 100 r + j
    in_splits = [(rank + j) % 3 for j in range(world)]
    out_splits = [(j + rank) % 3 for j in range(world)]
    inp = torch.cat([torch.full((n, 2), 100.0 * rank + j) for j, n in enumerate(in_splits)])
    out = torch.empty(sum(out_splits), 2)
    all_to_all.all_to_all_single(out, inp, out_splits, in_splits)
    expected = torch.cat([torch.full((n, 2), 100.0 * j + rank) for j, n in enumerate(out_splits)])
    assert torch.equal(out, expected), (rank, out, expected)

    eq = torch.arange(world, dtype=torch.float32) + 10 * rank  # one element to each rank
    got = torch.empty(world)
    all_to_all.all_to_all_single(got, eq)
    assert got.tolist() == [10.0 * j + rank for j in range(world)]

    evens = collectives.new_group([0, 2])
    if rank in (0, 2):
        mine = torch.tensor([rank + 0.5, rank + 0.25])
        theirs = torch.empty(2)
        all_to_all.all_to_all_single(theirs, mine, group=evens)
        assert theirs.tolist() == [0.5, 2.5] if rank == 0 else [0.25, 2.25]

    first = all_to_all.start_all_to_all(inp, out_splits, in_splits)
    second = all_to_all.start_all_to_all(inp * 2, out_splits, in_splits)
    assert torch.equal(second.wait(), expected * 2) and torch.equal(first.wait(), expected)


@pytest.mark.slow
def test_gloo_all_to_all_delivers_every_row_across_four_ranks():
    from tests.helpers.mp_harness import run_ranks

    run_ranks(a2a_worker, 4, timeout=180)


def test_gloo_all_to_all_posts_every_receive_before_any_send(monkeypatch):
    calls = []
    monkeypatch.setattr(all_to_all, "world_size", lambda group=None: 4)
    monkeypatch.setattr(all_to_all, "rank", lambda group=None: 1)
    monkeypatch.setattr(collectives.dist, "irecv",
                        lambda t, group=None, group_src=None: calls.append(("recv", group_src)))
    monkeypatch.setattr(collectives.dist, "isend",
                        lambda t, group=None, group_dst=None: calls.append(("send", group_dst)))
    inp = torch.arange(6.0).unsqueeze(1)  # rows for ranks 0, 1, 2, 3: 2, 1, 3, 0
    out = torch.zeros(5, 1)  # rows from ranks 0, 1, 2, 3: 1, 1, 0, 3
    all_to_all._receives_first(out, inp, out_splits=[1, 1, 0, 3], in_splits=[2, 1, 3, 0], group=None)
    # rank 1's peers in turn 2, 3, 0: receives from 3 and 0 (2 sends nothing), then sends to 2 and 0
    assert calls == [("recv", 3), ("recv", 0), ("send", 2), ("send", 0)]
    assert out[1].item() == 2.0  # its own row copied, never sent


def test_an_all_to_all_in_flight_lets_go_of_its_rows_once_landed():
    """The overlap path's handle sits in an autograd context beside the tensor it returns; holding
    on to that tensor closed a cycle through the graph's C++ nodes that the garbage collector cannot
    see, and every step's received rows leaked (250 MB a second in the dispatch benchmark)."""
    import gc
    import weakref

    x = torch.randn(6, 4, requires_grad=True)
    exchange = all_to_all.Exchange()
    flight = exchange.launch(x, [6], [6])
    rows = exchange.land(flight)
    (2 * rows).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    landed = weakref.ref(rows)
    del rows, flight
    gc.collect()
    assert landed() is None
