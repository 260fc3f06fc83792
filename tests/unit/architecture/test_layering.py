"""The folders are floors, and the tensor names follow one glossary.

LAYERS states, for every folder of adamole_dist/ (and each module at its top), what of the project
it may import; a floor may import only floors listed before it, so the order has no cycle. moe/
(tensor maths) also never touches torch.distributed or deepspeed, so routing, capacity and the
experts run and test in one process. Every shape suffix in adamole_dist/ uses letters of
glossary.py."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from adamole_dist.glossary import LETTERS

PACKAGE = Path(__file__).resolve().parents[3] / "adamole_dist"
# Bottom floor first. Each entry: the floors below it that it may import (itself always allowed).
LAYERS: dict[str, set[str]] = {
    # ground floor: nothing of the project
    "glossary": set(),
    "atomic_files": set(),
    "local_host": set(),
    "model_kwargs": set(),
    "progress": set(),  # bars on a terminal, decided once per process
    "config": set(),
    # tensor maths, the base model, the process runtime, a run's files, data: each on the ground floor only
    "moe": {"config", "glossary"},
    "base_model": {"config", "local_host", "progress"},
    "runtime": {"config", "atomic_files"},
    "run_files": {"config", "atomic_files", "local_host"},
    "data": {"config", "glossary", "atomic_files", "local_host", "model_kwargs", "progress"},
    # across ranks: collectives, groups, dispatchers
    "parallel": {"config", "glossary", "moe"},
    # the adapter on a model
    "adapters": {"config", "glossary", "atomic_files", "model_kwargs", "moe", "base_model", "parallel"},
    # generation with an adapted model; evaluation outside training (accuracy, lm-evaluation-harness)
    "generation": {"config", "glossary", "moe", "base_model", "data", "adapters"},
    "evaluation": {"config", "glossary", "atomic_files", "progress", "moe", "base_model", "data", "adapters",
                   "generation"},
    # the OpenAI-compatible server (adamole-serve): generation behind HTTP
    "serving": {"config", "glossary", "atomic_files", "local_host", "model_kwargs", "moe", "base_model", "run_files",
                "data", "adapters", "generation", "evaluation"},
    # the placement cost model: read by run assembly and the benchmarks only
    "costmodel": {"config", "glossary", "moe", "parallel", "adapters"},
    # the memory planner (adamole-plan, train --plan): formulas over a model's config
    "planning": {"config", "base_model"},
    # training: assembly, the step, the loop, checkpoints
    "train": {"config", "glossary", "atomic_files", "local_host", "model_kwargs", "progress", "moe", "base_model",
              "runtime", "run_files", "data", "parallel", "adapters", "generation", "evaluation", "costmodel",
              "planning"},
    # the command-line entry points (console scripts, python -m, launch/*.py): the top floor
    "cli": {"config", "glossary", "atomic_files", "local_host", "model_kwargs", "progress", "moe", "base_model",
            "runtime", "run_files", "data", "parallel", "adapters", "generation", "evaluation", "serving", "costmodel",
            "planning", "train"},
    # the package's public names
    "__init__": {"config", "adapters"},
}
# A floor that only some modules above it may import.
ONLY_IMPORTED_BY = {"costmodel": {"train/assembly.py"}}
FORBIDDEN_ANYWHERE_IN = {"moe": ("torch.distributed", "deepspeed")}


def floor_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_modules(source: str) -> list[str]:
    """Every module an ``import`` names, at any depth (function-level imports included)."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.append("." * node.level + (node.module or ""))
            else:
                names.append(node.module or "")
                names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def violations(folder: str) -> dict[str, list[str]]:
    """Imports of ``folder`` (a floor of LAYERS) that its floor does not allow, per module."""
    found = {}
    paths = sorted((PACKAGE / folder).rglob("*.py")) if (PACKAGE / folder).is_dir() else [PACKAGE / f"{folder}.py"]
    for path in paths:
        bad, rel = [], str(path.relative_to(PACKAGE))
        for mod in imported_modules(path.read_text()):
            if mod.startswith("."):
                bad.append(f"{mod} (relative: use adamole_dist.<folder>)")
            elif mod.startswith("adamole_dist."):
                top = mod.split(".")[1]
                allowed = top == folder or top in LAYERS[folder] and rel in ONLY_IMPORTED_BY.get(top, {rel})
                if not allowed:
                    bad.append(mod)
            elif mod == "adamole_dist":
                bad.append(mod)
            elif any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN_ANYWHERE_IN.get(folder, ())):
                bad.append(mod)
        if bad:
            found[rel] = bad
    return found


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_folder_imports_only_its_floors(folder):
    assert (PACKAGE / folder).is_dir() and list((PACKAGE / folder).glob("*.py")) or (PACKAGE / f"{folder}.py").is_file()
    assert violations(folder) == {}


