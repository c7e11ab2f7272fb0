"""Issue 19's incidents with real agents and a real guest, each window hit
deterministically by a crash point inside the engine (``NOVACRON_CRASH_AT``,
see novacron/faults.py), each now ending with the guest running in exactly
one place:

- source agent killed during stop-and-copy (guest paused, before ``go``): the
  restarted agent resumes the guest by itself and records why;
- source agent killed after ``go`` (the destination runs the guest): the
  restarted agent keeps its copy paused and refuses ``resume`` (409 naming the
  migration) while the destination cannot answer, then settles to the
  destination and releases its copy;
- destination agent SIGSTOPped at stop-and-copy: the pause is capped, the
  source resumes and the migration fails with the reason;
- destination QEMU killed mid-pre-copy: the migration fails within ~2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from novacron.agent.local import LocalAgent
from novacron.agent.migration.journal import Entry, Journal
from tests.migration.agents import Api
from tests.migration.qemu_helpers import (
    deleted_but_held,
    guest_spec,
    heartbeats,
    qemu_processes_using,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
SECRET = secrets.token_urlsafe(32)
CRASH = "NOVACRON_CRASH_AT"


async def boot_id(api: Api, vm: str) -> str:
    text, _ = await api.console(vm)
    return heartbeats(text)[-1][0]


async def assert_runs(agent: LocalAgent, vm: str, boot: str) -> None:
    """Running there, the same boot (no reboot), fresh heartbeats with checks ok."""
    api = Api(agent)
    assert (await api.ok("GET", f"/v1/vms/{vm}"))["state"] == "running"
    _, offset = await api.console(vm)
    await api.wait_console(vm, r"NOVACRON-HB .* ok=1", timeout=30, offset=offset)
    assert await boot_id(api, vm) == boot


async def assert_nothing_left(agent: LocalAgent, vm: str) -> None:
    assert (await agent.request("GET", f"/v1/vms/{vm}"))[0] == 404
    assert not (agent.state_dir / "vms" / vm).exists()
    incoming = agent.state_dir / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    left = qemu_processes_using(agent.state_dir)
    assert left == [], [(pid, Path(f"/proc/{pid}/cmdline").read_bytes()[:300]) for pid in left]
    if agent.pid is not None and agent.proc is not None and agent.proc.poll() is None:
        # nor a deleted RAM file the agent still maps (its space held until it exits)
        assert deleted_but_held(agent.pid, agent.state_dir) == []


async def wait_dead(agent: LocalAgent, timeout: float = 120) -> None:
    assert agent.proc is not None
    deadline = time.monotonic() + timeout
    while agent.proc.poll() is None:
        assert time.monotonic() < deadline, "the crash point was never reached"
        await asyncio.sleep(0.05)


async def side_done(agent: LocalAgent, mid: str, timeout: float = 60) -> dict:
    return await Api(agent).wait_migration(mid, timeout=timeout)


# -- a source agent killed inside a migration, then restarted ------------------------------

async def test_source_agent_killed_before_and_after_go() -> None:
    src = LocalAgent("src-crash", cluster_secret=SECRET, accel="tcg",
                     env={CRASH: "migration.source.paused"})
    await src.start()
    try:
        api = Api(src)
        await api.create_guest("g")
        boot = await boot_id(api, "g")

        # 1. killed in stop-and-copy, guest paused, 'go' not sent
        async with LocalAgent("dst-a", cluster_secret=SECRET, accel="tcg") as dst:
            mig = await api.migrate("g", dst)
            await wait_dead(src)
            theirs = await side_done(dst, mig["id"])
            assert theirs["phase"] == "failed", theirs  # it destroyed its half: never ran there
            src.env = {CRASH: "migration.source.resumed_received"}
            await src.start()
            st = await api.ok("GET", f"/v1/migrations/{mig['id']}")
            assert st["phase"] == "failed" and "resumed here" in st["error"], st
            assert st["journal"]["step"] == "rolled_back" and st["journal"]["settled"] is True
            await assert_runs(src, "g", boot)
            await assert_nothing_left(dst, "g")

        # 2. killed after 'go' (the destination confirmed it runs the guest)
        async with LocalAgent("dst-b", cluster_secret=SECRET, accel="tcg") as dst:
            mig = await api.migrate("g", dst)
            await wait_dead(src)
            theirs = await side_done(dst, mig["id"])
            assert theirs["phase"] == "completed", theirs
            assert theirs["journal"]["step"] == "committed"
            await assert_runs(dst, "g", boot)
            assert dst.pid is not None
            os.kill(dst.pid, signal.SIGSTOP)  # the destination cannot answer for now
            try:
                src.env = {}
                await src.start()
                status, doc = await src.request("POST", "/v1/vms/g/resume")
                assert status == 409 and mig["id"] in doc["error"], (status, doc)
                assert (await api.ok("GET", "/v1/vms/g"))["state"] == "migrating"
                st = await api.ok("GET", f"/v1/migrations/{mig['id']}")
                assert st["journal"] == {**st["journal"], "step": "go", "settled": False}, st
                assert st["phase"] not in ("completed", "failed", "cancelled")
            finally:
                os.kill(dst.pid, signal.SIGCONT)
            st = await api.wait_migration(mig["id"], timeout=60)
            assert st["phase"] == "completed" and "committed" in st["resolution"], st
            assert st["journal"]["step"] == "committed"
            await assert_nothing_left(src, "g")  # released: exactly one copy, there
            await assert_runs(dst, "g", boot)
            assert (await dst.request("POST", "/v1/vms/g/resume"))[0] == 200  # settled: not fenced
    finally:
        await src.stop()


# -- a shared source guest for the liveness cases ------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def source() -> AsyncIterator[LocalAgent]:
    async with LocalAgent("src-live", cluster_secret=SECRET, accel="tcg") as a:
        await Api(a).create_guest("h")
        yield a


@pytest.mark.parametrize(("options", "why"), [
    ({}, "sent nothing"),  # keepalives stop: noticed after liveness_s (2 s)
    # force: a 50 ms budget may be under the predicted pause, and the test wants the pause
    ({"liveness_s": 30, "downtime_ms": 50, "pause_factor": 10, "on_no_converge": "force"},
     "ceiling of 500 ms"),
])
async def test_destination_agent_stopped_at_stop_and_copy(
        source: LocalAgent, options: dict, why: str) -> None:
    api = Api(source)
    boot = await boot_id(api, "h")
    async with LocalAgent("dst-stop", cluster_secret=SECRET, accel="tcg",
                          env={CRASH: "migration.dest.stopcopy:stop"}) as dst:
        try:
            mig = await api.migrate("h", dst, **options)
            st = await api.wait_migration(mig["id"], timeout=120)
            assert st["phase"] == "failed" and why in st["error"], st
            ceiling = st["metrics"]["pause_ceiling_ms"]
            assert ceiling == min(options.get("downtime_ms", 300) * options.get("pause_factor", 10), 10_000)
            # the guest was paused and resumed: bounded by the ceiling (+ the resume itself)
            assert 0 < st["metrics"]["downtime_ms"] <= ceiling + 1000, st["metrics"]
            assert st["journal"]["step"] == "rolled_back"
            await assert_runs(source, "h", boot)
        finally:
            assert dst.pid is not None
            os.kill(dst.pid, signal.SIGCONT)
        theirs = await side_done(dst, mig["id"])
        assert theirs["phase"] == "failed", theirs
        await assert_nothing_left(dst, "h")


async def test_destination_qemu_killed_mid_precopy_noticed_fast(source: LocalAgent) -> None:
    api = Api(source)
    boot = await boot_id(api, "h")
    # (no "qemu" in the agent's name: the leak check looks for it in command lines)
    async with LocalAgent("dst-qkill", cluster_secret=SECRET, accel="tcg") as dst:
        mig = await api.migrate("h", dst, bandwidth_mbps=2)
        st = await api.wait_migration(mig["id"], until=lambda s: s["phase"] == "precopy"
                                      and s["metrics"]["pages_sent"] > 0)
        assert st["phase"] == "precopy", st
        pids = dst.qemu_pids()
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        killed = time.monotonic()
        st = await api.wait_migration(mig["id"], timeout=30)
        noticed = time.monotonic() - killed
        assert st["phase"] == "failed" and "QEMU exited" in st["error"], st
        assert noticed < 2.5, f"took {noticed:.2f}s"
        await assert_runs(source, "h", boot)
        theirs = await side_done(dst, mig["id"])
        assert theirs["phase"] == "failed"
        await assert_nothing_left(dst, "h")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[0], 0)
            raise AssertionError("the killed QEMU is still there")


async def test_force_resume_overrides_the_fence_and_is_audited() -> None:
    """A journal names an unsettled migration past 'go' whose peer is gone for good:
    resume is refused (409 naming it) until an operator forces it, which is audited."""
    async with LocalAgent("force", accel="tcg") as a:
        api = Api(a)
        await api.ok("POST", "/v1/vms", guest_spec("f"), want=201)
        await api.ok("POST", "/v1/vms/f/pause")
        a.kill()  # QEMU stays, paused; the next agent adopts it
        with socket.socket() as s:  # a port nobody listens on: the dead peer
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        Journal(a.state_dir / "migrations").begin(Entry(
            id="m-dead-peer", vm="f", role="source", step="go", peer_host="127.0.0.1", peer_port=dead_port))
        await a.start()
        status, doc = await a.request("POST", "/v1/vms/f/resume")
        assert status == 409 and "m-dead-peer" in doc["error"], (status, doc)
        assert (await a.request("POST", "/v1/vms/f/resume?force=yes"))[0] == 400
        assert (await a.request("DELETE", "/v1/vms/f"))[0] == 409  # fenced: not deletable either
        assert (await api.ok("POST", "/v1/vms/f/resume?force=true"))["state"] == "running"
        st = await api.ok("GET", "/v1/migrations/m-dead-peer")
        assert st["journal"]["step"] == "rolled_back" and "forced" in st["journal"]["reason"], st
        entries = (await api.ok("GET", "/v1/audit?action=resume+forced"))["entries"]
        assert len(entries) == 1 and entries[0]["target"] == "f" and "m-dead-peer" in entries[0]["detail"]
        assert (await a.request("POST", "/v1/vms/f/pause"))[0] == 200
        assert (await a.request("POST", "/v1/vms/f/resume"))[0] == 200  # settled: no fence
