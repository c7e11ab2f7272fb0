"""Persistence: schema migrations, feature documents, and nothing lost across a restart.

Every test here runs against SQLite and a real PostgreSQL (the ``backend`` fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from novacron.coordinator.models import VM, Host, VMSummary
from novacron.coordinator.store import Store, schema
from novacron.coordinator.store.postgres import core_migrations
from novacron.coordinator.store.sqlite import SQLiteStore
from tests.coordinator.conftest import BACKENDS, make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent, serving
from tests.coordinator.test_api import read_sse, vm_spec

MakeStore = Callable[[], Store]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def core_versions(backend: str) -> int:
    return len(schema.MIGRATIONS["core"]) if backend == "sqlite" else len(core_migrations())


async def tables(store: Store, backend: str) -> set[str]:
    sql = ("SELECT name FROM sqlite_master WHERE type = 'table'" if backend == "sqlite"
           else "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {str(r[0]) for r in await store.query(sql)}


async def test_schema_versions_are_recorded_and_applied_once(
        make_store: MakeStore, backend: str, tmp_path: Path) -> None:
    store = make_store()
    await store.open()
    versions = await store.schema_versions()  # type: ignore[attr-defined]
    assert versions["core"] == core_versions(backend)
    await store.put_host(Host("h", "http://x", "t", 1, 10, 5))
    if backend == "sqlite":
        assert (tmp_path / "c.db").stat().st_mode & 0o077 == 0  # holds agent tokens: owner only
    await store.close()
    await store.open()  # second open: no step re-run (a re-run CREATE TABLE would raise)
    assert await store.schema_versions() == versions  # type: ignore[attr-defined]
    assert [h.name for h in await store.list_hosts()] == ["h"]
    await store.close()


async def test_coordinators_starting_at_once_migrate_once(make_store: MakeStore) -> None:
    stores = [make_store() for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))  # the advisory lock lets one migrate
    try:
        for s in stores:
            assert (await s.schema_versions())["core"] >= 1  # type: ignore[attr-defined]
    finally:
        for s in stores:
            await s.close()


async def test_feature_component_migrations_and_documents(
        make_store: MakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.MIGRATIONS, "testfeature",
                        ["CREATE TABLE tf (k TEXT PRIMARY KEY, v INTEGER)"])
    store = make_store()
    await store.open()
    try:
        assert (await store.schema_versions())["testfeature"] == 1  # type: ignore[attr-defined]
        assert await store.execute("INSERT INTO tf VALUES (?, ?)", ("a", 1)) == 1
        assert await store.query("SELECT k, v FROM tf WHERE k = ?", ("a",)) == [("a", 1)]
        assert await store.query("SELECT k FROM tf WHERE k = '?'") == []  # quoted: not a parameter
        await store.put_doc("sched.decisions", "vm1", {"host": "h1", "score": 0.5})
        await store.put_doc("sched.decisions", "vm0", {"host": "h2"})
        assert await store.get_doc("sched.decisions", "vm1") == {"host": "h1", "score": 0.5}
        assert [k for k, _ in await store.list_docs("sched.decisions")] == ["vm0", "vm1"]
        assert await store.delete_doc("sched.decisions", "vm0")
        assert not await store.delete_doc("sched.decisions", "vm0")
        assert await store.get_doc("other", "vm1") is None
    finally:
        await store.close()


async def test_a_database_from_a_newer_coordinator_is_refused(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    await store.execute("INSERT INTO schema_version VALUES ('core', 99, 0)")
    await store.close()
    with pytest.raises(RuntimeError, match="newer"):
        await store.open()
    await store.close()


async def test_failed_step_leaves_the_schema_unchanged(
        make_store: MakeStore, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(schema.MIGRATIONS, "broken",
                        ["CREATE TABLE b1 (x INTEGER); CREATE TABLE b1 (x INTEGER)"])
    store = make_store()
    with pytest.raises(Exception, match="b1"):
        await store.open()
    await store.close()
    monkeypatch.undo()
    store = make_store()
    await store.open()
    try:
        assert "b1" not in await tables(store, backend)
        assert await store.query(
            "SELECT COUNT(*) FROM schema_version WHERE component = 'broken'") == [(0,)]
    finally:
        await store.close()


async def test_concurrent_heartbeats_are_batched_and_all_committed(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    try:
        for i in range(20):
            await store.put_host(Host(f"h{i}", "http://x", "t", 1, 1 << 30, 1 << 30))
        results = await asyncio.gather(*(
            store.heartbeat(f"h{i % 25}", {"memory_available_bytes": i, "load": float(i)}, 100.0 + i)
            for i in range(200)))
        assert results == [i % 25 < 20 for i in range(200)]  # False: not registered
        for i in range(20):
            host = await store.get_host(f"h{i}")
            assert host is not None
            last = max(j for j in range(200) if j % 25 == i)  # the newest heartbeat wins
            assert (host.state, host.memory_available_bytes, host.load, host.last_heartbeat) == \
                ("up", last, float(last), 100.0 + last)
            assert (host.url, host.token, host.cpus) == ("http://x", "t", 1)  # the rest is kept
    finally:
        await store.close()
    # Committed: a fresh store sees them.
    store = make_store()
    await store.open()
    try:
        assert await store.query("SELECT COUNT(*) FROM hosts WHERE last_heartbeat >= 100") == [(20,)]
    finally:
        await store.close()


async def test_vm_record_round_trip(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    vm = VM("v", "h", {"name": "v", "vcpus": 2, "memory_mb": 64, "kernel": "/k"}, "running",
            None, 1.5, 2.5)
    await store.put_vm(vm)
    assert await store.get_vm("v") == vm
    assert await store.list_vms(host="other") == []
    # summaries read the same fields out of the stored document, sizes as ints
    await store.put_vm(VM("u", "h2", {"name": "u", "memory_mb": 32}, "creating"))
    assert await store.vm_summaries() == [VMSummary("u", "h2", "creating", 0, 32),
                                          VMSummary("v", "h", "running", 2, 64)]
    await store.close()


async def test_vms_to_reconcile_names_only_records_behind_the_reports(make_store: MakeStore) -> None:
    """The database picks the VMs the reconciler must look at (fleet-scale pass)."""
    store = make_store()
    await store.open()
    try:
        for name, state, vms in [("h1", "up", ["a", "b", "e", "stray"]), ("h2", "up", ["b"]),
                                 ("h3", "down", ["c"]), ("h4", "up", [])]:
            await store.put_host(Host(name, "http://x", "t", 1, 1, 1, state=state, vms=vms))
        await store.put_host(Host("h5", "http://x", "t", 1, 1, 1, vms=None))  # type: ignore[arg-type]
        spec = {"name": "x", "memory_mb": 64}
        for name, host, state in [("a", "h1", "running"), ("b", "h1", "running"),
                                  ("c", "h1", "running"), ("d", "h2", "creating"),
                                  ("e", "h1", "migrating"), ("f", "h4", "stopped")]:
            await store.put_vm(VM(name, host, spec, state))
        # b: also on h2; c: only a down host says otherwise; d, e: in flight; f: unreported
        assert await store.state_counts() == ({"up": 4, "down": 1},
                                              {"running": 3, "creating": 1, "migrating": 1, "stopped": 1})
        assert await store.vms_to_reconcile() == {"b": ["h1", "h2"], "d": [], "e": ["h1"]}
        await store.heartbeat("h2", {"memory_available_bytes": 1, "vms": []}, 10.0)
        assert await store.vms_to_reconcile() == {"d": [], "e": ["h1"]}
    finally:
        await store.close()


async def test_claims_fail_on_a_host_changed_since_it_was_read(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()  # two coordinators on one database
    await a.open()
    await b.open()
    try:
        await a.put_host(Host("h", "http://x", "t", 4, 8 << 30, 8 << 30))
        seen_a, seen_b = await a.get_host("h"), await b.get_host("h")
        assert seen_a is not None and seen_b is not None
        assert seen_a.generation == seen_b.generation
        vm1 = VM("v1", "h", {"memory_mb": 64}, created_at=1.0, updated_at=1.0)
        vm2 = VM("v2", "h", {"memory_mb": 64}, created_at=1.0, updated_at=1.0)
        assert await a.claim_vm(vm1, seen_a.generation) == "claimed"
        assert await b.claim_vm(vm2, seen_b.generation) == "stale"  # decided on old records
        assert await b.get_vm("v2") is None
        fresh = await b.get_host("h")
        assert fresh is not None and fresh.generation > seen_b.generation
        assert await b.claim_vm(VM("v1", "h", {}), fresh.generation) == "taken"
        assert (await b.get_host("h")).generation == fresh.generation  # type: ignore[union-attr]
        assert await b.claim_vm(vm2, fresh.generation) == "claimed"
        assert await b.claim_vm(VM("v3", "nohost", {}), 0) == "stale"
        await a.put_vm(VM("v1", "h", {"memory_mb": 64}, state="running"))  # moves it too
        assert (await a.get_host("h")).generation > fresh.generation + 1  # type: ignore[union-attr]
        assert [v.name for v in await a.list_vms("h")] == ["v1", "v2"]
    finally:
        await a.close()
        await b.close()


async def test_lease_has_one_holder_and_a_new_token_per_holder(make_store: MakeStore) -> None:
    a, b = make_store(), make_store()
    await a.open()
    await b.open()
    try:
        await a.put_host(Host("h", "http://x", "t", 1, 10, 5, last_heartbeat=1.0))
        token = await a.acquire_lease("monitor", "A", 30)
        assert token is not None
        assert await b.acquire_lease("monitor", "B", 30) is None  # held by A
        assert await a.acquire_lease("monitor", "A", 30) == token  # renewal keeps the token
        assert await b.mark_down(10.0, fence=("monitor", "B", token)) == []  # B holds nothing
        await a.release_lease("monitor", "A")
        token_b = await b.acquire_lease("monitor", "B", 0.5)
        assert token_b is not None and token_b > token
        # A's old token no longer fences anything; B's does.
        assert await a.mark_down(10.0, fence=("monitor", "A", token)) == []
        assert (await a.get_host("h")).state == "up"  # type: ignore[union-attr]
        assert await b.mark_down(10.0, fence=("monitor", "B", token_b)) == ["h"]
        await asyncio.sleep(0.6)  # B's short lease runs out without renewal
        assert await b.mark_down(10.0, fence=("monitor", "B", token_b)) == []
        assert await a.acquire_lease("monitor", "A", 30) == token_b + 1
    finally:
        await a.close()
        await b.close()


async def test_restart_loses_nothing_and_resumes_migrations(
        tmp_path: Path, database_url: str) -> None:
    cfg = make_cfg(tmp_path / "coord", database_url=database_url)
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


async def test_restart_settles_vms_left_creating(
        tmp_path: Path, database_url: str, make_store: MakeStore) -> None:
    cfg = make_cfg(tmp_path / "coord", database_url=database_url)
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
        store = make_store() if database_url else SQLiteStore(cfg.data_dir / "coordinator.db")
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


async def test_put_vm_if_sets_only_from_the_expected_state(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    try:
        await store.put_vm(VM("v", "h", {}, state="running"))
        assert await store.put_vm_if(VM("v", "h", {}, state="migrating"), "running")
        assert not await store.put_vm_if(VM("v", "h", {}, state="migrating"), "running")
        assert (await store.get_vm("v")).state == "migrating"  # type: ignore[union-attr]
        assert not await store.put_vm_if(VM("nope", "h", {}, state="migrating"), "running")
        assert await store.get_vm("nope") is None
        # and still on the expected host: a label change read before a move does not undo it
        await store.put_vm(VM("v", "h2", {}, state="running"))
        stale = VM("v", "h", {}, state="running", labels={"tier": "batch"})
        assert not await store.put_vm_if(stale, "running", "h")
        moved = await store.get_vm("v")
        assert moved is not None and moved.host == "h2" and moved.labels == {}
        assert await store.put_vm_if(VM("v", "h2", {}, state="running", labels={"a": "b"}),
                                     "running", "h2")
        assert (await store.get_vm("v")).labels == {"a": "b"}  # type: ignore[union-attr]
    finally:
        await store.close()
