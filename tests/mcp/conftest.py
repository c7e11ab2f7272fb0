"""Fixtures of the MCP bridge tests: the real claude-flow, and a real coordinator app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from novacron.coordinator.mcp.client import ClaudeFlowClient, ClientSettings
from novacron.coordinator.mcp.install import NotInstalled, default_command


@pytest.fixture
def claude_flow_argv() -> list[str]:
    """argv of the pinned claude-flow; fails (never skips) when set-up has not run."""
    try:
        return default_command()
    except NotInstalled as exc:
        pytest.fail(f"{exc} -- the MCP bridge tests need the real claude-flow server")


@pytest.fixture
async def claude_flow(claude_flow_argv: list[str], tmp_path: Path) -> AsyncIterator[ClaudeFlowClient]:
    client = ClaudeFlowClient(ClientSettings(
        command=claude_flow_argv, workdir=tmp_path / "claude-flow", call_timeout=20,
        start_timeout=60, ping_interval=0, backoff=0.05))
    try:
        await client.start()
        yield client
    finally:
        await client.close()
