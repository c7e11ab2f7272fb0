"""``ClaudeFlowClient``: a long-lived, self-healing MCP session with claude-flow.

Every call has a timeout. Transport failures (the process died, a frame was
garbled, no answer in time) are retried up to ``attempts`` times with
exponential backoff and jitter, on a freshly started and re-initialized
server; argument, JSON-RPC and tool failures are not retried. A background
task pings the server and restarts it when it stops answering; its findings
are what ``health()`` (and ``GET /api/v1/mcp/health``) report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jsonschema

from novacron.coordinator.mcp import operations
from novacron.coordinator.mcp.errors import (
    ArgumentError,
    CallTimeout,
    McpError,
    RpcError,
    ToolError,
    TransportError,
    UnsupportedOperation,
)
from novacron.coordinator.mcp.install import default_command
from novacron.coordinator.mcp.registry import BridgeRegistry
from novacron.coordinator.mcp.stdio_session import DEFAULT_MAX_LINE, StdioSession

log = logging.getLogger("novacron.coordinator.mcp.client")
T = TypeVar("T")

METHOD_NOT_FOUND = -32601
MAX_TOOL_PAGES = 50


@dataclass
class ClientSettings:
    command: Sequence[str] | None = None  # None: the pinned claude-flow from `make claude-flow`
    workdir: Path = Path("claude-flow")  # the server writes .claude-flow/ and .swarm/ here
    call_timeout: float = 30.0
    start_timeout: float = 60.0
    ping_interval: float = 15.0  # 0 disables the health loop
    ping_timeout: float = 5.0
    attempts: int = 3
    backoff: float = 0.25  # first retry waits about this long, then doubles
    backoff_max: float = 4.0
    max_line: int = DEFAULT_MAX_LINE


@dataclass
class Health:
    status: str = "idle"  # idle (never used) | starting | ok | down | stopped
    pid: int | None = None
    server: dict[str, Any] = field(default_factory=dict)
    protocol_version: str = ""
    dialect: str = ""
    tools: int = 0
    starts: int = 0
    restarts: int = 0
    last_ping_at: float | None = None
    last_ping_ms: float | None = None
    consecutive_failures: int = 0
    last_error: str = ""


def parse_tool_result(tool: str, raw: Any) -> Any:
    """The payload of a tools/call result; ToolError for isError or ``success: false``."""
    if not isinstance(raw, dict):
        raise ToolError(tool, "malformed tools/call result (not an object)", raw)
    texts = [
        c.get("text", "") for c in raw.get("content") or []
        if isinstance(c, dict) and c.get("type") == "text"
    ]
    payload: Any
    if isinstance(raw.get("structuredContent"), dict):
        payload = raw["structuredContent"]
    else:
        text = "\n".join(texts)
        try:
            payload = json.loads(text) if text.strip() else {}
        except ValueError:
            payload = text
    if raw.get("isError"):
        message = payload.get("error") if isinstance(payload, dict) else None
        raise ToolError(tool, str(message or payload or "tool reported an error"), payload)
    if isinstance(payload, dict):
        error = payload.get("error")
        if payload.get("success") is False or (
            isinstance(error, str) and error and payload.get("success") is not True
        ):
            raise ToolError(tool, str(error or "tool reported failure"), payload)
    return payload


def clear_stale_locks(workdir: Path, limit: int = 100) -> list[Path]:
    """Remove claude-flow lock files whose owner process is gone.

    claude-flow guards its state with ``{"pid": ...}`` lock files that it only
    treats as stale after 30 s; a server killed while holding one would make
    its replacement fail every call until then. The workdir is ours alone, so a
    lock whose pid is not running is certainly left over.
    """
    removed: list[Path] = []
    root = workdir / ".claude-flow"
    if not root.is_dir():
        return removed
    for n, lock in enumerate(root.rglob("*.lock")):
        if n >= limit:
            break
        try:
            owner = json.loads(lock.read_text(encoding="utf-8")).get("pid")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(owner, int) or owner <= 0 or _running(owner):
            continue
        with contextlib.suppress(OSError):
            lock.unlink()
            removed.append(lock)
    if removed:
        log.info("removed stale claude-flow locks", extra={"locks": [str(p) for p in removed]})
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0 but holds nothing.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def child_env() -> dict[str, str]:
    """Environment for claude-flow processes."""
    # The coordinator's own settings (tokens among them) are none of the child's business.
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
    # claude-flow checks the registry for updates on start and may install them: a pinned,
    # offline server must do neither.
    env["CLAUDE_FLOW_AUTO_UPDATE"] = "false"
    return env


class ClaudeFlowClient:
    def __init__(self, settings: ClientSettings, registry: BridgeRegistry | None = None) -> None:
        if settings.attempts < 1:
            raise ValueError("attempts must be at least 1")
        self.settings = settings
        self.registry = registry or BridgeRegistry()
        self.health_state = Health()
        self.dialect = ""
        self._session: StdioSession | None = None
        self._tools: dict[str, dict[str, Any]] = {}
        self._validators: dict[str, Any] = {}
        self._lock = asyncio.Lock()
        self._health_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the server now (instead of on first use) and the health loop."""
        self._closed = False
        await self._retrying("start", lambda _s: _noop())

    async def close(self) -> None:
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        async with self._lock:
            if self._session is not None:
                await self._session.close()
                self._session = None
        self.health_state.status = "stopped"
        self.health_state.pid = None

    async def __aenter__(self) -> ClaudeFlowClient:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def pid(self) -> int | None:
        return self._session.pid if self._session is not None and self._session.alive else None

    def health(self) -> dict[str, Any]:
        h = self.health_state
        return {
            "status": h.status,
            "pid": self.pid,
            "server": h.server,
            "protocol_version": h.protocol_version,
            "dialect": h.dialect,
            "tools": h.tools,
            "starts": h.starts,
            "restarts": h.restarts,
            "last_ping_at": h.last_ping_at,
            "last_ping_ms": h.last_ping_ms,
            "consecutive_failures": h.consecutive_failures,
            "last_error": h.last_error,
        }

    async def _session_ready(self) -> StdioSession:
        """The live session, (re)starting the server when there is none."""
        async with self._lock:
            if self._closed:
                raise McpError("the MCP client is closed")
            session = self._session
            if session is not None and session.alive:
                return session
            if session is not None:
                await session.close(grace=0.5)
                self.health_state.restarts += 1
                log.warning("restarting mcp server", extra={"restarts": self.health_state.restarts})
            self._session = None
            self.health_state.status = "starting"
            try:
                argv = list(self.settings.command) if self.settings.command else default_command()
                clear_stale_locks(self.settings.workdir)
                session = StdioSession(argv, cwd=self.settings.workdir, env=child_env(),
                                       max_line=self.settings.max_line)
                await session.start(self.settings.start_timeout)
                try:
                    tools = await self._list_tools(session)
                except BaseException:
                    await session.close(grace=0.5)
                    raise
            except (McpError, OSError) as exc:
                self.health_state.status = "down"
                self.health_state.last_error = f"start: {exc}"
                raise
            self._install_tools(tools)
            self._session = session
            h = self.health_state
            h.starts += 1
            h.status = "ok"
            h.pid = session.pid
            h.server = dict(session.server_info)
            h.protocol_version = session.protocol_version
            h.tools = len(tools)
            h.consecutive_failures = 0
            if self.settings.ping_interval > 0 and self._health_task is None:
                # Pings begin with the first session: an unused bridge costs nothing.
                self._health_task = asyncio.create_task(self._health_loop(), name="mcp-health")
            log.info("mcp session ready", extra={
                "pid": session.pid, "server": h.server.get("name"), "tools": len(tools),
                "dialect": self.dialect or "-"})
            return session

    async def _list_tools(self, session: StdioSession) -> list[dict[str, Any]]:
        tools: list[dict[str, Any]] = []
        cursor: str | None = None
        for _page in range(MAX_TOOL_PAGES):
            params = {"cursor": cursor} if cursor else {}
            result = await session.request("tools/list", params, timeout=self.settings.call_timeout)
            if not isinstance(result, dict) or not isinstance(result.get("tools"), list):
                raise TransportError("tools/list answered without a tools array")
            tools.extend(t for t in result["tools"] if isinstance(t, dict) and isinstance(t.get("name"), str))
            cursor = result.get("nextCursor")
            if not cursor:
                return tools
        raise TransportError(f"tools/list did not end within {MAX_TOOL_PAGES} pages")

    def _install_tools(self, tools: list[dict[str, Any]]) -> None:
        self._tools = {}
        self._validators = {}
        for tool in tools:
            schema = tool.get("inputSchema")
            if not isinstance(schema, dict):
                schema = {"type": "object"}
            self._tools[tool["name"]] = schema
            try:
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)
                self._validators[tool["name"]] = cls(schema)
            except jsonschema.SchemaError:
                log.warning("tool has an invalid inputSchema; arguments go unchecked",
                            extra={"tool": tool["name"]})
        try:
            self.dialect = operations.detect_dialect(set(self._tools))
        except UnsupportedOperation:
            self.dialect = ""
        self.health_state.dialect = self.dialect

    async def _retrying(self, what: str, fn: Callable[[StdioSession], Awaitable[T]]) -> T:
        last: TransportError | None = None
        for attempt in range(1, self.settings.attempts + 1):
            try:
                session = await self._session_ready()
                return await fn(session)
            except TransportError as exc:
                last = exc
                self.health_state.last_error = f"{what}: {exc}"
                current = self._session
                if current is not None and (isinstance(exc, CallTimeout) or not current.alive):
                    # A server that stopped answering is as good as dead: start afresh.
                    await current.close(grace=0.5)
                    self.health_state.status = "down"
                if attempt == self.settings.attempts:
                    break
                delay = min(self.settings.backoff * 2 ** (attempt - 1), self.settings.backoff_max)
                delay *= random.uniform(0.5, 1.5)  # jitter: restarts of many clients spread out
                log.warning("mcp transport failure; retrying", extra={
                    "what": what, "attempt": attempt, "delay_s": round(delay, 3), "error": str(exc)})
                await asyncio.sleep(delay)
        raise TransportError(f"{what}: failed after {self.settings.attempts} attempts: {last}")

    # -- raw MCP -----------------------------------------------------------------------------

    async def ping(self) -> float:
        """Round-trip time of one ping in milliseconds (no retry: it is the health probe)."""
        session = await self._session_ready()
        started = time.perf_counter()
        try:
            await session.request("ping", None, timeout=self.settings.ping_timeout)
        except RpcError as exc:
            if exc.code != METHOD_NOT_FOUND:  # claude-flow v2 has no ping but answered
                raise
        return (time.perf_counter() - started) * 1000

    async def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One raw JSON-RPC request (timeout and transport retries included)."""
        return await self._retrying(method, lambda s: s.request(
            method, params, timeout=self.settings.call_timeout))

    async def tools(self) -> dict[str, dict[str, Any]]:
        """Tool name -> inputSchema, as listed by the running server."""
        await self._retrying("tools/list", lambda _s: _noop())
        return dict(self._tools)

    def check_arguments(self, tool: str, arguments: dict[str, Any]) -> None:
        if tool not in self._tools:
            raise UnsupportedOperation(f"the MCP server lists no tool {tool!r}")
        validator = self._validators.get(tool)
        if validator is None:
            return
        errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.path))
        if errors:
            err = errors[0]
            where = "/".join(str(p) for p in err.absolute_path) or "(arguments)"
            raise ArgumentError(f"{tool}: {where}: {err.message}")

    async def call_tool(self, tool: str, arguments: dict[str, Any]) -> Any:
        """Validate, call (with retries on transport failure) and parse one tool call."""
        if not self._tools:
            await self.tools()
        self.check_arguments(tool, arguments)
        params = {"name": tool, "arguments": arguments}
        raw = await self._retrying(f"tools/call {tool}", lambda s: s.request(
            "tools/call", params, timeout=self.settings.call_timeout))
        return parse_tool_result(tool, raw)

    # -- the eight operations ----------------------------------------------------------------

    async def run(self, operation: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run one operation through the mapping table; returns the merged step results."""
        if not self._tools:
            await self.tools()
        if not self.dialect:
            raise UnsupportedOperation("the MCP server lists no claude-flow swarm tools")
        results: list[Any] = []
        merged: dict[str, Any] = {}
        for step in operations.steps_for(self.dialect, operation):
            try:
                arguments = step.build(args, results)
            except KeyError as exc:
                raise ArgumentError(f"{operation}: missing {exc.args[0]}") from None
            if arguments is None:
                continue
            result = await self.call_tool(step.tool, arguments)
            results.append(result)
            if isinstance(result, dict):
                merged.update(result)
            else:
                merged.setdefault("results", []).append(result)
        await self._track(operation, args, merged)
        return merged

    async def swarm_init(self, topology: str = "mesh", max_agents: int | None = None,
                         strategy: str | None = None) -> dict[str, Any]:
        return await self.run("swarm_init", {"topology": topology, "max_agents": max_agents,
                                             "strategy": strategy})

    async def agent_spawn(self, agent_type: str, agent_id: str | None = None,
                          swarm_id: str | None = None) -> dict[str, Any]:
        return await self.run("agent_spawn", {"agent_type": agent_type, "agent_id": agent_id,
                                              "swarm_id": swarm_id})

    async def task_orchestrate(self, description: str, *, task_type: str | None = None,
                               priority: str | None = None, strategy: str | None = None,
                               agents: Sequence[str] = ()) -> dict[str, Any]:
        return await self.run("task_orchestrate", {
            "description": description, "task_type": task_type, "priority": priority,
            "strategy": strategy, "agents": list(agents)})

    async def swarm_status(self, swarm_id: str | None = None) -> dict[str, Any]:
        return await self.run("swarm_status", {"swarm_id": swarm_id})

    async def agent_list(self, status: str | None = None) -> dict[str, Any]:
        return await self.run("agent_list", {"status": status})

    async def agent_metrics(self, agent_id: str) -> dict[str, Any]:
        return await self.run("agent_metrics", {"agent_id": agent_id})

    async def task_status(self, task_id: str) -> dict[str, Any]:
        return await self.run("task_status", {"task_id": task_id})

    async def task_results(self, task_id: str) -> dict[str, Any]:
        result = await self.run("task_results", {"task_id": task_id})
        return {"taskId": result.get("taskId", task_id), "status": result.get("status"),
                "result": result.get("result", result.get("results"))}

    async def swarm_shutdown(self, swarm_id: str) -> dict[str, Any]:
        return await self.run("swarm_shutdown", {"swarm_id": swarm_id})

    async def _track(self, operation: str, args: dict[str, Any], result: dict[str, Any]) -> None:
        """Remember what the bridge created, so the coordinator can list and follow it."""
        reg = self.registry
        if operation == "swarm_init":
            sid = result.get("swarmId") or result.get("id")
            if sid:
                await reg.record("swarm", str(sid), {
                    "topology": result.get("topology", args.get("topology")),
                    "strategy": result.get("strategy", args.get("strategy")),
                    "max_agents": result.get("maxAgents", args.get("max_agents")),
                    "status": result.get("status", "running")})
        elif operation == "swarm_shutdown":
            sid = str(args["swarm_id"])
            if await reg.get("swarm", sid) is not None:
                await reg.record("swarm", sid, {"status": "shutdown"})
        elif operation == "swarm_status":
            sid = result.get("swarmId")
            if sid and await reg.get("swarm", str(sid)) is not None:
                await reg.record("swarm", str(sid), {"status": result.get("status"),
                                                     "agent_count": result.get("agentCount")})
        elif operation == "agent_spawn":
            aid = result.get("agentId") or result.get("id")
            if aid:
                await reg.record("agent", str(aid), {
                    "type": result.get("agentType", args.get("agent_type")),
                    "swarm_id": args.get("swarm_id"), "status": result.get("status")})
        elif operation == "agent_list":
            for agent in result.get("agents") or []:
                aid = agent.get("agentId") if isinstance(agent, dict) else None
                if aid and await reg.get("agent", str(aid)) is not None:
                    await reg.record("agent", str(aid), {"status": agent.get("status")})
        elif operation == "task_orchestrate":
            tid = result.get("taskId") or result.get("id")
            if tid:
                await reg.record("task", str(tid), {
                    "description": args.get("description"), "status": result.get("status"),
                    "agents": result.get("assignedTo", args.get("agents"))})
        elif operation in ("task_status", "task_results"):
            tid = result.get("taskId")
            if tid and await reg.get("task", str(tid)) is not None:
                await reg.record("task", str(tid), {"status": result.get("status"),
                                                    "result": result.get("result")})

    # -- health ------------------------------------------------------------------------------

    async def check_health(self) -> None:
        """One health probe: ping; on failure restart the server (the next ping tells)."""
        h = self.health_state
        try:
            h.last_ping_ms = round(await self.ping(), 3)
            h.last_ping_at = time.time()
            h.consecutive_failures = 0
            h.status = "ok"
        except (McpError, OSError) as exc:
            h.consecutive_failures += 1
            h.last_error = f"ping: {exc}"
            h.status = "down"
            log.warning("mcp health check failed", extra={"error": str(exc),
                                                         "failures": h.consecutive_failures})
            session = self._session
            if session is not None:
                await session.close(grace=0.5)
            with contextlib.suppress(McpError, OSError):
                await self._session_ready()

    async def _health_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.ping_interval)
            try:
                await self.check_health()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must outlive any one bad probe
                log.exception("mcp health loop error")


async def _noop() -> None:
    return None
