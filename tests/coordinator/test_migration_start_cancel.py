"""A client hanging up while the source agent is asked to migrate leaves no half-started record."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio

from novacron.coordinator.agent_client import AgentClient, AgentError
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.config import CoordinatorConfig
from novacron.coordinator.events import EventHub
from novacron.coordinator.migrations import MigrationManager
from novacron.coordinator.models import VM, Host
from novacron.coordinator.store.sqlite import SQLiteStore


class SlowAgents:
    """Agent calls answered in-process; POST /v1/migrations waits for ``release``."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def call(self, host: str, url: str, token: str, method: str, path: str,
                   body: dict[str, Any] | None = None, timeout_s: float | None = None) -> Any:
        if method == "POST" and path == "/v1/migrations":
            self.asked.set()
            await self.release.wait()
            if self.refuse:
                raise AgentError(host, "no room on the target", 409)
            return {"id": "a-1", "phase": "prepare"}
        if path == "/v1/migrations/a-1":
            return {"id": "a-1", "phase": "completed", "round": 3}
        if path.startswith("/v1/vms/"):
            return {"state": "running"}
        raise AssertionError(f"unexpected agent call {method} {path}")


@dataclass
class Setup:
    store: SQLiteStore
    agents: SlowAgents
    manager: MigrationManager


@pytest_asyncio.fixture(params=[False, True], ids=["accepted", "refused"])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Setup]:
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    for name in ("src", "dst"):
        await store.put_host(Host(name, f"http://{name}.invalid", "tok-" + name, 2, 1 << 30, 1 << 29,
                                  data_port=7701))
    await store.put_vm(VM("vm1", "src", {}, state="running"))
    agents = SlowAgents(refuse=request.param)
    cfg = CoordinatorConfig(data_dir=tmp_path, poll_interval_s=0.01)
    manager = MigrationManager(cfg, store, cast(AgentClient, agents), EventHub())
    try:
        yield Setup(store, agents, manager)
    finally:
        agents.release.set()
        await manager.close()
        await store.close()


async def test_cancelled_start_ends_in_a_definite_state(setup: Setup) -> None:
    store, agents, manager = setup.store, setup.agents, setup.manager
    request = asyncio.create_task(manager.start("vm1", "dst", {}))
    await asyncio.wait_for(agents.asked.wait(), 5)
    request.cancel()  # the HTTP client hung up during the agent call
    with pytest.raises(asyncio.CancelledError):
        await request
    agents.release.set()
    (mig,) = await store.list_migrations("vm1")
    for _ in range(500):  # bounded: the start and its follower settle within a few polls
        mig = await store.get_migration(mig.id) or mig
        if mig.done:
            break
        await asyncio.sleep(0.01)
    vm = await store.get_vm("vm1")
    assert vm is not None and vm.state == "running"
    if agents.refuse:
        assert mig.phase == "failed" and "no room on the target" in (mig.error or "")
        assert vm.host == "src"
    else:
        assert mig.phase == "completed" and mig.agent_migration_id == "a-1"
        assert vm.host == "dst"


async def test_uncancelled_refusal_still_reaches_the_caller(setup: Setup) -> None:
    setup.agents.release.set()
    if setup.agents.refuse:
        with pytest.raises(ApiError, match="no room on the target"):
            await setup.manager.start("vm1", "dst", {})
    else:
        mig = await setup.manager.start("vm1", "dst", {})
        assert mig.agent_migration_id == "a-1"
    with pytest.raises(ApiError, match="no VM named"):
        await setup.manager.start("nope", "dst", {})
