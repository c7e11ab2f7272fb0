"""``CoordinatorLink.poke()`` (a libvirt domain event) sends the next heartbeat at
once instead of after the interval; without a poke the link waits the interval."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web
from aiohttp.test_utils import TestServer

from novacron.agent.coordinator_link import CoordinatorLink

INTERVAL = 30.0  # far longer than the test: only a poke can bring a heartbeat


async def test_poke_heartbeats_at_once_and_only_then() -> None:
    beats: list[float] = []
    registered = asyncio.Event()

    async def register(_r: web.Request) -> web.Response:
        registered.set()
        return web.json_response({"host": {}, "heartbeat_interval_s": INTERVAL})

    async def heartbeat(_r: web.Request) -> web.Response:
        beats.append(time.monotonic())
        return web.json_response({"state": "up", "heartbeat_interval_s": INTERVAL})

    app = web.Application()
    app.router.add_post("/api/v1/hosts/register", register)
    app.router.add_post("/api/v1/hosts/{name}/heartbeat", heartbeat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()

    async def info() -> dict[str, object]:
        return {"name": "h1", "cpus": 1, "memory_bytes": 1 << 30, "memory_available_bytes": 1 << 29}

    link = CoordinatorLink(str(server.make_url("")).rstrip("/"), "agent-token-x",
                           "http://127.0.0.1:1", "tok-h1", info)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(registered.wait(), 10)
        await asyncio.sleep(0.5)
        assert beats == []  # the interval has not passed
        for expected in (1, 2):
            poked = time.monotonic()
            link.poke()
            link.poke()  # pokes in a burst fold into one heartbeat
            for _ in range(200):  # bounded: 10 s
                if len(beats) >= expected:
                    break
                await asyncio.sleep(0.05)
            assert len(beats) == expected and beats[-1] - poked < 5
            await asyncio.sleep(0.5)
            assert len(beats) == expected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()
