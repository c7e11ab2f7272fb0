"""An agent process with ``hypervisor = "libvirt"`` against real libvirtds the test
starts: /v1/vms lists the daemon's domains, adopts and drives them, and
/v1/libvirt/migrations moves one to a configured peer daemon."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from novacron.agent.guest import GuestImage
from novacron.agent.local import LocalAgent, LocalAgentError
from tests.libvirtd import LibvirtDaemon, SharedDir, have_libvirtd

pytestmark = [pytest.mark.slow, pytest.mark.e2e,
              pytest.mark.skipif(not have_libvirtd(), reason="needs libvirtd, virsh and root")]


@pytest.fixture
def shared(guest: GuestImage) -> Iterator[SharedDir]:
    s = SharedDir(guest)
    yield s
    s.remove()


@pytest.fixture
def daemons() -> Iterator[tuple[LibvirtDaemon, LibvirtDaemon]]:
    started: list[LibvirtDaemon] = []
    try:
        for name in ("a", "b"):
            started.append(LibvirtDaemon(name).start())
        yield started[0], started[1]
    finally:
        for d in started:
            d.stop()
        assert all(d.pids() == [] for d in started)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def coordinator() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A stand-in coordinator that records heartbeats and asks for one every 300 s:
    a heartbeat seen sooner was sent because of a libvirt event."""
    beats: list[dict[str, Any]] = []

    async def register(_r: web.Request) -> web.Response:
        return web.json_response({"host": {}, "heartbeat_interval_s": 300})

    async def heartbeat(r: web.Request) -> web.Response:
        beats.append(await r.json())
        return web.json_response({"state": "up", "heartbeat_interval_s": 300})

    app = web.Application()
    app.router.add_post("/api/v1/hosts/register", register)
    app.router.add_post("/api/v1/hosts/{name}/heartbeat", heartbeat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/"), beats
    finally:
        await server.close()


async def test_agent_lists_adopts_drives_and_migrates_libvirt_domains(
        daemons: tuple[LibvirtDaemon, LibvirtDaemon], shared: SharedDir,
        coordinator: tuple[str, list[dict[str, Any]]]) -> None:
    a, b = daemons
    a.define(shared.domain_xml("api1"))
    settings = {"hypervisor": "libvirt", "libvirt_uri": a.uri,
                "libvirt_peers": f"b={b.uri} tcp://127.0.0.1:{free_port()}",
                "libvirt_shutdown_timeout_s": "1",
                "coordinator_url": coordinator[0], "coordinator_token": "coordinator-token-0123456789"}
    beats = coordinator[1]
    async with LocalAgent("lv", accel="tcg", settings=settings) as agent:
        status, doc = await agent.request("GET", "/v1/vms")
        assert status == 200, doc
        [vm] = doc["vms"]
        assert vm["name"] == "api1" and vm["adopted"] is False and vm["state"] == "stopped"
        status, host = await agent.request("GET", "/v1/host")
        assert status == 200 and host["hypervisor"] == "libvirt" and host["vms"] == ["api1"]

        # refused until adopted; unknown actions and domains are clear errors
        status, doc = await agent.request("POST", "/v1/vms/api1/start")
        assert status == 409 and "adopt it first" in doc["error"]
        assert (await agent.request("POST", "/v1/vms/api1/reboot"))[0] == 404
        assert (await agent.request("POST", "/v1/vms/nope/start"))[0] == 404
        assert (await agent.request("POST", "/v1/vms", {"name": "x"}))[0] == 405  # define with libvirt

        # a domain an operator defines with virsh reaches the coordinator at once (an event)
        a.define(shared.domain_xml("api2"))
        deadline = time.monotonic() + 20
        while not any("api2" in hb.get("vms", []) for hb in beats):
            assert time.monotonic() < deadline, beats
            await asyncio.sleep(0.1)
        a.virsh("undefine", "api2")

        status, doc = await agent.request("POST", "/v1/vms/api1/adopt")
        assert status == 200 and doc["adopted"] is True
        status, doc = await agent.request("POST", "/v1/vms/api1/start")
        assert status == 200 and doc["state"] == "running"
        status, doc = await agent.request("POST", "/v1/vms/api1/pause")
        assert status == 200 and doc["state"] == "paused"
        status, doc = await agent.request("POST", "/v1/vms/api1/resume")
        assert status == 200 and doc["state"] == "running"
        status, doc = await agent.request("GET", "/v1/vms/api1/stats")
        assert status == 200 and doc["cpu_time_ns"] > 0
        assert await agent.request("POST", "/v1/vms/api1/console", {"text": "\n"}) == (200, {"sent": 1})
        for bad_text in ("", 5, "x" * 1025):
            assert (await agent.request("POST", "/v1/vms/api1/console", {"text": bad_text}))[0] == 400

        # bad migration requests change nothing
        for bad in ({"vm": "api1", "peer": "c"}, {"vm": "api1", "peer": "b", "options": {"compression": "lz4"}},
                    {"vm": "api1", "peer": "b", "dest_uri": "qemu:///system"}):
            status, doc = await agent.request("POST", "/v1/libvirt/migrations", bad)
            assert status == 400, doc
        assert (await agent.request("GET", "/v1/libvirt/migrations"))[1] == {"migrations": []}

        status, mig = await agent.request("POST", "/v1/libvirt/migrations", {"vm": "api1", "peer": "b", "options": {"parallel_connections": 2}})
        assert status == 202, mig
        deadline = time.monotonic() + 90
        states = set()
        while mig["phase"] not in ("completed", "failed", "cancelled"):
            states.add((await agent.request("GET", "/v1/vms/api1"))[1].get("state"))
            assert time.monotonic() < deadline, mig
            await asyncio.sleep(0.3)
            mig = (await agent.request("GET", f"/v1/libvirt/migrations/{mig['id']}"))[1]
        assert mig["phase"] == "completed", mig
        assert "migrating" in states, states
        assert mig["metrics"]["bytes_wire"] > 0 and mig["metrics"]["native"]["engine"] == "libvirt"
        assert (await agent.request("GET", "/v1/vms"))[1] == {"vms": []}
        assert b.virsh("domstate", "api1").stdout.strip() == "running"


@pytest.mark.parametrize(("settings", "reason"), [
    ({"libvirt_uri": "qemu+unix:///session?socket=/nonexistent/libvirt-sock"}, "cannot connect to libvirt"),
    ({"libvirt_peers": "b=file:///etc/passwd"}, "libvirt_peers.b"),
])
async def test_bad_libvirt_settings_stop_the_agent_with_a_reason(settings: dict[str, str], reason: str) -> None:
    agent = LocalAgent("badlv", accel="tcg", settings={"hypervisor": "libvirt", **settings})
    with pytest.raises(LocalAgentError, match="exited") as err:
        await agent.start(timeout=30)
    assert reason in str(err.value)
