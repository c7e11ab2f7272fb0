"""What a peer can hold without doing any work, and how much it can make us log.

Every listening socket (the daemons' HTTP APIs, the agent's migration port)
admits connections through a :class:`ConnectionBudget`: at most ``limit`` at
once, optionally at most ``per_address`` from one address. A connection that
has not proved itself yet (an HTTP connection between requests or still
sending its request head; a migration connection before its handshake) is
*evictable*. When a new connection arrives over a limit, the oldest evictable
one that has been so for at least ``grace`` seconds is closed to make room;
when there is none, the new one is refused. Idle and half-open connections
therefore cannot starve real clients, and a real client's fresh connection is
not evicted during its first round trips.

:class:`LogLimiter` keeps a repeated warning (refused connections, accept
errors when out of file descriptors) to one line per interval per kind.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from novacron.config import Invalid, setting

log = logging.getLogger("novacron.connections")

FD_LIMIT_CAP = 1 << 16  # raise the soft descriptor limit up to this (or the hard limit)


class LogLimiter:
    """At most one line per ``interval`` seconds per key; the next one says how many were dropped."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log, self.interval, self._clock = logger, interval, clock
        self._last: dict[str, float] = {}
        self._dropped: dict[str, int] = {}

    def warning(self, key: str, msg: str, **fields: Any) -> None:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped:
            fields["suppressed"] = dropped
        self._log.warning(msg, extra=fields)


@dataclass(eq=False)
class Slot:
    """One admitted connection; ``close`` ends it (used when it is evicted)."""

    address: str
    close: Callable[[], None]
    since: float  # when it last became evictable
    evictable: bool = True
    released: bool = False


class ConnectionBudget:
    """Slots for the connections of one listener, with eviction as the module describes."""

    def __init__(self, limit: int, *, per_address: int | None = None, grace: float = 1.0,
                 what: str = "connection", clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or (per_address is not None and per_address < 1):
            raise ValueError("connection limits must be at least 1")
        self.limit, self.per_address, self.grace, self.what = limit, per_address, grace, what
        self.clock = clock
        self.evicted = 0
        self.refused = 0
        self._total = 0
        self._held: dict[str, int] = {}  # per address
        self._oldest: OrderedDict[Slot, None] = OrderedDict()  # evictable, oldest first
        self._oldest_at: dict[str, OrderedDict[Slot, None]] = {}  # the same, per address
        self._log = LogLimiter(log)

    @property
    def held(self) -> int:
        return self._total

    def admit(self, address: str, close: Callable[[], None]) -> Slot | None:
        """A slot for a new (evictable) connection from ``address``, or None: refuse it."""
        now = self.clock()
        crowded = self.per_address is not None and self._held.get(address, 0) >= self.per_address
        if crowded and not self._evict(self._oldest_at.get(address), now):
            self._refuse(address, f"{self.per_address} from this address")
            return None
        if self._total >= self.limit and not self._evict(self._oldest, now):
            self._refuse(address, f"{self.limit} in all")
            return None
        slot = Slot(address, close, now)
        self._total += 1
        self._held[address] = self._held.get(address, 0) + 1
        self._queue(slot)
        return slot

    def busy(self, slot: Slot) -> None:
        """The connection is doing real work (a request, an authenticated channel): keep it."""
        if slot.evictable and not slot.released:
            slot.evictable = False
            self._unqueue(slot)

    def idle(self, slot: Slot) -> None:
        """The connection waits for its peer again: evictable, youngest in line."""
        if not slot.evictable and not slot.released:
            slot.evictable, slot.since = True, self.clock()
            self._queue(slot)

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        if slot.evictable:
            self._unqueue(slot)
        self._total -= 1
        left = self._held[slot.address] - 1
        if left:
            self._held[slot.address] = left
        else:
            del self._held[slot.address]

    def _queue(self, slot: Slot) -> None:
        self._oldest[slot] = None
        self._oldest_at.setdefault(slot.address, OrderedDict())[slot] = None

    def _unqueue(self, slot: Slot) -> None:
        self._oldest.pop(slot, None)
        line = self._oldest_at.get(slot.address)
        if line is not None:
            line.pop(slot, None)
            if not line:
                del self._oldest_at[slot.address]

    def _evict(self, line: OrderedDict[Slot, None] | None, now: float) -> bool:
        victim = next(iter(line), None) if line else None
        if victim is None or now - victim.since < self.grace:
            return False
        self.release(victim)
        self.evicted += 1
        self._log.warning(f"evict:{self.what}", f"{self.what} limit reached: closed the oldest idle one",
                          peer=victim.address, limit=self.limit, per_address=self.per_address)
        victim.close()
        return True

    def _refuse(self, address: str, reason: str) -> None:
        self.refused += 1
        self._log.warning(f"refuse:{self.what}", f"{self.what} refused: {reason} and none idle long enough to close",
                          peer=address)


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one (at most FD_LIMIT_CAP); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CAP)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return FD_LIMIT_CAP if soft == resource.RLIM_INFINITY else int(soft)


