"""The coordinator's /metrics: authenticated, and its series move with what happens."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from tests.coordinator.conftest import Coordinator, make_cfg, start_coordinator, stop_coordinator
from tests.coordinator.fake_agent import FakeAgent, serving
from tests.coordinator.test_api import read_sse, vm_spec
from tests.metrics_helpers import Samples, parse, value


async def scrape(c: Coordinator, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with c.session.get(c.url + "/metrics", headers=headers) as resp:
        return resp.status, await resp.text()


async def samples(c: Coordinator) -> Samples:
    status, text = await scrape(c, c.cfg.admin_token)
    assert status == 200
    return parse(text)


async def test_metrics_need_the_admin_or_the_metrics_token(tmp_path: Path) -> None:
    c = await start_coordinator(make_cfg(tmp_path, metrics_token="metrics-" + secrets.token_hex(8)))
    try:
        assert (await scrape(c))[0] == 401
        assert (await scrape(c, "wrong-token"))[0] == 401
        assert (await scrape(c, c.cfg.agent_token))[0] == 401
        assert (await scrape(c, c.cfg.admin_token))[0] == 200
        status, text = await scrape(c, c.cfg.metrics_token)
        assert status == 200 and "novacron_api_request_duration_seconds" in text
        # the metrics token reads metrics only
        assert (await c.call("GET", "/hosts", token=c.cfg.metrics_token))[0] == 401
    finally:
        await stop_coordinator(c)


async def test_series_follow_heartbeats_placements_vms_and_migrations(
        coordinator: Coordinator) -> None:
    c = coordinator
    async with serving(FakeAgent("alpha", "tok-a--per-host-token" + secrets.token_hex(4)),
                       FakeAgent("beta", "tok-b--per-host-token" + secrets.token_hex(4), memory_bytes=4 << 30)) as fakes:
        for fake in fakes:
            await fake.register_with(c.session, c.url, c.cfg.agent_token)
        for _ in range(3):
            status, _ = await c.call("POST", "/hosts/alpha/heartbeat", token=fakes[0].token,
                                     json={"memory_available_bytes": 1 << 30})
            assert status == 200
        assert (await c.call("POST", "/hosts/nobody/heartbeat", token=c.cfg.agent_token,
                             json={"memory_available_bytes": 1}))[0] == 404
        assert (await c.call("POST", "/vms", json=vm_spec("v1", host="alpha")))[0] == 201
        assert (await c.call("POST", "/vms", json=vm_spec("huge", 64 * 1024)))[0] == 409
        s = await samples(c)
        assert value(s, "novacron_heartbeats_total", result="ok") == 3
        assert value(s, "novacron_heartbeats_total", result="unknown") == 1
        assert value(s, "novacron_api_request_duration_seconds_count",
                     route="/api/v1/hosts/{name}/heartbeat", method="POST", status="200") == 3
        assert value(s, "novacron_api_request_duration_seconds_count",
                     route="/api/v1/hosts/{name}/heartbeat", status="404") == 1
        assert value(s, "novacron_placement_duration_seconds_count", outcome="placed") == 1
        assert value(s, "novacron_placement_duration_seconds_count", outcome="refused") == 1
        assert value(s, "novacron_vms", state="running") == 1
        assert value(s, "novacron_hosts", state="up") == 2
        assert value(s, "novacron_lease_held", lease="heartbeat-monitor") == 1

        fakes[0].hold_migrations = True
        _, mig = await c.call("POST", "/migrations", json={"vm": "v1", "target": "beta"})
        for _ in range(100):  # bounded: 5 s, until the follower has polled a report in
            s = await samples(c)  # (its series exist from the start, the agent's figures after a poll)
            if value(s, "novacron_migration_progress_percent", migration=mig["id"]) is not None:
                break
            await asyncio.sleep(0.05)
        assert value(s, "novacron_migrations_running") == 1
        assert value(s, "novacron_migration_live_pages", migration=mig["id"], kind="sent") is not None
        pct = value(s, "novacron_migration_progress_percent", migration=mig["id"])
        assert pct is not None and 0 < pct < 100, pct  # the agent's data progress, passed on
        fakes[0].hold_migrations = False
        await asyncio.wait_for(read_sse(c, mig["id"]), 10)
        s = await samples(c)
        assert value(s, "novacron_migrations_total", result="completed") == 1
        assert value(s, "novacron_migration_downtime_seconds_count") == 1
        assert value(s, "novacron_migration_downtime_seconds_sum") == 0.0125  # the fake's 12.5 ms
        assert value(s, "novacron_migration_bytes_count", kind="wire") == 1
        assert value(s, "novacron_migrations_running") == 0
        assert value(s, "novacron_migration_budget_exceeded_total", result="completed") in (None, 0)
        assert value(s, "novacron_migration_live_pages", migration=mig["id"]) is None
