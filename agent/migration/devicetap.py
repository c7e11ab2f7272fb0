"""QEMU's device-state stream, read from the moment the guest stops.

At the pause the source has three things to send: the final dirty pages, then
QEMU's device state (its own migration stream, RAM left out by
``x-ignore-shared``), then it waits for the destination to load it. Asking QEMU
for its device state only after the final pages went out puts QEMU's work (the
QMP round trip, its migration thread starting, every device saved) in series
with our final scan and send. The tap starts QEMU's stream as soon as the guest
stops and reads it into a bounded buffer meanwhile; the relay then forwards it
after the final pages, in the same order on the wire as before, so the
destination (which must load devices only once RAM is complete: virtio reads its
rings from guest memory) sees no change.

The buffer is bounded (``limit`` bytes): past it the tap stops reading and QEMU
waits on its socket, as it would on a slow relay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from novacron.agent.migration.unixsock import start_unix_server_at

CHUNK = 256 * 1024  # bytes per read of QEMU's stream
LIMIT = 64 << 20  # bytes buffered before QEMU is made to wait
IO_TIMEOUT_S = 60.0  # QEMU connecting, and each read: a stuck QEMU fails the migration


class DeviceStateTap:
    """One device-state stream from QEMU over a unix socket at ``path``."""

    def __init__(self, path: Path, *, limit: int = LIMIT, timeout_s: float = IO_TIMEOUT_S) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.bytes_read = 0
        self.limit = limit
        self._buffered = 0  # bytes read and not yet taken by chunks()
        self._space = asyncio.Condition()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # None ends the stream
        self._conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue(1)
        self._server: asyncio.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self, start: Callable[[Path], Awaitable[None]]) -> None:
        """Listen at ``path``, have ``start(path)`` point QEMU at it, and read."""
        self._server = await start_unix_server_at(self._on_conn, self.path)
        await start(self.path)
        self._task = asyncio.create_task(self._read(), name=f"device state {self.path.name}")

    async def _on_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            self._conns.put_nowait((r, w))
        except asyncio.QueueFull:  # one stream only; never block a handler
            w.close()

    async def _read(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await self._conns.get()
            try:
                while True:
                    async with self._space:  # past the bound QEMU waits on its socket
                        await self._space.wait_for(lambda: self._buffered < self.limit)
                    chunk = await asyncio.wait_for(reader.read(CHUNK), self.timeout_s)
                    if not chunk:
                        break
                    self.bytes_read += len(chunk)
                    self._buffered += len(chunk)
                    self._queue.put_nowait(chunk)
            finally:
                writer.close()
        finally:
            self._queue.put_nowait(None)  # the end, also on failure: chunks() re-raises it

    async def chunks(self) -> AsyncIterator[bytes]:
        """QEMU's stream in order, as read; raises what ended the reading early."""
        assert self._task is not None, "open() first"
        while (chunk := await self._queue.get()) is not None:
            self._buffered -= len(chunk)
            async with self._space:
                self._space.notify_all()
            yield chunk
        await self._task  # a failed read raises here, after what did arrive

    async def close(self) -> None:
        """Stop reading, close QEMU's connection and remove the socket (idempotent)."""
        task = self._task
        if task is not None:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})  # a cancel aimed at our caller still reaches it
            if not task.cancelled():
                task.exception()  # retrieved: the migration already failed or forwarded it
        if self._server is not None:
            self._server.close()
            self._server = None
        while not self._conns.empty():  # QEMU connected after the reader stopped waiting
            self._conns.get_nowait()[1].close()
        with contextlib.suppress(OSError):
            self.path.unlink()
