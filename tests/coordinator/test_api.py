"""The REST API against a real coordinator on loopback (fake agents behind it),
once on SQLite and once on a real PostgreSQL (the ``backend`` fixture)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from tests.coordinator.conftest import BACKENDS, Coordinator
from tests.coordinator.fake_agent import FakeAgent

GUEST = {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd", "cmdline": "console=ttyS0"}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def vm_spec(name: str, memory_mb: int = 256, **kw: Any) -> dict[str, Any]:
    return {"name": name, "vcpus": 1, "memory_mb": memory_mb, **GUEST, **kw}


async def test_health_needs_no_token(coordinator: Coordinator) -> None:
    async with coordinator.session.get(coordinator.url + "/api/v1/health") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ok"


@pytest.mark.parametrize("path", ["/hosts", "/vms", "/migrations", "/hosts/alpha", "/nope"])
async def test_routes_refuse_missing_and_wrong_tokens(coordinator: Coordinator, path: str) -> None:
    async with coordinator.session.get(coordinator.url + "/api/v1" + path) as resp:
        assert resp.status == 401
        assert "Authorization" in (await resp.json())["error"]
    status, doc = await coordinator.call("GET", path, token="wrong-token")
    assert status == 401 and "invalid token" in doc["error"]
    # The agent token is not an admin token.
    status, _ = await coordinator.call("GET", path, token=coordinator.cfg.agent_token)
    assert status == 401
    async with coordinator.session.get(coordinator.url + "/api/v1" + path,
                                       headers={"Authorization": "Basic abc"}) as resp:
        assert resp.status == 401


async def test_agent_routes_take_the_agent_and_host_tokens(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    body = agents[0].registration()
    status, _ = await coordinator.call("POST", "/hosts/register", json=body)  # admin token
    assert status == 401
    status, _ = await coordinator.call("POST", "/hosts/alpha/heartbeat",
                                       json={"memory_available_bytes": 1})  # admin token
    assert status == 403
    async with coordinator.session.post(coordinator.url + "/api/v1/hosts/alpha/heartbeat",
                                        json={"memory_available_bytes": 1}) as resp:
        assert resp.status == 401  # no credential at all
    # Heartbeats take the host's own token, not the shared bootstrap one.
    status, doc = await coordinator.call("POST", "/hosts/alpha/heartbeat",
                                         json={"memory_available_bytes": 1 << 30, "load": 0.5},
                                         token=coordinator.cfg.agent_token)
    assert status == 403 and "bound to another identity" in doc["error"]
    status, doc = await coordinator.call("POST", "/hosts/alpha/heartbeat",
                                         json={"memory_available_bytes": 1 << 30, "load": 0.5},
                                         token=agents[0].token)
    assert status == 200 and doc == {"state": "up", "heartbeat_interval_s": 1.0}
    status, doc = await coordinator.call("GET", "/hosts/alpha")
    assert doc["memory_available_bytes"] == 1 << 30 and doc["load"] == 0.5


async def test_hosts_are_listed_without_their_tokens(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    status, doc = await coordinator.call("GET", "/hosts")
    assert status == 200
    assert [h["name"] for h in doc["hosts"]] == ["alpha", "beta"]
    assert all(h["state"] == "up" and "token" not in h for h in doc["hosts"])
    assert agents[0].token not in json.dumps(doc)
    status, doc = await coordinator.call("GET", "/hosts/beta")
    assert status == 200 and doc["cpus"] == 8
    status, doc = await coordinator.call("GET", "/hosts/gamma")
    assert status == 404 and "gamma" in doc["error"]


async def test_heartbeat_of_unknown_host_is_404(coordinator: Coordinator) -> None:
    status, doc = await coordinator.call("POST", "/hosts/ghost/heartbeat",
                                         json={"memory_available_bytes": 1},
                                         token="ghost-host-own-token")
    assert status == 404 and "register" in doc["error"]


@pytest.mark.parametrize("body, needle", [
    ("{not json", "not valid JSON"),
    ("", "body is required"),
    ("[]", "body: [] is not of type 'object'"),
    (json.dumps({"name": "x", "vcpus": 1}), "'memory_mb' is a required property"),
    (json.dumps(vm_spec("bad name!")), "body.name"),
    (json.dumps(vm_spec("v", vcpus=0)), "body.vcpus"),
    (json.dumps(vm_spec("v", memory_mb="lots")), "body.memory_mb"),
    (json.dumps(vm_spec("v", colour="red")), "colour"),
    (json.dumps({"name": "v", "vcpus": 1, "memory_mb": 64}), "body"),  # neither kernel nor disk
    (json.dumps({**vm_spec("v"), "disk": "/d.img"}), "body"),  # both
])
async def test_bad_vm_bodies_get_400_and_change_nothing(
        coordinator: Coordinator, agents: list[FakeAgent], body: str, needle: str) -> None:
    status, doc = await coordinator.call("POST", "/vms", data=body,
                                         headers={"Content-Type": "application/json"})
    assert status == 400, doc
    assert needle in doc["error"]
    assert (await coordinator.call("GET", "/vms"))[1] == {"vms": []}
    assert all(not a.vms for a in agents)


async def test_oversized_body_is_413(coordinator: Coordinator) -> None:
    big = vm_spec("v", cmdline="x" * 4000)
    big["kernel"] = "k" * 4000
    big["initrd"] = "i" * 4000
    data = json.dumps(big) + " " * 20000
    status, doc = await coordinator.call("POST", "/vms", data=data)
    assert status == 413 and "too large" in doc["error"]


async def test_bad_path_and_query_parameters(coordinator: Coordinator) -> None:
    status, doc = await coordinator.call("GET", "/migrations?limit=zero")
    assert status == 400 and "limit" in doc["error"]
    status, doc = await coordinator.call("GET", "/migrations?limit=0")
    assert status == 400 and "limit" in doc["error"]
    status, doc = await coordinator.call("GET", "/vms/" + "x" * 80)
    assert status == 400 and "name" in doc["error"]
    status, doc = await coordinator.call("DELETE", "/hosts")
    assert status == 405 and "DELETE" in doc["error"]


async def test_vms_go_only_to_hosts_with_their_networks(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    alpha, beta = agents
    beta.networks = ["prod"]
    await beta.register_with(coordinator.session, coordinator.url, coordinator.cfg.agent_token)
    assert (await coordinator.call("GET", "/hosts/beta"))[1]["networks"] == ["prod"]
    status, vm = await coordinator.call("POST", "/vms", json=vm_spec("web", nics=[{"net": "prod"}]))
    assert status == 201 and vm["host"] == "beta", vm  # alpha has more memory but no 'prod'
    status, doc = await coordinator.call("POST", "/vms", json=vm_spec("db", nics=[{"net": "dev"}]))
    assert status in (409, 503) and "db" not in alpha.vms and "db" not in beta.vms, doc
    status, doc = await coordinator.call("POST", "/vms", json=vm_spec("x", nics=[{"net": "Prod/../x"}]))
    assert status == 400 and "nics" in doc["error"], doc
    status, doc = await coordinator.call("POST", "/migrations", json={"vm": "web", "target": "alpha"})
    assert status == 409 and "lacks the network(s) prod" in doc["error"], doc


async def test_vm_lifecycle_with_placement(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    alpha, beta = agents
    status, vm = await coordinator.call("POST", "/vms", json=vm_spec("web1", 1024))
    assert status == 201, vm
    assert vm["host"] == "alpha" and vm["state"] == "running"  # alpha has more free memory
    assert "web1" in alpha.vms
    # Pinning overrides placement.
    status, vm = await coordinator.call("POST", "/vms", json=vm_spec("web2", host="beta"))
    assert status == 201 and vm["host"] == "beta" and "web2" in beta.vms
    status, doc = await coordinator.call("POST", "/vms", json=vm_spec("web1"))
    assert status == 409 and "already exists" in doc["error"]
    status, doc = await coordinator.call("GET", "/vms?host=beta")
    assert [v["name"] for v in doc["vms"]] == ["web2"]
    status, doc = await coordinator.call("GET", "/vms/web1")
    assert status == 200 and doc["agent"]["pid"] == 4242
    alpha.vms["web1"]["state"] = "crashed"  # the agent knows better: the record follows
    status, doc = await coordinator.call("GET", "/vms/web1")
    assert doc["state"] == "crashed"
    assert (await coordinator.call("GET", "/vms?host=alpha"))[1]["vms"][0]["state"] == "crashed"
    alpha.vms["web1"]["state"] = "running"
    assert (await coordinator.call("GET", "/vms/web1"))[1]["state"] == "running"
    # A listing with refresh=true asks every host at once; a VM its agent lost is 'missing'.
    alpha.vms["web1"]["state"] = "paused"
    beta.vms.pop("web2")
    _, doc = await coordinator.call("GET", "/vms?refresh=true")
    assert {v["name"]: v["state"] for v in doc["vms"]} == {"web1": "paused", "web2": "missing"}
    assert (await coordinator.call("GET", "/vms"))[1] == doc  # and it was stored
    beta.vms["web2"] = {**vm_spec("web2"), "state": "running"}
    alpha.vms["web1"]["state"] = "running"
    await coordinator.call("GET", "/vms?refresh=true")
    status, doc = await coordinator.call("POST", "/vms/web1/stop")
    assert status == 200 and doc["state"] == "stopped" and alpha.vms["web1"]["state"] == "stopped"
    status, doc = await coordinator.call("POST", "/vms/web1/start")
    assert status == 200 and doc["state"] == "running"
    status, doc = await coordinator.call("DELETE", "/vms/web1")
    assert status == 200 and "web1" not in alpha.vms
    status, doc = await coordinator.call("GET", "/vms/web1")
    assert status == 404


async def test_no_capacity_is_409_and_agent_refusal_leaves_no_record(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    status, doc = await coordinator.call("POST", "/vms", json=vm_spec("huge", 64 * 1024))
    assert status == 409 and "free" in doc["error"]
    agents[0].fail_next_create = "kernel /boot/vmlinuz not found"
    status, doc = await coordinator.call("POST", "/vms", json=vm_spec("v1"))
    assert status == 409 and "kernel /boot/vmlinuz not found" in doc["error"]
    assert (await coordinator.call("GET", "/vms"))[1] == {"vms": []}


async def test_concurrent_creates_never_share_a_name_or_overbook(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    # alpha has 8 GiB and beta 4 GiB: twelve 1 GiB VMs fit, the rest must be refused.
    specs = [vm_spec(f"c{i % 16}", 1024) for i in range(20)]  # 4 names asked for twice
    results = await asyncio.gather(*(coordinator.call("POST", "/vms", json=s) for s in specs))
    created = [doc for status, doc in results if status == 201]
    assert all(status in (201, 409) for status, _ in results)
    assert len({v["name"] for v in created}) == len(created) == 12
    for fake in agents:
        assert sum(v["memory_mb"] for v in fake.vms.values()) << 20 <= fake.memory_bytes


async def test_unreachable_agent_is_502(coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    reg = {**agents[1].registration(), "name": "gone", "url": "http://127.0.0.1:9",
           "memory_bytes": 64 << 30, "memory_available_bytes": 64 << 30}
    status, _ = await coordinator.call("POST", "/hosts/register", json=reg,
                                       token=coordinator.cfg.agent_token)
    assert status == 200
    status, doc = await coordinator.call("POST", "/vms", json=vm_spec("v1", host="gone"))
    assert status == 502 and "unreachable" in doc["error"]
    status, doc = await coordinator.call("DELETE", "/hosts/gone")
    assert status == 200


async def test_hosts_with_vms_are_kept_and_orphans_can_be_forgotten(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    assert (await coordinator.call("POST", "/vms", json=vm_spec("v1", host="beta")))[0] == 201
    status, doc = await coordinator.call("DELETE", "/hosts/beta")
    assert status == 409 and "v1" in doc["error"]
    # The host dies for good: an operator removes the VM record, then the host.
    reg = {**agents[1].registration(), "url": "http://127.0.0.1:9"}
    await coordinator.call("POST", "/hosts/register", json=reg, token=coordinator.cfg.agent_token)
    status, doc = await coordinator.call("DELETE", "/vms/v1")
    assert status == 502 and "force=true" in doc["error"]
    status, doc = await coordinator.call("DELETE", "/vms/v1?force=true")
    assert status == 200
    status, doc = await coordinator.call("DELETE", "/hosts/beta")
    assert status == 200
    assert [h["name"] for h in (await coordinator.call("GET", "/hosts"))[1]["hosts"]] == ["alpha"]


async def test_sse_client_that_leaves_early_does_no_harm(
        coordinator: Coordinator, agents: list[FakeAgent], caplog: pytest.LogCaptureFixture) -> None:
    agents[0].hold_migrations = True
    assert (await coordinator.call("POST", "/vms", json=vm_spec("s1")))[0] == 201
    _, mig = await coordinator.call("POST", "/migrations", json={"vm": "s1", "target": "beta"})
    async with coordinator.session.get(f"{coordinator.url}/api/v1/migrations/{mig['id']}/events",
                                       headers=coordinator.headers()) as resp:
        await resp.content.readline()  # the first event, then hang up
    agents[0].hold_migrations = False
    for _ in range(200):  # bounded: the follower finishes it
        await asyncio.sleep(0.02)
        if (await coordinator.call("GET", f"/migrations/{mig['id']}"))[1]["phase"] == "completed":
            break
    assert (await coordinator.call("GET", f"/migrations/{mig['id']}"))[1]["phase"] == "completed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_host_missing_heartbeats_is_marked_down(tmp_path: Any, database_url: str) -> None:
    from tests.coordinator.conftest import make_cfg, start_coordinator, stop_coordinator

    c = await start_coordinator(make_cfg(tmp_path, heartbeat_interval_s=0.05,
                                         heartbeat_timeout_s=0.3, database_url=database_url))
    try:
        fake = FakeAgent("solo", "t0ken-solo-per-host-token")
        fake.url = "http://127.0.0.1:9"
        await fake.register_with(c.session, c.url, c.cfg.agent_token)
        assert (await c.call("GET", "/hosts/solo"))[1]["state"] == "up"
        for _ in range(100):  # bounded: 5 s at most
            await asyncio.sleep(0.05)
            if (await c.call("GET", "/hosts/solo"))[1]["state"] == "down":
                break
        assert (await c.call("GET", "/hosts/solo"))[1]["state"] == "down"
        status, doc = await c.call("POST", "/vms", json=vm_spec("v", host="solo"))
        assert status == 409 and "down" in doc["error"]
        # A heartbeat brings it back.
        status, doc = await c.call("POST", "/hosts/solo/heartbeat",
                                   json={"memory_available_bytes": 1 << 30}, token=fake.token)
        assert status == 200 and doc["state"] == "up"
        assert (await c.call("GET", "/hosts/solo"))[1]["state"] == "up"
    finally:
        await stop_coordinator(c)


async def read_sse(c: Coordinator, mig_id: str) -> list[dict[str, Any]]:
    events = []
    async with c.session.get(f"{c.url}/api/v1/migrations/{mig_id}/events",
                             headers=c.headers()) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


async def test_migration_streams_progress_and_moves_the_vm(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    alpha, beta = agents
    assert (await coordinator.call("POST", "/vms", json=vm_spec("db", 512)))[0] == 201
    status, mig = await coordinator.call(
        "POST", "/migrations", json={"vm": "db", "target": "beta",
                                     "options": {"bandwidth_mbps": 100, "downtime_ms": 50}})
    assert status == 202, mig
    assert mig["source"] == "alpha" and mig["target"] == "beta"
    events = await asyncio.wait_for(read_sse(coordinator, mig["id"]), 10)
    phases = [e["phase"] for e in events]
    assert phases[-1] == "completed"
    assert "precopy" in phases and "stopcopy" in phases
    assert events[-1]["metrics"]["downtime_ms"] == 12.5
    assert "db" in beta.vms and "db" not in alpha.vms
    status, vm = await coordinator.call("GET", "/vms/db")
    assert vm["host"] == "beta" and vm["state"] == "running"
    # The source agent was told where to send it, with the target's own token.
    status, hist = await coordinator.call("GET", "/migrations?vm=db")
    assert [m["id"] for m in hist["migrations"]] == [mig["id"]]
    # the coordinator's default convergence policy is written on the record, explicit
    assert hist["migrations"][0]["options"] == {"bandwidth_mbps": 100, "downtime_ms": 50,
                                                "on_no_converge": "abort"}
    # A finished migration's stream replays the final state and ends.
    events = await asyncio.wait_for(read_sse(coordinator, mig["id"]), 5)
    assert [e["phase"] for e in events] == ["completed"]
    status, _doc = await coordinator.call("POST", f"/migrations/{mig['id']}/cancel")
    assert status == 409


async def test_migration_refusals(coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    assert (await coordinator.call("POST", "/vms", json=vm_spec("app")))[0] == 201
    cases = [
        ({"vm": "nope", "target": "beta"}, 404, "no VM"),
        ({"vm": "app", "target": "nope"}, 404, "no host"),
        ({"vm": "app", "target": "alpha"}, 409, "already on host"),
        ({"vm": "app", "target": "beta", "options": {"downtime_ms": -1}}, 400, "downtime_ms"),
        ({"vm": "app", "target": "beta", "options": {"warp": 9}}, 400, "warp"),
    ]
    for body, code, needle in cases:
        status, doc = await coordinator.call("POST", "/migrations", json=body)
        assert status == code and needle in doc["error"], (body, doc)
    assert (await coordinator.call("GET", "/migrations"))[1] == {"migrations": []}
    status, doc = await coordinator.call("GET", "/migrations/m-000000000000")
    assert status == 404


async def test_cancel_keeps_the_vm_on_its_source(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    alpha, _beta = agents
    alpha.hold_migrations = True
    assert (await coordinator.call("POST", "/vms", json=vm_spec("cache")))[0] == 201
    status, mig = await coordinator.call("POST", "/migrations",
                                         json={"vm": "cache", "target": "beta"})
    assert status == 202
    status, doc = await coordinator.call("POST", "/migrations",
                                         json={"vm": "cache", "target": "beta"})
    assert status == 409 and "migrating" in doc["error"]
    status, _ = await coordinator.call("DELETE", "/vms/cache")
    assert status == 409
    status, doc = await coordinator.call("POST", f"/migrations/{mig['id']}/cancel")
    assert status == 202
    events = await asyncio.wait_for(read_sse(coordinator, mig["id"]), 10)
    assert events[-1]["phase"] == "cancelled"
    status, vm = await coordinator.call("GET", "/vms/cache")
    assert vm["host"] == "alpha" and vm["state"] == "running"


async def test_tokens_never_reach_the_logs(
        coordinator: Coordinator, agents: list[FakeAgent], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for fake in agents:
        await fake.register_with(coordinator.session, coordinator.url, coordinator.cfg.agent_token)
    await coordinator.call("GET", "/hosts", token="not-the-" + coordinator.cfg.admin_token)
    await coordinator.call("POST", "/vms", json=vm_spec("v1"))
    await coordinator.call("POST", "/migrations", json={"vm": "v1", "target": "beta"})
    assert caplog.records, "the coordinator logged nothing; this test would prove nothing"
    dump = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    for secret in (coordinator.cfg.admin_token, coordinator.cfg.agent_token,
                   agents[0].token, agents[1].token):
        assert secret not in dump
