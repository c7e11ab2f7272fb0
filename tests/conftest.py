"""Shared fixtures. Tests run against the installed ``novacron`` package."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def script_env() -> dict[str, str]:
    """Environment for running console scripts: the venv first, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env
