"""A real coordinator process under connection abuse: half-open request heads are cut
at the head deadline, idle connections over the cap make room for real clients, and
running out of descriptors is one log line, not a flood. ``/health`` answers in < 1 s."""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from novacron.coordinator.local import LocalCoordinator
from tests.attacks import close_all, open_many, still_open, timed_get, wait_all_closed

pytestmark = [pytest.mark.e2e]


def address(coord: LocalCoordinator) -> tuple[str, int]:
    url = urlsplit(coord.url)
    assert url.hostname and url.port
    return url.hostname, url.port


async def test_slowloris_heads_are_cut_at_the_deadline(tmp_path: Path) -> None:
    settings = {"http_header_timeout_s": "1.5"}
    async with LocalCoordinator(tmp_path / "c", settings=settings) as coord:
        t0 = time.monotonic()
        conns = await open_many(*address(coord), 200)
        try:
            assert len(conns) == 200
            for _ in range(3):
                status, secs = await timed_get(coord.url + "/api/v1/health")
                assert status == 200 and secs < 1.0
            await wait_all_closed(conns, timeout=8)
            assert time.monotonic() - t0 < 1.5 + 3  # the deadline, plus time to open them
        finally:
            close_all(conns)
        log = coord.log_path.read_text()
        assert log.count("did not send a request head in time") <= 2  # one line per interval


async def test_idle_connections_over_the_cap_make_room(tmp_path: Path) -> None:
    settings = {"http_max_connections": "100", "http_idle_timeout_s": "300", "http_header_timeout_s": "300"}
    async with LocalCoordinator(tmp_path / "c", settings=settings) as coord:
        conns = await open_many(*address(coord), 300, first_bytes=b"")
        try:
            await asyncio.sleep(0.7)  # older than the grace a fresh connection gets
            for _ in range(5):
                status, secs = await timed_get(coord.url + "/api/v1/health")
                assert status == 200 and secs < 1.0
            assert await still_open(conns) <= 100
        finally:
            close_all(conns)
        log = coord.log_path.read_text()
        assert 1 <= log.count("HTTP connection refused") <= 2
        assert log.count("closed the oldest idle one") <= 2


async def test_out_of_descriptors_is_one_line_not_a_flood(tmp_path: Path) -> None:
    """At the descriptor limit asyncio fails accept() in a loop; a cap set above the
    limit lets it happen. Before: thousands of lines in seconds."""
    settings = {"http_max_connections": "10000"}
    async with LocalCoordinator(tmp_path / "c", settings=settings) as coord:
        assert coord.proc is not None
        resource.prlimit(coord.proc.pid, resource.RLIMIT_NOFILE, (128, 128))
        conns = await open_many(*address(coord), 250, first_bytes=b"", connect_timeout=0.5)
        try:
            await asyncio.sleep(3)
        finally:
            close_all(conns)
        log = coord.log_path.read_text()
        assert 1 <= log.count("out of system resource") <= 2, log[-3000:]
        await asyncio.sleep(1.5)  # accept() resumes once descriptors are free
        status, secs = await timed_get(coord.url + "/api/v1/health")
        assert status == 200 and secs < 1.0
