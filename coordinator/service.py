"""Coordinator process lifecycle: build the aiohttp app and serve until signalled."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from novacron.coordinator.config import CoordinatorConfig

log = logging.getLogger("novacron.coordinator")


def build_app(cfg: CoordinatorConfig) -> web.Application:
    app = web.Application()

    async def health(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app.router.add_get("/api/v1/health", health)
    return app


async def serve(cfg: CoordinatorConfig) -> None:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    runner = web.AppRunner(build_app(cfg))
    await runner.setup()
    await web.TCPSite(runner, cfg.host, cfg.port).start()
    log.info("coordinator listening", extra={"host": cfg.host, "port": cfg.port})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
