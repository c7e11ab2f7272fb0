"""An agent told 503 by a busy coordinator waits one to two intervals before its next
heartbeat (spread out, not a synchronised retry storm) and counts it as shed."""

from __future__ import annotations

import asyncio
import itertools
import time

from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry, Counter

from novacron.agent.coordinator_link import CoordinatorLink

INTERVAL = 0.2


async def test_503_backs_off_an_interval_or_two() -> None:
    beats: list[float] = []

    async def register(_r: web.Request) -> web.Response:
        return web.json_response({"host": {}, "heartbeat_interval_s": INTERVAL})

    async def heartbeat(_r: web.Request) -> web.Response:
        beats.append(time.monotonic())
        if len(beats) <= 3:  # busy at first, then fine
            return web.json_response({"error": "busy"}, status=503, headers={"Retry-After": "1"})
        return web.json_response({"state": "up", "heartbeat_interval_s": INTERVAL})

    app = web.Application()
    app.router.add_post("/api/v1/hosts/register", register)
    app.router.add_post("/api/v1/hosts/{name}/heartbeat", heartbeat)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()

    async def info() -> dict[str, object]:
        return {"name": "h1", "cpus": 1, "memory_bytes": 1 << 30, "memory_available_bytes": 1 << 29}

    registry = CollectorRegistry()
    counter = Counter("hb", "heartbeats", ["result"], registry=registry)
    link = CoordinatorLink(str(server.make_url("")).rstrip("/"), "agent-token-x",
                           "http://127.0.0.1:1", "tok-h1", info, heartbeats=counter)
    task = asyncio.create_task(link.run())
    try:
        for _ in range(100):  # bounded: 5 s
            if len(beats) >= 5:
                break
            await asyncio.sleep(0.05)
        assert len(beats) >= 5
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        # after each 503: one to two intervals (plus scheduling slack), never the short retry
        for gap in gaps[:3]:
            assert INTERVAL * 0.95 <= gap <= INTERVAL * 2 + 0.25, gaps
        assert registry.get_sample_value("hb_total", {"result": "shed"}) == 3
        assert (registry.get_sample_value("hb_total", {"result": "ok"}) or 0) >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await server.close()
