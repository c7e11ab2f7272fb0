"""NovaCron's MCP server core: JSON-RPC dispatch shared by the HTTP and stdio transports.

Two eras are answered. Legacy peers (2024-11-05 … 2025-11-25) open with
``initialize``; 2026-07-28 peers send ``server/discover`` and carry their
protocol version in ``_meta`` on every request (no handshake, no session).

Error policy: an unknown method is -32601; malformed params or an unknown
tool is -32602; a tool whose arguments fail its inputSchema, or that fails
while running, answers a normal result with ``isError: true`` so a model can
read the reason and correct itself. Nothing a client sends crashes the server.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from novacron import __version__
from novacron.coordinator.api.openapi import SchemaValidator

log = logging.getLogger("novacron.coordinator.mcp.server")

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MODERN_VERSIONS = ("2026-07-28",)
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
HEADER_MISMATCH = -32020
UNSUPPORTED_PROTOCOL_VERSION = -32022

SERVER_INFO = {"name": "novacron", "title": "NovaCron fleet", "version": __version__}
INSTRUCTIONS = (
    "NovaCron manages a fleet of KVM hosts: list hosts and VMs, place a VM, "
    "live-migrate a VM, classify and plan tasks, and inspect the claude-flow bridge."
)

ProgressFn = Callable[[float, float | None, str | None], Awaitable[None]]
NotifyFn = Callable[[dict[str, Any]], Awaitable[None]]


class ToolFailure(Exception):
    """Raised by a tool handler: becomes a result with ``isError: true``."""


@dataclass
class ToolContext:
    """What a running tool may use besides its arguments."""

    progress: ProgressFn


ToolHandler = Callable[[dict[str, Any], ToolContext], Awaitable[Any]]


@dataclass
class Tool:
    name: str
    description: str
    input_schema: dict[str, Any]
    handler: ToolHandler
    read_only: bool = True
    _validator: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        jsonschema.Draft202012Validator.check_schema(self.input_schema)
        self._validator = SchemaValidator(self.input_schema)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "inputSchema": self.input_schema,
            "annotations": {"readOnlyHint": self.read_only},
        }

    def argument_errors(self, arguments: dict[str, Any]) -> list[str]:
        errors = sorted(self._validator.iter_errors(arguments), key=lambda e: list(e.path))
        out = []
        for err in errors[:5]:
            where = "/".join(str(p) for p in err.path) or "(arguments)"
            out.append(f"{where}: {err.message}")
        return out


class RpcFailure(Exception):
    """A JSON-RPC error answer (code, message, data)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        self.code, self.message, self.data = code, message, data
        super().__init__(message)


