"""``novacron bench mcp``: claude-flow call latency, persistent MCP session vs a process per call.

The bridge keeps one claude-flow MCP server alive and sends each operation as
a ``tools/call`` over its stdio session. The seed ran ``npx claude-flow <cmd>``
for every operation. Both are measured here in one run against the same
pinned claude-flow and the same working directory (swarm status, after one
swarm init), plus the spawn without npx's own start-up as a second reference.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from novacron.bench.report import Report, percentile
from novacron.coordinator.mcp.client import ClaudeFlowClient, ClientSettings, child_env
from novacron.coordinator.mcp.install import claude_flow_bin, install_dir

DESCRIPTION = ("claude-flow call latency (p50/p99): one persistent MCP stdio session vs "
               "spawning `npx claude-flow <cmd>` per call")
MAX_CALLS = 5000
MAX_SPAWNS = 200
SPAWN_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=300,
                        help=f"tools/call round trips over the session (1..{MAX_CALLS}, default 300)")
    parser.add_argument("--spawns", type=int, default=10,
                        help=f"processes spawned per reference (1..{MAX_SPAWNS}, default 10)")


async def _session_latencies(workdir: Path, calls: int) -> tuple[list[float], list[float], float]:
    client = ClaudeFlowClient(ClientSettings(workdir=workdir, ping_interval=0))
    started = time.perf_counter()
    await client.start()
    startup_ms = (time.perf_counter() - started) * 1000
    try:
        await client.swarm_init("mesh", 4, "balanced")
        await client.swarm_status()  # warm
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.swarm_status()
            samples.append((time.perf_counter() - t0) * 1000)
        # ping: the transport's own share of a call (no tool work on the server)
        pings = [await client.ping() for _ in range(calls)]
        return samples, pings, startup_ms
    finally:
        await client.close()


async def _spawn_latencies(argv: list[str], workdir: Path, count: int) -> list[float]:
    env = child_env()
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=str(workdir), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            code = await asyncio.wait_for(proc.wait(), SPAWN_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{argv[0]} did not finish within {SPAWN_TIMEOUT_S:g}s") from None
        if code != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with {code}")
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def run(args: argparse.Namespace) -> Report:
    if not 1 <= args.calls <= MAX_CALLS:
        raise SystemExit(f"novacron bench mcp: --calls must be 1..{MAX_CALLS}")
    if not 1 <= args.spawns <= MAX_SPAWNS:
        raise SystemExit(f"novacron bench mcp: --spawns must be 1..{MAX_SPAWNS}")
    exe = claude_flow_bin()  # NotInstalled names the make target
    npx = shutil.which("npx")
    with tempfile.TemporaryDirectory(prefix="novacron-bench-mcp-") as tmp:
        workdir = Path(tmp)
        session, pings, startup_ms = asyncio.run(_session_latencies(workdir, args.calls))
        direct = asyncio.run(_spawn_latencies([str(exe), "swarm", "status"], workdir, args.spawns))
        via_npx: list[float] = []
        if npx is not None:
            via_npx = asyncio.run(_spawn_latencies(
                [npx, "--prefix", str(install_dir()), "--no-install", "claude-flow", "swarm",
                 "status"], workdir, args.spawns))

    report = Report("mcp")
    table = report.table("claude-flow swarm status: latency per call",
                         ["method", "calls", "p50 ms", "p99 ms", "mean ms", "p50 vs session"])
    base = percentile(session, 50)
    rows = [("persistent MCP session (tools/call)", session),
            ("persistent MCP session (ping only)", pings),
            ("spawn claude-flow per call", direct)]
    if via_npx:
        rows.append(("spawn `npx claude-flow` per call (seed)", via_npx))
    data: dict[str, object] = {"session_startup_ms": round(startup_ms, 1)}
    for label, samples in rows:
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        table.add(label, len(samples), p50, p99, statistics.fmean(samples), p50 / base)
        key = {"persistent MCP session (tools/call)": "session",
               "persistent MCP session (ping only)": "session_ping",
               "spawn claude-flow per call": "spawn_direct"}.get(label, "spawn_npx")
        data[key] = {"calls": len(samples), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                     "mean_ms": round(statistics.fmean(samples), 3),
                     "p50_ratio_vs_session": round(p50 / base, 3)}
    report.data = data
    report.notes.append(f"session start-up (spawn + initialize + tools/list of the whole "
                        f"server), paid once: {startup_ms:.0f} ms")
    if npx is None:
        report.notes.append("npx not found: the seed's reference was not measured")
    return report
