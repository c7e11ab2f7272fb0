"""Failures of the MCP bridge, split by whether a retry can help.

Only :class:`TransportError` (the server process died, a frame was garbled or
a call timed out) is retried; a rejected argument or a failed tool would fail
the same way again.
"""

from __future__ import annotations

from typing import Any


class McpError(Exception):
    """Base of every bridge failure."""


class TransportError(McpError):
    """The stdio session broke: process exit, bad frame, oversized line, timeout."""


class CallTimeout(TransportError):
    """No answer within the call's timeout."""


class RpcError(McpError):
    """The server answered with a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        self.code, self.message, self.data = code, message, data
        super().__init__(f"JSON-RPC error {code}: {message}")


class ArgumentError(McpError):
    """Arguments do not match the tool's inputSchema (checked before calling)."""


class ToolError(McpError):
    """The tool ran and reported failure (isError, or ``{"success": false}``)."""

    def __init__(self, tool: str, message: str, result: Any = None) -> None:
        self.tool, self.message, self.result = tool, message, result
        super().__init__(f"{tool}: {message}")


class UnsupportedOperation(McpError):
    """The server lists no tool that implements this operation."""
