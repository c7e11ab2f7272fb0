"""Shared fixtures. Tests run against the installed ``novacron`` package."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from novacron.coordinator.store import Store
from novacron.coordinator.store.pg_local import LocalPostgres
from novacron.coordinator.store.postgres import PostgresStore
from novacron.coordinator.store.sqlite import SQLiteStore

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """End-to-end tests (real QEMU guests under TCG, real services, on two shared cores)
    get one rerun: a pass on the rerun is still printed as ``R`` and counted as a
    rerun in the summary, so an intermittent failure stays visible and is looked
    into; a test that fails twice fails the run. ``NOVACRON_NO_RERUN=1`` turns it off."""
    if os.environ.get("NOVACRON_NO_RERUN") or not config.pluginmanager.hasplugin("rerunfailures"):
        return
    for item in items:
        if item.get_closest_marker("e2e") is not None and item.get_closest_marker("flaky") is None:
            item.add_marker(pytest.mark.flaky(reruns=1))


@pytest.fixture
def script_env() -> dict[str, str]:
    """Environment for running console scripts: the venv first, no stray config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalPostgres]:
    """One real PostgreSQL for the session (started on first use, removed at the end)."""
    server = LocalPostgres()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pg_url(postgres_server: LocalPostgres) -> AsyncIterator[str]:
    """URL of a fresh database of its own for one test; dropped after it."""
    url = await postgres_server.new_database()
    try:
        yield url
    finally:
        await postgres_server.drop_database(url)


@pytest.fixture
def backend() -> str:
    """The store behind ``coordinator`` and ``make_store``. SQLite here; a test module
    overrides this fixture with ``params=BACKENDS`` to run against both."""
    return "sqlite"


BACKENDS = ["sqlite", "postgres"]


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest) -> str:
    """'' for SQLite, else a fresh PostgreSQL database (the server starts on first use)."""
    return "" if backend == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.fixture
def make_store(database_url: str, tmp_path: Path) -> Callable[[], Store]:
    """New (unopened) stores on one database of the chosen backend."""
    def make() -> Store:
        if database_url:
            return PostgresStore(database_url, pool_size=4)
        return SQLiteStore(tmp_path / "c.db")
    return make
