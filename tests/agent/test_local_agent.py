"""LocalAgent's own promises: a killed agent leaves its QEMUs, stop() clears
them and the temp state dir; the daemon refuses to run without a token; the
guest builder's command line prints the cached paths."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.local import LocalAgent, LocalAgentError

pytestmark = pytest.mark.e2e


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def test_kill_then_stop_cleans_up(guest: GuestImage) -> None:
    agent = LocalAgent("killme", accel="tcg")
    try:
        await agent.start()
        spec = {"name": "k", "vcpus": 1, "memory_mb": 128, "kernel": str(guest.kernel),
                "initrd": str(guest.initrd), "cmdline": guest.cmdline}  # fmt: skip
        status, vm = await agent.request("POST", "/v1/vms", spec)
        assert status == 201 and vm["state"] == "running"
        agent_pid = agent.pid
        assert agent_pid is not None
        agent.kill()
        assert not alive(agent_pid)
        assert agent.qemu_pids() == [vm["pid"]] and alive(vm["pid"])  # the fault leaves QEMU behind
    finally:
        await agent.stop()
    assert not alive(vm["pid"])
    assert not agent.state_dir.exists()


async def test_sigterm_stops_the_vms(guest: GuestImage) -> None:
    """vms_on_exit = stop (LocalAgent's setting): a graceful exit powers VMs off itself."""
    agent = LocalAgent("term", accel="tcg")
    try:
        await agent.start()
        spec = {"name": "t", "vcpus": 1, "memory_mb": 128, "kernel": str(guest.kernel),
                "initrd": str(guest.initrd), "cmdline": guest.cmdline}  # fmt: skip
        status, vm = await agent.request("POST", "/v1/vms", spec)
        assert status == 201
        assert agent.proc is not None
        agent.proc.terminate()
        assert await asyncio.to_thread(agent.proc.wait, 20) == 0
        assert not alive(vm["pid"])
        record = json.loads((agent.state_dir / "vms" / "t" / "vm.json").read_text())
        assert record["state"] == "stopped" and record["pid"] is None
        assert not (agent.state_dir / "vms" / "t" / "ram").exists()
        assert "agent shutting down" in agent.log_path.read_text()
    finally:
        await agent.stop()


async def test_own_session_gives_the_agent_its_own_scheduler_group() -> None:
    """bench migrate runs each agent in a session (so an autogroup) of its own, as
    each QEMU is; by default an agent stays in its caller's session."""
    for own in (False, True):
        async with LocalAgent("sess", accel="tcg", own_session=own) as agent:
            assert agent.pid is not None
            assert (os.getsid(agent.pid) == agent.pid) is own
            assert (os.getsid(agent.pid) == os.getsid(0)) is not own
        assert not alive(agent.pid)  # stop() ends it either way


async def test_start_failure_is_reported() -> None:
    agent = LocalAgent("bad", settings={"log_level": "nonsense"})
    with pytest.raises(LocalAgentError, match="exited"):
        await agent.start(timeout=30)
    assert not agent.state_dir.exists()


def test_agent_requires_a_token(script_env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nport = 0\n')
    res = subprocess.run(["novacron-agent", "--config", str(cfg)], env=script_env,
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert res.returncode != 0 and "key 'token': required" in res.stderr
    assert not (tmp_path / "state").exists()


def test_guest_build_command_prints_paths(guest: GuestImage) -> None:
    res = subprocess.run([sys.executable, "-m", "novacron.agent.guest", "build", "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc == {"kernel": str(guest.kernel), "initrd": str(guest.initrd), "cmdline": guest.cmdline}


@pytest.mark.slow
async def test_agent_registers_and_heartbeats_with_the_coordinator(tmp_path: Path) -> None:
    from novacron.coordinator.client import CoordinatorClient
    from novacron.coordinator.local import LocalCoordinator

    coord = LocalCoordinator(tmp_path / "coord", settings={"heartbeat_interval_s": "0.5"})
    agent = LocalAgent("reg-host", accel="tcg")
    try:
        await coord.start()
        agent.settings.update(coordinator_url=coord.url, coordinator_token=coord.agent_token)
        await agent.start()
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            host: dict[str, object] = {}
            for _ in range(100):  # bounded: ~10 s
                hosts = {h["name"]: h for h in await client.hosts()}
                host = hosts.get("reg-host", {})
                if host.get("last_heartbeat", 0) > host.get("registered_at", 0):  # type: ignore[operator]
                    break
                await asyncio.sleep(0.1)
        assert host.get("url") == agent.url and host.get("state") == "up", host
        assert host["last_heartbeat"] > host["registered_at"]  # type: ignore[operator]
        assert coord.agent_token not in agent.log_path.read_text()
    finally:
        await agent.stop()
        coord.stop()
