"""Lifecycle, CPU models and offline migration through a real coordinator and two
real agents (TCG guests on loopback).

Host b allows only the CPU models ``Nehalem`` and ``qemu64`` (its ``cpu_models``
setting); host a offers whatever QEMU runs here. Shown:

- agents report their CPU models at registration; a VM asking for a model its
  host cannot run is refused (naming model and host) and nothing is created;
- a VM whose model b lacks is refused for b by the coordinator's migration
  admission (b's agent refuses it too: tests/agent/test_cpu_models.py);
- a VM with the default model boots, ``stop`` through the coordinator shuts it
  down gracefully (outcome ``graceful``), it migrates offline to b (a forgets
  it, b defines it, the record follows) and boots there; an offline migration
  that the target refuses (an image b lacks) changes nothing.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from novacron.agent.guest import GuestImage, ensure_guest
from novacron.agent.local import LocalAgent
from novacron.coordinator.client import ApiClientError, CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.migration.agents import Api

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

B_MODELS = ["Nehalem", "qemu64"]


class Fleet:
    def __init__(self, coord: LocalCoordinator, a: LocalAgent, b: LocalAgent, client: CoordinatorClient,
                 guest: GuestImage, only_a: Path) -> None:
        self.coord, self.a, self.b, self.client, self.guest, self.only_a = coord, a, b, client, guest, only_a

    def spec(self, name: str, **over: Any) -> dict[str, Any]:
        doc = {"name": name, "vcpus": 1, "memory_mb": 128, "accel": "tcg", "kernel": str(self.guest.kernel),
               "initrd": str(self.guest.initrd), "cmdline": self.guest.workload_cmdline(mem_mb=16, rate_mb=1)}
        doc.update(over)
        return doc

    async def agent_vms(self, agent: LocalAgent) -> dict[str, str]:
        doc = await Api(agent).ok("GET", "/v1/vms")
        return {v["name"]: v["state"] for v in doc["vms"]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet() -> AsyncIterator[Fleet]:
    guest = ensure_guest()
    work = Path(tempfile.mkdtemp(prefix="nc-life-"))
    only_a = work / "only-a"  # an image dir host b does not have
    only_a.mkdir()
    shutil.copy(guest.kernel, only_a / "vmlinuz")
    secret = secrets.token_urlsafe(32)
    coord = LocalCoordinator(work / "coord", settings={"heartbeat_interval_s": "1", "poll_interval_s": "0.1"})
    try:
        await coord.start()
        link = {"coordinator_url": coord.url, "coordinator_token": coord.agent_token}
        a = LocalAgent("life-a", cluster_secret=secret, accel="tcg", settings=link,
                       image_dirs=[guest.kernel.parent, only_a])
        b = LocalAgent("life-b", cluster_secret=secret, accel="tcg", image_dirs=[guest.kernel.parent],
                       settings={**link, "cpu_models": ",".join(B_MODELS)})
        async with a, b, CoordinatorClient(coord.url, coord.admin_token) as client:
            deadline = time.monotonic() + 60
            while {h["name"] for h in await client.hosts()} != {"life-a", "life-b"}:
                assert time.monotonic() < deadline, "agents did not register"
                await asyncio.sleep(0.1)
            yield Fleet(coord, a, b, client, guest, only_a)
    finally:
        coord.stop()
        shutil.rmtree(work, ignore_errors=True)


async def refused(call: Any, status: int = 409) -> str:
    with pytest.raises(ApiClientError) as info:
        await call
    assert info.value.status == status, info.value
    return info.value.message


async def test_hosts_report_cpu_models(fleet: Fleet) -> None:
    hosts = {h["name"]: h for h in await fleet.client.hosts()}
    assert hosts["life-b"]["cpu_models"] == B_MODELS
    a_models = set(hosts["life-a"]["cpu_models"])
    assert {"Nehalem", "qemu64", "Westmere"} <= a_models
    assert "host" not in a_models  # TCG: no passthrough
    assert "Skylake-Server" not in a_models  # TCG in QEMU 7.2 lacks its AVX-512 and more
    assert hosts["life-a"]["cpu_signature"].count("/") == 4


async def test_model_the_host_cannot_run_is_refused(fleet: Fleet) -> None:
    why = await refused(fleet.client.create_vm({**fleet.spec("sky", cpu_model="Skylake-Server"),
                                                "host": "life-a"}))
    assert "Skylake-Server" in why and "life-a" in why, why
    # placed by the scheduler instead: no host runs it, and the answer says why
    why = await refused(fleet.client.create_vm(fleet.spec("sky", cpu_model="Skylake-Server")))
    assert "CPU model" in why, why
    assert "sky" not in await fleet.agent_vms(fleet.a) and await fleet.client.vms() == []
    # passthrough needs KVM: refused on a TCG host before anything starts
    why = await refused(fleet.client.create_vm({**fleet.spec("pass", cpu_model="host", accel="auto"),
                                                "host": "life-a"}))
    assert "'host'" in why and "KVM" in why, why


async def test_admission_refuses_a_host_without_the_model(fleet: Fleet) -> None:
    # a Westmere VM may not go to b (b allows Nehalem and qemu64)
    await fleet.client.create_vm({**fleet.spec("west", cpu_model="Westmere"), "host": "life-a", "start": False})
    why = await refused(fleet.client.migrate("west", "life-b"))
    assert "Westmere" in why and "life-b" in why, why
    assert (await fleet.client.vm("west"))["host"] == "life-a"


async def test_graceful_stop_then_offline_migration(fleet: Fleet) -> None:
    client, api_a, api_b = fleet.client, Api(fleet.a), Api(fleet.b)
    vm = await client.create_vm({**fleet.spec("cold"), "host": "life-a"})
    assert vm["state"] == "running"
    first = (await api_a.wait_console("cold", r"NOVACRON-READY boot=(\w+)", timeout=150)).group(1)
    await api_a.wait_console("cold", "NOVACRON-POWER button=handle", timeout=60)
    mac_spec = (await api_a.ok("GET", "/v1/vms/cold"))["spec"]
    assert mac_spec["cpu_model"] == "Nehalem"  # the default

    stopped = await client.request("POST", "/vms/cold/stop?timeout_s=60")
    assert stopped["state"] == "stopped" and stopped["outcome"]["graceful"] is True, stopped
    assert (await api_a.ok("GET", "/v1/vms/cold"))["exit_code"] == 0
    await api_a.wait_console("cold", "NOVACRON-POWEROFF clean", timeout=5)

    mig = await client.migrate("cold", "life-b")
    assert mig["phase"] == "completed" and mig["options"].get("offline") is True, mig
    assert "cold" not in await fleet.agent_vms(fleet.a)
    assert (await fleet.agent_vms(fleet.b))["cold"] == "stopped"
    record = await client.vm("cold")
    assert record["host"] == "life-b" and record["state"] == "stopped"
    assert (await api_b.ok("GET", "/v1/vms/cold"))["spec"] == mac_spec  # MACs, model: all kept

    started = await client.request("POST", "/vms/cold/start")
    assert started["state"] == "running" and started["host"] == "life-b"
    second = (await api_b.wait_console("cold", r"NOVACRON-READY boot=(\w+)", timeout=150)).group(1)
    assert second != first
    forced = await client.request("POST", "/vms/cold/stop?force=true")
    assert forced["outcome"]["graceful"] is False and forced["state"] == "stopped"


async def test_failed_offline_migration_changes_nothing(fleet: Fleet) -> None:
    kernel = str(fleet.only_a / "vmlinuz")  # only a has this image
    await fleet.client.create_vm({**fleet.spec("stay", kernel=kernel), "host": "life-a", "start": False})
    why = await refused(fleet.client.migrate("stay", "life-b"))
    assert "stays on life-a" in why, why
    assert (await fleet.agent_vms(fleet.a))["stay"] == "stopped"
    assert "stay" not in await fleet.agent_vms(fleet.b)
    record = await fleet.client.vm("stay")
    assert record["host"] == "life-a" and record["state"] == "stopped"
    migs = [m for m in (await fleet.client.request("GET", "/migrations?vm=stay"))["migrations"]]
    assert migs[0]["phase"] == "failed"
