"""The folders are layers, and the tensor names follow one glossary.

config/ imports nothing else from the project; moe/ (tensor maths) imports only config/ -- no
torch.distributed, no deepspeed, nothing from parallel/ -- so routing, capacity and the experts
run and test in one process; every shape suffix in adamole_dist/ uses letters of glossary.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from adamole_dist.glossary import LETTERS

PACKAGE = Path(__file__).resolve().parents[1] / "adamole_dist"
ALLOWED_PROJECT_IMPORTS = {"config": {"config"}, "moe": {"config", "moe", "glossary"}}
FORBIDDEN_ANYWHERE_IN = {"moe": ("torch.distributed", "deepspeed")}


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
    found = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        bad = []
        for mod in imported_modules(path.read_text()):
            if mod.startswith("."):
                bad.append(f"{mod} (relative: use adamole_dist.<folder>)")
            elif mod.startswith("adamole_dist."):
                top = mod.split(".")[1]
                if top not in ALLOWED_PROJECT_IMPORTS[folder]:
                    bad.append(mod)
            elif mod == "adamole_dist":
                bad.append(mod)
            elif any(mod == f or mod.startswith(f + ".") for f in FORBIDDEN_ANYWHERE_IN.get(folder, ())):
                bad.append(mod)
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED_PROJECT_IMPORTS))
def test_folder_imports_only_its_layers(folder):
    assert list((PACKAGE / folder).glob("*.py")), folder
    assert violations(folder) == {}


def test_the_scans_catch_a_forbidden_import_and_an_unknown_letter(tmp_path, monkeypatch):
    fake = tmp_path / "adamole_dist"
    (fake / "moe").mkdir(parents=True)
    (fake / "moe" / "routing.py").write_text(
        "import torch\nfrom adamole_dist.config.adapter import AdapterConfig\n"
        "def f():\n    import torch.distributed as dist\n    from adamole_dist.parallel import collectives\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations("moe") == {"moe/routing.py": ["torch.distributed", "adamole_dist.parallel",
                                                    "adamole_dist.parallel.collectives"]}
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