def test_every_module_has_a_floor_and_floors_only_look_down():
    assert {floor_of(p) for p in PACKAGE.rglob("*.py")} == set(LAYERS)
    order = list(LAYERS)
    for folder, below in LAYERS.items():
        assert all(order.index(b) < order.index(folder) for b in below), folder


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at any depth (function-level imports included). ``from
    P import name`` is an edge to the submodule P.name where that is a module, else to P."""
    paths = {module_name(p, package): p for p in package.rglob("*.py") if "harness_tasks" not in p.parts}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for mod, path in paths.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                           for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in paths and t != mod}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_import_circle_among_the_modules():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and graph["adamole_dist.data.run_data"] >= {"adamole_dist.data.token_cache"}
    assert import_circles(graph) == []


def test_the_circle_scan_finds_a_circle_through_a_function_level_import(tmp_path):
    fake = tmp_path / "adamole_dist"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "tasks.py").write_text("def build():\n    from adamole_dist.data.sft_task import SFTTask\n")
    (fake / "data" / "sft_task.py").write_text("from adamole_dist.data.tasks import IGNORE, Task\n")
    (fake / "data" / "batching.py").write_text("from adamole_dist.data import tasks\n")
    graph = import_graph(fake)
    assert graph["adamole_dist.data.batching"] == {"adamole_dist.data.tasks"}
    assert import_circles(graph) == [["adamole_dist.data.sft_task", "adamole_dist.data.tasks"]]
    assert import_circles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]


def test_the_scans_catch_a_forbidden_import_and_an_unknown_letter(tmp_path, monkeypatch):
    fake = tmp_path / "adamole_dist"
    (fake / "moe").mkdir(parents=True)
    (fake / "moe" / "routing.py").write_text(
        "import torch\nfrom adamole_dist.config.adapter import AdapterConfig\n"
        "def f():\n    import torch.distributed as dist\n    from adamole_dist.parallel import collectives\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations("moe") == {"moe/routing.py": ["torch.distributed", "adamole_dist.parallel",
                                                    "adamole_dist.parallel.collectives"]}
    (fake / "train").mkdir()
    for name in ("assembly.py", "loop.py"):  # the cost model: assembly may read it, the loop may not
        (fake / "train" / name).write_text("def f():\n    from adamole_dist.costmodel.placement import Workload\n")
    assert violations("train") == {"train/loop.py": ["adamole_dist.costmodel.placement",
                                                     "adamole_dist.costmodel.placement.Workload"]}
    (fake / "moe" / "permute.py").write_text("rows_SZ = w_T1N = mask_TN = lora_B = 0\n")
    assert suffix_letters_outside_glossary() == {"moe/permute.py": {"rows_SZ:Z", "w_T1N:1"}}


SUFFIXED = re.compile(r"\b(?:[a-z][a-z0-9]*_)+([A-Z][A-Z0-9]*)\b|\b[A-Z]_([A-Z][A-Z0-9]*)\b")
NOT_SHAPES = {"lora_A", "lora_B", "step_N",  # parameter names, and a path pattern in a message
              "O_RDONLY", "O_RDWR", "O_CREAT"}  # os.open flags


def suffix_letters_outside_glossary() -> dict[str, set[str]]:
    unknown: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for m in SUFFIXED.finditer(path.read_text()):
            if m.group(0) in NOT_SHAPES or m.group(0).isupper() and m.group(0).count("_") > 1:
                continue
            suffix = m.group(1) or m.group(2)
            bad = {c for c in suffix if c not in LETTERS} | ({"1"} if "1" in suffix[:-1] else set())
            if bad:
                unknown.setdefault(str(path.relative_to(PACKAGE)), set()).update(f"{m.group(0)}:{c}" for c in bad)
    return unknown


def test_every_shape_suffix_uses_glossary_letters():
    assert suffix_letters_outside_glossary() == {}


def test_glossary_letters_are_single_and_distinct():
    assert all(len(k) == 1 for k in LETTERS) and len(set(LETTERS.values())) == len(LETTERS)
