"""Where the pinned claude-flow lives: ``make claude-flow`` installs it into
``${XDG_CACHE_HOME:-~/.cache}/novacron/claude-flow/<hash>/`` (see node/install),
keyed by the hash of node/package.json + node/package-lock.json.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from novacron.coordinator.mcp.errors import McpError

NODE_DIR = Path(__file__).resolve().parent / "node"
INSTALL_HINT = "run `make claude-flow` in the NovaCron checkout (it installs the pinned claude-flow)"


class NotInstalled(McpError):
    """The pinned claude-flow is not installed."""


def install_dir() -> Path:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((NODE_DIR / name).read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "novacron" / "claude-flow" / digest.hexdigest()[:16]


def claude_flow_bin() -> Path:
    """The ``claude-flow`` executable of the pinned install; NotInstalled if absent."""
    base = install_dir()
    exe = base / "node_modules" / ".bin" / "claude-flow"
    if not (base / ".complete").exists() or not os.access(exe, os.X_OK):
        raise NotInstalled(f"claude-flow is not installed at {base}: {INSTALL_HINT}")
    return exe


def default_command() -> list[str]:
    """argv that starts claude-flow's MCP server over stdio (run directly: no npx, no shell)."""
    return [str(claude_flow_bin()), "mcp", "start"]
