"""Coordinator test fixtures: a real coordinator on loopback, fake agents beside it."""

from __future__ import annotations

import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from novacron.coordinator.config import CoordinatorConfig
from novacron.coordinator.service import build_app
from tests.conftest import BACKENDS  # noqa: F401  (the backend fixtures live there)
from tests.coordinator.fake_agent import FakeAgent, serving


def make_cfg(data_dir: Path, **overrides: Any) -> CoordinatorConfig:
    values: dict[str, Any] = {
        "data_dir": data_dir, "admin_token": "admin-" + secrets.token_hex(8),
        "agent_token": "agent-" + secrets.token_hex(8), "poll_interval_s": 0.02,
        "heartbeat_interval_s": 1.0, "heartbeat_timeout_s": 30.0, "max_body_bytes": 16 * 1024,
    }
    values.update(overrides)
    return CoordinatorConfig(**values)


@dataclass
class Coordinator:
    cfg: CoordinatorConfig
    server: TestServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.cfg.admin_token}"}

    async def call(self, method: str, path: str, *, token: str | None = None,
                   **kw: Any) -> tuple[int, Any]:
        headers = {**self.headers(token), **kw.pop("headers", {})}
        async with self.session.request(method, self.url + "/api/v1" + path,
                                        headers=headers, **kw) as resp:
            return resp.status, await resp.json(content_type=None)


async def start_coordinator(cfg: CoordinatorConfig) -> Coordinator:
    server = TestServer(build_app(cfg), host="127.0.0.1")
    await server.start_server()
    return Coordinator(cfg, server, aiohttp.ClientSession())


async def stop_coordinator(c: Coordinator) -> None:
    await c.session.close()
    await c.server.close()


@pytest.fixture
async def coordinator(tmp_path: Path, database_url: str) -> AsyncIterator[Coordinator]:
    c = await start_coordinator(make_cfg(tmp_path / "coord", database_url=database_url))
    try:
        yield c
    finally:
        await stop_coordinator(c)


@pytest.fixture
async def agents(coordinator: Coordinator) -> AsyncIterator[list[FakeAgent]]:
    """Two fake agents, registered with the coordinator, able to migrate to each other."""
    async with serving(FakeAgent("alpha", "tok-a-" + secrets.token_hex(8), memory_bytes=8 << 30),
                       FakeAgent("beta", "tok-b-" + secrets.token_hex(8), memory_bytes=4 << 30)) as fakes:
        for fake in fakes:
            await fake.register_with(coordinator.session, coordinator.url,
                                     coordinator.cfg.agent_token)
        yield fakes


def sigint_default() -> None:
    """``preexec_fn`` for a child that a test interrupts with SIGINT: a shell without job
    control starts background commands (``make test &``) with SIGINT ignored, and that
    would pass to the child, which then never sees the Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
