"""Rooms small enough to read at once: no function of the package over 50 lines (its docstring included),
each command (cli/*.py) at most 160 lines, run assembly at most 350, the Trainer class at most 180."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PACKAGE = REPO / "adamole_dist"
MAX_FUNCTION_LINES = 50
MAX_FILE_LINES = {"cli/*.py": 160, "train/assembly.py": 350}
MAX_CLASS_LINES = {("train/loop.py", "Trainer"): 180}


def long_functions(root: Path, limit: int) -> dict[str, int]:
    """'path:line name' (path under ``root``) -> lines, of every function (methods and nested ones too)
    longer than ``limit``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found[f"{path.relative_to(root)}:{node.lineno} {node.name}"] = lines
    return found


def test_no_function_of_the_package_is_over_50_lines():
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES) == {}


def test_the_commands_and_run_assembly_fit_their_budget():
    too_long = {}
    for pattern, limit in MAX_FILE_LINES.items():
        paths = sorted(PACKAGE.glob(pattern))
        assert paths, pattern
        for path in paths:
            lines = len(path.read_text().splitlines())
            if lines > limit:
                too_long[str(path.relative_to(PACKAGE))] = lines
    assert too_long == {}


def test_the_trainer_holds_only_loop_state():
    for (file, name), limit in MAX_CLASS_LINES.items():
        [node] = [n for n in ast.walk(ast.parse((PACKAGE / file).read_text()))
                  if isinstance(n, ast.ClassDef) and n.name == name]
        assert node.end_lineno - node.lineno + 1 <= limit, f"{file}: {name} has {node.end_lineno - node.lineno + 1}"


def test_the_scan_sees_a_long_method(tmp_path):
    body = "\n".join(f"        x = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"class C:\n    def long(self):\n{body}\n\n    def short(self):\n        pass\n")
    assert long_functions(tmp_path, MAX_FUNCTION_LINES) == {"m.py:2 long": MAX_FUNCTION_LINES + 1}
