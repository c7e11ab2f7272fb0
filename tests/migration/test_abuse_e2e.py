"""A real migration under a connection attack without credentials: half-open HTTP
request heads on the coordinator and both agents, idle and half-hello connections on
the destination's migration port (more than its per-address limit). The migration
completes, every ``/health`` answers in under a second throughout, and the servers
close every attacking connection at their deadlines."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from novacron.agent.channel.handshake import MAGIC
from novacron.agent.channel.server import MAX_PENDING_PER_ADDRESS
from novacron.agent.local import LocalAgent
from novacron.coordinator.local import LocalCoordinator
from tests.attacks import close_all, open_many, timed_get, wait_all_closed
from tests.migration.agents import Api

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

HTTP = {"http_header_timeout_s": "2"}


async def test_migration_succeeds_and_health_stays_fast_under_slowloris(tmp_path: Path) -> None:
    secret = secrets.token_urlsafe(32)
    async with LocalCoordinator(tmp_path / "coord", settings=HTTP) as coord, \
            LocalAgent("abuse-a", cluster_secret=secret, accel="tcg", settings=HTTP) as a, \
            LocalAgent("abuse-b", cluster_secret=secret, accel="tcg", settings=HTTP) as b:
        api_a = Api(a)
        await api_a.create_guest("victim", rate_mb=4)
        curl = urlsplit(coord.url)
        assert curl.hostname and curl.port
        health = [coord.url + "/api/v1/health", a.url + "/v1/health", b.url + "/v1/health"]
        attack = await open_many(curl.hostname, curl.port, 200)
        attack += await open_many("127.0.0.1", a.port, 100)
        attack += await open_many("127.0.0.1", b.port, 200)
        # twice the per-address limit of silent peers, then peers that stop after the magic
        attack += await open_many("127.0.0.1", b.data_port, 2 * MAX_PENDING_PER_ADDRESS, first_bytes=b"")
        attack += await open_many("127.0.0.1", b.data_port, MAX_PENDING_PER_ADDRESS, first_bytes=MAGIC)
        try:
            await asyncio.sleep(1.2)  # the attackers' connections are past the grace of fresh ones
            mig = await api_a.migrate("victim", b, downtime_ms=300)
            slowest = 0.0
            for _ in range(600):  # bounded: at most ~4 min
                for url in health:
                    status, secs = await timed_get(url)
                    assert status == 200 and secs < 1.0, (url, status, secs)
                    slowest = max(slowest, secs)
                st = await api_a.ok("GET", f"/v1/migrations/{mig['id']}")
                if st["phase"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.2)
            assert st["phase"] == "completed", st
            assert (await Api(b).ok("GET", "/v1/vms/victim"))["state"] == "running"
            assert (await a.request("GET", "/v1/vms/victim"))[0] == 404
            print(f"migration under attack: {st['metrics']['total_s']} s, slowest /health {slowest:.3f} s")
            # HTTP heads: 2 s deadline; migration port: 5 s handshake deadline
            await wait_all_closed(attack, timeout=10)
        finally:
            close_all(attack)
        log = b.log_path.read_text()
        assert "refused migration peer" in log and "migration peer authenticated" in log
