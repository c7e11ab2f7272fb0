"""Concurrency limits, queued migrations and drains through the API, with fake agents
(the end to end with real agents and guests is test_fleet_ops_e2e.py); on SQLite and
on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from novacron.coordinator.api.keys import STORE
from novacron.coordinator.client import CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.conftest import (
    BACKENDS,
    Coordinator,
    make_cfg,
    start_coordinator,
    stop_coordinator,
)
from tests.coordinator.fake_agent import FakeAgent, register_all, serving
from tests.coordinator.test_api import vm_spec
from tests.coordinator.test_cli import cli, cli_env

LIMITS = {"migration_limit_outbound": 2, "migration_limit_inbound": 2, "migration_limit_fleet": 3}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def fleet(tmp_path: Path, database_url: str) -> AsyncIterator[tuple[Coordinator, list[FakeAgent]]]:
    """A coordinator with limits 2 out / 2 in / 3 fleet and three fake hosts; only alpha
    has the network ``prod``."""
    c = await start_coordinator(make_cfg(tmp_path / "coord", database_url=database_url, **LIMITS))
    try:
        async with serving(*(FakeAgent(n, f"tok-{n}-" + secrets.token_hex(8), memory_bytes=16 << 30)
                             for n in ("alpha", "beta", "gamma"))) as fakes:
            fakes[0].networks = ["prod"]
            for fake in fakes:
                await fake.register_with(c.session, c.url, c.cfg.agent_token)
            yield c, fakes
    finally:
        await stop_coordinator(c)


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 30.0) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)


async def create(c: Coordinator, name: str, host: str, **kw: Any) -> None:
    status, doc = await c.call("POST", "/vms", json={**vm_spec(name, memory_mb=64, **kw), "host": host})
    assert status == 201, doc


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals],
                   key=lambda x: (x[0], x[1]))  # an end before a start at the same instant
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def overlaps(migs: list[dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict[str, int]:
    """Per group (``key``), the most migrations running at once, from the records."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for m in migs:
        assert m["started_at"] is not None and m["finished_at"] is not None, m
        groups.setdefault(key(m), []).append((m["started_at"], m["finished_at"]))
    return {k: max_overlap(v) for k, v in groups.items()}


async def test_a_fourth_migration_queues_and_starts_when_a_slot_frees(
        fleet: tuple[Coordinator, list[FakeAgent]]) -> None:
    c, (alpha, beta, gamma) = fleet
    for i, host in enumerate(["alpha", "alpha", "beta", "beta", "gamma"]):
        await create(c, f"v{i}", host)
    for fake in (alpha, beta, gamma):
        fake.hold_migrations = True  # they stay in pre-copy: the slots stay taken
    moves = [("v0", "beta"), ("v1", "gamma"), ("v2", "gamma"), ("v3", "alpha"), ("v4", "alpha")]
    migs = []
    for vm, target in moves:
        status, mig = await c.call("POST", "/migrations", json={"vm": vm, "target": target})
        assert status == 202, mig
        migs.append(mig)
    assert [m["phase"] for m in migs[:3]] != ["queued"] * 3
    assert migs[3]["phase"] == migs[4]["phase"] == "queued"
    assert migs[3]["queue_reason"] == "the fleet runs 3 migrations (limit 3)", migs[3]
    assert migs[3]["started_at"] is None
    # queued, not failed, and its VM is untouched
    status, doc = await c.call("GET", f"/migrations/{migs[3]['id']}")
    assert status == 200 and doc["phase"] == "queued" and doc["error"] is None
    assert (await c.call("GET", "/vms/v3"))[1]["state"] == "running"
    assert not any(r["vm"] == "v3" for r in beta.migration_requests)  # the agent was not asked
    # a second migration of a VM that waits in the queue is refused
    status, doc = await c.call("POST", "/migrations", json={"vm": "v3", "target": "gamma"})
    assert status == 409 and "already migrating" in doc["error"] and "queued" in doc["error"], doc

    # cancel works on a queued migration; the VM stays, nothing reached the agent
    status, doc = await c.call("POST", f"/migrations/{migs[4]['id']}/cancel")
    assert status == 202 and doc["phase"] == "cancelled", doc
    vm = (await c.call("GET", "/vms/v4"))[1]
    assert vm["host"] == "gamma" and vm["state"] == "running", vm
    assert not any(r["vm"] == "v4" for r in gamma.migration_requests)

    # deleting a VM whose migration waits in the queue drops the migration too
    await create(c, "gone", "beta")
    status, queued = await c.call("POST", "/migrations", json={"vm": "gone", "target": "gamma"})
    assert status == 202 and queued["phase"] == "queued", queued
    status, doc = await c.call("DELETE", "/vms/gone")
    assert status == 200, doc
    status, doc = await c.call("GET", f"/migrations/{queued['id']}")
    assert doc["phase"] == "cancelled" and "gone" not in beta.vms, doc

    for fake in (alpha, beta, gamma):
        fake.hold_migrations = False

    async def all_done() -> list[dict[str, Any]] | None:
        docs = [(await c.call("GET", f"/migrations/{m['id']}"))[1] for m in migs[:4]]
        return docs if all(d["phase"] == "completed" for d in docs) else None

    done = await until("the four migrations completed", all_done)
    assert {v: (await c.call("GET", f"/vms/{v}"))[1]["host"] for v in ("v0", "v1", "v2", "v3")} == \
        {"v0": "beta", "v1": "gamma", "v2": "gamma", "v3": "alpha"}
    # the queued one started only after one of the first three had finished
    assert done[3]["started_at"] >= min(d["finished_at"] for d in done[:3])
    assert max(overlaps(done, lambda m: "fleet").values()) <= 3


