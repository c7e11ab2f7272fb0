"""Accepting and opening channels.

The server authenticates every connection before handing it to the handler,
so a peer without the cluster secret never reaches code that changes state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from novacron.agent.channel.handshake import (
    DEFAULT_TIMEOUT,
    AuthError,
    client_handshake,
    server_handshake,
)
from novacron.agent.channel.records import Channel

log = logging.getLogger("novacron.agent.channel")

Handler = Callable[[Channel], Awaitable[None]]


class ChannelServer:
    def __init__(
        self,
        secret: str | bytes,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handshake_timeout: float = DEFAULT_TIMEOUT,
        max_pending: int = 16,
    ) -> None:
        self._secret = secret
        self._handler = handler
        self.host = host
        self.port = port
        self._timeout = handshake_timeout
        # Bound concurrent unauthenticated connections so a flood cannot pin memory.
        self._pending = asyncio.Semaphore(max_pending)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0  # connections that failed authentication

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._on_connect, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("migration channel listening", extra={"host": self.host, "port": self.port})
        return self.port

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            if self._pending.locked():
                log.warning("too many pending channel handshakes; refusing", extra={"peer": str(peer)})
                return
            async with self._pending:
                try:
                    keys = await server_handshake(reader, writer, self._secret, self._timeout)
                except AuthError as exc:
                    self.refused += 1
                    log.warning("refused migration peer", extra={"peer": str(peer), "reason": str(exc)})
                    return
            channel = Channel(reader, writer, keys, is_client=False)
            log.info("migration peer authenticated", extra={"peer": str(peer), "session": keys.session_id})
            try:
                await self._handler(channel)
            except Exception:
                log.exception("migration channel handler failed", extra={"peer": str(peer)})
            finally:
                await channel.close()
        finally:
            if not writer.is_closing():
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)


async def connect(
    host: str, port: int, secret: str | bytes, *, timeout: float = DEFAULT_TIMEOUT
) -> Channel:
    """Open and authenticate a channel to a destination agent's data port."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        raise AuthError(f"no answer from {host}:{port} within {timeout:g}s") from None
    except OSError as exc:
        raise AuthError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    try:
        keys = await client_handshake(reader, writer, secret, timeout)
    except BaseException:
        writer.close()
        raise
    return Channel(reader, writer, keys, is_client=True)
