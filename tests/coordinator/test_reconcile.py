"""The coordinator's records follow what the agents really run: after a
restart that cut a migration start short, and whenever a host other than the
recorded one reports a VM. Fake agents (no QEMU); the real-agent version is
tests/migration/test_coordinator_crash.py."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from novacron.coordinator.api.keys import RECONCILER, STORE
from novacron.coordinator.models import Migration
from novacron.coordinator.reconcile import Reconciler, Sighting, migration_outcome
from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent, serving


def vm_spec(name: str, host: str) -> dict[str, Any]:
    return {"name": name, "vcpus": 1, "memory_mb": 256, "kernel": "/boot/vmlinuz", "host": host}


def test_migration_outcome_by_where_the_vm_runs() -> None:
    def s(state: str | None, error: str | None = None) -> Sighting:
        return Sighting("h", state, error)

    assert migration_outcome(s(None), s("running")) == "completed"
    assert migration_outcome(s("stopped"), s("running")) == "completed"
    assert migration_outcome(s("running"), s(None)) == "failed"
    assert migration_outcome(s("paused"), s(None)) == "failed"
    assert migration_outcome(s(None), s(None)) == "failed"  # lost on the source, not moved
    assert migration_outcome(s("migrating"), s(None)) is None  # still going
    assert migration_outcome(s(None, "unreachable"), s(None)) is None  # no answer, no guess
    assert migration_outcome(s("running"), s(None, "unreachable")) is None
    assert migration_outcome(s("running"), s("running")) is None  # two copies: not ours to pick


async def fleet(c: Coordinator, fakes: list[FakeAgent]) -> None:
    for fake in fakes:
        await fake.register_with(c.session, c.url, c.cfg.agent_token)


async def heartbeat(c: Coordinator, fake: FakeAgent) -> None:
    body = {"memory_available_bytes": fake.memory_bytes - fake.used(), "vms": sorted(fake.vms)}
    status, doc = await c.call("POST", f"/hosts/{fake.name}/heartbeat", json=body,
                               token=fake.token)  # a host's own credential, not agent_token
    assert status == 200, doc


@pytest.fixture
async def two(tmp_path: Path) -> Any:
    async with serving(FakeAgent("alpha", "tok-a-" + secrets.token_hex(8)),
                       FakeAgent("beta", "tok-b-" + secrets.token_hex(8))) as fakes:
        yield fakes


async def test_record_follows_the_host_that_runs_the_vm(tmp_path: Path, two: list[FakeAgent]) -> None:
    alpha, beta = two
    c = await start_coordinator(make_cfg(tmp_path / "c"))
    try:
        await fleet(c, two)
        assert (await c.call("POST", "/vms", json=vm_spec("v1", "alpha")))[0] == 201
        beta.vms["v1"] = alpha.vms.pop("v1")  # it moved behind the coordinator's back
        await heartbeat(c, beta)
        await c.server.app[RECONCILER].run_once()
        status, doc = await c.call("GET", "/vms/v1")
        assert status == 200 and doc["host"] == "beta" and doc["state"] == "running", doc
    finally:
        await stop_coordinator(c)


async def test_delete_stops_the_vm_where_it_really_runs(tmp_path: Path, two: list[FakeAgent]) -> None:
    alpha, beta = two
    c = await start_coordinator(make_cfg(tmp_path / "c"))
    try:
        await fleet(c, two)
        assert (await c.call("POST", "/vms", json=vm_spec("v1", "alpha")))[0] == 201
        beta.vms["v1"] = alpha.vms.pop("v1")
        await heartbeat(c, beta)
        status, doc = await c.call("DELETE", "/vms/v1")  # no reconcile pass has run yet
        assert status == 200, doc
        assert "v1" not in beta.vms and ("DELETE", "/v1/vms/v1") in beta.calls
        assert (await c.call("GET", "/vms/v1"))[0] == 404
    finally:
        await stop_coordinator(c)


@pytest.mark.parametrize(("case", "phase", "host"), [
    ("source-reports-it", "completed", "beta"),  # the agent accepted and finished it
    ("source-forgot-vm-moved", "completed", "beta"),  # the source agent restarted since
    ("never-reached-source", "failed", "alpha"),  # the coordinator died before asking
])  # fmt: skip
async def test_restart_settles_a_migration_start_cut_short(
        tmp_path: Path, two: list[FakeAgent], case: str, phase: str, host: str) -> None:
    alpha, beta = two
    cfg = make_cfg(tmp_path / "c")
    c = await start_coordinator(cfg)
    try:
        await fleet(c, two)
        assert (await c.call("POST", "/vms", json=vm_spec("v1", "alpha")))[0] == 201
        # what a coordinator killed inside start() leaves: the record, no agent id yet
        store = c.server.app[STORE]
        now = time.time()
        mig = Migration(id="m-cut", vm="v1", source="alpha", target="beta", created_at=now,
                        updated_at=now)
        await store.put_migration(mig)
        vm = await store.get_vm("v1")
        assert vm is not None
        vm.state = "migrating"
        await store.put_vm(vm)
    finally:
        await stop_coordinator(c)
    if case != "never-reached-source":
        beta.vms["v1"] = {**alpha.vms.pop("v1"), "state": "running"}
    if case == "source-reports-it":
        alpha.migrations["m-cut"] = {"id": "m-cut", "vm": "v1", "phase": "completed", "round": 3,
                                     "step": 99, "target": beta, "options": {}, "metrics": {},
                                     "error": None}  # fmt: skip
    c = await start_coordinator(cfg)
    try:
        for _ in range(200):  # bounded: ~4 s
            status, doc = await c.call("GET", "/migrations/m-cut")
            if doc["phase"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.02)
        assert doc["phase"] == phase, doc
        status, doc = await c.call("GET", "/vms/v1")
        assert status == 200 and doc["host"] == host and doc["state"] == "running", doc
        assert (await c.call("DELETE", "/vms/v1"))[0] == 200
        assert "v1" not in alpha.vms and "v1" not in beta.vms
    finally:
        await stop_coordinator(c)


class DyingAgent(FakeAgent):
    """Drops the connection instead of answering a create; ``keeps`` says whether
    the VM exists afterwards (an agent killed after, or before, creating it)."""

    keeps = True

    async def create_vm(self, r: web.Request) -> web.Response:
        spec = await r.json()
        if self.keeps:
            self.vms[spec["name"]] = {**spec, "state": "running", "pid": 4242, "accel": "tcg"}
        assert r.transport is not None
        r.transport.abort()
        raise web.HTTPServiceUnavailable()


@pytest.mark.parametrize("keeps", [True, False])
async def test_create_whose_answer_was_lost(tmp_path: Path, keeps: bool) -> None:
    dying = DyingAgent("alpha", "tok-a-" + secrets.token_hex(8))
    dying.keeps = keeps
    async with serving(dying) as fakes:
        c = await start_coordinator(make_cfg(tmp_path / "c"))
        try:
            await fleet(c, fakes)
            status, doc = await c.call("POST", "/vms", json=vm_spec("v1", "alpha"))
            if keeps:  # asked again: the agent has it, so the record stays
                assert status == 201 and doc["state"] == "running", doc
                assert (await c.call("GET", "/vms/v1"))[1]["host"] == "alpha"
            else:  # the agent says it has no such VM: nothing to keep
                assert status == 502, doc
                assert (await c.call("GET", "/vms/v1"))[0] == 404
        finally:
            await stop_coordinator(c)


class MuteSource(FakeAgent):
    """Accepts a migration, then drops the connection instead of answering."""

    async def start_migration(self, r: web.Request) -> web.Response:
        before = set(self.migrations)
        await super().start_migration(r)
        assert len(set(self.migrations) - before) == 1 and r.transport is not None
        r.transport.abort()
        raise web.HTTPServiceUnavailable()


async def test_migration_start_whose_answer_was_lost_is_followed(tmp_path: Path) -> None:
    async with serving(MuteSource("alpha", "tok-a-" + secrets.token_hex(8)),
                       FakeAgent("beta", "tok-b-" + secrets.token_hex(8))) as fakes:
        c = await start_coordinator(make_cfg(tmp_path / "c"))
        try:
            await fleet(c, fakes)
            assert (await c.call("POST", "/vms", json=vm_spec("v1", "alpha")))[0] == 201
            status, mig = await c.call("POST", "/migrations", json={"vm": "v1", "target": "beta"})
            assert status == 202, mig
            for _ in range(200):  # bounded: ~4 s
                status, mig = await c.call("GET", f"/migrations/{mig['id']}")
                if mig["phase"] in ("completed", "failed"):
                    break
                await asyncio.sleep(0.02)
            assert mig["phase"] == "completed", mig  # not "failed" while the VM moved
            assert (await c.call("GET", "/vms/v1"))[1]["host"] == "beta"
        finally:
            await stop_coordinator(c)


class _Lease:
    def __init__(self, held: bool) -> None:
        self.held = held


async def test_the_loop_reconciles_only_while_it_holds_the_lease() -> None:
    """Several coordinators on one database: only the lease holder writes records
    from the agents' reports (the lease moving is tests/coordinator/test_multi_coordinator.py)."""
    passes: list[bool] = []
    lease = _Lease(False)

    class Counting(Reconciler):
        async def run_once(self) -> None:
            passes.append(lease.held)

    loop = asyncio.create_task(Counting(None, None).run(0.01, lease))  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.2)
        assert passes == []  # another coordinator holds it
        lease.held = True
        for _ in range(200):  # bounded: 2 s
            if passes:
                break
            await asyncio.sleep(0.01)
        assert passes and all(passes)
    finally:
        loop.cancel()