async def test_drain_moves_every_vm_off_and_reports_the_one_that_cannot_move(
        fleet: tuple[Coordinator, list[FakeAgent]]) -> None:
    c, (alpha, _beta, _gamma) = fleet
    for name in ("v1", "v2", "v3"):
        await create(c, name, "alpha")
    await create(c, "pinned", "alpha", nics=[{"net": "prod"}])  # only alpha has prod
    alpha.hold_migrations = True
    status, drain = await c.call("POST", "/hosts/alpha/drain", json={"max_parallel": 2})
    assert status == 202, drain
    assert drain["host"] == "alpha" and drain["state"] == "running" and drain["max_parallel"] == 2
    assert sorted(v["vm"] for v in drain["vms"]) == ["pinned", "v1", "v2", "v3"]
    host = (await c.call("GET", "/hosts/alpha"))[1]
    assert host["lifecycle"] == "draining" and host["drain"] == drain["id"] and host["maintenance"]
    listed = {h["name"]: h for h in (await c.call("GET", "/hosts"))[1]["hosts"]}
    assert listed["alpha"]["lifecycle"] == "draining" and listed["beta"]["lifecycle"] == "active"
    # while it runs: no second drain, maintenance stays on
    status, doc = await c.call("POST", "/hosts/alpha/drain", json={})
    assert status == 409 and "being drained already" in doc["error"] and drain["id"] in doc["error"]
    status, doc = await c.call("PUT", "/hosts/alpha/maintenance", json={"maintenance": False})
    assert status == 409 and "being drained" in doc["error"], doc

    async def moving() -> Any:
        doc = (await c.call("GET", f"/drains/{drain['id']}"))[1]
        return doc if sum(v["state"] == "migrating" for v in doc["vms"]) == 2 else None

    doc = await until("two VMs migrating", moving)
    assert sum(v["state"] == "pending" for v in doc["vms"]) + \
        sum(v["state"] == "failed" for v in doc["vms"]) == 2  # max_parallel holds the rest
    alpha.hold_migrations = False

    async def finished() -> Any:
        doc = (await c.call("GET", f"/drains/{drain['id']}"))[1]
        return doc if doc["state"] != "running" else None

    doc = await until("the drain ended", finished)
    assert doc["state"] == "failed" and doc["finished_at"] >= doc["created_at"]
    by_vm = {v["vm"]: v for v in doc["vms"]}
    for name in ("v1", "v2", "v3"):
        assert by_vm[name]["state"] == "moved" and by_vm[name]["target"] in ("beta", "gamma"), by_vm
        assert (await c.call("GET", f"/vms/{name}"))[1]["host"] == by_vm[name]["target"]
    assert by_vm["pinned"]["state"] == "failed" and by_vm["pinned"]["migration"] is None
    assert by_vm["pinned"]["error"] == ("no host can take it: no other up host has the "
                                        "network(s) prod; it stays on alpha"), by_vm["pinned"]
    vm = (await c.call("GET", "/vms/pinned"))[1]
    assert vm["host"] == "alpha" and vm["state"] == "running" and "pinned" in alpha.vms
    host = (await c.call("GET", "/hosts/alpha"))[1]
    assert host["lifecycle"] == "maintenance" and host["drain"] is None
    assert [d["id"] for d in (await c.call("GET", "/drains"))[1]["drains"]] == [drain["id"]]
    # the limits held: at most 2 out of alpha, 2 into each host, 3 in the fleet
    migs = [m for m in (await c.call("GET", "/migrations"))[1]["migrations"]]
    assert len(migs) == 3
    assert max(overlaps(migs, lambda m: m["source"]).values()) <= 2
    assert max(overlaps(migs, lambda m: m["target"]).values()) <= 2
    # maintenance ends by hand after the drain
    status, doc = await c.call("PUT", "/hosts/alpha/maintenance", json={"maintenance": False})
    assert status == 200 and doc["lifecycle"] == "active"


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/hosts/nope/drain", {}, 404, "no host named 'nope'"),
    ("/hosts/alpha/drain", {"max_parallel": 0}, 400, "max_parallel"),
    ("/hosts/alpha/drain", {"max_parallel": -3}, 400, "max_parallel"),
    ("/hosts/alpha/drain", {"max_parallel": 100000}, 400, "max_parallel"),
    ("/hosts/alpha/drain", {"max_parallel": "2"}, 400, "max_parallel"),
    ("/hosts/alpha/drain", {"max_parallel": 2, "force": True}, 400, "force"),
    ("/hosts/alpha%2F..%2Fbeta/drain", {}, 400, "not a valid name"),
])  # fmt: skip
async def test_bad_drain_requests_change_nothing(fleet: tuple[Coordinator, list[FakeAgent]],
                                                 path: str, body: dict, status: int,
                                                 words: str) -> None:
    c, _fakes = fleet
    await create(c, "v1", "alpha")
    got, doc = await c.call("POST", path, json=body)
    assert got == status and words in doc["error"], doc
    host = (await c.call("GET", "/hosts/alpha"))[1]
    assert host["maintenance"] is False and host["lifecycle"] == "active"
    assert (await c.call("GET", "/drains"))[1]["drains"] == []
    assert (await c.call("GET", "/migrations"))[1]["migrations"] == []
    assert (await c.call("GET", "/drains/d-0123456789ab"))[0] == 404


