"""Past capacity the coordinator turns heartbeats away (503 + Retry-After) instead of
marking live hosts down, and marks nothing down while it cannot tell."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent
from tests.metrics_helpers import parse, value

BUSY_TOKEN = "tok-busy-per-host-token"


async def burst(c: Coordinator, n: int, token: str) -> list[tuple[int, str | None]]:
    async def one() -> tuple[int, str | None]:
        async with c.session.post(c.url + "/api/v1/hosts/busy/heartbeat",
                                  json={"memory_available_bytes": 1 << 30},
                                  headers=c.headers(token)) as resp:  # the host's own credential
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")
    return await asyncio.gather(*(one() for _ in range(n)))


async def state(c: Coordinator, host: str) -> str:
    return str((await c.call("GET", f"/hosts/{host}"))[1]["state"])


async def test_overload_sheds_heartbeats_and_marks_no_live_host_down(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = await start_coordinator(make_cfg(tmp_path, max_pending_heartbeats=1,
                                         heartbeat_interval_s=0.5, heartbeat_timeout_s=1.0))
    try:
        for name in ("busy", "quiet"):
            fake = FakeAgent(name, BUSY_TOKEN if name == "busy" else f"tok-{name}-1-per-host-token")
            fake.url = "http://127.0.0.1:9"
            await fake.register_with(c.session, c.url, c.cfg.agent_token)
        start = time.monotonic()
        shed = 0
        while time.monotonic() - start < 1.6:  # bounded: keep it over capacity past the timeout
            results = await burst(c, 40, BUSY_TOKEN)
            assert {s for s, _ in results} <= {200, 503}
            assert all(r == "1" for s, r in results if s == 503)  # Retry-After: the interval
            shed += sum(s == 503 for s, _ in results)
        assert shed > 0
        # the operator is told why, once per hold period, not once per heartbeat
        why = [r.getMessage() for r in caplog.records if "shedding heartbeats" in r.getMessage()]
        assert why and all("heartbeats waiting for the database (max_pending_heartbeats)" in m for m in why), why
        assert len(why) <= 2, why
        # "quiet" has been silent longer than the timeout, but we were turning agents away
        assert await state(c, "quiet") == "up"
        async with c.session.get(c.url + "/metrics", headers=c.headers()) as resp:
            samples = parse(await resp.text())
        assert value(samples, "novacron_heartbeats_total", result="shed") == shed
        # caught up: the silent host goes down within the timeout and a check period
        calm = time.monotonic()
        while await state(c, "quiet") != "down":
            assert time.monotonic() - calm < 1.0 + 1.0 + 0.25 + 1.0, "never marked down"
            await asyncio.sleep(0.05)
    finally:
        await stop_coordinator(c)


async def test_a_late_event_loop_sheds_heartbeats_and_holds_the_monitor(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = await start_coordinator(make_cfg(tmp_path, heartbeat_interval_s=0.5,
                                         heartbeat_timeout_s=1.0))
    try:
        for name in ("busy", "quiet"):
            fake = FakeAgent(name, BUSY_TOKEN if name == "busy" else f"tok-{name}-2-per-host-token")
            fake.url = "http://127.0.0.1:9"
            await fake.register_with(c.session, c.url, c.cfg.agent_token)
        assert {s for s, _ in await burst(c, 5, BUSY_TOKEN)} == {200}
        # one pause (a garbage collection, say) is not overload: still taken
        time.sleep(0.7)
        await asyncio.sleep(0.15)  # the watcher sees one late check
        assert {s for s, _ in await burst(c, 3, BUSY_TOKEN)} == {200}
        start, statuses = time.monotonic(), []
        while time.monotonic() - start < 1.5:  # bounded: the loop keeps stalling past the timeout
            for _ in range(3):  # late on checks in a row: each 0.1 s tick straddles a stall
                time.sleep(0.7)  # the coordinator shares this loop: as if swamped with requests
                await asyncio.sleep(0.01)
            statuses += [s for s, _ in await burst(c, 8, BUSY_TOKEN)]
        # a share is still taken (halved per late check: 1/4, 1/8, ... of them), the rest shed
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 0.75 * len(statuses), statuses
        assert await state(c, "quiet") == "up"  # silent past the timeout, but we could not tell
        assert any(re.search(r"shedding heartbeats .*: event loop ran [0-9]+ ms late", r.getMessage())
                   for r in caplog.records)
        await asyncio.sleep(2.5)  # calm again
        assert {s for s, _ in await burst(c, 3, BUSY_TOKEN)} == {200}
    finally:
        await stop_coordinator(c)
