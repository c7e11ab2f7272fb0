"""Migration policies through a real coordinator with fake agents: what each migration runs with,
what the source agent is sent, and refusals that change nothing."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BACKENDS
from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent, serving
from tests.coordinator.test_api import read_sse, vm_spec

POLICIES: dict[str, Any] = {
    "bulk": {"bandwidth_mbps": 50.0, "downtime_ms": 2000.0, "throttle": True,
             "selector": {"tier": "batch"}, "description": "batch VMs"},
    "latency": {"downtime_ms": 50.0, "max_rounds": 100},
    "fallback": {"bandwidth_mbps": 500.0},
}

Fleet = tuple[Coordinator, list[FakeAgent]]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)  # the labels' compare-and-set runs on both stores


@pytest.fixture
async def fleet(tmp_path: Path, database_url: str) -> AsyncIterator[Fleet]:
    cfg = make_cfg(tmp_path / "coord", database_url=database_url, migration_policies=POLICIES,
                   default_migration_policy="fallback")
    c = await start_coordinator(cfg)
    try:
        async with serving(FakeAgent("alpha", "tok-a-" + secrets.token_hex(8)),
                           FakeAgent("beta", "tok-b-" + secrets.token_hex(8))) as fakes:
            for fake in fakes:
                await fake.register_with(c.session, c.url, cfg.agent_token)
            yield c, fakes
    finally:
        await stop_coordinator(c)


async def _migrate(c: Coordinator, body: dict[str, Any]) -> dict[str, Any]:
    status, mig = await c.call("POST", "/migrations", json=body)
    assert status == 202, mig
    events = await read_sse(c, mig["id"])
    assert events[-1]["phase"] == "completed", events[-1]
    return mig


# the coordinator writes its default convergence policy on every record (migration_on_no_converge)
ABORT = {"on_no_converge": "abort"}


async def test_each_migration_runs_with_the_policy_that_applies(fleet: Fleet) -> None:
    c, (alpha, beta) = fleet
    status, doc = await c.call("GET", "/migration-policies")
    assert status == 200 and doc["default"] == "fallback"
    assert {p["name"]: p["selector"] for p in doc["policies"]} == {
        "bulk": {"tier": "batch"}, "latency": {}, "fallback": {}}
    assert {p["name"]: p["options"] for p in doc["policies"]}["bulk"] == {
        "bandwidth_mbps": 50.0, "downtime_ms": 2000.0, "throttle": True}

    status, vm = await c.call("POST", "/vms", json=vm_spec("batch1", host="alpha",
                                                           labels={"tier": "batch", "team": "ml"}))
    assert status == 201 and vm["labels"] == {"tier": "batch", "team": "ml"}, vm
    assert "labels" not in alpha.vms["batch1"]  # the coordinator's field, not the agent's spec
    await c.call("POST", "/vms", json=vm_spec("web1", host="alpha"))

    # selected by labels; an explicit option overrides one of the policy's
    mig = await _migrate(c, {"vm": "batch1", "target": "beta", "options": {"downtime_ms": 300}})
    assert (mig["policy"], mig["policy_source"]) == ("bulk", "labels")
    sent = {**ABORT, "bandwidth_mbps": 50.0, "downtime_ms": 300, "throttle": True}
    assert mig["options"] == sent and alpha.migration_requests[-1]["options"] == sent
    # the VM without labels or policy: the default
    mig = await _migrate(c, {"vm": "web1", "target": "beta"})
    assert (mig["policy"], mig["policy_source"], mig["options"]) == (
        "fallback", "default", {**ABORT, "bandwidth_mbps": 500.0})
    # named with the migration: over the labels
    mig = await _migrate(c, {"vm": "batch1", "target": "alpha", "policy": "latency"})
    assert (mig["policy"], mig["policy_source"]) == ("latency", "request")
    assert beta.migration_requests[-1]["options"] == {**ABORT, "downtime_ms": 50.0, "max_rounds": 100}
    # the VM's own policy: over its labels, under one named with the migration
    status, vm = await c.call("PUT", "/vms/batch1/labels", json={"migration_policy": "latency"})
    assert status == 200 and vm["migration_policy"] == "latency" and vm["labels"]["tier"] == "batch"
    mig = await _migrate(c, {"vm": "batch1", "target": "beta"})
    assert (mig["policy"], mig["policy_source"]) == ("latency", "vm")
    # the record keeps it
    status, stored = await c.call("GET", f"/migrations/{mig['id']}")
    assert (stored["policy"], stored["policy_source"], stored["options"]) == (
        "latency", "vm", {**ABORT, "downtime_ms": 50.0, "max_rounds": 100})
    # labels changed, own policy cleared: the labels decide again (none match: the default)
    status, vm = await c.call("PUT", "/vms/batch1/labels",
                              json={"labels": {"tier": "web"}, "migration_policy": None})
    assert status == 200 and vm["labels"] == {"tier": "web"} and vm["migration_policy"] is None
    mig = await _migrate(c, {"vm": "batch1", "target": "alpha"})
    assert (mig["policy"], mig["policy_source"]) == ("fallback", "default")


async def test_unknown_policies_and_bad_labels_are_refused_and_change_nothing(fleet: Fleet) -> None:
    c, (alpha, _beta) = fleet
    await c.call("POST", "/vms", json=vm_spec("web1", host="alpha"))
    status, doc = await c.call("POST", "/migrations",
                               json={"vm": "web1", "target": "beta", "policy": "nope"})
    assert status == 400 and "no migration policy 'nope'" in doc["error"], doc
    status, doc = await c.call("POST", "/migrations",
                               json={"vm": "web1", "target": "beta", "policy": "Bad Name"})
    assert status == 400 and "body.policy" in doc["error"], doc
    assert (await c.call("GET", "/migrations"))[1]["migrations"] == []
    assert alpha.migration_requests == []
    status, vm = await c.call("GET", "/vms/web1")
    assert vm["state"] == "running" and vm["host"] == "alpha"

    for bad in ({"labels": {"Tier": "x"}}, {"labels": {"tier": "a b"}}, {"labels": {"tier": 5}},
                {"labels": {f"k{i}": "v" for i in range(33)}}, {"migration_policy": "nope"}):
        status, doc = await c.call("POST", "/vms", json=vm_spec("web2", host="alpha", **bad))
        assert status == 400, (bad, doc)
        status, doc = await c.call("PUT", "/vms/web1/labels", json=bad)
        assert status == 400, (bad, doc)
    assert "web2" not in alpha.vms and "web2" not in {
        v["name"] for v in (await c.call("GET", "/vms"))[1]["vms"]}
    status, vm = await c.call("GET", "/vms/web1")
    assert vm["labels"] == {} and vm["migration_policy"] is None
    status, doc = await c.call("PUT", "/vms/nope/labels", json={"labels": {}})
    assert status == 404
