"""kill -9 of a real agent at named points of VM create, then a restart: no
orphan QEMU, no stray file, and the name either free again or the VM adopted
and manageable. The crash points come from ``NOVACRON_CRASH_AT`` (novacron.faults)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.local import LocalAgent
from novacron.agent.vm.recovery import qemus_under
from novacron.faults import ENV

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def spec(guest: GuestImage, name: str) -> dict[str, object]:
    return {"name": name, "vcpus": 1, "memory_mb": 64, "accel": "tcg", "kernel": str(guest.kernel),
            "initrd": str(guest.initrd), "cmdline": guest.cmdline}  # fmt: skip


def alive(pid: int) -> bool:
    """Running (a QEMU whose agent was killed is reparented and may linger as a zombie)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.parametrize(("point", "adopted"), [
    ("vm.create.recorded", False),  # record written, nothing else
    ("vm.create.ram_file", False),  # RAM file reserved, QEMU not spawned
    ("vm.create.spawned", True),  # QEMU runs, its QMP never answered the old agent
    ("vm.create.responding", True),  # VM up, the 201 never sent
])  # fmt: skip
async def test_agent_killed_during_create(guest: GuestImage, point: str, adopted: bool) -> None:
    agent = LocalAgent("crash", accel="tcg", env={ENV: point})
    vms = agent.state_dir / "vms"
    try:
        await agent.start()
        with pytest.raises(aiohttp.ClientError):  # the agent dies mid-request
            await agent.request("POST", "/v1/vms", spec(guest, "c1"))
        assert agent.proc is not None and agent.proc.wait(10) == -signal.SIGKILL
        assert point in agent.log_path.read_text()
        left = [p.pid for procs in qemus_under(vms).values() for p in procs]
        assert len(left) == (1 if adopted else 0), left  # what the killed agent left running
        assert (vms / "c1" / "vm.json").exists()  # intent was recorded before anything else
        assert (vms / "c1" / "ram").exists() == (point != "vm.create.recorded")

        agent.env.clear()
        await agent.start()
        status, doc = await agent.request("GET", "/v1/vms/c1")
        if adopted:
            assert status == 200 and doc["state"] == "running" and doc["pid"] == left[0], doc
            # manageable: QMP works for the new agent
            assert (await agent.request("POST", "/v1/vms/c1/pause"))[1]["state"] == "paused"
            assert (await agent.request("POST", "/v1/vms/c1/resume"))[1]["state"] == "running"
            assert "vm adopted" in agent.log_path.read_text()
        else:
            assert status == 404, doc
            assert not (vms / "c1").exists()  # no record, RAM file or socket left
            status, doc = await agent.request("POST", "/v1/vms", spec(guest, "c1"))
            assert status == 201, doc  # the name is usable again
            left = [doc["pid"]]
        assert (await agent.request("DELETE", "/v1/vms/c1"))[0] == 200
        assert not alive(left[0]) and not (vms / "c1").exists()
        assert qemus_under(vms) == {}
    finally:
        await agent.stop()


@pytest.mark.parametrize(("point", "adopted"), [("vm.create.ram_file", False), ("vm.create.spawned", True)])
async def test_coordinator_record_follows_an_agent_killed_during_create(
        guest: GuestImage, tmp_path: Path, point: str, adopted: bool) -> None:
    from novacron.coordinator.client import ApiClientError, CoordinatorClient
    from novacron.coordinator.local import LocalCoordinator

    coord = LocalCoordinator(tmp_path / "coord", settings={"heartbeat_interval_s": "0.5",
                                                           "reconcile_interval_s": "0.5"})
    agent = LocalAgent("crash-c", accel="tcg", env={ENV: point})
    try:
        await coord.start()
        agent.settings.update(coordinator_url=coord.url, coordinator_token=coord.agent_token)
        await agent.start()
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            for _ in range(100):  # bounded: ~10 s until registered
                if [h["name"] for h in await client.hosts()] == ["crash-c"]:
                    break
                await asyncio.sleep(0.1)
            with pytest.raises(ApiClientError, match="outcome unknown"):
                await client.create_vm(spec(guest, "c2"))
            assert (await client.vm("c2"))["state"] == "creating"  # the name stays reserved
            # the agent's sockets close a moment before it can be reaped: wait, bounded, as above
            assert agent.proc is not None and agent.proc.wait(10) == -signal.SIGKILL
            agent.env.clear()
            await agent.start()

            async def record() -> dict[str, object] | None:
                try:
                    return await client.vm("c2")
                except ApiClientError:
                    return None

            for _ in range(200):  # bounded: ~20 s for a reconcile pass to settle it
                doc = await record()
                if doc is None or doc["state"] != "creating":
                    break
                await asyncio.sleep(0.1)
            if adopted:
                assert doc is not None and doc["state"] == "running" and doc["host"] == "crash-c", doc
                pid = doc["agent"]["pid"]  # type: ignore[index]
            else:
                assert doc is None  # dropped: the agent rolled the create back
                await client.create_vm(spec(guest, "c2"))  # the name is free again
                pid = (await client.vm("c2"))["agent"]["pid"]
            await client.delete_vm("c2")
            assert not alive(pid) and qemus_under(agent.state_dir / "vms") == {}
    finally:
        await agent.stop()
        coord.stop()
