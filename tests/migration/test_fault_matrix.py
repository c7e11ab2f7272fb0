"""Randomised, bounded fault matrix (opt-in: ``NOVACRON_FAULT_MATRIX=N`` runs N
migrations, e.g. 100; seed with ``NOVACRON_FAULT_SEED``). One busy guest hops
between two real agents; each migration gets one fault from ``FAULTS`` (a crash
point inside the engine, or a signal from outside at pre-copy), then the dead
or stopped agent is restarted or continued. After settling, the guest must run
on exactly one host with the same boot and fresh, passing heartbeats and its own
page check, no migration may stay unsettled, and the other host must have no
QEMU, RAM file or folder of it. Prints the faults x outcomes table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from novacron.agent.local import LocalAgent
from tests.migration.agents import Api
from tests.migration.qemu_helpers import VERIFY, CuttableProxy, heartbeats, qemu_processes_using

RUNS = int(os.environ.get("NOVACRON_FAULT_MATRIX", "0") or 0)
pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    pytest.mark.skipif(RUNS <= 0, reason="opt-in: set NOVACRON_FAULT_MATRIX=N (e.g. 100)"),
    pytest.mark.timeout(120 + 30 * RUNS),  # bounded: about 8 s a migration on 2 busy cores
]
CRASH = "NOVACRON_CRASH_AT"
OPTIONS = {"in_doubt_timeout_s": 10, "bandwidth_mbps": 20}
VM = "m"


@dataclass(frozen=True)
class Fault:
    name: str
    phase: str
    side: str = ""  # "src" / "dst": which agent gets the crash point
    point: str = ""  # crash point (``:stop`` for SIGSTOP)
    external: str = ""  # "kill_dst_agent" / "kill_dst_qemu" / "kill_src_agent" at pre-copy


FAULTS = [
    Fault("none", "-"),
    Fault("SIGKILL source agent", "precopy", external="kill_src_agent"),
    Fault("SIGKILL source agent", "stopcopy", "src", "migration.source.paused"),
    Fault("SIGKILL source agent", "go sent", "src", "migration.source.go_sent"),
    Fault("SIGKILL source agent", "after go", "src", "migration.source.resumed_received"),
    Fault("SIGKILL destination agent", "precopy", external="kill_dst_agent"),
    Fault("SIGKILL destination agent", "stopcopy", "dst", "migration.dest.stopcopy"),
    Fault("SIGKILL destination agent", "go received", "dst", "migration.dest.go_received"),
    Fault("SIGSTOP destination agent", "stopcopy", "dst", "migration.dest.stopcopy:stop"),
    Fault("SIGSTOP source agent", "stopcopy", "src", "migration.source.paused:stop"),
    Fault("SIGKILL destination QEMU", "precopy", external="kill_dst_qemu"),
    Fault("channel cut", "precopy", external="cut"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fixed_agent(name: str, secret: str) -> LocalAgent:
    """Fixed API and data ports: a peer must find a restarted agent where it was."""
    return LocalAgent(name, cluster_secret=secret, accel="tcg", data_port=free_port(),
                      settings={"port": str(free_port())})


async def restart(agent: LocalAgent, env: dict[str, str]) -> None:
    if agent.proc is not None and agent.proc.poll() is None:
        agent.kill()  # its QEMUs live on; the new agent adopts them
    agent.env = env
    await agent.start()


def alive(agent: LocalAgent) -> bool:
    return agent.proc is not None and agent.proc.poll() is None


async def dead_or_done(victim: LocalAgent, src: LocalAgent, mid: str, timeout: float = 120) -> None:
    """Until the crash point killed ``victim``, or the migration ended without reaching it."""
    deadline = time.monotonic() + timeout
    while alive(victim) and time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            status, doc = await src.request("GET", f"/v1/migrations/{mid}")
            if status == 200 and doc["phase"] in ("completed", "failed", "cancelled"):
                return
        await asyncio.sleep(0.05)


def stopped(agent: LocalAgent) -> bool:
    try:
        return Path(f"/proc/{agent.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


async def ended(agent: LocalAgent, mid: str) -> bool:
    """Whether ``agent``'s side of ``mid`` ended (False also if it does not answer now:
    it may have just been stopped at its crash point)."""
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        status, doc = await agent.request("GET", f"/v1/migrations/{mid}", timeout=2)
        return status == 200 and doc["phase"] in ("completed", "failed", "cancelled")
    return False


async def final_at(agent: LocalAgent, mid: str, timeout: float = 120) -> None:
    """Until ``agent``'s side of migration ``mid`` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, doc = await agent.request("GET", f"/v1/migrations/{mid}")
        if status == 200 and doc["phase"] in ("completed", "failed", "cancelled"):
            return
        await asyncio.sleep(0.1)


