"""Bad input to a real agent gets a 400 that says what is wrong and changes nothing:
non-finite numbers, names with a trailing newline, deep nesting, out-of-range offsets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from novacron.agent.local import LocalAgent

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent() -> AsyncIterator[LocalAgent]:
    async with LocalAgent("bad-input", accel="tcg") as a:
        yield a


async def raw(agent: LocalAgent, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(method, agent.url + path, data=body, headers=agent.headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def nothing_changed(agent: LocalAgent) -> None:
    assert await agent.request("GET", "/v1/vms") == (200, {"vms": []})
    assert list((agent.state_dir / "vms").iterdir()) == []
    assert await agent.request("GET", "/v1/migrations") == (200, {"migrations": []})


@pytest.mark.parametrize(("body", "message"), [
    (b'{"name": "vm1", "vcpus": NaN, "memory_mb": 64}', "NaN is not a JSON number"),
    (b'{"name": "vm1", "vcpus": 1, "memory_mb": Infinity}', "Infinity is not a JSON number"),
    (b'{"name": "vm1", "vcpus": 1, "memory_mb": 1e999}', "out of range"),
    (b'{"name": "vm1\\n", "vcpus": 1, "memory_mb": 64}', "name:"),
    (b'{"name": "vm1\\n\\n", "vcpus": 1, "memory_mb": 64}', "name:"),
    (b'{"name": "vm1", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper than"),
    (b'{"name": "vm1", "x": ' + b"{\"a\":" * 70 + b"1" + b"}" * 70 + b"}", "nested deeper than"),
])
async def test_bad_vm_create_is_400(agent: LocalAgent, body: bytes, message: str) -> None:
    status, doc = await raw(agent, "POST", "/v1/vms", body)
    assert status == 400 and message in doc["error"], doc
    await nothing_changed(agent)


@pytest.mark.parametrize("body", [
    b'{"vm": "vm1", "target": {"url": "http://127.0.0.1:9", "token": "t"}, "options": {"downtime_ms": NaN}}',
    b'{"vm": "vm1\\n", "target": {"url": "http://127.0.0.1:9", "token": "t"}}',
    b'{"vm": ' + b"[" * 3000 + b"]" * 3000 + b"}",
])
async def test_bad_migration_request_is_400(agent: LocalAgent, body: bytes) -> None:
    status, doc = await raw(agent, "POST", "/v1/migrations", body)
    assert status == 400, doc
    await nothing_changed(agent)


@pytest.mark.parametrize("offset", [str(2**63), str(2**64 + 5), "9" * 400, "-1", "1e3"])
async def test_console_offset_out_of_range_is_400(agent: LocalAgent, offset: str) -> None:
    status, doc = await raw(agent, "GET", f"/v1/vms/ghost/console?offset={offset}")
    assert status == 400 and "offset" in doc["error"], doc
