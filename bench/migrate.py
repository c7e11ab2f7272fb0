"""``novacron bench migrate``: our live migration against QEMU's own, same guest.

Every case boots the test guest (TCG) with the same spec and migrates it
between two hosts on loopback:

- **novacron**: two real ``novacron-agent`` processes; the engine copies RAM
  from the shared RAM file (fingerprint dirty tracking, zero skip, dedup,
  zstd, AES-256-GCM) and QEMU sends only device state (``x-ignore-shared``).
- **qemu-tcp**: QEMU's native pre-copy over TCP with default settings.
- **qemu-multifd-zstd**: QEMU's multifd (2 channels) with zstd, when this QEMU
  has it.

Idle (workload dirtying nothing) and busy guests, uncapped and capped (``--cap``
MB/s on both engines: our ``bandwidth_mbps``, QEMU's ``max-bandwidth``; ``--cap 0``
runs uncapped only), for each ``--memory-mb`` size (a size whose two RAM files do
not fit in /dev/shm and free memory is skipped, with a note).
"Uncapped" lifts QEMU's default 128 MiB/s ``max-bandwidth``; QEMU's downtime
limit and ours are both 300 ms. Figures: total time, downtime (ours: source
pause until the destination confirmed running; QEMU: from the source's STOP
event to the destination's RESUME event, both stamped by the host clock) and bytes on the wire (ours: every
frame written to the channel; QEMU: the bytes of its migration streams during
the migration, counted by a splice relay in front of the destination, all
multifd streams included). CPU s/GiB: CPU seconds per GiB of guest RAM on both
ends together; ours: both agent processes (every thread); QEMU: the source QEMU
minus its vCPU threads, plus the whole destination QEMU (its guest is paused),
both from /proc. Load: the 1-minute load average when the row finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from novacron.bench._relay import CountingRelay
from novacron.bench.report import Report

DESCRIPTION = "live migration: novacron engine vs QEMU native (tcp, multifd+zstd), idle/busy, capped/uncapped"
MB = 1_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-mb", default="256",
                        help="guest RAM in MiB, comma-separated sizes run one after another "
                             "(default 256; e.g. 256,1024,4096)")
    parser.add_argument("--workload-mb", type=int, default=96,
                        help="memory the guest workload fills and checks (default 96)")
    parser.add_argument("--busy-rate", type=int, default=16,
                        help="MB/s the busy guest dirties (default 16)")
    parser.add_argument("--cap", type=float, default=50.0,
                        help="bandwidth cap in MB/s for the capped rows; 0 = uncapped rows only (default 50)")
    parser.add_argument("--engines", default="novacron,qemu-tcp,qemu-multifd-zstd",
                        help="comma-separated subset of novacron,qemu-tcp,qemu-multifd-zstd (default: all)")
    parser.add_argument("--guests", default="idle,busy", help="comma-separated subset of idle,busy (default: both)")


def run(args: argparse.Namespace) -> Report:
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    guests = [g.strip() for g in args.guests.split(",") if g.strip()]
    for e in engines:
        if e not in ("novacron", "qemu-tcp", "qemu-multifd-zstd"):
            raise SystemExit(f"novacron bench migrate: unknown engine {e!r}")
    for g in guests:
        if g not in ("idle", "busy"):
            raise SystemExit(f"novacron bench migrate: unknown guest kind {g!r}")
    try:
        sizes = [int(m) for m in str(args.memory_mb).split(",") if m.strip()]
    except ValueError:
        raise SystemExit("novacron bench migrate: --memory-mb takes comma-separated integers") from None
    if not sizes or any(args.workload_mb >= m or m < 64 for m in sizes):
        raise SystemExit("novacron bench migrate: need each --memory-mb >= 64 and > --workload-mb")
    if args.cap < 0:
        raise SystemExit("novacron bench migrate: --cap must be >= 0")
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    for mem in sizes:
        if why := _does_not_fit(mem):
            notes.append(f"{mem} MiB: not run ({why})")
            continue
        rows, more = asyncio.run(_run_all(argparse.Namespace(**{**vars(args), "memory_mb": mem}),
                                          engines, guests))
        for r in rows:
            r["memory_mb"] = mem
        results += rows
        notes += [n for n in more if n not in notes]
    return _report(args, sizes, results, notes)


def _does_not_fit(memory_mb: int) -> str:
    """Why two RAM files of this size (source and destination) cannot be had now, or ''."""
    need = 2 * memory_mb * (1 << 20) + (1 << 30)
    shm = os.statvfs("/dev/shm")
    free_shm = shm.f_bavail * shm.f_frsize
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if free_shm < need:
        return f"/dev/shm has {free_shm >> 20} MiB free, two RAM files need {need >> 20} MiB"
    if avail < need:
        return f"{avail >> 20} MiB of memory available, two RAM files need {need >> 20} MiB"
    return ""


def _spec(name: str, args: argparse.Namespace, rate: int) -> dict[str, Any]:
    from novacron.agent.guest import ensure_guest

    g = ensure_guest()
    return {
        "name": name, "vcpus": 1, "memory_mb": args.memory_mb, "accel": "tcg",
        "kernel": str(g.kernel), "initrd": str(g.initrd),
        "cmdline": g.workload_cmdline(mem_mb=args.workload_mb, rate_mb=rate, verify_s=8),
    }  # fmt: skip


async def _run_all(args: argparse.Namespace, engines: list[str], guests: list[str]
                   ) -> tuple[list[dict[str, Any]], list[str]]:
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    caps = [0.0, args.cap] if args.cap else [0.0]
    for kind in guests:
        rate = 0 if kind == "idle" else args.busy_rate
        if "novacron" in engines:
            results += await _ours(args, kind, rate, caps)
        qemu = [e for e in engines if e.startswith("qemu")]
        if qemu:
            rows, qnotes = await _qemu(args, kind, rate, caps, qemu)
            results += rows
            notes += [n for n in qnotes if n not in notes]
    return results, notes


# -- our engine, two real agents ---------------------------------------------
async def _ours(args: argparse.Namespace, kind: str, rate: int, caps: list[float]) -> list[dict[str, Any]]:
    from novacron.agent.local import LocalAgent

    secret = secrets.token_urlsafe(32)
    rows = []
    async with LocalAgent("bench-a", cluster_secret=secret, accel="tcg") as a, \
            LocalAgent("bench-b", cluster_secret=secret, accel="tcg") as b:
        name = f"bench-{kind}"
        status, doc = await a.request("POST", "/v1/vms", _spec(name, args, rate))
        if status != 201:
            raise RuntimeError(f"cannot create the guest: {doc}")
        await _wait_console(a, name)
        src, dst = a, b
        for cap in caps:
            status, doc = await src.request("POST", "/v1/migrations", {
                "vm": name, "grant": src.grant_to(dst, name),
                "options": {"bandwidth_mbps": cap, "downtime_ms": 300},
            })  # fmt: skip
            if status != 202:
                raise RuntimeError(f"migration refused: {doc}")
            st = await _wait_migration(src, doc["id"])
            if st["phase"] != "completed":
                raise RuntimeError(f"our migration failed: {st['error']}")
            m = st["metrics"]
            _, dst_st = await dst.request("GET", f"/v1/migrations/{doc['id']}")
            dm = dst_st.get("metrics", {}) if isinstance(dst_st, dict) else {}
            cpu = m["cpu_s"] + float(dm.get("cpu_s") or 0.0)
            rows.append({
                "guest": kind, "cap_mbps": cap, "engine": "novacron", "total_s": m["total_s"],
                "downtime_ms": m["downtime_ms"], "wire_bytes": m["bytes_wire"],
                "rounds": st["round"], "compression_ratio": m["compression_ratio"],
                "dedup_ratio": m["dedup_ratio"], "downtime_parts": m.get("downtime_parts"),
                "cpu_s_source": m["cpu_s"], "cpu_s_destination": dm.get("cpu_s"),
                "cpu_s_per_gib": cpu / (args.memory_mb / 1024),
                "stop_scan": m.get("stop_scan"), "pipeline": m.get("pipeline"),
                "phase_seconds": m.get("phase_seconds"),
                "load_1m": os.getloadavg()[0],
            })  # fmt: skip
            await _wait_console(dst, name)
            src, dst = dst, src
    return rows


async def _wait_console(agent: Any, name: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, doc = await agent.request("GET", f"/v1/vms/{name}/console")
        if status == 200 and "NOVACRON-HB" in doc["text"]:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"guest {name} printed no heartbeat in {timeout}s")


async def _wait_migration(agent: Any, mid: str, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, st = await agent.request("GET", f"/v1/migrations/{mid}")
        if status == 200 and st["phase"] in ("completed", "failed", "cancelled"):
            return st
        await asyncio.sleep(0.1)
    raise RuntimeError(f"migration {mid} did not finish in {timeout}s")


# -- QEMU's own migration ------------------------------------------------------
async def _qemu(args: argparse.Namespace, kind: str, rate: int, caps: list[float],
                engines: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    from novacron.agent.guest import cache_root
    from novacron.agent.local import state_parent
    from novacron.agent.vm.accel import AccelDetector
    from novacron.agent.vm.images import ImageDirs
    from novacron.agent.vm.manager import VMManager

    # RAM files on /dev/shm, as our agents keep theirs
    root = Path(tempfile.mkdtemp(prefix="nc-bench-qemu-", dir=state_parent()))
    images = ImageDirs.of([cache_root()])  # the test guest's folder
    hosts = [VMManager(root / "x", AccelDetector(probe_kernels=[]), images=images),
             VMManager(root / "y", AccelDetector(probe_kernels=[]), images=images)]
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        for h in hosts:
            await h.load()
        name = f"bench-q{kind}"
        vm = await hosts[0].create(_spec(name, args, rate))
        await vm.wait_serial(r"NOVACRON-HB", timeout=180)
        src, dst = 0, 1
        for engine in engines:
            for cap in caps:
                try:
                    row = await _qemu_once(hosts[src], hosts[dst], name, engine, cap)
                except _Unsupported as exc:
                    notes.append(f"{engine}: not measured ({exc})")
                    break
                row["guest"] = kind
                row["cpu_s_per_gib"] = row.pop("cpu_s") / (args.memory_mb / 1024)
                row["load_1m"] = os.getloadavg()[0]
                rows.append(row)
                src, dst = dst, src
    finally:
        for h in hosts:
            await h.shutdown(stop_vms=True)
        shutil.rmtree(root, ignore_errors=True)
    return rows, notes


class _Unsupported(Exception):
    pass


async def _qemu_once(src_host: Any, dst_host: Any, name: str, engine: str, cap: float) -> dict[str, Any]:
    from novacron.agent.qmp import QMPError

    src = src_host.get(name)
    dvm = dst_host.new_vm(src.spec, src.accel, dst_host.paths(name))
    dvm.paths.dir.mkdir(parents=True)
    try:
        await dvm.start(incoming=True)
        assert src.qmp is not None and dvm.qmp is not None
        multifd = engine == "qemu-multifd-zstd"
        caps = {"capabilities": [{"capability": "multifd", "state": multifd}]}
        for q in (src.qmp, dvm.qmp):
            await q.execute("migrate-set-capabilities", caps)
            if multifd:
                try:
                    await q.execute("migrate-set-parameters",
                                    {"multifd-compression": "zstd", "multifd-channels": 2})
                except QMPError as exc:
                    raise _Unsupported(exc.desc) from None
        await dvm.qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        info = await dvm.qmp.execute("query-migrate")
        port = int(info["socket-address"][0]["port"])
        # cap, or lift QEMU's 128 MiB/s default so "uncapped" means the same for both
        await src.qmp.execute("migrate-set-parameters",
                              {"max-bandwidth": int(cap * MB) if cap else 1 << 40})
        relay = CountingRelay(port)
        stops, resumes = src.qmp.subscribe(["STOP"]), dvm.qmp.subscribe(["RESUME"])
        vcpus = [int(c["thread-id"]) for c in await src.qmp.execute("query-cpus-fast")]
        cpu0 = _qemu_cpu(src.pid, vcpus), _qemu_cpu(src.pid), _qemu_cpu(dvm.pid)
        try:
            await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{relay.port}"})
            while True:
                info = await src.qmp.execute("query-migrate")
                if info.get("status") == "completed":
                    break
                if info.get("status") in ("failed", "cancelled"):
                    raise RuntimeError(f"QEMU migration {info.get('status')}: {info.get('error-desc')}")
                await asyncio.sleep(0.01)
            while (await dvm.qmp.execute("query-status"))["status"] != "paused":
                await asyncio.sleep(0.005)
            wrote = relay.forward_bytes
            cpu1 = _qemu_cpu(src.pid, vcpus), _qemu_cpu(src.pid), _qemu_cpu(dvm.pid)
            await dvm.qmp.execute("cont")
            # both QEMUs stamp events with the host clock: pause -> resume, as for ours
            stopped, resumed = await stops.get(timeout=10), await resumes.get(timeout=10)
            downtime_ms = (_event_time(resumed) - _event_time(stopped)) * 1000.0
        finally:
            src.qmp.unsubscribe(stops)
            dvm.qmp.unsubscribe(resumes)
            await asyncio.to_thread(relay.close)
        dvm.state = "running"
        dvm.incoming = False
    except BaseException:
        with contextlib.suppress(Exception):
            await dvm.stop()
        shutil.rmtree(dvm.paths.dir, ignore_errors=True)
        raise
    await src.stop()
    shutil.rmtree(src.paths.dir, ignore_errors=True)
    src_host.forget(name)
    dst_host.register(dvm)
    return {
        "cap_mbps": cap, "engine": engine, "total_s": info["total-time"] / 1000.0,
        "downtime_ms": downtime_ms, "qemu_reported_downtime_ms": float(info["downtime"]),
        "wire_bytes": wrote,
        "ram_transferred": int(info["ram"]["transferred"]),
        "rounds": int(info["ram"].get("dirty-sync-count", 0)),
        # migration work only: the source's guest (vCPU threads) is not counted
        "cpu_s": (cpu1[1] - cpu0[1]) - (cpu1[0] - cpu0[0]) + (cpu1[2] - cpu0[2]),
    }


def _qemu_cpu(pid: int | None, threads: list[int] | None = None) -> float:
    """CPU seconds of QEMU process ``pid`` (exited threads included), or of the given threads."""
    if pid is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")

    def stat_cpu(path: str) -> float:
        with open(path) as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    if threads is None:
        return stat_cpu(f"/proc/{pid}/stat")
    total = 0.0
    for tid in threads:  # the vCPU threads, from query-cpus-fast
        with contextlib.suppress(OSError):
            total += stat_cpu(f"/proc/{pid}/task/{tid}/stat")
    return total


def _event_time(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


# -- report --------------------------------------------------------------------
def _report(args: argparse.Namespace, sizes: list[int], results: list[dict[str, Any]],
            notes: list[str]) -> Report:
    report = Report("migrate")
    table = report.table(
        f"Live migration of a TCG guest on loopback, {','.join(map(str, sizes))} MiB "
        f"(workload {args.workload_mb} MB, busy = {args.busy_rate} MB/s dirtied)",
        ["MiB", "guest", "cap MB/s", "engine", "total s", "after prepare s", "downtime ms", "wire MB",
         "rounds", "CPU s/GiB", "load", "time vs qemu-tcp", "wire vs qemu-tcp"],
    )
    ref = {(r["memory_mb"], r["guest"], r["cap_mbps"]): r for r in results if r["engine"] == "qemu-tcp"}
    for r in results:
        base = ref.get((r["memory_mb"], r["guest"], r["cap_mbps"]))
        t_ratio = r["total_s"] / base["total_s"] if base and base["total_s"] else None
        w_ratio = r["wire_bytes"] / base["wire_bytes"] if base and base["wire_bytes"] else None
        r["time_vs_qemu_tcp"], r["wire_vs_qemu_tcp"] = t_ratio, w_ratio
        # QEMU's total-time starts at 'migrate', its destination already running: ours
        # without the prepare phase (destination admission and QEMU start) compares like that
        r["after_prepare_s"] = r["total_s"] - float((r.get("phase_seconds") or {}).get("prepare", 0.0))
        table.add(r["memory_mb"], r["guest"], r["cap_mbps"] or "none", r["engine"], r["total_s"],
                  r["after_prepare_s"], r["downtime_ms"], r["wire_bytes"] / MB, r["rounds"], r.get("cpu_s_per_gib"),
                  r.get("load_1m"), t_ratio, w_ratio)
    report.data = {"memory_mb": sizes, "workload_mb": args.workload_mb,
                   "busy_rate_mb": args.busy_rate, "cap_mbps": args.cap, "results": results}
    report.notes += notes
    report.notes.append(
        "downtime: source pause to guest resumed at the destination (QEMU: its STOP and RESUME "
        "event timestamps; its own figure, which ends on the source, is in --json). wire: novacron = all frames "
        "written to the channel; QEMU = bytes through a counting splice relay (all streams). "
        "CPU s/GiB: both ends, per GiB of guest RAM (novacron: both agent processes; QEMU: source "
        "QEMU minus its vCPU threads plus the destination QEMU). load: 1-minute load average. "
        "after prepare: our total without the prepare phase (destination admission, RAM file and "
        "QEMU start), which QEMU's total-time leaves out (its destination is started before). "
        "Ratios < 1 favour novacron. --json adds our stop-phase scan (pages read while paused) "
        "and the compression choices per row.")
    return report
