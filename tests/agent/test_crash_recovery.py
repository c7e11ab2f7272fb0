"""kill -9 of a real agent at named points of VM create, then a restart: no
orphan QEMU, no stray file, and the name either free again or the VM adopted
and manageable. The crash points come from ``NOVACRON_CRASH_AT`` (novacron.faults)."""

from __future__ import annotations

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
