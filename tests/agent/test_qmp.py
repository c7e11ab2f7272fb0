"""The QMP client against a real QEMU (no guest: SeaBIOS on an empty machine)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from novacron.agent.qmp import QMPClient, QMPClosedError, QMPError, QMPTimeoutError

pytestmark = pytest.mark.e2e


def start_qemu(sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc,accel=tcg",
         "-m", "32", "-S", "-qmp", f"unix:{sock.name},server=on,wait=off", *extra],
        cwd=sock.parent, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture
async def qemu(short_tmp: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], QMPClient]]:
    proc = start_qemu(short_tmp / "qmp.sock")
    client = None
    try:
        client = await QMPClient.connect(str(short_tmp / "qmp.sock"), timeout=10)
        yield proc, client
    finally:
        if client is not None:
            await client.close()
        proc.kill()
        proc.wait()


async def test_greeting_and_execute(qemu: tuple[subprocess.Popen[bytes], QMPClient]) -> None:
    _proc, qmp = qemu
    assert qmp.greeting["version"]["qemu"]["major"] >= 7
    status = await qmp.execute("query-status")
    assert status["status"] == "prelaunch" and status["running"] is False
    name = await qmp.execute("query-name")
    assert name == {}


async def test_errors_carry_qemu_class_and_desc(qemu: tuple[subprocess.Popen[bytes], QMPClient]) -> None:
    _proc, qmp = qemu
    with pytest.raises(QMPError) as err:
        await qmp.execute("no-such-command")
    assert err.value.error_class == "CommandNotFound" and "no-such-command" in err.value.desc
    with pytest.raises(QMPError) as err:
        await qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "bogus", "state": True}]})
    assert err.value.error_class == "GenericError" and "bogus" in err.value.desc
    assert (await qmp.execute("query-status"))["status"] == "prelaunch"  # still usable


async def test_events_reach_subscribers(qemu: tuple[subprocess.Popen[bytes], QMPClient]) -> None:
    _proc, qmp = qemu
    all_events = qmp.subscribe()
    async with qmp.listen("RESUME") as resumes:
        await qmp.execute("cont")
        event = await resumes.get(timeout=10)
    assert event["event"] == "RESUME" and "timestamp" in event
    stop_waiter = asyncio.create_task(qmp.wait_event("STOP", timeout=10))
    await asyncio.sleep(0.05)  # let the waiter subscribe
    await qmp.execute("stop")
    assert (await stop_waiter)["event"] == "STOP"
    seen = [(await all_events.get(timeout=1))["event"] for _ in range(2)]
    assert seen == ["RESUME", "STOP"]
    with pytest.raises(QMPTimeoutError):
        await qmp.wait_event("SHUTDOWN", timeout=0.3)


async def test_timeout_when_qemu_is_frozen(qemu: tuple[subprocess.Popen[bytes], QMPClient]) -> None:
    proc, qmp = qemu
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(QMPTimeoutError, match="query-status"):
            await qmp.execute("query-status", timeout=0.5)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # the late reply to the timed-out call is dropped; the next call gets its own
    assert (await qmp.execute("query-status", timeout=10))["status"] == "prelaunch"


async def test_qemu_exit_fails_waiters(qemu: tuple[subprocess.Popen[bytes], QMPClient]) -> None:
    proc, qmp = qemu
    waiter = asyncio.create_task(qmp.wait_event("RESUME", timeout=30))
    await asyncio.sleep(0.05)
    proc.kill()
    with pytest.raises(QMPClosedError):
        await waiter
    await asyncio.wait_for(qmp.wait_closed(), 10)
    with pytest.raises(QMPClosedError):
        await qmp.execute("query-status")
    await qmp.close()
    await qmp.close()  # idempotent


async def test_quit_emits_shutdown_and_closes(qemu: tuple[subprocess.Popen[bytes], QMPClient]) -> None:
    proc, qmp = qemu
    async with qmp.listen("SHUTDOWN") as events:
        await qmp.execute("quit")
        event = await events.get(timeout=10)
    assert event["data"]["reason"] == "host-qmp-quit"
    await asyncio.wait_for(qmp.wait_closed(), 10)
    assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_long_socket_path(short_tmp: Path) -> None:
    deep = short_tmp / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    sock = deep / "qmp.sock"
    assert len(str(sock)) > 108
    proc = start_qemu(sock)
    try:
        qmp = await QMPClient.connect(str(sock), timeout=10)
        assert (await qmp.execute("query-status"))["status"] == "prelaunch"
        await qmp.close()
    finally:
        proc.kill()
        proc.wait()


async def test_connect_gives_up_without_qemu(short_tmp: Path) -> None:
    with pytest.raises(QMPTimeoutError, match="not accepting"):
        await QMPClient.connect(str(short_tmp / "nothing.sock"), timeout=0.3)


async def test_out_of_band_negotiated_and_used(short_tmp: Path) -> None:
    """``oob``: negotiated where QEMU offers it; ``migrate-recover`` then runs out of
    band (what post-copy recovery needs when the main loop waits on a missing page)."""
    sock = short_tmp / "qmp.sock"
    proc = start_qemu(sock, "-incoming", "defer")
    try:
        plain = await QMPClient.connect(str(sock), timeout=10)
        assert plain.oob is False and "oob" in plain.greeting["capabilities"]
        await plain.close()
        qmp = await QMPClient.connect(str(sock), timeout=10, oob=True)
        assert qmp.oob is True
        # answered by QEMU's monitor thread: no post-copy is paused here, so it refuses
        with pytest.raises(QMPError, match="postcopy is paused"):
            await qmp.execute("migrate-recover", {"uri": "unix:r.sock"}, oob=True, timeout=10)
        assert (await qmp.execute("query-status"))["status"] == "inmigrate"
        await qmp.close()
    finally:
        proc.kill()
        proc.wait()