def error_response(rid: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": rid, "error": err}


def _text_result(payload: Any, *, is_error: bool) -> dict[str, Any]:
    text = payload if isinstance(payload, str) else json.dumps(payload, default=str)
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": is_error}
    if not is_error and isinstance(payload, dict):
        result["structuredContent"] = payload
    return result


class McpProtocol:
    """Stateless apart from the tool table: each message is answered on its own."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools = {t.name: t for t in tools}
        if len(self.tools) != len(tools):
            raise ValueError("duplicate tool names")

    async def handle(
        self,
        msg: Any,
        *,
        notify: NotifyFn | None = None,
        header_version: str | None = None,
        header_method: str | None = None,
    ) -> dict[str, Any] | None:
        """Answer one decoded JSON-RPC message; ``None`` for notifications and responses."""
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            return error_response(None, INVALID_REQUEST, "expected a JSON-RPC 2.0 object")
        method = msg.get("method")
        has_id = "id" in msg
        rid = msg.get("id")
        if method is None:
            return None  # a response to a request we never send; nothing to do
        if not isinstance(method, str) or (has_id and not isinstance(rid, (str, int))):
            return error_response(rid if isinstance(rid, (str, int)) else None, INVALID_REQUEST,
                                  "method must be a string and id a string or integer")
        params = msg.get("params", {})
        if params is None:
            params = {}
        if not has_id:
            if not isinstance(params, dict):
                return None
            log.debug("mcp notification", extra={"method": method})
            return None
        try:
            if not isinstance(params, dict):
                raise RpcFailure(INVALID_PARAMS, "params must be an object")
            version = self._request_version(method, params, header_version, header_method)
            result = await self._call(method, params, version, notify)
        except RpcFailure as exc:
            return error_response(rid, exc.code, exc.message, exc.data)
        except Exception:
            log.exception("mcp request failed", extra={"method": method})
            return error_response(rid, INTERNAL_ERROR, "internal error")
        if version in MODERN_VERSIONS:
            result.setdefault("resultType", "complete")
            meta = result.setdefault("_meta", {})
            meta.setdefault(SERVER_INFO_META, SERVER_INFO)
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    @staticmethod
    def _request_version(
        method: str, params: dict[str, Any], header_version: str | None, header_method: str | None
    ) -> str | None:
        """The 2026 protocol version a request carries in ``_meta``, checked; None if legacy."""
        meta = params.get("_meta")
        version = meta.get(PROTOCOL_VERSION_META) if isinstance(meta, dict) else None
        if version is None:
            return None
        if version not in MODERN_VERSIONS:
            if method == "server/discover" or version not in HANDSHAKE_VERSIONS:
                raise RpcFailure(
                    UNSUPPORTED_PROTOCOL_VERSION, f"unsupported protocol version {version!r}",
                    {"supported": [*HANDSHAKE_VERSIONS, *MODERN_VERSIONS], "requested": version},
                )
            return None
        if header_version is not None and header_version != version:
            raise RpcFailure(HEADER_MISMATCH, "MCP-Protocol-Version header does not match _meta")
        if header_method is not None and header_method != method:
            raise RpcFailure(HEADER_MISMATCH, "Mcp-Method header does not match the request's method")
        return str(version)

    async def _call(
        self, method: str, params: dict[str, Any], version: str | None, notify: NotifyFn | None
    ) -> dict[str, Any]:
        if method == "initialize":
            requested = params.get("protocolVersion")
            if not isinstance(requested, str):
                raise RpcFailure(INVALID_PARAMS, "initialize needs a protocolVersion string")
            negotiated = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]
            return {
                "protocolVersion": negotiated,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": SERVER_INFO,
                "instructions": INSTRUCTIONS,
            }
        if method == "server/discover":
            return {
                "supportedVersions": [*MODERN_VERSIONS, *HANDSHAKE_VERSIONS],
                "capabilities": {"tools": {"listChanged": False}},
                "instructions": INSTRUCTIONS,
                "ttlMs": 0,
                "cacheScope": "public",
            }
        if method == "ping":
            return {}
        if method == "tools/list":
            cursor = params.get("cursor")
            if cursor is not None and not isinstance(cursor, str):
                raise RpcFailure(INVALID_PARAMS, "cursor must be a string")
            if cursor:
                raise RpcFailure(INVALID_PARAMS, "unknown cursor (the tool list has one page)")
            result: dict[str, Any] = {"tools": [t.describe() for t in self.tools.values()]}
            if version in MODERN_VERSIONS:
                result.update(ttlMs=0, cacheScope="public")
            return result
        if method == "tools/call":
            return await self._call_tool(params, notify)
        raise RpcFailure(METHOD_NOT_FOUND, f"method not found: {method}")

    async def _call_tool(self, params: dict[str, Any], notify: NotifyFn | None) -> dict[str, Any]:
        name = params.get("name")
        if not isinstance(name, str):
            raise RpcFailure(INVALID_PARAMS, "tools/call needs a tool name")
        tool = self.tools.get(name)
        if tool is None:
            raise RpcFailure(INVALID_PARAMS, f"unknown tool: {name}", {"tools": sorted(self.tools)})
        arguments = params.get("arguments", {})
        if arguments is None:
            arguments = {}
        if not isinstance(arguments, dict):
            raise RpcFailure(INVALID_PARAMS, "arguments must be an object")
        problems = tool.argument_errors(arguments)
        if problems:
            return _text_result("invalid arguments: " + "; ".join(problems), is_error=True)
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None

        async def progress(done: float, total: float | None = None, message: str | None = None) -> None:
            if token is None or notify is None or isinstance(token, bool):
                return
            note: dict[str, Any] = {"progressToken": token, "progress": done}
            if total is not None:
                note["total"] = total
            if message:
                note["message"] = message
            await notify({"jsonrpc": "2.0", "method": "notifications/progress", "params": note})

        try:
            payload = await tool.handler(arguments, ToolContext(progress=progress))
        except ToolFailure as exc:
            return _text_result(str(exc), is_error=True)
        except Exception as exc:
            log.exception("mcp tool crashed", extra={"tool": name})
            return _text_result(f"{name} failed: {type(exc).__name__}", is_error=True)
        return _text_result(payload, is_error=False)
