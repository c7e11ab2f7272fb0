"""The channel's connection: one object that reads and writes, like the pair
``asyncio.open_connection`` returns, but a frame of page data is received
straight into the buffer it is handed on in.

An ``asyncio.StreamReader`` copies every received byte three times (the kernel's
read into a new object, appended to its buffer, sliced out of it, and the rest of
the buffer moved down): on a fast link that was about a fifth of the destination
agent's CPU. Here (``asyncio.BufferedProtocol``) the transport reads into our
memory: small reads (record headers, control records) go through a bounded
buffer, and the rest of a large read (``DIRECT_MIN`` bytes or more) lands in its
own ``bytearray`` directly. Reading pauses while ``LIMIT`` unread bytes wait, so
a peer cannot make us hold more than that (plus the record being read); writing
waits for the transport's buffer to drain, as ``StreamWriter.drain`` does.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from typing import Any

from novacron.native._kernels import uninitialized_bytearray

SCRATCH = 256 * 1024  # one read of small records (asyncio's own read size)
LIMIT = 1024 * 1024  # unread bytes held before reading pauses
DIRECT_MIN = 64 * 1024  # reads this large fill their own buffer


class ChannelStream(asyncio.BufferedProtocol):
    """Reader and writer of one connection (pass it as both to ``Channel``)."""

    def __init__(self, on_connected: Callable[[ChannelStream], Coroutine[Any, Any, None]] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_connected = on_connected  # a server's handler of this connection, started once made
        self.handler: asyncio.Task[None] | None = None
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()  # received, not read yet
        self._scratch = bytearray(SCRATCH)
        self._scratch_view = memoryview(self._scratch)
        self._target: memoryview | None = None  # a large read in progress: filled in place
        self._filled = 0
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._exc: BaseException | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._drainers: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed: asyncio.Future[None] = self._loop.create_future()

    # -- asyncio's side ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._on_connected is not None:
            self.handler = self._loop.create_task(self._on_connected(self))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._target is not None and self._filled < len(self._target):
            return self._target[self._filled:]
        # a view, never the bytearray: asyncio's TLS reader (3.11) fills ``buf[offset:]``,
        # which of a bytearray is a copy, and what it read there would be lost
        return self._scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._target is not None and self._filled < len(self._target):
            self._filled += nbytes
            if self._filled < len(self._target):
                return
        else:
            self._buf += self._scratch_view[:nbytes]
            if len(self._buf) >= LIMIT:
                self._pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # the peer is done: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if exc is not None:
            self._exc = exc
        self._wake()
        for fut in self._drainers:
            if not fut.done():
                if exc is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(exc)
        self._drainers.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        while self._drainers:
            fut = self._drainers.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- reading -------------------------------------------------------------
    async def readexactly(self, n: int) -> bytes | bytearray:
        """``n`` bytes (a ``bytearray`` for large reads); ``asyncio.IncompleteReadError``
        if the stream ends first, the connection's error if it broke. A cancelled read
        loses nothing: the bytes it had are read again by the next call."""
        if n < 0:
            raise ValueError("readexactly size can not be less than zero")
        if n < DIRECT_MIN or len(self._buf) >= n:
            while len(self._buf) < n:
                self._check_end(bytes(self._buf), n)
                await self._wait()
            data = bytes(memoryview(self._buf)[:n])
            del self._buf[:n]
            self._maybe_resume()
            return data
        target = uninitialized_bytearray(n)  # filled in full before it is handed on
        have = len(self._buf)
        target[:have] = self._buf
        self._buf.clear()
        self._target, self._filled = memoryview(target), have
        self._maybe_resume()
        try:
            while self._filled < n:
                self._check_end(bytes(target[:self._filled]), n)
                await self._wait()
        except BaseException:
            # not delivered: keep what arrived for the next read, in order
            self._buf[:0] = target[:self._filled]
            raise
        finally:
            self._target = None
        return target

    def _check_end(self, partial: bytes, n: int) -> None:
        if self._exc is not None:
            raise self._exc
        if self._eof:
            raise asyncio.IncompleteReadError(partial, n)

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.transport.is_closing():
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if self._reading_paused and len(self._buf) < LIMIT and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def exception(self) -> BaseException | None:
        return self._exc

    # -- writing -------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self._exc is not None:
            raise self._exc
        assert self.transport is not None
        if self.transport.is_closing():
            await asyncio.sleep(0)  # as StreamWriter: let connection_lost be seen
            if self._exc is not None:
                raise self._exc
            if self._closed.done():
                raise ConnectionResetError("connection lost")
        if self._writing_paused:
            fut = self._loop.create_future()
            self._drainers.append(fut)
            await fut

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self.transport is None else self.transport.get_extra_info(name, default)