async def test_queued_migration_survives_a_coordinator_restart(
        tmp_path: Path, database_url: str) -> None:
    cfg = make_cfg(tmp_path / "coord", database_url=database_url, migration_limit_fleet=1,
                   lease_ttl_s=1.0)
    async with serving(FakeAgent("alpha", "tok-alpha-" + secrets.token_hex(8)),
                       FakeAgent("beta", "tok-beta-" + secrets.token_hex(8))) as (alpha, beta):
        c = await start_coordinator(cfg)
        try:
            for fake in (alpha, beta):
                await fake.register_with(c.session, c.url, cfg.agent_token)
            await create(c, "v1", "alpha")
            await create(c, "v2", "alpha")
            alpha.hold_migrations = True
            first = (await c.call("POST", "/migrations", json={"vm": "v1", "target": "beta"}))[1]
            second = (await c.call("POST", "/migrations", json={"vm": "v2", "target": "beta"}))[1]
            assert first["phase"] != "queued" and second["phase"] == "queued", (first, second)
        finally:
            await stop_coordinator(c)
        c = await start_coordinator(cfg)  # the same store: it adopts one, and keeps the other queued
        try:
            assert (await c.call("GET", f"/migrations/{second['id']}"))[1]["phase"] == "queued"
            alpha.hold_migrations = False

            async def both_done() -> bool:
                docs = [(await c.call("GET", f"/migrations/{m['id']}"))[1] for m in (first, second)]
                return all(d["phase"] == "completed" for d in docs)

            await until("both migrations completed after the restart", both_done)
            assert (await c.call("GET", "/vms/v2"))[1]["host"] == "beta"
        finally:
            await stop_coordinator(c)


