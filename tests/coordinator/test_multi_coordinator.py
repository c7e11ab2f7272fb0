"""Several coordinators on one PostgreSQL database: placements never over-commit a
host, the once-per-fleet heartbeat monitor moves when its holder dies, and an SSE
client on one coordinator follows a migration driven by another."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from novacron.coordinator.api.hosts import MONITOR_LEASE
from novacron.coordinator.reconcile import RECONCILE_LEASE
from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent, serving
from tests.coordinator.test_api import read_sse, vm_spec


@pytest.fixture
def backend() -> str:
    return "postgres"


async def two_coordinators(tmp_path: Path, database_url: str,
                           **overrides: Any) -> tuple[Coordinator, Coordinator]:
    # Same tokens and the same grant-signing key: agents and operators may talk to either
    # (behind a load balancer), and agents trust the grants of both.
    key = str(tmp_path / "grant-signing.key")
    a = await start_coordinator(make_cfg(tmp_path / "a", database_url=database_url,
                                         grant_key_file=key, **overrides))
    b = await start_coordinator(make_cfg(tmp_path / "b", database_url=database_url,
                                         admin_token=a.cfg.admin_token,
                                         agent_token=a.cfg.agent_token, grant_key_file=key,
                                         **overrides))
    return a, b


async def test_concurrent_placements_on_two_coordinators_never_overcommit(
        tmp_path: Path, database_url: str) -> None:
    a, b = await two_coordinators(tmp_path, database_url)
    sizes = {"h1": 2 << 30, "h2": 1536 << 20, "h3": 1 << 30}  # room for 8 + 6 + 4 VMs of 256 MiB
    fakes = [FakeAgent(n, f"tok-{n}-x-per-host-token", memory_bytes=m) for n, m in sizes.items()]
    try:
        async with serving(*fakes):
            for fake in fakes:
                await fake.register_with(a.session, a.url, a.cfg.agent_token)
            for round_ in range(2):  # the second round finds the fleet nearly full
                specs = [vm_spec(f"r{round_}v{i}", 256) for i in range(30)]
                results = await asyncio.gather(*(
                    (a if i % 2 else b).call("POST", "/vms", json=spec)
                    for i, spec in enumerate(specs)))
                assert all(status in (201, 409) for status, _ in results), results
            _, doc = await a.call("GET", "/vms")
            placed: dict[str, int] = {}
            for vm in doc["vms"]:
                placed[vm["host"]] = placed.get(vm["host"], 0) + vm["spec"]["memory_mb"]
            for fake in fakes:
                used = sum(v["memory_mb"] for v in fake.vms.values())
                assert used == placed.get(fake.name, 0)
                assert used << 20 <= fake.memory_bytes, f"{fake.name} over-committed"
            assert len(doc["vms"]) == 18  # every slot filled, none twice
    finally:
        await stop_coordinator(a)
        await stop_coordinator(b)


async def test_sse_on_one_coordinator_follows_a_migration_started_on_another(
        tmp_path: Path, database_url: str) -> None:
    a, b = await two_coordinators(tmp_path, database_url)
    try:
        async with serving(FakeAgent("alpha", "tok-a-1234-per-host-token"),
                           FakeAgent("beta", "tok-b-1234-per-host-token", memory_bytes=4 << 30)) as fakes:
            for fake in fakes:
                await fake.register_with(b.session, b.url, b.cfg.agent_token)
            assert (await b.call("POST", "/vms", json=vm_spec("m1")))[0] == 201
            fakes[0].hold_migrations = True  # parked in pre-copy until the reader on A is there
            status, mig = await b.call("POST", "/migrations", json={"vm": "m1", "target": "beta"})
            assert status == 202, mig
            reader = asyncio.create_task(read_sse(a, mig["id"]))
            await asyncio.sleep(0.3)
            fakes[0].hold_migrations = False  # B's poller walks it on; only NOTIFY tells A
            events = await asyncio.wait_for(reader, 15)
            phases = [e["phase"] for e in events]
            assert phases[-1] == "completed"
            assert "stopcopy" in phases and "commit" in phases, phases  # live, not a re-read
            assert (await a.call("GET", "/vms/m1"))[1]["host"] == "beta"
    finally:
        await stop_coordinator(a)
        await stop_coordinator(b)


async def test_two_coordinators_never_start_two_migrations_of_one_vm(
        tmp_path: Path, database_url: str) -> None:
    a, b = await two_coordinators(tmp_path, database_url)
    try:
        async with serving(FakeAgent("alpha", "tok-a-5678-per-host-token"),
                           FakeAgent("beta", "tok-b-5678-per-host-token", memory_bytes=4 << 30)) as fakes:
            for fake in fakes:
                await fake.register_with(a.session, a.url, a.cfg.agent_token)
            for i in range(4):
                assert (await a.call("POST", "/vms", json=vm_spec(f"d{i}", host="alpha")))[0] == 201
            fakes[0].hold_migrations = True
            for i in range(4):  # both coordinators asked at the same moment, several times
                results = await asyncio.gather(*(
                    c.call("POST", "/migrations", json={"vm": f"d{i}", "target": "beta"})
                    for c in (a, b, a, b)))
                assert sorted(s for s, _ in results) == [202, 409, 409, 409], results
            _, doc = await a.call("GET", "/migrations")
            assert len(doc["migrations"]) == 4
            fakes[0].hold_migrations = False
    finally:
        await stop_coordinator(a)
        await stop_coordinator(b)


async def _health(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/api/v1/health") as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_killing_the_lease_holder_moves_its_loops_and_migrations_within_the_lease_time(
        tmp_path: Path, database_url: str, script_env: dict[str, str]) -> None:
    ttl = 2.0
    first = make_cfg(tmp_path / "a", database_url=database_url, lease_ttl_s=ttl,
                     heartbeat_interval_s=0.2, heartbeat_timeout_s=1.0)
    env = {**script_env, "NOVACRON_COORDINATOR_DATA_DIR": str(first.data_dir),
           "NOVACRON_COORDINATOR_ADMIN_TOKEN": first.admin_token,
           "NOVACRON_COORDINATOR_AGENT_TOKEN": first.agent_token,
           "NOVACRON_COORDINATOR_DATABASE_URL": database_url,
           "NOVACRON_COORDINATOR_LEASE_TTL_S": str(ttl),
           "NOVACRON_COORDINATOR_HEARTBEAT_INTERVAL_S": "0.2",
           "NOVACRON_COORDINATOR_HEARTBEAT_TIMEOUT_S": "1.0",
           "NOVACRON_COORDINATOR_MCP_ENABLED": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "novacron-coordinator"),
                             "--port", "0"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    session = aiohttp.ClientSession()
    fakes = [FakeAgent("alpha", "tok-alpha-1-per-host-token"), FakeAgent("beta", "tok-beta-1-per-host-token")]
    try:
        async with serving(*fakes):
            await _kill_and_take_over(tmp_path, database_url, proc, first, ttl, session, fakes)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        await session.close()


async def _kill_and_take_over(tmp_path: Path, database_url: str, proc: subprocess.Popen[bytes],
                              first: Any, ttl: float, session: aiohttp.ClientSession,
                              fakes: list[FakeAgent]) -> None:
    b: Coordinator | None = None
    admin = {"Authorization": f"Bearer {first.admin_token}"}
    try:
        listen = first.data_dir / "listen.json"
        for _ in range(300):  # bounded: 30 s
            if listen.exists() or proc.poll() is not None:
                break
            await asyncio.sleep(0.1)
        a_url = json.loads(listen.read_text())["url"]
        for _ in range(100):
            if MONITOR_LEASE in (await _health(session, a_url))["leases"]:
                break
            await asyncio.sleep(0.1)
        assert (await _health(session, a_url))["leases"] == sorted([MONITOR_LEASE, RECONCILE_LEASE])
        for fake in fakes:
            await fake.register_with(session, a_url, first.agent_token)
        async with session.post(a_url + "/api/v1/vms", json=vm_spec("mv", host="alpha"),
                                headers=admin) as resp:
            assert resp.status == 201
        fakes[0].hold_migrations = True  # still in pre-copy when its follower dies
        async with session.post(a_url + "/api/v1/migrations", headers=admin,
                                json={"vm": "mv", "target": "beta"}) as resp:
            assert resp.status == 202
            mig_id = (await resp.json())["id"]
        b = await start_coordinator(make_cfg(
            tmp_path / "b", database_url=database_url, admin_token=first.admin_token,
            agent_token=first.agent_token, lease_ttl_s=ttl, heartbeat_interval_s=0.2,
            heartbeat_timeout_s=1.0))
        await asyncio.sleep(ttl)  # B keeps asking; A keeps renewing
        assert (await _health(session, b.url))["leases"] == []
        os.killpg(proc.pid, signal.SIGKILL)  # no clean hand-over: the lease must expire
        proc.wait(10)
        killed = time.monotonic()
        while (await _health(session, b.url))["leases"] != sorted([MONITOR_LEASE, RECONCILE_LEASE]):
            assert time.monotonic() - killed < ttl + ttl / 3 + 1.0, "monitor and reconciliation did not move"
            await asyncio.sleep(0.05)
        # ... and B now does the monitor's work: a silent host goes down.
        fake = FakeAgent("quiet", "tok-quiet-1-per-host-token")
        fake.url = "http://127.0.0.1:9"
        await fake.register_with(b.session, b.url, b.cfg.agent_token)
        for _ in range(100):  # bounded: 5 s
            if (await b.call("GET", "/hosts/quiet"))[1]["state"] == "down":
                break
            await asyncio.sleep(0.05)
        assert (await b.call("GET", "/hosts/quiet"))[1]["state"] == "down"
        # B adopted the migration A was following: released, it completes through B.
        fakes[0].hold_migrations = False
        for _ in range(200):  # bounded: 10 s
            _, mig = await b.call("GET", f"/migrations/{mig_id}")
            if mig["phase"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert mig["phase"] == "completed", mig
        assert (await b.call("GET", "/vms/mv"))[1]["host"] == "beta"
        assert "mv" in fakes[1].vms
    finally:
        if b is not None:
            await stop_coordinator(b)


async def test_migration_limits_hold_across_coordinators(tmp_path: Path, database_url: str) -> None:
    """Fleet limit 2, migrations asked for on two coordinators at once: never more than
    two run, the rest queue, and every one completes (started by either coordinator)."""
    a, b = await two_coordinators(tmp_path, database_url, migration_limit_fleet=2,
                                  migration_limit_outbound=10, migration_limit_inbound=10,
                                  lease_ttl_s=1.0)
    fakes = [FakeAgent(n, f"tok-{n}-l-per-host-token") for n in ("h1", "h2")]
    try:
        async with serving(*fakes):
            for fake in fakes:
                await fake.register_with(a.session, a.url, a.cfg.agent_token)
            for i in range(6):
                status, _ = await a.call("POST", "/vms", json={**vm_spec(f"m{i}", 64), "host": "h1"})
                assert status == 201
            fakes[0].hold_migrations = True
            results = await asyncio.gather(*(
                (a if i % 2 else b).call("POST", "/migrations", json={"vm": f"m{i}", "target": "h2"})
                for i in range(6)))
            assert all(status == 202 for status, _ in results), results
            phases = [doc["phase"] for _, doc in results]
            assert phases.count("queued") == 4, phases
            fakes[0].hold_migrations = False
            ids = [doc["id"] for _, doc in results]
            deadline = time.monotonic() + 60
            while True:
                docs = [(await a.call("GET", f"/migrations/{i}"))[1] for i in ids]
                if all(d["phase"] == "completed" for d in docs):
                    break
                assert time.monotonic() < deadline, docs
                await asyncio.sleep(0.1)
            edges = sorted([(d["started_at"], 1) for d in docs] + [(d["finished_at"], -1) for d in docs])
            running = most = 0
            for _, step in edges:
                running += step
                most = max(most, running)
            assert most <= 2, docs
    finally:
        await stop_coordinator(a)
        await stop_coordinator(b)


async def test_heartbeats_shed_by_one_coordinator_hold_the_monitor_on_the_other(
        tmp_path: Path, database_url: str) -> None:
    """The heartbeat monitor runs on one coordinator; hosts that another one turned away
    (503) are silent too, and must not be marked down for it."""
    from tests.coordinator.test_heartbeat_shedding import BUSY_TOKEN, burst, state

    a, b = await two_coordinators(tmp_path, database_url, max_pending_heartbeats=1,
                                  heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0)
    try:
        holder = other = None
        for _ in range(100):  # bounded: 10 s
            for c, rest in ((a, b), (b, a)):
                if MONITOR_LEASE in (await _health(c.session, c.url))["leases"]:
                    holder, other = c, rest
            if holder is not None:
                break
            await asyncio.sleep(0.1)
        assert holder is not None and other is not None, "nobody took the monitor lease"
        for name, token in (("busy", BUSY_TOKEN), ("quiet", "tok-quiet-9-per-host-token")):
            fake = FakeAgent(name, token)
            fake.url = "http://127.0.0.1:9"
            await fake.register_with(other.session, other.url, other.cfg.agent_token)
        start, shed = time.monotonic(), 0
        while time.monotonic() - start < 2.0:  # bounded: over capacity past the timeout
            results = await burst(other, 40, BUSY_TOKEN)
            shed += sum(s == 503 for s, _ in results)
        assert shed > 0
        # "quiet" is silent past the timeout, but a coordinator was turning agents away
        assert await state(holder, "quiet") == "up"
        calm = time.monotonic()
        while await state(holder, "quiet") != "down":  # caught up: now silence counts
            assert time.monotonic() - calm < 1.25 + 0.25 + 1.0 + 1.0, "never marked down"
            await asyncio.sleep(0.05)
    finally:
        await stop_coordinator(b)
        await stop_coordinator(a)
