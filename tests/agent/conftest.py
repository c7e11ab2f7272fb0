"""Fixtures for the agent tests: the cached test guest, short temp dirs."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage, ensure_guest


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    return ensure_guest()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="nc-t-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
