"""The MCP bridge's services on the aiohttp app (see novacron.coordinator.api.keys)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from novacron.coordinator.mcp.client import ClaudeFlowClient
    from novacron.coordinator.mcp.protocol import McpProtocol

CLAUDE_FLOW: web.AppKey[ClaudeFlowClient] = web.AppKey("claude_flow")
MCP_SERVER: web.AppKey[McpProtocol] = web.AppKey("mcp_server")