async def test_drain_of_a_down_host_and_a_changed_rebalance_plan_are_refused(
        fleet: tuple[Coordinator, list[FakeAgent]]) -> None:
    c, _fakes = fleet
    await create(c, "v1", "alpha")
    await create(c, "v2", "beta")
    await create(c, "v3", "beta")
    store = c.server.app[STORE]
    gamma = await store.get_host("gamma")
    assert gamma is not None
    gamma.state = "down"
    await store.put_host(gamma)
    status, doc = await c.call("POST", "/hosts/gamma/drain", json={})
    assert status == 409 and "is down" in doc["error"], doc
    assert (await c.call("GET", "/hosts/gamma"))[1]["maintenance"] is False

    plan = (await c.call("POST", "/rebalance/plan", json={}))[1]
    assert [(m["vm"], m["target"]) for m in plan["moves"]] == [("v1", "beta")], plan
    seen = [{"vm": "v1", "source": "alpha", "target": "gamma"}]  # not what the plan says now
    status, doc = await c.call("POST", "/rebalance/plan", json={"apply": True, "expect": seen})
    assert status == 409 and "plan changed" in doc["error"], doc
    status, doc = await c.call("POST", "/rebalance/plan", json={"expect": seen})
    assert status == 400 and "only with apply" in doc["error"], doc
    status, doc = await c.call("POST", "/rebalance/plan", json={"apply": True, "max_parallel": 0})
    assert status == 400 and "max_parallel" in doc["error"], doc
    assert (await c.call("GET", "/drains"))[1]["drains"] == []
    assert (await c.call("GET", "/migrations"))[1]["migrations"] == []

    expect = [{k: m[k] for k in ("vm", "source", "target")} for m in plan["moves"]]
    status, doc = await c.call("POST", "/rebalance/plan", json={"apply": True, "expect": expect})
    assert status == 200 and doc["drain"]["kind"] == "rebalance", doc

    async def ended() -> Any:
        run = (await c.call("GET", f"/drains/{doc['drain']['id']}"))[1]
        return run if run["state"] != "running" else None

    run = await until("the rebalance run ended", ended)
    assert run["state"] == "done" and run["host"] is None
    assert (await c.call("GET", "/vms/v1"))[1]["host"] == "beta"


@pytest.mark.e2e
async def test_cli_drain_no_wait_show_list_and_rebalance_needs_yes(tmp_path: Path) -> None:
    fakes = [FakeAgent(n, f"tok-{n}-" + secrets.token_hex(8)) for n in ("alpha", "beta")]
    # fake agents send no heartbeats: the hosts must not be marked down during the test
    async with LocalCoordinator(tmp_path / "coord", settings={
            "poll_interval_s": "0.02", "heartbeat_timeout_s": "600",
            "migration_limit_fleet": "1"}) as coord, serving(*fakes):
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            await register_all(client, fakes, coord.agent_token)
            for name in ("web", "db"):
                await client.create_vm({**vm_spec(name, memory_mb=64), "host": "alpha"})
        env = cli_env(coord, tmp_path, COLUMNS="120")
        fakes[0].hold_migrations = True  # the drain stays running while we look
        code, out, err = await cli(env, "host", "drain", "alpha", "--no-wait")
        drain_id = out.strip()
        assert code == 0 and drain_id.startswith("d-") and len(out.splitlines()) == 1, out + err
        code, out, err = await cli(env, "hosts")
        row = next(line for line in out.splitlines() if "alpha" in line)
        assert code == 0 and "draining" in row, out + err
        code, out, err = await cli(env, "host", "show", "alpha")
        assert code == 0 and "draining" in out and drain_id in out, out + err
        code, out, err = await cli(env, "host", "drain", "alpha")
        assert code == 1 and "being drained already" in err and drain_id in err, err
        # fleet limit 1: the drain's second move waits in the queue, and says why
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            for _ in range(100):
                doc = await client.request("GET", f"/drains/{drain_id}")
                if sorted(v["state"] for v in doc["vms"]) == ["migrating", "queued"]:
                    break
                await asyncio.sleep(0.1)
        queued = next(v["migration"] for v in doc["vms"] if v["state"] == "queued")
        code, out, err = await cli(env, "migration", "show", queued)
        text = " ".join(out.split())
        assert code == 0 and "queued" in text and "the fleet runs 1 migration (limit 1)" in text, out
        code, out, err = await cli(env, "migration", "list")
        assert code == 0 and "queued" in out, out + err
        fakes[0].hold_migrations = False
        code, out, err = await cli(env, "drain", "show", drain_id, "--follow")
        assert code == 0, out + err
        assert "drain of alpha " + drain_id + ": 2 of 2 VMs moved" in " ".join(out.split()), out
        code, out, err = await cli(env, "drain", "list")
        assert code == 0 and drain_id in out and "2/2" in out, out + err
        code, out, err = await cli(env, "host", "show", "alpha")
        assert code == 0 and "maintenance" in out, out + err
        code, out, err = await cli(env, "host", "drain", "nope")
        assert code == 1 and err.strip() == "novacron: error: no host named 'nope' (HTTP 404)", err
        code, out, err = await cli(env, "host", "drain", "alpha", "--max-parallel", "0")
        assert code == 1 and "--max-parallel" in err, err
        # alpha is empty and in maintenance; beta holds both: bring one back to have a plan
        code, out, err = await cli(env, "host", "maintenance", "alpha", "off")
        assert code == 0, err
        code, out, err = await cli(env, "migrate", "web", "--to", "alpha")
        assert code == 0, out + err
        code, out, err = await cli(env, "rebalance", "--apply")  # no terminal to ask on
        assert code == 1 and "add --yes" in err and "Rebalancing plan" in out, out + err
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            assert (await client.vm("web"))["host"] == "alpha"  # nothing moved
            assert len((await client.request("GET", "/drains"))["drains"]) == 1


