"""A real coordinator process under connection abuse: half-open request heads are cut
at the head deadline, idle connections over the cap make room for real clients, and
running out of descriptors is one log line, not a flood. ``/health`` answers in < 1 s."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from novacron.coordinator.local import LocalCoordinator
from tests.attacks import Conn, close_all, open_many, still_open, timed_get, wait_all_closed

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def address(coord: LocalCoordinator) -> tuple[str, int]:
    url = urlsplit(coord.url)
    assert url.hostname and url.port
    return url.hostname, url.port


async def get_on(conn: Conn) -> int:
    """One keep-alive GET /api/v1/health on an open connection; its status."""
    reader, writer = conn
    writer.write(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")]
    await reader.readexactly(length[0])
    return int(head.split()[1])


async def test_slowloris_heads_are_cut_at_the_deadline(tmp_path: Path) -> None:
    settings = {"http_header_timeout_s": "1.5"}
    async with LocalCoordinator(tmp_path / "c", settings=settings) as coord:
        keep = await open_many(*address(coord), 1, first_bytes=b"")  # a well-behaved keep-alive client
        assert await get_on(keep[0]) == 200
        t0 = time.monotonic()
        conns = await open_many(*address(coord), 200)
        try:
            assert len(conns) == 200
            for _ in range(3):
                status, secs = await timed_get(coord.url + "/api/v1/health")
                assert status == 200 and secs < 1.0
            await wait_all_closed(conns, timeout=8)
            assert time.monotonic() - t0 < 1.5 + 3  # the deadline, plus time to open them
            # idle between requests for longer than the head deadline: still served
            assert await get_on(keep[0]) == 200
        finally:
            close_all(conns + keep)
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


async def test_idle_flood_at_the_systemd_default_descriptor_limit(tmp_path: Path) -> None:
    """The issue's case: a coordinator limited to 1,024 descriptors (hard), 1,100 idle
    connections. Before: /health timed out and the log flooded. Now the automatic cap
    (half the descriptors) closes the oldest idle ones to make room."""
    local = LocalCoordinator(tmp_path / "c")
    local.data_dir.mkdir(parents=True)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    with open(local.log_path, "ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "novacron.coordinator.main"], env=local.env(),
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                preexec_fn=limit)
    conns: list[Conn] = []
    try:
        listen = local.data_dir / "listen.json"
        for _ in range(300):  # bounded: 30 s
            if listen.exists() and json.loads(listen.read_text()).get("pid") == proc.pid:
                break
            assert proc.poll() is None, local.log_path.read_text()[-2000:]
            await asyncio.sleep(0.1)
        url = json.loads(listen.read_text())["url"]
        host, port = urlsplit(url).hostname, urlsplit(url).port
        assert host and port
        conns = await open_many(host, port, 1100, first_bytes=b"", connect_timeout=0.5)
        await asyncio.sleep(0.7)
        for _ in range(5):
            status, secs = await timed_get(url + "/api/v1/health")
            assert status == 200 and secs < 1.0
        assert await still_open(conns) <= 512
    finally:
        close_all(conns)
        proc.terminate()
        proc.wait(10)
    lines = local.log_path.read_text().splitlines()
    assert len(lines) < 20, lines[-10:]
    assert not any("out of system resource" in line for line in lines)
