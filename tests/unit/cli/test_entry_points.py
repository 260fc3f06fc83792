"""The commands as a user runs them: the console scripts the install puts on PATH (setup.py's
entry_points) and ``python -m adamole_dist.cli.<command>``, each answering --help with its usage."""

import shutil
import subprocess
import sys

import pytest

COMMANDS = ("train", "eval", "generate", "export", "plot", "plan")


@pytest.mark.parametrize("command", COMMANDS)
def test_the_console_script_is_installed_and_runs(command):
    script = shutil.which(f"adamole-{command}")
    assert script is not None, f"adamole-{command} is not on PATH: is the package installed (make setup)?"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_python_dash_m_runs_a_command():
    done = subprocess.run([sys.executable, "-m", "adamole_dist.cli.export", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout and "--merge" in done.stdout
