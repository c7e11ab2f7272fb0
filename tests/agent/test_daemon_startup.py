"""An agent that cannot listen releases what it started and says why in one line."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.agent import daemon
from novacron.agent.config import AgentConfig
from novacron.agent.vm.accel import AccelDetector, AccelInfo
from novacron.agent.vm.manager import VMManager


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A loopback port some other process is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


class SlowProbe(AccelDetector):
    """A probe that would run for a long time: it must be cancelled, not leaked."""

    def __init__(self) -> None:
        super().__init__()
        self.started = asyncio.Event()
        self.cancelled = False

    async def detect(self) -> AccelInfo:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


def lock_is_free(state_dir: Path) -> bool:
    fd = os.open(state_dir / "agent.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


async def test_bind_failure_releases_probe_vms_and_lock(
        tmp_path: Path, occupied_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = SlowProbe()
    monkeypatch.setattr(daemon, "make_accel", lambda cfg: probe)
    shutdowns: list[bool] = []
    real_shutdown = VMManager.shutdown

    async def shutdown(self: VMManager, stop_vms: bool) -> None:
        shutdowns.append(stop_vms)
        await real_shutdown(self, stop_vms)

    monkeypatch.setattr(VMManager, "shutdown", shutdown)
    cfg = AgentConfig(port=occupied_port, state_dir=tmp_path / "state", token="t" * 16, vms_on_exit="stop")
    with pytest.raises(SystemExit) as exited:
        await daemon.serve(cfg)  # same task: a SystemExit from another task would stop the loop
    assert str(exited.value.code) == (
        f"novacron-agent: cannot listen on 127.0.0.1:{occupied_port}: address already in use")
    assert probe.started.is_set() and probe.cancelled
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "accel probe"]
    assert shutdowns == [True]
    assert lock_is_free(cfg.state_dir)
    assert not (cfg.state_dir / daemon.ENDPOINT_FILE).exists()


def test_occupied_port_exits_with_one_line(script_env: dict[str, str], tmp_path: Path,
                                           occupied_port: int) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\nport = {occupied_port}\ntoken = "{"t" * 16}"\n'
                   f'accel = "tcg"\nlog_level = "error"\n')
    res = subprocess.run(["novacron-agent", "--config", str(cfg)], env=script_env,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"novacron-agent: cannot listen on 127.0.0.1:{occupied_port}: address already in use"]
    assert lock_is_free(tmp_path / "state")
