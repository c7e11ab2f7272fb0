"""``novacron bench fleet``: the control plane under a fleet of simulated agents.

Real ``novacron-coordinator`` processes on loopback (one on SQLite, or one or
more sharing a private PostgreSQL started for the run) and one simulated agent
per host that behaves like the real link: it registers with its own token,
then heartbeats every interval (random phase, a few percent of jitter, 10 s
request timeout, an interval or two of random back-off on 503; these run in
worker processes, ``novacron.bench._fleet_agents``). Each host
reports its VMs (``--vms-per-host`` records seeded into the database). Agents
are spread over the coordinators as a load balancer would.

Measured over ``--seconds`` after a warm-up interval: heartbeats/s, p50/p99,
timeouts, shed (503) heartbeats, false downs (hosts marked down although their
agent is alive: the coordinators' own log lines), then ``--placements`` VM
placements through the API (a stand-in agent server accepts the creates) with
their rate and p99. Client and coordinators share this machine's cores: the
client's own cost is part of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import secrets
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from novacron.agent.migration.throttle import CpuQuota
from novacron.bench._fleet_agents import REQUEST_TIMEOUT_S, Tally, fast_loop
from novacron.bench.report import Report, percentile
from novacron.connlimits import raise_fd_limit
from novacron.coordinator.local import LocalCoordinator
from novacron.coordinator.store.pg_local import LocalPostgres

DESCRIPTION = "control plane at fleet scale: simulated agents against 1 or 2 coordinators, SQLite or PostgreSQL"
SCENARIOS = ("sqlite:1", "postgres:1", "postgres:2")
FD_SPARE = 1024  # descriptors beyond one per simulated agent: registration, API, files
PLACEMENT_TIMEOUT_S = 120.0  # placements and listings read the whole fleet


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=int, nargs="+", default=[2000],
                        metavar="N", help="fleet sizes to run (default: %(default)s)")
    parser.add_argument("--vms-per-host", type=int, default=10, metavar="N", help="VM records per host (default: %(default)s)")
    parser.add_argument("--interval", type=float, default=5.0, metavar="SECONDS", help="heartbeat interval in seconds (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=30.0, metavar="SECONDS", help="measuring window in seconds (default: %(default)s)")
    parser.add_argument("--placements", type=int, default=50, metavar="N", help="VM placements timed (default: %(default)s)")
    parser.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                        help="copy each coordinator's log into DIR (default: not kept)")
    parser.add_argument("--coordinator-cpus", type=float, default=None, metavar="CORES",
                        help="hold each coordinator to this many cores with a cgroup CPU quota, "
                        "as if each ran on a machine of its own that size: on one machine, "
                        "how the rate grows with coordinators (default: no quota)")
    parser.add_argument("--scenario", nargs="+", default=list(SCENARIOS),
                        metavar="BACKEND:N", help="backend:coordinators, e.g. sqlite:1 postgres:2 (default: %(default)s)")


QUOTA_PERIOD_US = 10_000  # --coordinator-cpus: the cgroup's CPU period (1 ms quota at least: 0.1 core)
REPORT_LIMIT = 1 << 28  # a worker's report: every latency of the window, as JSON


class _Workers:
    """The processes that run the simulated agents (``novacron.bench._fleet_agents``)."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, count: int) -> None:
        for _ in range(count):
            self.procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "novacron.bench._fleet_agents",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=REPORT_LIMIT))

    def _send(self, proc: asyncio.subprocess.Process, msg: dict[str, Any]) -> None:
        assert proc.stdin is not None
        if proc.returncode is not None:
            raise RuntimeError(f"a fleet worker exited with status {proc.returncode}")
        proc.stdin.write(json.dumps(msg).encode() + b"\n")

    def add(self, i: int, **agent: Any) -> None:
        """Start simulated agent ``i`` (in worker i mod the worker count)."""
        self._send(self.procs[i % len(self.procs)], {"op": "add", **agent})

    def measure(self) -> None:
        for proc in self.procs:
            self._send(proc, {"op": "measure"})

    async def report(self, tally: Tally) -> None:
        """Stop counting; add every worker's figures to ``tally``."""
        for proc in self.procs:
            self._send(proc, {"op": "report"})
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), REQUEST_TIMEOUT_S * 3)
            if not line:
                raise RuntimeError(f"a fleet worker ended without its report (status {await proc.wait()})")
            tally.merge(json.loads(line))

    async def stop(self) -> None:
        """The fleet falls silent: every agent stops, every worker exits."""
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.procs.clear()


