"""``novacron bench api``: heartbeat ingestion of the coordinator under 1,000 agents.

A real coordinator subprocess on loopback; N simulated agents register, then
each sends R heartbeats (a bounded number of requests in flight). References
measured in the same run: the health endpoint (same server, same client, no
auth, no storage) and raw SQLite heartbeat updates in-process (the storage
floor, no HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from novacron.bench.report import Report, percentile
from novacron.coordinator.client import CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from novacron.coordinator.models import Host
from novacron.coordinator.store.sqlite import SQLiteStore

DESCRIPTION = "coordinator heartbeat ingestion rate and p99 latency with simulated agents"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents (1000)")
    parser.add_argument("--rounds", type=int, default=5, help="heartbeats per agent (5)")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="requests in flight at once (64)")


async def _drive(session: aiohttp.ClientSession, jobs: list[tuple[str, str, Any, str]],
                 concurrency: int) -> tuple[float, list[float], int]:
    """Send the jobs with ``concurrency`` workers; (seconds, latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    it = iter(jobs)

    async def worker() -> None:
        nonlocal errors
        for method, url, body, token in it:
            t0 = time.perf_counter()
            async with session.request(method, url, json=body,
                                       headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, errors


async def _raw_sqlite(path: Path, agents: int, rounds: int) -> float:
    """sqlite3 alone: one UPDATE + COMMIT per heartbeat on the coordinator's schema."""
    store = SQLiteStore(path)
    await store.open()
    try:
        for i in range(agents):
            await store.put_host(Host(f"h{i}", "http://127.0.0.1:1", "t", 4, 8 << 30, 8 << 30))
    finally:
        await store.close()

    def work() -> float:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        doc = json.dumps({"memory_available_bytes": 4 << 30, "load": 0.5})
        start = time.perf_counter()
        for _ in range(rounds):
            for i in range(agents):
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE hosts SET state = 'up', last_heartbeat = ?, data = ? "
                             "WHERE name = ?", (time.time(), doc, f"h{i}"))
                conn.execute("COMMIT")
        elapsed = time.perf_counter() - start
        conn.close()
        return agents * rounds / elapsed

    return await asyncio.to_thread(work)


async def _run(args: argparse.Namespace) -> Report:
    if not (1 <= args.agents <= 100_000 and 1 <= args.rounds <= 1000
            and 1 <= args.concurrency <= 1024):
        raise SystemExit("novacron bench api: --agents 1..100000, --rounds 1..1000, "
                         "--concurrency 1..1024")
    rnd = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="nc-bench-api-") as tmp:
        coord = LocalCoordinator(Path(tmp) / "coord", settings={
            "log_level": "warning", "heartbeat_timeout_s": "3600"})
        await coord.start()
        try:
            base = coord.url + "/api/v1"
            conn = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=conn) as session:
                register = [("POST", f"{base}/hosts/register", {
                    "name": f"sim-{i:05d}", "url": f"http://127.0.0.1:{10000 + i % 50000}",
                    "token": f"sim-host-token-{i:08d}", "cpus": 32, "memory_bytes": 128 << 30,
                    "memory_available_bytes": 64 << 30, "vms": []}, coord.agent_token)
                    for i in range(args.agents)]
                reg_s, _, reg_err = await _drive(session, register, args.concurrency)
                beats = [("POST", f"{base}/hosts/sim-{i:05d}/heartbeat", {
                    "memory_available_bytes": rnd.randrange(1 << 30, 64 << 30),
                    "load": round(rnd.random() * 8, 2), "vms": [f"vm-{i}-{j}" for j in range(4)]},
                    f"sim-host-token-{i:08d}")  # each host heartbeats with its own credential
                    for _ in range(args.rounds) for i in range(args.agents)]
                rnd.shuffle(beats)
                hb_s, hb_lat, hb_err = await _drive(session, beats, args.concurrency)
                health = [("GET", f"{base}/health", None, "")] * len(beats)
                he_s, he_lat, he_err = await _drive(session, health, args.concurrency)
            async with CoordinatorClient(coord.url, coord.admin_token) as client:
                hosts = await client.hosts()
        finally:
            coord.stop()
        raw_rate = await _raw_sqlite(Path(tmp) / "raw.db", min(args.agents, 1000), args.rounds)
    if reg_err or hb_err or he_err or len(hosts) != args.agents:
        raise SystemExit(f"novacron bench api: errors: register {reg_err}, heartbeat {hb_err}, "
                         f"health {he_err}, hosts listed {len(hosts)} of {args.agents}")
    n = len(beats)
    hb_rate, he_rate = n / hb_s, n / he_s
    hb50, hb99 = percentile(hb_lat, 50) * 1e3, percentile(hb_lat, 99) * 1e3
    he50, he99 = percentile(he_lat, 50) * 1e3, percentile(he_lat, 99) * 1e3
    report = Report("api")
    t = report.table(f"Heartbeat ingestion: {args.agents} agents × {args.rounds} heartbeats, "
                     f"{args.concurrency} in flight",
                     ["what", "per s", "p50 ms", "p99 ms", "× heartbeat"])
    t.add("heartbeat: auth, schema, SQLite commit", hb_rate,
          hb50, hb99, 1.0)
    t.add("ref: GET /health (no auth, no storage)", he_rate,
          he50, he99, he_rate / hb_rate)
    t.add("ref: sqlite3 UPDATE+COMMIT, no HTTP", raw_rate, None, None,
          raw_rate / hb_rate)
    t.add("registration", args.agents / reg_s, None, None, args.agents / reg_s / hb_rate)
    report.data = {
        "agents": args.agents, "rounds": args.rounds, "concurrency": args.concurrency,
        "heartbeats": n,
        "heartbeat_rate_per_s": hb_rate,
        "heartbeat_p50_ms": hb50,
        "heartbeat_p99_ms": hb99,
        "health_rate_per_s": he_rate,
        "health_p99_ms": he99,
        "raw_sqlite_rate_per_s": raw_rate,
        "heartbeat_vs_health": hb_rate / he_rate,
        "heartbeat_vs_raw_sqlite": hb_rate / raw_rate,
        "registration_rate_per_s": args.agents / reg_s,
        "heartbeat_capacity_agents_at_5s_interval": hb_rate * 5,
    }
    report.notes.append(
        f"At the default 5 s heartbeat interval this coordinator would keep "
        f"{hb_rate * 5:,.0f} agents fresh. Client and server share this machine's cores.")
    return report


def run(args: argparse.Namespace) -> Report:
    return asyncio.run(_run(args))
