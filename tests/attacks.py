"""Cheap attacks on our listeners for the abuse tests: half-open and idle connections
(slowloris) and a timed health probe. Loopback only; every socket is closed by ``close_all``."""

from __future__ import annotations

import asyncio
import time

import aiohttp

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
HALF_HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: "  # a request head that never ends


async def open_many(host: str, port: int, n: int, first_bytes: bytes = HALF_HEAD,
                    connect_timeout: float = 2.0) -> list[Conn]:
    """Up to ``n`` connections that each send ``first_bytes`` and then nothing."""
    conns: list[Conn] = []
    for _ in range(n):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), connect_timeout)
        except (OSError, TimeoutError):
            continue  # refused or left in the backlog: that is the server's right
        if first_bytes:
            writer.write(first_bytes)
        conns.append((reader, writer))
    return conns


async def still_open(conns: list[Conn]) -> int:
    """How many of ``conns`` the server has not closed (EOF or reset) yet."""
    async def is_open(reader: asyncio.StreamReader) -> bool:
        try:
            return bool(await asyncio.wait_for(reader.read(1), 0.01))
        except TimeoutError:
            return True
        except OSError:
            return False

    return sum(await asyncio.gather(*(is_open(r) for r, _w in conns)))


async def wait_all_closed(conns: list[Conn], timeout: float) -> float:
    """Seconds until the server closed every one of ``conns``; fails after ``timeout``."""
    t0 = time.monotonic()
    while (left := await still_open(conns)) > 0:
        assert time.monotonic() - t0 < timeout, f"{left} of {len(conns)} connections still open after {timeout}s"
        await asyncio.sleep(0.1)
    return time.monotonic() - t0


def close_all(conns: list[Conn]) -> None:
    for _r, w in conns:
        w.close()


async def timed_get(url: str, timeout: float = 5.0) -> tuple[int, float]:
    """Status and seconds of one GET on a fresh connection (as a monitoring probe does)."""
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url) as resp,
    ):
        await resp.read()
        return resp.status, time.monotonic() - t0