async def _stand_in_agent() -> tuple[web.AppRunner, str]:
    """Answers VM creates for every simulated host (placements need an agent to say yes)."""
    async def create(request: web.Request) -> web.Response:
        spec = await request.json()
        return web.json_response({**spec, "state": "running"}, status=201)

    async def get_vm(request: web.Request) -> web.Response:
        return web.json_response({"name": request.match_info["name"], "state": "running"})

    app = web.Application()
    app.router.add_post("/v1/vms", create)
    app.router.add_get("/v1/vms/{name}", get_vm)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


def _vm_rows(hosts: int, per_host: int) -> list[tuple[str, str, str]]:
    now = time.time()
    rows = []
    for h in range(hosts):
        for v in range(per_host):
            name = f"vm-{h:05d}-{v:02d}"
            doc = {"name": name, "host": f"sim-{h:05d}", "state": "running", "error": None,
                   "created_at": now, "updated_at": now,
                   "spec": {"name": name, "vcpus": 1, "memory_mb": 2048, "kernel": "/k"}}
            rows.append((name, f"sim-{h:05d}", json.dumps(doc)))
    return rows


async def _seed_vms(database_url: str, sqlite_path: Path, hosts: int, per_host: int) -> None:
    rows = _vm_rows(hosts, per_host)
    if database_url:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.copy_records_to_table("vms", records=rows, columns=["name", "host", "data"])
            # A fleet's database has long been vacuumed and analysed; without this the
            # autovacuum of the freshly loaded table lands in the measuring window.
            await conn.execute("VACUUM ANALYZE vms")
        finally:
            await conn.close()
        return

    def work() -> None:
        db = sqlite3.connect(sqlite_path, isolation_level=None, timeout=30)
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO vms (name, host, data) VALUES (?, ?, ?)", rows)
        db.execute("COMMIT")
        db.close()

    await asyncio.to_thread(work)


