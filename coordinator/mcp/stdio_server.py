"""The stdio transport of NovaCron's MCP server (``novacron mcp``).

An MCP host (Claude Desktop, an IDE, the Inspector) starts ``novacron mcp``
and speaks newline-delimited JSON-RPC on its stdin/stdout. The tools act on
the fleet, which lives in the coordinator, so each message goes to the same
protocol core over the coordinator's ``/mcp`` endpoint (with the CLI's
server URL and token); JSON and SSE answers, progress notifications
included, come back as lines on stdout. Lines are bounded; a broken line is
answered with a parse error and the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl as ssl_
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, BinaryIO

import aiohttp

from novacron.coordinator.mcp.protocol import (
    HANDSHAKE_VERSIONS,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MODERN_VERSIONS,
    PARSE_ERROR,
    PROTOCOL_VERSION_META,
    error_response,
)
from novacron.httpjson import ResponseTooLarge, error_message, read_json

log = logging.getLogger("novacron.coordinator.mcp.stdio_server")

DEFAULT_MAX_LINE = 1 << 20
MAX_IN_FLIGHT = 16
DRAIN_TIMEOUT_S = 30.0
Emit = Callable[[dict[str, Any]], Awaitable[None]]


async def lines(reader: asyncio.StreamReader, max_line: int) -> AsyncIterator[bytes | None]:
    """Lines of ``reader`` without their newline; None stands for an overlong line (skipped)."""
    buf = bytearray()
    skipping = False
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            if buf and not skipping:
                yield bytes(buf)
            return
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > max_line:
                    if not skipping:
                        yield None
                    skipping = True
                    buf.clear()
                break
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if skipping:
                skipping = False
                continue
            if len(line) > max_line:
                yield None
                continue
            yield line


class HttpForwarder:
    """Carries JSON-RPC messages to the coordinator's ``/mcp`` and answers back."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 3600.0,
                 ssl: ssl_.SSLContext | None = None) -> None:
        self.url = base_url.rstrip("/") + "/mcp"
        self.token = token
        self.ssl = ssl  # verifies an https coordinator (the fleet CA); None: the system's CAs
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, connect=10)
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpForwarder:
        connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None
        self._http = aiohttp.ClientSession(timeout=self.timeout, connector=connector)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._http is not None:
            if self.session_id:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with self._http.delete(self.url, headers=self._headers(None)):
                        pass
            await self._http.close()

    def _headers(self, msg: dict[str, Any] | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}",
                   "Accept": "application/json, text/event-stream",
                   "Content-Type": "application/json"}
        version = self.protocol_version
        if msg is not None:
            params = msg.get("params")
            meta = params.get("_meta") if isinstance(params, dict) else None
            modern = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
            if modern in MODERN_VERSIONS:
                version = str(modern)
                headers["Mcp-Method"] = str(msg.get("method"))
        if version:
            headers["MCP-Protocol-Version"] = version
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        return headers

    async def forward(self, msg: dict[str, Any], emit: Emit) -> None:
        assert self._http is not None
        rid = msg.get("id") if "method" in msg else None
        try:
            async with self._http.post(self.url, json=msg, headers=self._headers(msg)) as resp:
                if resp.status == 202:
                    return
                if msg.get("method") == "initialize" and resp.status == 200:
                    self.session_id = resp.headers.get("Mcp-Session-Id") or self.session_id
                ctype = resp.headers.get("Content-Type", "")
                if resp.status == 200 and ctype.startswith("text/event-stream"):
                    async for event in _sse_events(resp.content):
                        await self._deliver(event, msg, emit)
                    return
                answer = await read_json(resp)
                if isinstance(answer, dict) and answer.get("jsonrpc") == "2.0":
                    await self._deliver(answer, msg, emit)
                elif rid is not None:
                    await emit(error_response(rid, INTERNAL_ERROR,
                                              f"coordinator answered HTTP {resp.status}: "
                                              f"{error_message(answer) or resp.reason}"))
        except ResponseTooLarge as exc:
            if rid is not None:
                await emit(error_response(rid, INTERNAL_ERROR, f"coordinator answer: {exc}"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            if rid is not None:
                await emit(error_response(rid, INTERNAL_ERROR,
                                          f"coordinator unreachable at {self.url}: {exc}"))

    async def _deliver(self, answer: dict[str, Any], msg: dict[str, Any], emit: Emit) -> None:
        if msg.get("method") == "initialize" and isinstance(answer.get("result"), dict):
            version = answer["result"].get("protocolVersion")
            if version in HANDSHAKE_VERSIONS:
                self.protocol_version = str(version)
        await emit(answer)


async def _sse_events(content: aiohttp.StreamReader) -> AsyncIterator[dict[str, Any]]:
    buf = bytearray()
    data: list[bytes] = []
    async for chunk in content.iter_any():
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl]).rstrip(b"\r")
            del buf[: nl + 1]
            if line.startswith(b"data:"):
                data.append(line[5:].lstrip(b" "))
            elif not line and data:
                with contextlib.suppress(ValueError):
                    event = json.loads(b"\n".join(data))
                    if isinstance(event, dict):
                        yield event
                data = []


async def serve_stdio(forwarder: HttpForwarder, *, stdin: BinaryIO | None = None,
                      stdout: BinaryIO | None = None, max_line: int = DEFAULT_MAX_LINE) -> None:
    """Serve MCP on stdin/stdout until stdin closes."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 stdin or sys.stdin.buffer)
    out = stdout or sys.stdout.buffer
    write_lock = asyncio.Lock()
    limit = asyncio.Semaphore(MAX_IN_FLIGHT)
    tasks: set[asyncio.Task[None]] = set()

    async def emit(message: dict[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        async with write_lock:
            out.write(data)
            out.flush()

    async def run_one(msg: dict[str, Any]) -> None:
        try:
            await forwarder.forward(msg, emit)
        finally:
            limit.release()

    async for line in lines(reader, max_line):
        if line is None:
            await emit(error_response(None, PARSE_ERROR, f"line longer than {max_line} bytes"))
            continue
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            await emit(error_response(None, PARSE_ERROR, "line is not valid JSON"))
            continue
        if not isinstance(msg, dict):
            await emit(error_response(None, INVALID_REQUEST, "expected a JSON-RPC object"))
            continue
        await limit.acquire()
        if msg.get("method") == "initialize":
            await run_one(msg)  # later messages need its session id
            continue
        task = asyncio.create_task(run_one(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
        for task in tasks:
            task.cancel()
