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

The buffer is bounded (``limit``): past it the tap stops reading and QEMU waits
on its socket, as it would on a slow relay.
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
        # None ends the stream; a bound on chunks is a bound on bytes (reads <= CHUNK)
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(max(1, limit // CHUNK))
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
                while chunk := await asyncio.wait_for(reader.read(CHUNK), self.timeout_s):
                    self.bytes_read += len(chunk)
                    await self._queue.put(chunk)
            finally:
                writer.close()
        finally:
            # the reader's end, also on failure: chunks() stops and re-raises it
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """QEMU's stream in order, as read; raises what ended the reading early."""
        assert self._task is not None, "open() first"
        while True:
            if self._task.done() and self._queue.empty():
                break  # ended and its end marker did not fit (the queue was full then)
            chunk = await self._queue.get()
            if chunk is None:
                break
            yield chunk
        await self._task  # a failed read raises here, after what did arrive

    async def close(self) -> None:
        """Stop reading and remove the socket (idempotent)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()
