"""Placement routes on a real coordinator: dry runs, plans, host attributes, VM create."""

from __future__ import annotations

from typing import Any

import pytest

from tests.coordinator.conftest import Coordinator
from tests.coordinator.fake_agent import FakeAgent

GUEST = {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0"}


async def test_dry_run_explains_and_changes_nothing(coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    status, doc = await coordinator.call("POST", "/placements", json={"vm": {"vcpus": 2, "memory_mb": 1024}})
    assert status == 200, doc
    assert doc["placed"] and doc["host"] in ("alpha", "beta")
    ex = doc["explanation"]
    assert ex["hosts_considered"] == 2 and ex["feasible"] == 2
    assert ex["chosen"]["host"] == doc["host"] and ex["why"]
    assert len(ex["alternatives"]) == 1
    status, vms = await coordinator.call("GET", "/vms")
    assert vms["vms"] == []
    # too big for either host: a reasoned "no", not an error
    status, doc = await coordinator.call("POST", "/placements",
                                         json={"vm": {"vcpus": 1, "memory_mb": 10 * 1024}})
    assert status == 200 and doc["placed"] is False
    assert doc["explanation"]["rejected"]["memory"]["hosts"] == 2


async def test_host_attributes_steer_placement(coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    status, doc = await coordinator.call("PUT", "/placements/hosts/alpha",
                                         json={"zone": "z1", "latency_ms": {"eu": 150}})
    assert status == 200 and doc["zone"] == "z1"
    await coordinator.call("PUT", "/placements/hosts/beta", json={"zone": "z2", "latency_ms": {"eu": 3}})
    body = {"vm": {"vcpus": 1, "memory_mb": 512, "region": "eu", "max_latency_ms": 10}}
    status, doc = await coordinator.call("POST", "/placements", json=body)
    assert doc["host"] == "beta" and doc["explanation"]["rejected"]["latency"]["hosts"] == 1
    status, doc = await coordinator.call("PUT", "/placements/hosts/beta", json={"enabled": False})
    status, doc = await coordinator.call("POST", "/placements", json=body)
    assert doc["placed"] is False and "disabled" in doc["explanation"]["rejected"]
    status, doc = await coordinator.call("GET", "/placements/hosts")
    assert status == 200 and doc["hosts"]["beta"] == {"enabled": False}
    status, doc = await coordinator.call("PUT", "/placements/hosts/nobody", json={"zone": "z"})
    assert status == 404


@pytest.mark.parametrize(("body", "needle"), [
    ({}, "vm"),
    ({"vm": {"vcpus": 0, "memory_mb": 512}}, "vcpus"),
    ({"vm": {"vcpus": 1, "memory_mb": 512, "priority": "asap"}}, "priority"),
    ({"vm": {"vcpus": 1, "memory_mb": 512, "max_latency_ms": 5}}, "region"),
    ({"vm": {"vcpus": 1, "memory_mb": 512, "affinity": ["ghost"]}}, "not placed"),
    ({"vm": {"vcpus": 1, "memory_mb": 512}, "weights": {"cost": 0, "performance": 0, "latency": 0}},
     "weight"),
    ({"vm": {"vcpus": 1, "memory_mb": 512}, "strategy": "coin-flip"}, "strategy"),
    ({"vm": {"vcpus": 1, "memory_mb": 512}, "extra": 1}, "extra"),
])
async def test_bad_placement_requests_get_400(coordinator: Coordinator, agents: list[FakeAgent],
                                               body: dict[str, Any], needle: str) -> None:
    status, doc = await coordinator.call("POST", "/placements", json=body)
    assert status == 400, doc
    assert needle in doc["error"]


async def test_vm_create_uses_the_scheduler_and_plan_frees_a_host(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    # make beta the cheaper host: the scheduler (unlike "most free memory") picks it
    await coordinator.call("PUT", "/placements/hosts/alpha", json={"cost_per_hour": 3.0})
    await coordinator.call("PUT", "/placements/hosts/beta", json={"cost_per_hour": 1.0})
    status, vm = await coordinator.call("POST", "/vms", json={"name": "v1", "vcpus": 1,
                                                              "memory_mb": 256, **GUEST})
    assert status == 201, vm
    assert vm["host"] == "beta"
    # a second VM, pinned to alpha, leaves alpha nearly empty: the plan moves it to beta
    status, vm = await coordinator.call("POST", "/vms", json={"name": "v2", "vcpus": 1, "memory_mb": 256,
                                                              "host": "alpha", **GUEST})
    assert status == 201 and vm["host"] == "alpha"
    status, plan = await coordinator.call("POST", "/rebalance/plan", json={"max_migrations": 5})
    assert status == 200, plan
    assert [(m["vm"], m["source"], m["target"]) for m in plan["moves"]] == [("v2", "alpha", "beta")]
    assert plan["hosts_freed"] == ["alpha"] and plan["hourly_saving"] == 3.0
    assert plan["moves"][0]["est_bytes"] > 256 << 20
    status, vms = await coordinator.call("GET", "/vms")
    assert {v["name"]: v["host"] for v in vms["vms"]} == {"v1": "beta", "v2": "alpha"}  # unchanged


async def test_vm_create_honours_placement_preferences(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    await coordinator.call("PUT", "/placements/hosts/alpha", json={"latency_ms": {"eu": 40}})
    await coordinator.call("PUT", "/placements/hosts/beta", json={"latency_ms": {"eu": 2}})
    near = {"name": "near", "vcpus": 1, "memory_mb": 256, **GUEST,
            "placement": {"region": "eu", "max_latency_ms": 10}}
    status, vm = await coordinator.call("POST", "/vms", json=near)
    assert status == 201 and vm["host"] == "beta", vm
    beta = next(a for a in agents if a.name == "beta")
    assert "placement" not in beta.vms["near"]  # preferences never reach the agent
    # anti-affinity with "near" plus a latency bound only beta meets: nowhere to go, and why
    apart = {"name": "apart", "vcpus": 1, "memory_mb": 256, **GUEST,
             "placement": {"region": "eu", "max_latency_ms": 10, "anti_affinity": ["near"]}}
    status, doc = await coordinator.call("POST", "/vms", json=apart)
    assert status == 409 and "no host" in doc["error"], doc
    status, doc = await coordinator.call("GET", "/vms")
    assert [v["name"] for v in doc["vms"]] == ["near"]  # the refusal changed nothing


@pytest.mark.parametrize("placement", [
    {"priority": "urgent"}, {"max_latency_ms": 5}, {"affinity": ["a"], "anti_affinity": ["a"]},
    {"colour": "blue"},
])
async def test_vm_create_rejects_bad_placement(coordinator: Coordinator, agents: list[FakeAgent],
                                               placement: dict[str, Any]) -> None:
    body = {"name": "v", "vcpus": 1, "memory_mb": 256, **GUEST, "placement": placement}
    status, doc = await coordinator.call("POST", "/vms", json=body)
    assert status == 400, doc
    status, doc = await coordinator.call("GET", "/vms")
    assert doc["vms"] == []


@pytest.mark.parametrize(("body", "needle"), [
    ({"max_migrations": 0}, "max_migrations"), ({"hot_threshold": 2}, "hot_threshold"),
    ({"drain_threshold": 0.95, "hot_threshold": 0.5}, "drain_threshold < hot_threshold"),
    ({"drain_threshold": 0.95}, "drain_threshold < hot_threshold"),  # against the default
    ({"bandwidth_mbps": -1}, "bandwidth_mbps"), ({"surprise": True}, "surprise"),
])
async def test_bad_plan_requests_get_400(coordinator: Coordinator, body: dict[str, Any],
                                         needle: str) -> None:
    status, doc = await coordinator.call("POST", "/rebalance/plan", json=body)
    assert status == 400 and needle in doc["error"], doc


async def test_routes_are_in_the_openapi_document(coordinator: Coordinator) -> None:
    _, doc = await coordinator.call("GET", "/openapi.json")
    assert "post" in doc["paths"]["/api/v1/placements"]
    assert "post" in doc["paths"]["/api/v1/rebalance/plan"]
    assert "put" in doc["paths"]["/api/v1/placements/hosts/{name}"]


async def test_learned_policy_is_off_by_default_and_learns_once_on(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    status, doc = await coordinator.call("GET", "/placements/policy")
    assert status == 200 and doc == {"enabled": False, "contexts": {}, "open_decisions": 0}
    status, _ = await coordinator.call("POST", "/vms", json={"name": "a", "vcpus": 1, "memory_mb": 128, **GUEST})
    assert status == 201
    _, doc = await coordinator.call("GET", "/placements/policy")
    assert doc["open_decisions"] == 0  # off: nothing recorded
    status, doc = await coordinator.call("PUT", "/placements/policy", json={"enabled": True})
    assert status == 200 and doc["enabled"] is True
    for name in ("b", "c"):
        status, _ = await coordinator.call("POST", "/vms", json={"name": name, "vcpus": 1,
                                                                 "memory_mb": 128, **GUEST})
        assert status == 201
    _, doc = await coordinator.call("GET", "/placements/policy")
    assert doc["open_decisions"] == 2
    status, _ = await coordinator.call("DELETE", "/vms/b")
    assert status in (200, 204)
    await coordinator.call("POST", "/vms", json={"name": "d", "vcpus": 1, "memory_mb": 128, **GUEST})
    _, doc = await coordinator.call("GET", "/placements/policy")
    # b's departure was read from the VM records and settled its reward
    assert doc["open_decisions"] == 2
    assert sum(a["n"] for t in doc["contexts"].values() for a in t.values()) == 1
    status, doc = await coordinator.call("PUT", "/placements/policy", json={"enabled": "yes"})
    assert status == 400
