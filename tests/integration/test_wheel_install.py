"""The package as a user installs it: the wheel built from this checkout, installed into a fresh virtual
environment, runs its commands and finds its package data (the local lm-evaluation-harness tasks) with
no checkout beside it. The fresh environment takes its dependencies (torch, transformers, lm-eval, ...)
from the project's environment through a path file, so the test needs no package index; the project
itself comes only from the wheel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("setup.py", "pyproject.toml", "README.md", "adamole_dist", "benchmarks")
LOOKUP = """
import json, sys
from pathlib import Path
import adamole_dist
from adamole_dist.evaluation.harness import HarnessPlan, local_task_names
plan = HarnessPlan("arc_easy_local", Path(sys.argv[1]), Path(sys.argv[2]))
folder = plan.write_tasks()
print(json.dumps({"package": adamole_dist.__file__, "local_tasks": local_task_names(),
                  "written": sorted(p.name for p in folder.iterdir()),
                  "yaml": (folder / "arc_easy_local.yaml").read_text()}))
"""


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the checkout (a build writes build/ and egg-info beside its sources)."""
    src = tmp / "src"
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = (tmp / "dist").glob("adamole_dist-*.whl")
    return wheel


def fresh_env(tmp: Path, wheel: Path) -> Path:
    """A new venv holding the wheel, its dependencies read from this environment's site-packages (a path
    file appends them after its own; the editable install's finder there is not run)."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return env_dir


def test_the_wheel_installs_runs_adamole_eval_and_finds_the_harness_tasks(tmp_path):
    env_dir = fresh_env(tmp_path, build_wheel(tmp_path))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a checkout on the path would shadow the wheel
    elsewhere = tmp_path / "elsewhere"  # no checkout here: nothing to import the project from but the wheel
    elsewhere.mkdir()
    done = subprocess.run([str(env_dir / "bin" / "adamole-eval"), "--help"], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:") and "--harness" in done.stdout

    data = tmp_path / "data"
    (data / "ARC-Easy").mkdir(parents=True)
    (data / "ARC-Easy" / "test.json").write_text("[]")
    done = subprocess.run([str(env_dir / "bin" / "python"), "-c", LOOKUP, str(data), str(tmp_path / "out.json")],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(env_dir), found["package"]  # the wheel's copy, not the checkout
    assert found["local_tasks"] == ["arc_easy_local", "boolq_local", "openbookqa_local"]
    assert found["written"] == ["arc_easy_local.yaml", "utils.py"]
    assert f"data_dir: {json.dumps(str(data.resolve()))}" in found["yaml"]
