"""An asyncio client for QEMU's machine protocol (QMP) over a unix socket.

    qmp = await QMPClient.connect(path)          # greeting + qmp_capabilities
    await qmp.execute("stop")
    async with qmp.listen("RESUME") as events:   # subscribe before acting: no race
        await qmp.execute("cont")
        event = await events.get(timeout=5)
    await qmp.close()

Errors QEMU returns become :class:`QMPError` carrying its ``class`` and
``desc``; a closed connection fails every waiting call with
:class:`QMPClosedError`; a call that outlives its timeout raises
:class:`QMPTimeoutError` (the late reply is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

log = logging.getLogger("novacron.agent.qmp")

# query-qmp-schema and friends answer with lines of several hundred KB
_LINE_LIMIT = 32 * 1024 * 1024


# sun_path holds 108 bytes including the NUL
_MAX_UNIX_PATH = 107


async def open_unix(path: str, limit: int = 2**16) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """open_unix_connection that also reaches sockets whose path is too long
    for sun_path, through ``/proc/self/fd/<dir fd>/<name>``."""
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        return await asyncio.open_unix_connection(path, limit=limit)
    head, name = os.path.split(path)
    dir_fd = os.open(head or ".", os.O_PATH | os.O_DIRECTORY)
    try:
        return await asyncio.open_unix_connection(f"/proc/self/fd/{dir_fd}/{name}", limit=limit)
    finally:
        os.close(dir_fd)


class QMPError(Exception):
    """QEMU answered a command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        self.command, self.error_class, self.desc = command, error_class, desc
        super().__init__(f"QMP {command}: {error_class}: {desc}")


class QMPClosedError(ConnectionError):
    """The QMP connection is closed (QEMU exited or close() was called)."""


class QMPTimeoutError(TimeoutError):
    """A QMP command or wait did not finish in time."""


class EventQueue:
    """Events matching a subscription, in arrival order."""

    def __init__(self, names: frozenset[str] | None) -> None:
        self.names = names
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def matches(self, event: dict[str, Any]) -> bool:
        return self.names is None or event.get("event") in self.names

    def _put(self, event: dict[str, Any] | None) -> None:
        self._queue.put_nowait(event)

    async def get(
        self,
        timeout: float | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The next (matching) event; QMPClosedError once the connection ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                event = await asyncio.wait_for(self._queue.get(), left)
            except TimeoutError:
                raise QMPTimeoutError(f"no QMP event {sorted(self.names or [])} in {timeout}s") from None
            if event is None:
                self._queue.put_nowait(None)  # later get() calls see the close too
                raise QMPClosedError("QMP connection closed while waiting for an event")
            if predicate is None or predicate(event):
                return event


class QMPClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._subs: list[EventQueue] = []
        self._write_lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        self.greeting: dict[str, Any] = {}
        self.oob = False  # out-of-band execution negotiated (see connect)

    @classmethod
    async def connect(cls, path: str, timeout: float = 10.0, *, oob: bool = False) -> QMPClient:
        """Connect (retrying while QEMU creates the socket) and negotiate capabilities;
        ``oob``: out-of-band execution too, where QEMU offers it (a post-copy destination
        whose main loop waits on a missing page still answers ``migrate-recover``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reader, writer = await open_unix(path, limit=_LINE_LIMIT)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() >= deadline:
                    raise QMPTimeoutError(f"QMP socket {path} not accepting after {timeout}s: {exc}") from None
                await asyncio.sleep(0.05)
        client = cls(reader, writer)
        try:
            left = max(0.1, deadline - time.monotonic())
            client.greeting = await client._read_greeting(left)
            client._reader_task = asyncio.create_task(client._read_loop(), name=f"qmp-reader {path}")
            enable = oob and "oob" in client.greeting.get("capabilities", [])
            await client.execute("qmp_capabilities", {"enable": ["oob"]} if enable else None, timeout=left)
            client.oob = enable
        except BaseException:
            await client.close()
            raise
        return client

    async def _read_greeting(self, timeout: float) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(self._reader.readline(), timeout)
        except TimeoutError:
            raise QMPTimeoutError(f"no QMP greeting in {timeout:.1f}s") from None
        if not line:
            raise QMPClosedError("QMP connection closed before the greeting")
        msg = json.loads(line)
        if "QMP" not in msg:
            raise QMPClosedError(f"not a QMP greeting: {line[:200]!r}")
        return dict(msg["QMP"])

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("unparsable QMP line", extra={"line": line[:200].decode(errors="replace")})
                    continue
                if "event" in msg:
                    for sub in list(self._subs):
                        if sub.matches(msg):
                            sub._put(msg)
                    continue
                fut = self._pending.pop(str(msg.get("id")), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            log.debug("QMP read ended", extra={"reason": str(exc)})
        finally:
            self._mark_closed()

    def _mark_closed(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(QMPClosedError("QMP connection closed"))
        self._pending.clear()
        for sub in self._subs:
            sub._put(None)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0,
                      *, oob: bool = False) -> Any:
        """Run ``command`` and return its ``return`` value; QMPError on an error reply.
        ``oob``: out of band when negotiated (QEMU runs it beside a blocked main loop)."""
        if self.closed:
            raise QMPClosedError(f"QMP connection closed (command {command})")
        msg_id = str(next(self._ids))
        request: dict[str, Any] = {"exec-oob" if oob and self.oob else "execute": command, "id": msg_id}
        if arguments:
            request["arguments"] = arguments
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        try:
            async with self._write_lock:
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
            reply = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            raise QMPTimeoutError(f"QMP {command}: no reply in {timeout}s") from None
        except (ConnectionError, RuntimeError) as exc:
            if isinstance(exc, QMPClosedError):
                raise
            raise QMPClosedError(f"QMP {command}: {exc}") from exc
        finally:
            self._pending.pop(msg_id, None)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(command, str(err.get("class", "GenericError")), str(err.get("desc", "")))
        return reply.get("return")

    def subscribe(self, names: Iterable[str] | None = None) -> EventQueue:
        """A queue of future events named in ``names`` (all events when None)."""
        sub = EventQueue(frozenset(names) if names is not None else None)
        if self.closed:
            sub._put(None)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: EventQueue) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    @contextlib.asynccontextmanager
    async def listen(self, *names: str) -> AsyncIterator[EventQueue]:
        sub = self.subscribe(names or None)
        try:
            yield sub
        finally:
            self.unsubscribe(sub)

    async def wait_event(
        self,
        name: str,
        timeout: float = 30.0,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The next ``name`` event from now on (use listen() if it may come sooner)."""
        async with self.listen(name) as sub:
            return await sub.get(timeout, predicate)

    async def close(self) -> None:
        """Close the socket and fail outstanding calls; idempotent."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader_task
        self._mark_closed()
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def __aenter__(self) -> QMPClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
