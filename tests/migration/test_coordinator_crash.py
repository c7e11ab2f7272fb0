"""kill -9 of the coordinator during a migration start, with real agents and a
real guest: after the restart its record says where the VM really runs, and
deleting the VM really stops that QEMU. ``migration.start.recorded``: killed
before asking the source agent (the VM stays); ``migration.start.accepted``:
killed while the source agent accepts and runs the migration (the VM moves)."""

from __future__ import annotations

import asyncio
import secrets
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from novacron.agent.local import LocalAgent
from novacron.agent.vm.recovery import qemus_under
from novacron.coordinator.local import LocalCoordinator
from novacron.faults import ENV
from tests.migration.agents import Api
from tests.migration.qemu_helpers import guest_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def call(coord: LocalCoordinator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.request(method, f"{coord.url}/api/v1{path}", json=body,
                        headers={"Authorization": f"Bearer {coord.admin_token}"}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def until(what: str, check: Any, timeout: float = 60.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.parametrize(("point", "moved"), [
    ("migration.start.recorded", False),
    ("migration.start.accepted", True),
])  # fmt: skip
async def test_coordinator_killed_during_migration_start(tmp_path: Path, point: str, moved: bool) -> None:
    secret = secrets.token_urlsafe(32)
    coord = LocalCoordinator(tmp_path / "coord", env={ENV: point},
                             settings={"heartbeat_interval_s": "0.5", "reconcile_interval_s": "1"})
    a = LocalAgent("cc-a", cluster_secret=secret, accel="tcg")
    b = LocalAgent("cc-b", cluster_secret=secret, accel="tcg")
    try:
        await coord.start()
        for agent in (a, b):
            agent.settings.update(coordinator_url=coord.url, coordinator_token=coord.agent_token)
            await agent.start()

        async def both_up() -> bool:
            _, doc = await call(coord, "GET", "/hosts")
            return sorted(h["name"] for h in doc["hosts"] if h["state"] == "up") == ["cc-a", "cc-b"]

        await until("both agents registered", both_up)
        status, doc = await call(coord, "POST", "/vms", {**guest_spec("cc"), "host": "cc-a"})
        assert status == 201, doc
        with pytest.raises(aiohttp.ClientError):  # the coordinator dies mid-request
            await call(coord, "POST", "/migrations", {"vm": "cc", "target": "cc-b"})
        assert coord.proc is not None and coord.proc.wait(10) == -signal.SIGKILL

        src, dst = Api(a), Api(b)
        if moved:  # the source agent got the request: the move goes on without the coordinator
            migs = (await src.ok("GET", "/v1/migrations"))["migrations"]
            assert len(migs) == 1, migs
            done = await src.wait_migration(migs[0]["id"], timeout=120)
            assert done["phase"] == "completed", done
        else:
            assert (await src.ok("GET", "/v1/migrations"))["migrations"] == []
        home, away = (dst, src) if moved else (src, dst)
        pid = (await home.ok("GET", "/v1/vms/cc"))["pid"]
        assert (await away.agent.request("GET", "/v1/vms/cc"))[0] == 404

        coord.extra_env.clear()
        await coord.start()

        async def settled() -> Any:
            _, doc = await call(coord, "GET", "/migrations?vm=cc")
            migs = doc["migrations"]
            return migs[0] if migs and migs[0]["phase"] in ("completed", "failed") else None

        mig = await until("migration settled", settled)
        assert mig["phase"] == ("completed" if moved else "failed"), mig
        status, doc = await call(coord, "GET", "/vms/cc")
        assert status == 200 and doc["state"] == "running", doc
        assert doc["host"] == home.agent.name, doc
        assert doc["agent"]["pid"] == pid  # the record's host is the one running that QEMU

        status, doc = await call(coord, "DELETE", "/vms/cc")
        assert status == 200, doc
        assert not alive(pid)
        assert qemus_under(a.state_dir / "vms") == {} and qemus_under(b.state_dir / "vms") == {}
    finally:
        await a.stop()
        await b.stop()
        coord.stop()
