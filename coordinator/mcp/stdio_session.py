"""One MCP session over a child process's stdin/stdout (newline-delimited JSON-RPC).

The child is started from an argv list (never a shell) in its own process
group and working directory. A reader task matches responses to pending
requests by id, answers the server's own ``ping`` requests, and treats any
broken frame or oversized line as a dead session: the caller restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from novacron.coordinator.mcp.errors import CallTimeout, RpcError, TransportError

log = logging.getLogger("novacron.coordinator.mcp.stdio")

# Versions we can talk; claude-flow answers the oldest one.
CLIENT_PROTOCOL_VERSION = "2025-06-18"
ACCEPTED_PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
DEFAULT_MAX_LINE = 8 * 1024 * 1024  # tools/list of claude-flow is ~0.5 MB
STDERR_TAIL_LINES = 40
# Requests from the server answered at once; beyond it a request gets an error
# straight away (or, while our replies pile up unread, no answer at all).
MAX_SERVER_REQUESTS = 16
MAX_UNREAD_REPLIES = 1024 * 1024  # bytes of replies the server has not read yet
BUSY_CODE = -32000  # JSON-RPC implementation-defined server error

NotificationHandler = Callable[[str, dict[str, Any]], None]


class StdioSession:
    """A started child process speaking MCP; ``start()`` then ``request()``."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        env: dict[str, str] | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        on_notification: NotificationHandler | None = None,
        client_name: str = "novacron",
    ) -> None:
        if not argv:
            raise ValueError("MCP server command is empty")
        self.argv = [str(a) for a in argv]
        self.cwd = cwd
        self.env = env
        self.max_line = max_line
        self.on_notification = on_notification
        self.client_name = client_name
        self.proc: asyncio.subprocess.Process | None = None
        self.server_info: dict[str, Any] = {}
        self.protocol_version = ""
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._answering: set[asyncio.Task[None]] = set()
        self.refused_server_requests = 0  # over MAX_SERVER_REQUESTS: answered busy or dropped
        self._write_lock = asyncio.Lock()
        self._dead: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self._dead is None

    async def start(self, timeout: float) -> None:
        """Spawn the server and run the initialize / initialized handshake."""
        self.cwd.mkdir(parents=True, exist_ok=True)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=str(self.cwd),
                env=self.env,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=self.max_line,
                start_new_session=True,  # own process group: we can stop its children too
            )
        except OSError as exc:
            raise TransportError(f"cannot start MCP server {self.argv[0]!r}: {exc.strerror or exc}") from exc
        log.info("mcp server started", extra={"pid": self.proc.pid, "argv0": self.argv[0]})
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name="mcp-stdout"),
            asyncio.create_task(self._read_stderr(), name="mcp-stderr"),
        ]
        try:
            result = await self.request(
                "initialize",
                {
                    "protocolVersion": CLIENT_PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": self.client_name, "version": "0.1.0"},
                },
                timeout=timeout,
            )
            version = result.get("protocolVersion") if isinstance(result, dict) else None
            if version not in ACCEPTED_PROTOCOL_VERSIONS:
                raise TransportError(f"server answered unsupported protocol version {version!r}")
            self.protocol_version = str(version)
            info = result.get("serverInfo")
            self.server_info = info if isinstance(info, dict) else {}
            await self.notify("notifications/initialized", None)
        except BaseException:
            await self.close()
            raise

    async def request(self, method: str, params: dict[str, Any] | None, *, timeout: float) -> Any:
        """Send one request and wait for its result; JSON-RPC errors raise RpcError."""
        if not self.alive:
            raise TransportError(f"MCP session is down ({self._dead or 'not started'})")
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        try:
            await self._send(msg)
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            # Tell the server to stop working on it; the session itself is fine.
            with contextlib.suppress(TransportError):
                await self.notify("notifications/cancelled", {"requestId": rid, "reason": "timeout"})
            raise CallTimeout(f"{method}: no answer within {timeout:g}s") from None
        finally:
            self._pending.pop(rid, None)

    async def notify(self, method: str, params: dict[str, Any] | None) -> None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        await self._send(msg)

    async def _send(self, msg: dict[str, Any]) -> None:
        if self.proc is None or self.proc.stdin is None or not self.alive:
            raise TransportError("MCP session is down")
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        async with self._write_lock:
            try:
                self.proc.stdin.write(data)
                await self.proc.stdin.drain()
            except (ConnectionError, RuntimeError) as exc:
                self._fail(f"write failed: {exc}")
                raise TransportError(f"MCP server stdin closed: {exc}") from exc

    def _fail(self, reason: str, *, quiet: bool = False) -> None:
        """Mark the session dead and fail every pending call (they may be retried)."""
        if self._dead is None:
            self._dead = reason
            if not quiet:
                log.warning("mcp session lost", extra={"pid": self.pid, "reason": reason})
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TransportError(f"MCP session lost: {reason}"))

    async def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            while True:
                try:
                    line = await stdout.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    self._fail(f"a line from the server exceeded {self.max_line} bytes")
                    await self._kill()
                    return
                if not line:
                    code = await self.proc.wait()
                    await asyncio.sleep(0)  # let the stderr reader take the last words
                    last = self.stderr_tail[-1] if self.stderr_tail else ""
                    self._fail(f"server exited with code {code}" + (f": {last[:300]}" if last else ""))
                    return
                self._dispatch(line)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a reader that dies silently would hang every caller
            self._fail(f"reader crashed: {exc!r}")

    def _dispatch(self, line: bytes) -> None:
        text = line.strip()
        if not text:
            return
        try:
            msg = json.loads(text)
        except ValueError:
            # Some servers print banners on stdout; not JSON-RPC, not fatal.
            log.debug("non-JSON line from mcp server", extra={"line": text[:200].decode(errors="replace")})
            return
        if not isinstance(msg, dict):
            log.debug("ignored non-object frame from mcp server")
            return
        if "method" in msg:
            method = msg.get("method")
            if "id" in msg:
                if len(self._answering) >= MAX_SERVER_REQUESTS:
                    self._refuse_server_request(msg)
                    return
                task = asyncio.get_running_loop().create_task(self._answer_server_request(msg))
                self._answering.add(task)  # keep a reference until it is done
                task.add_done_callback(self._answering.discard)
            elif isinstance(method, str) and self.on_notification is not None:
                params = msg.get("params")
                self.on_notification(method, params if isinstance(params, dict) else {})
            return
        rid = msg.get("id")
        fut = self._pending.get(rid) if isinstance(rid, int) else None
        if fut is None or fut.done():
            log.debug("response for unknown request id", extra={"id": rid})
            return
        err = msg.get("error")
        if isinstance(err, dict):
            code = err.get("code")
            # a malformed code is the server's bug: report it as an internal error, keep the session
            code = code if isinstance(code, int) and not isinstance(code, bool) else -32603
            fut.set_exception(RpcError(code, str(err.get("message", "")), err.get("data")))
        elif "result" in msg:
            fut.set_result(msg["result"])
        else:
            fut.set_exception(TransportError("response has neither result nor error"))

    def _refuse_server_request(self, msg: dict[str, Any]) -> None:
        """Too many answers in flight: reply busy without a task, unless replies go unread."""
        self.refused_server_requests += 1
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is None or not self.alive or stdin.transport.get_write_buffer_size() > MAX_UNREAD_REPLIES:
            if self.refused_server_requests == 1:
                log.warning("mcp server floods requests; dropping some", extra={"pid": self.pid})
            return
        reply = {"jsonrpc": "2.0", "id": msg["id"],
                 "error": {"code": BUSY_CODE, "message": "too many requests in flight"}}
        # one write() of a whole frame: it cannot interleave with a locked _send
        with contextlib.suppress(ConnectionError, RuntimeError):  # a dying pipe: the reader sees it
            stdin.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    async def _answer_server_request(self, msg: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"jsonrpc": "2.0", "id": msg["id"]}
        if msg.get("method") == "ping":
            reply["result"] = {}
        else:
            reply["error"] = {"code": -32601, "message": f"method not found: {msg.get('method')}"}
        with contextlib.suppress(TransportError):
            await self._send(reply)

    async def _read_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        stderr = self.proc.stderr
        while True:
            try:
                line = await stderr.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an overlong diagnostic line is dropped, the session lives on
            if not line:
                return
            self.stderr_tail.append(line.decode(errors="replace").rstrip())

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    async def close(self, grace: float = 2.0) -> None:
        """Close stdin, give the server ``grace`` seconds, then stop its whole group."""
        self._fail("closed", quiet=True)
        proc = self.proc
        if proc is not None:
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), grace)
                except TimeoutError:
                    await self._kill()
                    await proc.wait()
            else:
                # The leader is gone but children of its group may linger.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
        tasks = [*self._tasks, *self._answering]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._answering.clear()
