"""LocalAgent's own promises: a killed agent leaves its QEMUs, stop() clears
them and the temp state dir; the daemon refuses to run without a token; the
guest builder's command line prints the cached paths."""

from __future__ import annotations

import json
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