async def test_a_drain_cut_by_a_coordinator_restart_is_finished_by_the_next_one(
        tmp_path: Path, database_url: str) -> None:
    cfg = make_cfg(tmp_path / "coord", database_url=database_url, lease_ttl_s=1.0, **LIMITS)
    async with serving(*(FakeAgent(n, f"tok-{n}-" + secrets.token_hex(8)) for n in
                         ("alpha", "beta", "gamma"))) as fakes:
        c = await start_coordinator(cfg)
        try:
            for fake in fakes:
                await fake.register_with(c.session, c.url, cfg.agent_token)
            for name in ("v1", "v2", "v3"):
                await create(c, name, "alpha")
            fakes[0].hold_migrations = True
            status, drain = await c.call("POST", "/hosts/alpha/drain", json={"max_parallel": 2})
            assert status == 202, drain

            async def two_moving() -> bool:
                doc = (await c.call("GET", f"/drains/{drain['id']}"))[1]
                return sum(v["state"] == "migrating" for v in doc["vms"]) == 2

            await until("two VMs migrating", two_moving)
        finally:
            await stop_coordinator(c)
        c = await start_coordinator(cfg)  # same store: it adopts the drain and its migrations
        try:
            host = (await c.call("GET", "/hosts/alpha"))[1]
            assert host["lifecycle"] == "draining" and host["drain"] == drain["id"]
            fakes[0].hold_migrations = False

            async def ended() -> Any:
                doc = (await c.call("GET", f"/drains/{drain['id']}"))[1]
                return doc if doc["state"] != "running" else None

            doc = await until("the drain ended after the restart", ended)
            assert doc["state"] == "done", doc
            assert all(v["state"] == "moved" for v in doc["vms"]), doc
            migs = (await c.call("GET", "/migrations"))[1]["migrations"]
            assert sorted(m["vm"] for m in migs) == ["v1", "v2", "v3"]  # none started twice
            assert (await c.call("GET", "/hosts/alpha"))[1]["lifecycle"] == "maintenance"
        finally:
            await stop_coordinator(c)


async def test_rebalance_plans_no_move_to_a_host_lacking_the_vms_network(
        fleet: tuple[Coordinator, list[FakeAgent]]) -> None:
    c, _fakes = fleet
    await create(c, "netvm", "alpha", nics=[{"net": "prod"}])  # only alpha has prod
    await create(c, "v2", "beta")
    await create(c, "v3", "beta")
    plan = (await c.call("POST", "/rebalance/plan", json={}))[1]
    # alpha is the emptiest, but beta lacks prod: beta is emptied onto alpha instead
    assert [(m["vm"], m["target"]) for m in plan["moves"]] == [("v2", "alpha"), ("v3", "alpha")], plan
    status, doc = await c.call("DELETE", "/vms/netvm")
    assert status == 200, doc
    await create(c, "plain", "alpha")
    plan = (await c.call("POST", "/rebalance/plan", json={}))[1]
    assert [(m["vm"], m["target"]) for m in plan["moves"]] == [("plain", "beta")], plan
