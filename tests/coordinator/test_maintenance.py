"""Host maintenance end to end through the API with fake agents: placement skips the host,
a manual migration to it needs force, the host list says so, and it ends cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.coordinator.client import CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.conftest import Coordinator
from tests.coordinator.fake_agent import FakeAgent, register_all, serving
from tests.coordinator.test_api import read_sse, vm_spec
from tests.coordinator.test_cli import cli, cli_env


async def _maintenance(c: Coordinator, host: str, on: bool) -> dict:
    status, doc = await c.call("PUT", f"/hosts/{host}/maintenance", json={"maintenance": on})
    assert status == 200, doc
    return doc


async def test_maintenance_keeps_new_vms_and_migrations_away(coordinator: Coordinator,
                                                            agents: list[FakeAgent]) -> None:
    c = coordinator
    status, vm = await c.call("POST", "/vms", json=vm_spec("web", host="beta"))
    assert status == 201, vm
    doc = await _maintenance(c, "alpha", True)
    assert doc["name"] == "alpha" and doc["maintenance"] is True and doc["state"] == "up"
    hosts = {h["name"]: h for h in (await c.call("GET", "/hosts"))[1]["hosts"]}
    assert hosts["alpha"]["maintenance"] is True and hosts["beta"]["maintenance"] is False
    assert (await c.call("GET", "/hosts/alpha"))[1]["maintenance"] is True

    # placement: alpha has the most room, yet every new VM lands on beta
    for i in range(3):
        status, vm = await c.call("POST", "/vms", json=vm_spec(f"new{i}", memory_mb=128))
        assert status == 201 and vm["host"] == "beta", vm
    status, doc = await c.call("POST", "/placements", json={"vm": {"vcpus": 1, "memory_mb": 128}})
    assert status == 200 and doc["host"] == "beta", doc
    # beta full: nowhere to go rather than the host in maintenance
    status, doc = await c.call("POST", "/vms", json=vm_spec("big", memory_mb=3584))
    assert status == 409, doc
    assert "big" not in {v["name"] for v in (await c.call("GET", "/vms"))[1]["vms"]}
    assert not agents[0].vms  # nothing reached alpha

    # a price change through the scheduler attributes does not end maintenance
    status, _ = await c.call("PUT", "/placements/hosts/alpha", json={"cost_per_hour": 3.0})
    assert status == 200
    assert (await c.call("GET", "/hosts/alpha"))[1]["maintenance"] is True

    # manual migration: refused without force, the VM stays where it runs
    status, doc = await c.call("POST", "/migrations", json={"vm": "web", "target": "alpha"})
    assert status == 409 and "in maintenance" in doc["error"] and "--force" in doc["error"], doc
    assert (await c.call("GET", "/migrations"))[1]["migrations"] == []
    status, vm = await c.call("GET", "/vms/web")
    assert vm["host"] == "beta" and vm["state"] == "running"
    status, mig = await c.call("POST", "/migrations",
                               json={"vm": "web", "target": "alpha", "force": True})
    assert status == 202, mig
    assert (await read_sse(c, mig["id"]))[-1]["phase"] == "completed"
    assert (await c.call("GET", "/vms/web"))[1]["host"] == "alpha"

    # off again: alpha takes VMs, and keeps its price
    doc = await _maintenance(c, "alpha", False)
    assert doc["maintenance"] is False
    status, attrs = await c.call("GET", "/placements/hosts")
    assert attrs["hosts"]["alpha"] == {"cost_per_hour": 3.0}
    status, vm = await c.call("POST", "/vms", json=vm_spec("after", memory_mb=3800))  # too big for beta
    assert status == 201 and vm["host"] == "alpha", vm


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/hosts/nope/maintenance", {"maintenance": True}, 404),
    ("/hosts/alpha/maintenance", {"maintenance": "yes"}, 400),
    ("/hosts/alpha/maintenance", {}, 400),
    ("/hosts/alpha/maintenance", {"maintenance": True, "extra": 1}, 400),
])
async def test_bad_maintenance_requests_change_nothing(coordinator: Coordinator,
                                                       agents: list[FakeAgent], path: str,
                                                       body: dict, status: int) -> None:
    got, doc = await coordinator.call("PUT", path, json=body)
    assert got == status and "error" in doc
    assert (await coordinator.call("GET", "/hosts/alpha"))[1]["maintenance"] is False
    got, _ = await coordinator.call("PUT", "/hosts/alpha/maintenance", json={"maintenance": True},
                                    token=coordinator.cfg.agent_token)
    assert got in (401, 403)  # agents report; only operators decide maintenance
    assert (await coordinator.call("GET", "/hosts/alpha"))[1]["maintenance"] is False


@pytest.mark.e2e
async def test_cli_host_maintenance_and_forced_migrate(tmp_path: Path) -> None:
    fakes = [FakeAgent("alpha", "tok-alpha-4-0123456789"), FakeAgent("beta", "tok-beta-4-0123456789", 4 << 30)]
    async with LocalCoordinator(tmp_path / "coord", settings={"poll_interval_s": "0.02"}) as coord, \
            serving(*fakes):
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            await register_all(client, fakes, coord.agent_token)
            await client.create_vm({**vm_spec("web"), "host": "alpha"})
        env = cli_env(coord, tmp_path, COLUMNS="120")
        code, out, err = await cli(env, "host", "maintenance", "beta", "on")
        assert code == 0 and out.strip() == "beta: in maintenance; no new VMs go there", err
        code, out, err = await cli(env, "hosts")
        assert code == 0 and "maintenance" in out, err
        row = next(line for line in out.splitlines() if "beta" in line)
        assert "maintenance" in row
        code, _out, err = await cli(env, "migrate", "web", "--to", "beta")
        assert code == 1 and "in maintenance" in err and "--force" in err, err
        assert len(err.strip().splitlines()) == 1
        code, out, err = await cli(env, "migrate", "web", "--to", "beta", "--force", "--json")
        assert code == 0, err
        code, out, err = await cli(env, "host", "maintenance", "beta", "off")
        assert code == 0 and out.strip() == "beta: out of maintenance; takes VMs again", err
        code, out, err = await cli(env, "host", "maintenance", "nope", "on")
        assert code == 1 and "no host named 'nope'" in err