async def _run_one(backend: str, n_coord: int, hosts: int, args: argparse.Namespace,
                   tmp: Path, pg: LocalPostgres | None, files: int) -> dict[str, Any]:
    database_url = await pg.new_database() if pg is not None else ""
    cap = min(math.ceil(hosts / n_coord) + FD_SPARE // 2, files - FD_SPARE // 2)
    admin, agent_token = "adm-" + secrets.token_urlsafe(18), "agt-" + secrets.token_urlsafe(18)
    env = {"PYTHONASYNCIODEBUG": "1"} if os.environ.get("NOVACRON_BENCH_ASYNCIO_DEBUG") else None
    settings = {"log_level": "info", "heartbeat_interval_s": str(args.interval),
                "mcp_enabled": "false", "database_url": database_url,
                # one keep-alive connection per agent, as in a real fleet, and room for the
                # API, up to what a process may open: past that the coordinator closes the
                # oldest idle connections and their agents connect again
                "http_max_connections": str(cap)}
    coords = [LocalCoordinator(tmp / f"{backend}-{n_coord}-{hosts}-{i}", admin_token=admin,
                               agent_token=agent_token, settings=settings, env=env)
              for i in range(n_coord)]
    tally = Tally()
    stand_in, stand_in_url = await _stand_in_agent()
    tasks: list[asyncio.Task[None]] = []
    workers = _Workers()
    quotas: list[CpuQuota] = []
    try:
        await workers.start(math.ceil(hosts / (files - FD_SPARE)))
        for c in coords:
            await c.start()
            if args.coordinator_cpus:
                assert c.proc is not None
                whole = math.ceil(args.coordinator_cpus)
                # a short period: the quota slows the coordinator evenly rather than
                # stopping it for most of every 100 ms (which every request would wait out)
                quota = CpuQuota(c.proc.pid, whole, prefix="novacron-bench-coordinator",
                                 period_us=QUOTA_PERIOD_US)
                quota.set(1.0 - args.coordinator_cpus / whole)
                quotas.append(quota)
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            # registration: every host with its own token, 64 at a time
            tokens = [f"sim-token-{i}-{secrets.token_hex(8)}" for i in range(hosts)]
            sem = asyncio.Semaphore(64)

            async def register(i: int) -> None:
                vms = [f"vm-{i:05d}-{v:02d}" for v in range(args.vms_per_host)]
                async with sem, session.post(
                        f"{coords[i % n_coord].url}/api/v1/hosts/register",
                        headers={"Authorization": f"Bearer {agent_token}"},
                        json={"name": f"sim-{i:05d}", "url": stand_in_url, "token": tokens[i],
                              "cpus": 64, "memory_bytes": 512 << 30,
                              "memory_available_bytes": 480 << 30, "vms": vms}) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"registration failed: HTTP {resp.status}")

            async def live(i: int) -> None:
                """A real agent heartbeats as soon as it is registered."""
                rnd = random.Random(-i)
                while True:  # a busy coordinator may time a registration out: try again later
                    try:
                        await register(i)
                        break
                    except (aiohttp.ClientError, TimeoutError):
                        tally.registration_retries += 1
                        await asyncio.sleep(args.interval * rnd.uniform(1.0, 2.0))
                vms = [f"vm-{i:05d}-{v:02d}" for v in range(args.vms_per_host)]
                workers.add(i, url=coords[i % n_coord].url, name=f"sim-{i:05d}", token=tokens[i],
                            vms=vms, interval=args.interval, seed=i)

            t0 = time.perf_counter()
            tasks.extend(asyncio.create_task(live(i)) for i in range(hosts))
            await asyncio.gather(*tasks)  # every host registered (a refusal raises)
            reg_rate = hosts / (time.perf_counter() - t0)
            await _seed_vms(database_url, coords[0].data_dir / "coordinator.db", hosts,
                            args.vms_per_host)
            await asyncio.sleep(args.interval)  # warm-up: every agent has spoken once
            workers.measure()
            t0, cpu0, client0 = time.perf_counter(), [_cpu_s(c) for c in coords], time.process_time()
            await asyncio.sleep(args.seconds)
            await workers.report(tally)
            window = time.perf_counter() - t0
            coord_cpu = [(_cpu_s(c) - c0) / window for c, c0 in zip(coords, cpu0, strict=True)]
            client_cpu = (time.process_time() - client0 + tally.cpu_s) / window
            beats = len(tally.latencies)

            # placements while the fleet keeps heartbeating
            place_lat: list[float] = []
            failed = 0
            t0 = time.perf_counter()
            slow = aiohttp.ClientTimeout(total=PLACEMENT_TIMEOUT_S)
            for p in range(args.placements):
                started = time.perf_counter()
                try:
                    async with session.post(
                            f"{coords[p % n_coord].url}/api/v1/vms", timeout=slow,
                            headers={"Authorization": f"Bearer {admin}"},
                            json={"name": f"new-{p:05d}", "vcpus": 1, "memory_mb": 256,
                                  "kernel": "/k"}) as resp:
                        await resp.read()
                        ok = resp.status == 201
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                if ok:
                    place_lat.append(time.perf_counter() - started)
                else:
                    failed += 1
            place_s = time.perf_counter() - t0
            await workers.stop()  # the fleet falls silent: count downs before any timeout passes
            down_now: int | None = None
            try:
                async with session.get(f"{coords[0].url}/api/v1/hosts", timeout=slow,
                                       headers={"Authorization": f"Bearer {admin}"}) as resp:
                    down_now = sum(h["state"] != "up" for h in (await resp.json())["hosts"])
            except (aiohttp.ClientError, TimeoutError):
                pass  # reported as unknown
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await workers.stop()
        for c in coords:
            c.stop()
        for quota in quotas:
            quota.close()
        await stand_in.cleanup()
        if pg is not None and database_url:
            await pg.drop_database(database_url)
    false_downs = sum(c.log_path.read_text(errors="replace").count("marked down") for c in coords)
    if args.keep_logs is not None:
        args.keep_logs.mkdir(parents=True, exist_ok=True)
        for i, c in enumerate(coords):
            shutil.copyfile(c.log_path, args.keep_logs / f"{backend}-{n_coord}-{hosts}-{i}.log")
    lat = tally.latencies
    return {
        "backend": backend, "coordinators": n_coord, "hosts": hosts,
        "vms": hosts * args.vms_per_host, "registration_per_s": reg_rate,
        "heartbeats_per_s": beats / window, "expected_per_s": hosts / args.interval,
        "heartbeat_p50_ms": percentile(lat, 50) * 1e3 if lat else None,
        "heartbeat_p99_ms": percentile(lat, 99) * 1e3 if lat else None,
        "timeouts": tally.timeouts, "shed": tally.shed, "errors": tally.errors,
        "false_downs": false_downs, "down_at_end": down_now,
        "placements_per_s": len(place_lat) / place_s if place_s else None,
        "placement_p99_ms": percentile(place_lat, 99) * 1e3 if place_lat else None,
        "coordinator_cpu": coord_cpu, "client_cpu": client_cpu,
        "coordinator_cpu_quota": args.coordinator_cpus,
        # how late the simulator itself ran: its latencies include this
        "client_lag_p99_ms": percentile(tally.loop_lag_s, 99) * 1e3 if tally.loop_lag_s else None,
        "client_gc_max_ms": max(tally.gc_pauses_s, default=0.0) * 1e3,
        "placements_failed": failed, "registration_retries": tally.registration_retries, "first_error": tally.first_error or None,
    }


