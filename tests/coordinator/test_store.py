"""Persistence: schema migrations, feature documents, and nothing lost across a restart."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from novacron.coordinator.models import VM, Host
from novacron.coordinator.store import schema
from novacron.coordinator.store.sqlite import SQLiteStore
from tests.coordinator.conftest import make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent, serving
from tests.coordinator.test_api import read_sse, vm_spec


async def test_schema_versions_are_recorded_and_applied_once(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    versions = await store.schema_versions()
    assert versions["core"] == len(schema.MIGRATIONS["core"])
    await store.put_host(Host("h", "http://x", "t", 1, 10, 5))
    assert (tmp_path / "c.db").stat().st_mode & 0o077 == 0  # holds agent tokens: owner only
    await store.close()
    await store.open()  # second open: no step re-run (a re-run CREATE TABLE would raise)
    assert await store.schema_versions() == versions
    assert [h.name for h in await store.list_hosts()] == ["h"]
    await store.close()


async def test_feature_component_migrations_and_documents(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.MIGRATIONS, "testfeature",
                        ["CREATE TABLE tf (k TEXT PRIMARY KEY, v INTEGER)"])
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    try:
        assert (await store.schema_versions())["testfeature"] == 1
        assert await store.execute("INSERT INTO tf VALUES (?, ?)", ("a", 1)) == 1
        assert await store.query("SELECT k, v FROM tf") == [("a", 1)]
        await store.put_doc("sched.decisions", "vm1", {"host": "h1", "score": 0.5})
        await store.put_doc("sched.decisions", "vm0", {"host": "h2"})
        assert await store.get_doc("sched.decisions", "vm1") == {"host": "h1", "score": 0.5}
        assert [k for k, _ in await store.list_docs("sched.decisions")] == ["vm0", "vm1"]
        assert await store.delete_doc("sched.decisions", "vm0")
        assert not await store.delete_doc("sched.decisions", "vm0")
        assert await store.get_doc("other", "vm1") is None
    finally:
        await store.close()


async def test_a_database_from_a_newer_coordinator_is_refused(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    await store.execute("INSERT INTO schema_version VALUES ('core', 99, 0)")
    await store.close()
    with pytest.raises(RuntimeError, match="newer"):
        await store.open()
    await store.close()


async def test_failed_step_leaves_the_schema_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.MIGRATIONS, "broken",
                        ["CREATE TABLE b1 (x); CREATE TABLE b1 (x)"])
    store = SQLiteStore(tmp_path / "c.db")
    with pytest.raises(sqlite3.OperationalError):
        await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "c.db")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "b1" not in tables
    assert conn.execute("SELECT COUNT(*) FROM schema_version WHERE component='broken'").fetchone()[0] == 0
    conn.close()


async def test_concurrent_heartbeats_are_batched_and_all_committed(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    try:
        for i in range(20):
            await store.put_host(Host(f"h{i}", "http://x", "t", 1, 1 << 30, 1 << 30))
        results = await asyncio.gather(*(
            store.heartbeat(f"h{i % 25}", {"memory_available_bytes": i, "load": float(i)}, 100.0 + i)
            for i in range(200)))
        assert [r is None for r in results] == [i % 25 >= 20 for i in range(200)]
        for i in range(20):
            host = await store.get_host(f"h{i}")
            assert host is not None
            last = max(j for j in range(200) if j % 25 == i)  # the newest heartbeat wins
            assert (host.memory_available_bytes, host.last_heartbeat) == (last, 100.0 + last)
    finally:
        await store.close()
    # Committed: a fresh connection sees them.
    conn = sqlite3.connect(tmp_path / "c.db")
    assert conn.execute("SELECT COUNT(*) FROM hosts WHERE last_heartbeat >= 100").fetchone()[0] == 20
    conn.close()


async def test_vm_record_round_trip(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "c.db")
    await store.open()
    vm = VM("v", "h", {"name": "v", "vcpus": 2, "memory_mb": 64, "kernel": "/k"}, "running",
            None, 1.5, 2.5)
    await store.put_vm(vm)
    assert await store.get_vm("v") == vm
    assert await store.list_vms(host="other") == []
    await store.close()


async def test_restart_loses_nothing_and_resumes_migrations(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "coord")
    fakes = [FakeAgent("alpha", "tok-alpha-per-host-token"), FakeAgent("beta", "tok-beta-per-host-token", memory_bytes=4 << 30)]
    async with serving(*fakes):
        c = await start_coordinator(cfg)
        try:
            for fake in fakes:
                await fake.register_with(c.session, c.url, cfg.agent_token)
            for name in ("a1", "a2", "a3"):
                assert (await c.call("POST", "/vms", json=vm_spec(name)))[0] == 201
            _, done = await c.call("POST", "/migrations", json={"vm": "a1", "target": "beta"})
            await asyncio.wait_for(read_sse(c, done["id"]), 10)
            fakes[0].hold_migrations = True  # this one is still running at the restart
            _, running = await c.call("POST", "/migrations", json={"vm": "a2", "target": "beta"})
            before = {p: (await c.call("GET", p))[1] for p in ("/hosts", "/vms", "/migrations")}
            assert before["/vms"]["vms"][0]["host"] == "beta"
        finally:
            await stop_coordinator(c)
        c = await start_coordinator(cfg)
        try:
            after = {p: (await c.call("GET", p))[1] for p in ("/hosts", "/vms", "/migrations")}
            running_before = next(m for m in before["/migrations"]["migrations"]
                                  if m["id"] == running["id"])
            running_after = next(m for m in after["/migrations"]["migrations"]
                                 if m["id"] == running["id"])
            # The resumed poller may have stored one more poll; everything else is identical.
            for key in ("phase", "round", "metrics", "updated_at"):
                running_after[key] = running_before[key]
            assert after == before
            fakes[0].hold_migrations = False
            events = await asyncio.wait_for(read_sse(c, running["id"]), 10)
            assert events[-1]["phase"] == "completed"
            assert (await c.call("GET", "/vms/a2"))[1]["host"] == "beta"
        finally:
            await stop_coordinator(c)


async def test_restart_settles_vms_left_creating(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "coord")
    fake = FakeAgent("alpha", "tok-alpha-per-host-token")
    async with serving(fake):
        c = await start_coordinator(cfg)
        try:
            await fake.register_with(c.session, c.url, cfg.agent_token)
            assert (await c.call("POST", "/vms", json=vm_spec("made")))[0] == 201
        finally:
            await stop_coordinator(c)
        # As if the coordinator died while agents were still working on two creates:
        # the agent finished "made"; "lost" never reached it.
        store = SQLiteStore(cfg.data_dir / "coordinator.db")
        await store.open()
        for name in ("made", "lost"):
            await store.put_vm(VM(name, "alpha", vm_spec(name), "creating", None, 1.0, 1.0))
        await store.close()
        c = await start_coordinator(cfg)
        try:
            _status, doc = await c.call("GET", "/vms")
            assert [(v["name"], v["state"]) for v in doc["vms"]] == [("made", "running")]
        finally:
            await stop_coordinator(c)
