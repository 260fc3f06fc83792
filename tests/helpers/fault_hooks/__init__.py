"""Fault injection for subprocess tests (see sitecustomize.py): ``env_with(**variables)``."""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers.launch_utils import launch_env

HOOKS = Path(__file__).resolve().parent


def env_with(**variables: str) -> dict:
    """launch_env() with this folder first on PYTHONPATH (its sitecustomize runs) and ``variables`` set."""
    env = launch_env()
    env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), *filter(None, [env.get("PYTHONPATH")])])
    env.update(variables)
    return env
