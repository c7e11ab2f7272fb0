"""Prometheus metrics of real agents during a real migration: the running
migration's live series on the source, then its histograms and page counts
on both ends once it completes."""

from __future__ import annotations

import asyncio
import secrets

import aiohttp
import pytest

from novacron.agent.local import LocalAgent
from tests.metrics_helpers import Samples, parse, value
from tests.migration.agents import Api

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def scrape(session: aiohttp.ClientSession, agent: LocalAgent,
                 token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(agent.url + "/metrics", headers=headers) as resp:
        return resp.status, await resp.text()


async def samples(session: aiohttp.ClientSession, agent: LocalAgent) -> Samples:
    status, text = await scrape(session, agent, agent.token)
    assert status == 200, text
    return parse(text)


async def test_metrics_scraped_during_a_real_migration() -> None:
    secret = secrets.token_urlsafe(32)
    async with LocalAgent("ma", cluster_secret=secret, accel="tcg") as a, \
            LocalAgent("mb", cluster_secret=secret, accel="tcg") as b, \
            aiohttp.ClientSession() as session:
        assert (await scrape(session, a))[0] == 401  # the agent's token, like the rest
        api = Api(a)
        await api.create_guest("metered", rate_mb=8)
        # A bandwidth cap keeps it in pre-copy long enough to be seen there.
        mig = await api.migrate("metered", b, bandwidth_mbps=40)
        live: Samples = []
        for _ in range(1200):  # bounded: the migration ends or 60 s pass
            s = await samples(session, a)
            if value(s, "novacron_agent_migration_live_pages", migration=mig["id"]) is not None:
                live = s
            st = (await api.ok("GET", f"/v1/migrations/{mig['id']}"))
            if st["phase"] in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(0.05)
        st = await api.wait_migration(mig["id"])
        assert st["phase"] == "completed", st
        assert live, "no live series seen while the migration ran"
        assert value(live, "novacron_agent_migrations_running") == 1
        assert value(live, "novacron_agent_migration_live_pages", migration=mig["id"],
                     role="source", kind="sent") is not None
        assert value(live, "novacron_agent_migration_dirty_rate_pages_per_second",
                     migration=mig["id"], vm="metered") is not None

        m = st["metrics"]
        s = await samples(session, a)
        assert value(s, "novacron_agent_migrations_running") == 0
        assert value(s, "novacron_agent_migrations_total", role="source", result="completed") == 1
        assert value(s, "novacron_agent_migration_downtime_seconds_count") == 1
        assert value(s, "novacron_agent_migration_downtime_seconds_sum") == pytest.approx(
            m["downtime_ms"] / 1000, abs=1e-3)
        assert value(s, "novacron_agent_migration_pages_total", role="source", kind="sent") \
            == m["pages_sent"] > 0
        assert value(s, "novacron_agent_migration_pages_total", role="source", kind="zero") \
            == m["pages_zero"]
        assert value(s, "novacron_agent_migration_bytes_sum", role="source", kind="wire") \
            == m["bytes_wire"]
        for phase in ("prepare", "precopy", "stopcopy", "commit"):
            assert value(s, "novacron_agent_migration_phase_duration_seconds_count",
                         role="source", phase=phase) == 1, phase
        d = await samples(session, b)
        assert value(d, "novacron_agent_migrations_total", role="destination", result="completed") == 1
        assert (value(d, "novacron_agent_migration_pages_total", role="destination", kind="sent")
                or 0) > 0