async def settled(agents: list[LocalAgent], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        open_ = []
        for a in agents:
            for m in (await Api(a).ok("GET", "/v1/migrations"))["migrations"]:
                if m["phase"] not in ("completed", "failed", "cancelled") or (
                        m.get("journal") and not m["journal"]["settled"]):
                    open_.append((a.name, m["id"], m["phase"], m.get("journal")))
        if not open_:
            return
        assert time.monotonic() < deadline, f"unsettled: {open_}"
        await asyncio.sleep(0.2)


async def where(agents: list[LocalAgent]) -> list[LocalAgent]:
    running = []
    for a in agents:
        status, doc = await a.request("GET", f"/v1/vms/{VM}")
        if status == 200:
            assert doc["state"] == "running", (a.name, doc)
            running.append(a)
    return running


async def one_migration(src: LocalAgent, dst: LocalAgent, fault: Fault) -> str:
    """Run one migration under ``fault``; returns its outcome at the source."""
    api = Api(src)
    if fault.side:
        await restart(src if fault.side == "src" else dst, {CRASH: fault.point})
    proxy = CuttableProxy(dst.data_port) if fault.external == "cut" else None
    extra = {"data_port": await proxy.start()} if proxy is not None else {}
    mig = await api.migrate(VM, dst, **OPTIONS, **extra)
    victim = src if fault.side == "src" else dst
    try:
        if fault.external:
            st = await api.wait_migration(mig["id"], until=lambda s: s["phase"] == "precopy"
                                          and s["metrics"]["pages_sent"] > 0)
            if st["phase"] == "precopy":
                if fault.external == "kill_src_agent":
                    src.kill()
                elif fault.external == "kill_dst_agent":
                    dst.kill()
                elif proxy is not None:
                    proxy.cut()
                else:
                    for pid in dst.qemu_pids():
                        os.kill(pid, signal.SIGKILL)
        elif fault.side:
            if fault.point.endswith(":stop"):
                for _ in range(2400):  # until stopped at the point, or the migration ended
                    if stopped(victim) or await ended(src, mig["id"]):
                        break
                    await asyncio.sleep(0.05)
                if stopped(victim):  # the peer gives up on it by itself
                    await final_at(dst if victim is src else src, mig["id"])
            else:
                await dead_or_done(victim, src, mig["id"])
        for a in (src, dst):  # bring back whatever died, without the crash point
            if not alive(a):
                await restart(a, {})
    finally:
        if victim.pid is not None and stopped(victim):
            os.kill(victim.pid, signal.SIGCONT)
        if proxy is not None:
            await proxy.close()
    for a in (src, dst):
        if a.env:
            await restart(a, {})
    await settled([src, dst])
    return str((await api.ok("GET", f"/v1/migrations/{mig['id']}"))["phase"])


async def test_fault_matrix() -> None:
    seed = int(os.environ.get("NOVACRON_FAULT_SEED", "0") or 0) or random.randrange(1 << 30)
    rng = random.Random(seed)
    secret = secrets.token_urlsafe(32)
    a, b = fixed_agent("fa", secret), fixed_agent("fb", secret)
    table: Counter[tuple[str, str, str]] = Counter()
    double = lost = 0
    await a.start()
    await b.start()
    try:
        await Api(a).create_guest(VM, rate_mb=8)
        text, _ = await Api(a).console(VM)
        boot = heartbeats(text)[-1][0]
        for i in range(RUNS):
            fault = FAULTS[i % len(FAULTS)] if i < len(FAULTS) else rng.choice(FAULTS)
            [src] = await where([a, b])
            dst = b if src is a else a
            outcome = await one_migration(src, dst, fault)
            running = await where([a, b])
            double += len(running) > 1
            lost += not running
            assert len(running) == 1, (i, fault, [r.name for r in running])
            host = running[0]
            other = b if host is a else a
            api = Api(host)
            _, offset = await api.console(VM)
            await api.wait_console(VM, r"NOVACRON-HB .* ok=1", timeout=30, offset=offset)
            text, _ = await api.console(VM)
            assert heartbeats(text)[-1][0] == boot, (i, fault, "the guest rebooted")
            assert not (other.state_dir / "vms" / VM).exists()
            assert qemu_processes_using(other.state_dir) == []
            moved = "moved" if host is dst else "stayed"
            table[(fault.name, fault.phase, f"{outcome}/{moved}")] += 1
        await Api(host).ok("POST", f"/v1/vms/{VM}/console", {"text": "verify\n"})
        v = await Api(host).wait_console(VM, VERIFY.pattern, timeout=30, offset=offset)
        assert v.group(2) == "0" and v.group(3) == "ok", v.group(0)
    finally:
        lines = [f"fault matrix: {RUNS} migrations, seed {seed}; double runs {double}, lost guests {lost}",
                 f"{'fault':28} {'phase':12} outcome (at source) / guest -> count"]
        lines += [f"{f:28} {p:12} {o} -> {n}" for (f, p, o), n in sorted(table.items())]
        print("\n".join(lines))
        for agent in (a, b):
            if agent.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(agent.pid, signal.SIGCONT)
            await agent.stop()
