"""API-level helpers for migration tests against real ``novacron-agent`` processes."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from novacron.agent.local import LocalAgent
from tests.migration.qemu_helpers import guest_spec


class Api:
    def __init__(self, agent: LocalAgent) -> None:
        self.agent = agent

    async def ok(self, method: str, path: str, body: Any = None, want: int = 200) -> Any:
        status, doc = await self.agent.request(method, path, body)
        assert status == want, (method, path, status, doc)
        return doc

    async def create_guest(self, name: str, **kw: Any) -> dict[str, Any]:
        doc = await self.ok("POST", "/v1/vms", guest_spec(name, **kw), want=201)
        await self.wait_console(name, r"NOVACRON-HB .* ok=1", timeout=150)
        return doc  # type: ignore[no-any-return]

    async def console(self, name: str, offset: int = 0) -> tuple[str, int]:
        doc = await self.ok("GET", f"/v1/vms/{name}/console?offset={offset}")
        return doc["text"], doc["next_offset"]

    async def wait_console(self, name: str, pattern: str, timeout: float,
                           offset: int = 0) -> re.Match[str]:
        rx = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        text = ""
        while True:
            chunk, offset = await self.console(name, offset)
            text += chunk
            m = rx.search(text)
            if m:
                return m
            if loop.time() > deadline:
                raise AssertionError(f"{pattern!r} not on {name}'s console in {timeout}s: {text[-300:]!r}")
            await asyncio.sleep(0.2)

    async def migrate(self, vm: str, dest: LocalAgent, **options: Any) -> dict[str, Any]:
        """Start ``vm`` towards ``dest`` with a grant as a coordinator would issue it
        (``data_port``: where the grant says the destination's channel is)."""
        grant = self.agent.grant_to(dest, vm, data_port=options.pop("data_port", None))
        doc = await self.ok("POST", "/v1/migrations",
                            {"vm": vm, "grant": grant, "options": options}, want=202)
        return doc  # type: ignore[no-any-return]

    async def wait_migration(self, mid: str, timeout: float = 180,
                             until: Any = None) -> dict[str, Any]:
        """Poll the status until it is final (or ``until(status)`` holds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            st = await self.ok("GET", f"/v1/migrations/{mid}")
            if (until is not None and until(st)) or st["phase"] in ("completed", "failed", "cancelled"):
                return st  # type: ignore[no-any-return]
            if loop.time() > deadline:
                raise AssertionError(f"migration {mid} stuck: {st}")
            await asyncio.sleep(0.05)
