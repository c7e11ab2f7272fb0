"""Accepting and opening channels.

The server authenticates every connection before handing it to the handler,
so a peer without the cluster secret never reaches code that changes state.
Unauthenticated connections are bounded (per address and in all, the oldest
idle one closed to make room; see novacron.connlimits) and must finish the
handshake within a short deadline, so idle connections cannot keep a real
migration out.

With the fleet's TLS configured the port is wrapped in mutual TLS first: the
server requires a client certificate from the fleet CA and the client checks
the server's certificate against the destination's host name, so the cluster
secret alone no longer lets one host pose as another. The peer certificate's
common name (its host identity) is ``Channel.peer_identity``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_
from collections.abc import Awaitable, Callable

from novacron.agent.channel.handshake import (
    DEFAULT_TIMEOUT,
    AuthError,
    client_handshake,
    server_handshake,
)
from novacron.agent.channel.records import Channel
from novacron.agent.channel.stream import ChannelStream
from novacron.connlimits import ConnectionBudget, LogLimiter, peer_address
from novacron.tls import peer_common_name

log = logging.getLogger("novacron.agent.channel")

Handler = Callable[[Channel], Awaitable[None]]

HANDSHAKE_DEADLINE_S = 5.0  # the whole handshake is three small messages: a round trip or two
MAX_PENDING = 64  # unauthenticated connections in all
MAX_PENDING_PER_ADDRESS = 8


class ChannelServer:
    def __init__(
        self,
        secret: str | bytes,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        handshake_timeout: float = HANDSHAKE_DEADLINE_S,
        max_pending: int = MAX_PENDING,
        max_pending_per_address: int = MAX_PENDING_PER_ADDRESS,
        ssl: ssl_.SSLContext | None = None,
    ) -> None:
        self._secret = secret
        self.ssl = ssl  # a server context requiring client certificates (mutual TLS), or None
        self._handler = handler
        self.host = host
        self.port = port
        self._timeout = handshake_timeout
        # A real client sends its hello as soon as it connects: one second of grace before
        # its connection may be closed to make room is ample.
        self.pending = ConnectionBudget(max_pending, per_address=max_pending_per_address, grace=1.0,
                                        what="unauthenticated migration connection")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused = 0  # connections that failed authentication
        self._refusals = LogLimiter(log)  # a flood of bad peers is one line per interval

    async def start(self) -> int:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ChannelStream(self._on_connect), self.host, self.port, ssl=self.ssl,
            ssl_handshake_timeout=self._timeout if self.ssl is not None else None)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("migration channel listening", extra={"host": self.host, "port": self.port})
        return self.port

    async def _on_connect(self, stream: ChannelStream) -> None:
        reader = writer = stream
        assert writer.transport is not None
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = writer.get_extra_info("peername")
        try:
            slot = self.pending.admit(peer_address(writer.transport), writer.transport.abort)
            if slot is None:
                return
            try:
                async with asyncio.timeout(self._timeout):
                    keys = await server_handshake(reader, writer, self._secret, self._timeout)
            except (AuthError, TimeoutError) as exc:
                self.refused += 1
                reason = str(exc) if isinstance(exc, AuthError) else f"no handshake within {self._timeout:g}s"
                self._refusals.warning("refused", "refused migration peer", peer=str(peer), reason=reason)
                return
            finally:
                self.pending.release(slot)
            channel = Channel(reader, writer, keys, is_client=False)
            if self.ssl is not None:
                channel.peer_identity = peer_common_name(writer.transport)
            log.info("migration peer authenticated", extra={"peer": str(peer), "session": keys.session_id,
                                                           "identity": channel.peer_identity})
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
    host: str, port: int, secret: str | bytes, *, timeout: float = DEFAULT_TIMEOUT,
    ssl: ssl_.SSLContext | None = None, server_name: str | None = None,
) -> Channel:
    """Open and authenticate a channel to a destination agent's data port.

    With ``ssl`` (a client context with this host's certificate) the connection is
    mutual TLS and the destination's certificate must be issued for ``server_name``
    (its host name from the coordinator's grant)."""
    if ssl is not None and not server_name:
        raise AuthError(f"no host name to verify {host}:{port}'s certificate against")
    try:
        _, stream = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
            ChannelStream, host, port, ssl=ssl, server_hostname=server_name if ssl is not None else None),
            timeout)
        reader = writer = stream
    except TimeoutError:
        raise AuthError(f"no answer from {host}:{port} within {timeout:g}s") from None
    except ssl_.SSLError as exc:
        detail = getattr(exc, "verify_message", None) or exc.reason or exc  # e.g. a host name mismatch
        raise AuthError(f"TLS with {host}:{port} ({server_name}) failed: {detail}") from None
    except OSError as exc:
        raise AuthError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    try:
        keys = await client_handshake(reader, writer, secret, timeout)
    except BaseException:
        writer.close()
        raise
    channel = Channel(reader, writer, keys, is_client=True)
    if ssl is not None:
        channel.peer_identity = peer_common_name(writer.transport)
    return channel