def default_max_connections() -> int:
    """Half the descriptors: the rest stay for files, QEMU, agents and the store."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft = FD_LIMIT_CAP if soft == resource.RLIM_INFINITY else soft
    return max(16, int(soft) // 2)


def rate_limited_exception_handler(interval: float = 10.0) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """A loop exception handler that reports each kind of error once per ``interval``.

    Out of descriptors, asyncio reports every failed accept() (about once a
    second per socket, more with many sockets); this keeps it to one line.
    """
    last: dict[str, float] = {}
    dropped: dict[str, int] = {}

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        key = f"{context.get('message')}|{type(exc).__name__}|{getattr(exc, 'errno', '')}"
        now = time.monotonic()
        if key in last and now - last[key] < interval:
            dropped[key] = dropped.get(key, 0) + 1
            return
        last[key] = now
        n = dropped.pop(key, 0)
        if n:
            context = dict(context, message=f"{context.get('message')} ({n} more like it not shown)")
        loop.default_exception_handler(context)

    return handle


@dataclass
class HttpLimits:
    """``[http]`` of both daemons: how long a client may take and how many it may hold."""

    # the request head must be complete this long after the connection opens or after the
    # first byte of a later request (slowloris)
    header_timeout_s: float = setting(10.0, help="seconds a client has to send a complete request "
                                      "head (request line + headers)")
    idle_timeout_s: float = setting(30.0, help="seconds after which a kept-alive connection with "
                                    "no request is closed")
    max_connections: int = setting(0, help="cap on open HTTP connections (the oldest idle one is "
                                   "evicted first); 0: half the process's file-descriptor limit")

    def connections(self) -> int:
        return self.max_connections or default_max_connections()


def check_http_limits(limits: HttpLimits, section: str = "http") -> None:
    for key in ("header_timeout_s", "idle_timeout_s"):
        value = getattr(limits, key)
        if not 0 < value <= 3600:
            raise Invalid(f"{section}.{key}", "must be more than 0 and at most 3600 seconds")
    if limits.max_connections < 0:
        raise Invalid(f"{section}.max_connections", "must be 0 (automatic) or positive")


# -- HTTP ----------------------------------------------------------------------------------------
#
# aiohttp has an idle keep-alive timeout but no deadline for a request head. So each
# connection is wrapped in _GuardedConnection, which sees every byte before aiohttp does, and
# the app gets one middleware that tells it when a request is being handled. Between
# requests a connection is evictable and, once it sends a byte (or on connect), has
# header_timeout_s to complete the head; aiohttp's own keepalive_timeout closes it when idle.
# The head deadlines are swept a few times per timeout by one timer rather than each being a
# timer of its own: a timer per request is a handle, a context and a bound method that stay
# in the event loop's heap, cancelled, for seconds, thousands of them at a fleet's
# heartbeat rate, and the garbage collector walks them all (see novacron.daemon).


class HttpGuard:
    """The connections of one HTTP server: budget, head deadlines, request marks."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        # a client sends its request right after connecting (after TLS, too): half a second is ample
        self.budget = ConnectionBudget(limits.connections(), grace=0.5, what="HTTP connection")
        self.conns: dict[Any, _GuardedConnection] = {}  # aiohttp's RequestHandler -> ours
        self.head_timeouts = 0
        self._log = LogLimiter(log)
        self._heads: dict[_GuardedConnection, float] = {}  # connection -> when its head is due
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = min(1.0, limits.header_timeout_s / 4)

    def expect_head(self, conn: _GuardedConnection) -> None:
        """``conn`` waits for a request head: due header_timeout_s from now, or from when it
        was first expected if it still is (later bytes of the same head do not extend it)."""
        if conn in self._heads:
            return
        loop = asyncio.get_running_loop()
        self._heads[conn] = loop.time() + self.limits.header_timeout_s
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def head_done(self, conn: _GuardedConnection) -> None:
        self._heads.pop(conn, None)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c, due in self._heads.items() if due <= now]:
            del self._heads[conn]
            conn.head_late()
        self._sweeper = loop.call_later(self._sweep_every, self._sweep) if self._heads else None

    def protocol_factory(self, make_handler: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedConnection(self, make_handler())

    @web.middleware
    async def middleware(self, request: Any, handler: Callable[[Any], Any]) -> Any:
        conn = self.conns.get(request.protocol)
        if conn is None:  # served by a runner without the guard (aiohttp's TestServer)
            return await handler(request)
        conn.busy()
        try:
            return await handler(request)
        finally:
            conn.idle()


class _GuardedConnection(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a slot in the budget and a head deadline."""

    def __init__(self, guard: HttpGuard, inner: Any) -> None:
        self._guard, self._inner = guard, inner
        self._slot: Slot | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though not always an asyncio.Transport subclass (uvloop's is not)
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._slot = self._guard.budget.admit(peer_address(transport), transport.close)
        if self._slot is None:
            transport.abort()
            return
        self._guard.conns[self._inner] = self
        self._inner.connection_made(transport)
        self._guard.expect_head(self)

    def head_late(self) -> None:
        """The head deadline passed (HttpGuard's sweep): close a connection still waiting."""
        if self._slot is not None and self._slot.evictable and self._transport is not None:
            self._guard.head_timeouts += 1
            self._guard._log.warning("head", "closed a connection that did not send a request head in time",
                                     peer=self._slot.address, timeout_s=self._guard.limits.header_timeout_s)
            self._transport.abort()

    def busy(self) -> None:
        self._guard.head_done(self)
        if self._slot is not None:
            self._guard.budget.busy(self._slot)

    def idle(self) -> None:
        if self._slot is not None:
            self._guard.budget.idle(self._slot)  # the next byte re-arms the head deadline

    def data_received(self, data: bytes) -> None:
        if self._slot is None:
            return
        if self._slot.evictable:
            self._guard.expect_head(self)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._slot is not None else None

    def pause_writing(self) -> None:
        if self._slot is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._slot is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard.head_done(self)
        if self._slot is None:
            return
        self._guard.budget.release(self._slot)
        self._guard.conns.pop(self._inner, None)
        self._inner.connection_lost(exc)


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with every connection behind the guard."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: HttpGuard, *,
                 ssl_context: Any = None) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host, self._port, self._guard = host, port, guard

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        extra: dict[str, Any] = {}
        if self._ssl_context is not None:
            extra = {"ssl": self._ssl_context, "ssl_handshake_timeout": self._guard.limits.header_timeout_s}
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server), self._host, self._port, backlog=self._backlog,
            reuse_address=True, **extra)