def _cpu_s(coord: LocalCoordinator) -> float:
    """CPU seconds (user + system) the coordinator process has used so far."""
    assert coord.proc is not None
    fields = Path(f"/proc/{coord.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _scenarios(raw: list[str]) -> list[tuple[str, int]]:
    out = []
    for item in raw:
        backend, _, count = item.partition(":")
        if backend not in ("sqlite", "postgres") or not count.isdigit() or not 1 <= int(count) <= 8 \
                or (backend == "sqlite" and int(count) != 1):
            raise SystemExit(f"novacron bench fleet: bad scenario {item!r} "
                             "(sqlite:1, postgres:N with N 1..8)")
        out.append((backend, int(count)))
    return out


async def _run(args: argparse.Namespace) -> Report:
    if not all(1 <= h <= 50_000 for h in args.hosts) or not 0 <= args.vms_per_host <= 100 \
            or not 0.2 <= args.interval <= 60 or not 1 <= args.seconds <= 3600 \
            or not 0 <= args.placements <= 10_000 \
            or not (args.coordinator_cpus is None or 0.1 <= args.coordinator_cpus <= 64):
        raise SystemExit("novacron bench fleet: --hosts 1..50000, --vms-per-host 0..100, "
                         "--interval 0.2..60, --seconds 1..3600, --placements 0..10000, "
                         "--coordinator-cpus 0.1..64")
    scenarios = _scenarios(args.scenario)
    # each simulated agent keeps a connection open and each coordinator answers one per
    # agent: a descriptor each (the agents are spread over as many processes as that takes)
    files = raise_fd_limit()
    results = []
    pg: LocalPostgres | None = None
    with tempfile.TemporaryDirectory(prefix="nc-bench-fleet-") as tmp:
        try:
            if any(b == "postgres" for b, _ in scenarios):
                pg = LocalPostgres()
                await asyncio.to_thread(pg.start)
            for hosts in args.hosts:
                for backend, n in scenarios:
                    r = await _run_one(backend, n, hosts, args, Path(tmp),
                                       pg if backend == "postgres" else None, files)
                    results.append(r)
                    # a long run: each scenario's figures as soon as it ends, in case a later one stalls
                    print(f"bench fleet: {backend} × {n}, {hosts} hosts: "
                          f"{r['heartbeats_per_s']:,.0f} heartbeats/s (of {r['expected_per_s']:,.0f}), "
                          f"p99 {r['heartbeat_p99_ms'] or float('nan'):.1f} ms, {r['false_downs']} false downs, "
                          f"{r['timeouts']} timeouts, {r['shed']} shed; CPU (cores) coordinators "
                          + "+".join(f"{c:.2f}" for c in r["coordinator_cpu"])
                          + f", client {r['client_cpu']:.2f}; load {os.getloadavg()[0]:.2f}",
                          file=sys.stderr, flush=True)
        finally:
            if pg is not None:
                await asyncio.to_thread(pg.stop)
    report = Report("fleet")
    t = report.table(f"Fleet: heartbeat every {args.interval:g} s, {args.vms_per_host} VMs per host, "
                     f"{args.seconds:g} s window",
                     ["store × coordinators", "hosts", "heartbeats/s (of)", "p50 ms", "p99 ms",
                      "timeouts", "shed", "false downs", "placements/s", "placement p99 ms",
                      "registrations/s", "CPU cores: coordinators / client"])
    for r in results:
        t.add(f"{r['backend']} × {r['coordinators']}", r["hosts"],
              f"{r['heartbeats_per_s']:,.0f} ({r['expected_per_s']:,.0f})",
              r["heartbeat_p50_ms"], r["heartbeat_p99_ms"], r["timeouts"], r["shed"],
              r["false_downs"], r["placements_per_s"], r["placement_p99_ms"],
              r["registration_per_s"],
              " + ".join(f"{c:.2f}" for c in r["coordinator_cpu"]) + f" / {r['client_cpu']:.2f}")
    report.data = {"interval_s": args.interval, "seconds": args.seconds, "results": results}
    report.notes.append("Simulated agents, coordinators and PostgreSQL share this machine's cores.")
    if args.coordinator_cpus:
        report.notes.append(f"Each coordinator was held to {args.coordinator_cpus:g} cores "
                            "(cgroup CPU quota), as if on a machine of its own.")
    lags = [r["client_lag_p99_ms"] for r in results if r.get("client_lag_p99_ms") is not None]
    if lags:
        report.notes.append(f"The simulated agents' own event loop ran at most {max(lags):.1f} ms "
                            "late (p99 per row): their latencies include that.")
    return report


def run(args: argparse.Namespace) -> Report:
    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds _run: its coordinators and PostgreSQL are stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with asyncio.Runner(loop_factory=fast_loop()) as runner:
            return runner.run(_run(args))
    finally:
        signal.signal(signal.SIGTERM, previous)
