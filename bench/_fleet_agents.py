"""The simulated agents of ``novacron bench fleet``, in worker processes of their own.

Each simulated agent keeps one HTTP/1.1 connection to its coordinator, as a
real agent does, so a fleet needs a file descriptor per host. One process may
hold only ``ulimit -Hn`` of them (20,000 on the machine this was measured on),
so the fleet is spread over as many workers as that takes. A worker is
``python -m novacron.bench._fleet_agents``, driven by JSON lines on its stdin:

- ``{"op": "add", "url", "name", "token", "vms", "interval", "seed"}``: start one agent
  (the parent sends it as soon as that host is registered);
- ``{"op": "measure"}``: start counting heartbeats;
- ``{"op": "report"}``: stop counting and answer one JSON line (the tally and
  the worker's CPU seconds while it counted);
- end of input: stop every agent and exit.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

REQUEST_TIMEOUT_S = 10.0  # an agent's heartbeat request
LAG_TICK_S = 0.02  # the worker's own event-loop lag is sampled this often


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    timeouts: int = 0
    shed: int = 0
    measuring: bool = False
    first_error: str = ""
    registration_retries: int = 0
    cpu_s: float = 0.0  # the worker's, while measuring
    # The simulator's own delays, which its latencies include: how late its event loop
    # ran (one sample per LAG_TICK_S) and how long its garbage collections paused it.
    loop_lag_s: list[float] = field(default_factory=list)
    gc_pauses_s: list[float] = field(default_factory=list)

    def record(self, started: float, status: int) -> None:
        if not self.measuring:
            return
        if status == 200:
            self.latencies.append(time.perf_counter() - started)
        elif status == 503:
            self.shed += 1
        elif status == 0:  # timeout or connection error
            self.timeouts += 1
        else:
            self.errors += 1

    def merge(self, other: dict[str, Any]) -> None:
        """Add a worker's report."""
        self.latencies.extend(other["latencies"])
        for key in ("errors", "timeouts", "shed", "registration_retries"):
            setattr(self, key, getattr(self, key) + other[key])
        self.cpu_s += other["cpu_s"]
        self.loop_lag_s.extend(other["loop_lag_s"])
        self.gc_pauses_s.extend(other["gc_pauses_s"])
        self.first_error = self.first_error or other["first_error"]


class _BeatConnection(asyncio.Protocol):
    """One simulated agent's keep-alive HTTP/1.1 connection, posting a prepared heartbeat.

    An aiohttp client request costs ~0.5 ms of CPU, so with it the client, not the
    coordinator, ran out of CPU first. This sends fixed bytes and parses only the status
    line, Content-Length and the body's length: the coordinator's answer is still read
    whole, on the wire.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        status = int(head[0].split(" ", 2)[1])
        body = bytes(self.buf[end + 4:end + 4 + length])
        del self.buf[:end + 4 + length]
        self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("coordinator closed the connection"))

    async def post(self, request: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self.waiter


async def agent(url: str, name: str, host_token: str, vms: list[str], interval: float,
                tally: Tally, rnd: random.Random) -> None:
    """Heartbeat every ``interval`` (random phase, a few percent of jitter, one to two
    intervals of back-off on 503, a new connection after a failure), forever."""
    await asyncio.sleep(rnd.uniform(0, interval))
    body = json.dumps({"memory_available_bytes": 64 << 30, "load": 0.5, "vms": vms}).encode()
    host, _, port = url.removeprefix("http://").partition(":")
    # its own credential, as a real agent's; the same bytes every interval
    request = (f"POST /api/v1/hosts/{name}/heartbeat HTTP/1.1\r\nHost: {host}:{port}\r\n"
               f"Authorization: Bearer {host_token}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    conn: _BeatConnection | None = None
    while True:
        started = time.perf_counter()
        status = 0
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                if conn is None or conn.transport is None:
                    _, conn = await loop.create_connection(_BeatConnection, host, int(port))
                status, text = await conn.post(request)
            if status not in (200, 503) and tally.measuring and not tally.first_error:
                tally.first_error = f"HTTP {status}: {text[:200]!r}"
        except (OSError, TimeoutError, ValueError, IndexError):
            status = 0
            if conn is not None and conn.transport is not None:
                conn.transport.abort()  # a late answer must not be read as the next one's
            conn = None
        tally.record(started, status)
        pause = interval * rnd.uniform(0.97, 1.03)
        if status == 503:
            pause = interval * rnd.uniform(1.0, 2.0)
        await asyncio.sleep(max(0.0, pause - (time.perf_counter() - started)))


async def _watch_lag(tally: Tally) -> None:
    while True:
        start = time.perf_counter()
        await asyncio.sleep(LAG_TICK_S)
        if tally.measuring:
            tally.loop_lag_s.append(time.perf_counter() - start - LAG_TICK_S)


def _watch_gc(tally: Tally) -> None:
    started = 0.0

    def on_gc(phase: str, _info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        elif tally.measuring:
            tally.gc_pauses_s.append(time.perf_counter() - started)

    gc.callbacks.append(on_gc)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tally = Tally()
    _watch_gc(tally)
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(_watch_lag(tally))]
    cpu0 = 0.0
    try:
        while line := await reader.readline():
            msg = json.loads(line)
            op = msg["op"]
            if op == "add":
                tasks.append(asyncio.create_task(agent(
                    msg["url"], msg["name"], msg["token"], msg["vms"], msg["interval"], tally,
                    random.Random(msg["seed"]))))
            elif op == "measure":
                tally.latencies.clear()
                tally.loop_lag_s.clear()
                tally.gc_pauses_s.clear()
                # One worker stands in for thousands of agent processes: a collection of
                # all their objects (up to 0.2 s) would be counted as the coordinator's
                # latency. Nothing here needs the cycle collector for one window.
                gc.collect()
                gc.disable()
                tally.measuring, cpu0 = True, time.process_time()
            elif op == "report":
                tally.measuring = False
                gc.enable()
                tally.cpu_s = time.process_time() - cpu0
                sys.stdout.write(json.dumps(asdict(tally)) + "\n")
                sys.stdout.flush()
            else:
                raise SystemExit(f"fleet worker: unknown op {op!r}")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop (libuv, compiled) if installed, else None (asyncio's own): on
    asyncio's loop the simulated fleet, not the coordinator, ran out of CPU first."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    from novacron.connlimits import raise_fd_limit

    raise_fd_limit()
    with asyncio.Runner(loop_factory=fast_loop()) as runner:
        runner.run(_serve())


if __name__ == "__main__":
    main()
