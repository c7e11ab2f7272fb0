"""Shared fixtures. Tests run against the installed ``novacron`` package."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def script_env() -> dict[str, str]:
    """Environment for running console scripts: the venv first, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session (started on first use, removed at the end)."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pg_url(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """URL of a fresh database of its own for one test; dropped after it."""
    url = await postgres_server.new_database()
    try:
        yield url
    finally:
        await postgres_server.drop_database(url)
