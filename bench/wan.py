"""``novacron bench wan``: live migration over a slow link, our engine against QEMU's own.

It builds its own two "hosts": network namespaces A and B joined by a veth pair
whose both directions are paced by ``tc tbf`` (``--links``, in Mbit/s; this
kernel has no ``netem``, so no latency is added), plus a third namespace for the
harness, joined to each host by an unshaped link of its own, so the harness's
API calls and console reads never cross the shaped link (``_netns.WanPair``).
One ``novacron-agent`` runs in each host; QEMU's own migration (``qemu-tcp``,
``qemu-multifd-zstd``: ``bench migrate``'s driver) runs between a QEMU started in
A and one started in B, over the same veth. For each link, each case and each
engine, fresh guests (TCG) are booted in A and migrated to B:

- **single**: one guest with the realistic memory profile, while B already runs
  a guest of the same image (booted there first, running through every engine's
  row; before each of our engine's rows B indexes its RAM, ``POST
  /v1/host/dedup-index``, as before a drain): what destination-side dedup can use.
  ``novacron-nodedup`` is our engine with that dedup off, for the bytes it saves.
- **evacuation**: ``--vms`` realistic guests of the same image, all migrated to
  B at once (a host drain). Our engine gets one migration request per VM, sent
  together; QEMU one migration per VM, started together.
- **random**: one guest whose working set is random data, the worst case.

The realistic profile (``agent/guest``: ``novacron.profile=realistic``): the
image's page-cache set (kernel modules of the guest's own Debian kernel package,
48 MiB, identical in every VM of the image) and a working set of 30 % zero,
40 % text-like and 30 % random pages seeded per boot, so two VMs' heaps differ.

Per row: **total** (harness wall clock from the migration request, destination
preparation included, until the guest runs at B; evacuation: the longest of the
VMs' migrations, which start within one heartbeat of each other, and the wall
clock of the whole drain in ``--json``), **downtime** (the guest's own
heartbeat gap, as ``bench migrate`` measures it; evacuation: the worst VM),
**wire** (bytes the veth carried, both directions, from the kernel's counters in
each namespace: the same measure for every engine, TCP/IP and Ethernet headers
included), **CPU s** at each end (every process of that end, the agent and its
QEMUs or QEMU alone, guest vCPU threads left out, sampled every 100 ms over the
migration), the guests' own page check (``verify`` on the console at B, the same
boot, no bad page), and ratios to qemu-multifd-zstd on the same link and case.
The load average is shown at the start and the end. Everything it creates
(namespaces, agents, QEMUs, state folders on /dev/shm) goes, also on failure or
Ctrl-C. Needs root (namespaces, ``tc``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from novacron.bench._netns import WanPair, inside
from novacron.bench.migrate import (
    _agent_console,
    _first_boot,
    _ours_once,
    _qemu_once,
    _Unsupported,
    _vm_console,
)
from novacron.bench.report import Report

DESCRIPTION = ("WAN live migration through a tc-tbf shaped veth between two namespaces: novacron vs "
               "QEMU tcp and multifd+zstd; realistic guest with its image at the destination, N-VM "
               "evacuation, random guest")
# novacron-nodedup: our engine with destination-side dedup off (migration option
# dest_dedup: false), to show what the have/need exchange saves on the same guests
ENGINES = ("novacron", "novacron-nodedup", "qemu-tcp", "qemu-multifd-zstd")
OURS = {"novacron": {}, "novacron-nodedup": {"dest_dedup": False}}
CASES = ("single", "evacuation", "random")
REFERENCE = "qemu-multifd-zstd"
MB = 1_000_000
CPU_SAMPLE_S = 0.1  # how often each end's processes are read (an exiting source QEMU loses at most this)
VERIFY_S = 30  # the guests' background check interval: keeps their own CPU use low during the run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--links", default="1000,100,20",
                        help="link rates in Mbit/s, comma-separated, each run in turn (default 1000,100,20)")
    parser.add_argument("--memory-mb", type=int, default=256,
                        help="RAM of every guest in MiB (default 256; the realistic guest needs its "
                             "working set + 192, and 224 at least)")
    parser.add_argument("--workload-mb", type=int, default=0,
                        help="MiB working set the guest workload fills and checks (default 0: "
                             "--memory-mb - 192, at least 16)")
    parser.add_argument("--rate-mb", type=int, default=0,
                        help="MB/s each guest rewrites during the migration (default 0: idle)")
    parser.add_argument("--vms", type=int, default=4, help="guests in the evacuation case (default 4)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)} (default: all)")


def _choose(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in allowed]
    if bad or not out:
        raise SystemExit(f"novacron bench wan: {what} {bad or text!r}: choose from {','.join(allowed)}")
    return out


def _validate(args: argparse.Namespace) -> tuple[list[float], list[str], list[str]]:
    try:
        links = [float(x) for x in str(args.links).split(",") if x.strip()]
    except ValueError:
        raise SystemExit("novacron bench wan: --links takes comma-separated Mbit/s, e.g. 1000,100,20") from None
    if not links or any(not 1 <= x <= 10_000 for x in links):
        raise SystemExit("novacron bench wan: each link rate must be 1..10000 Mbit/s")
    engines = _choose(args.engines, ENGINES, "engines")
    cases = _choose(args.cases, CASES, "cases")
    from novacron.agent.guest.build import REALISTIC_EXTRA_MB, REALISTIC_MIN_MEMORY_MB

    if not args.workload_mb:
        args.workload_mb = max(16, args.memory_mb - REALISTIC_EXTRA_MB)
    if args.workload_mb < 1 or args.memory_mb < max(REALISTIC_MIN_MEMORY_MB, args.workload_mb + REALISTIC_EXTRA_MB):
        raise SystemExit(f"novacron bench wan: need --memory-mb >= --workload-mb + {REALISTIC_EXTRA_MB} and >= "
                         f"{REALISTIC_MIN_MEMORY_MB} (kernel and page-cache set of the realistic guest)")
    if not 1 <= args.vms <= 16:
        raise SystemExit("novacron bench wan: --vms must be 1..16")
    if args.rate_mb < 0:
        raise SystemExit("novacron bench wan: --rate-mb must be >= 0")
    if os.geteuid() != 0 or shutil.which("tc") is None:
        raise SystemExit("novacron bench wan: needs root and tc (iproute2) to build network namespaces")
    return links, engines, cases


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> Report:
    links, engines, cases = _validate(args)
    load_start = _load()
    print(f"novacron bench wan: load average at start {load_start}", file=sys.stderr)
    with WanPair(f"{os.getpid() % 100000}{secrets.token_hex(2)}") as net, inside(net.m):
        results, notes = asyncio.run(_run_all(args, net, links, engines, cases))
    load_end = _load()
    print(f"novacron bench wan: load average at end {load_end}", file=sys.stderr)
    return _report(args, links, results, notes, load_start, load_end, [net.a, net.b, net.m])


# -- processes of one end, and their CPU ---------------------------------------------
def _ticks(path: str) -> float:
    with open(path) as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_without_vcpus(pid: int, vcpus: dict[int, float]) -> float | None:
    """CPU seconds of process ``pid`` (exited threads included) less its guest vCPU
    threads (QEMU names them "CPU <n>/TCG" or "/KVM": ``debug-threads=on``); None once
    gone. ``vcpus`` keeps each vCPU thread's last figure across calls: a thread that
    exits (QEMU quitting) hands its time to the process total, and must still be left out."""
    try:
        total = _ticks(f"/proc/{pid}/stat")
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/comm") as f:
                    comm = f.read().strip()
                if comm.startswith("CPU ") and comm.endswith(("/TCG", "/KVM")):
                    vcpus[int(tid)] = _ticks(f"/proc/{pid}/task/{tid}/stat")
    except OSError:
        return None
    return total - sum(vcpus.values())


class CpuMeter:
    """CPU seconds of one end's processes over a window: those running at the start
    count from there, those started meanwhile (the destination's QEMU) from zero;
    sampled every ``CPU_SAMPLE_S`` so one that exits meanwhile (the source's QEMU)
    counts up to its last sample."""

    def __init__(self, pids: Callable[[], list[int]], exclude: set[int] | None = None) -> None:
        self._pids = pids
        self._exclude = exclude or set()
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._vcpus: dict[int, dict[int, float]] = {}  # pid -> vCPU thread -> its last CPU seconds
        self._task: asyncio.Task[None] | None = None

    def _sample(self, *, discover: bool) -> None:
        if discover:
            for pid in self._pids():
                if pid not in self._base and pid not in self._exclude:
                    self._base[pid] = self._last[pid] = 0.0
        for pid in self._base:
            if (v := cpu_without_vcpus(pid, self._vcpus.setdefault(pid, {}))) is not None:
                self._last[pid] = v

    def start(self) -> None:
        for pid in self._pids():
            if pid not in self._exclude and (v := cpu_without_vcpus(pid, self._vcpus.setdefault(pid, {}))) is not None:
                self._base[pid] = self._last[pid] = v
        self._task = asyncio.create_task(self._run(), name="cpu-meter")

    async def _run(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(CPU_SAMPLE_S)
            n += 1
            self._sample(discover=n % 5 == 0)  # finding new processes scans /proc: less often

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sample(discover=True)
        return sum(self._last[p] - self._base[p] for p in self._base)


# -- the run ------------------------------------------------------------------
def _spec(name: str, args: argparse.Namespace, profile: str) -> dict[str, Any]:
    from novacron.agent.guest import ensure_guest

    g = ensure_guest()
    return {
        "name": name, "vcpus": 1, "memory_mb": args.memory_mb, "accel": "tcg",
        "kernel": str(g.kernel), "initrd": str(g.initrd_for(profile)),
        "cmdline": g.workload_cmdline(mem_mb=args.workload_mb, rate_mb=args.rate_mb, verify_s=VERIFY_S,
                                      profile=profile),
    }  # fmt: skip


def _fits(n_vms: int, memory_mb: int) -> str:
    """Why ``n_vms`` guests' RAM files cannot be had now, or ''."""
    need = n_vms * memory_mb * (1 << 20) + (1 << 30)
    shm = os.statvfs("/dev/shm")
    free_shm = shm.f_bavail * shm.f_frsize
    with open("/proc/meminfo") as f:
        avail = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), 0)
    if min(free_shm, avail) < need:
        return (f"{n_vms} RAM files of {memory_mb} MiB need {need >> 20} MiB; /dev/shm has "
                f"{free_shm >> 20} MiB free, {avail >> 20} MiB of memory available")
    return ""


async def _run_all(args: argparse.Namespace, net: WanPair, links: list[float], engines: list[str],
                   cases: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    from novacron.agent.guest import cache_root, ensure_guest
    from novacron.agent.local import LocalAgent, state_parent
    from novacron.agent.vm.accel import AccelDetector
    from novacron.agent.vm.images import ImageDirs
    from novacron.agent.vm.manager import VMManager

    await asyncio.to_thread(ensure_guest)  # built (and cached) before anything is timed
    secret = secrets.token_urlsafe(32)
    agents = (LocalAgent("wan-a", cluster_secret=secret, accel="tcg", netns=net.a, address=net.a_addr),
              LocalAgent("wan-b", cluster_secret=secret, accel="tcg", netns=net.b, address=net.b_addr))
    root = Path(tempfile.mkdtemp(prefix="nc-bench-wan-", dir=state_parent()))
    images = ImageDirs.of([cache_root()])
    hosts = (VMManager(root / "a", AccelDetector(probe_kernels=[]), images=images),
             VMManager(root / "b", AccelDetector(probe_kernels=[]), images=images))
    ctx = _Ctx(args, net, agents, hosts)
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    try:
        for agent in agents:
            await agent.start()
        for h in hosts:
            await h.load()
        for mbit in links:
            await asyncio.to_thread(net.shape, mbit)
            for case in cases:
                n = args.vms if case == "evacuation" else 1
                if why := _fits(2 * n + (case == "single"), args.memory_mb):
                    notes.append(f"{mbit:g} Mbit/s {case}: not run ({why})")
                    continue
                resident = await ctx.boot_resident() if case == "single" else None
                try:
                    for engine in engines:
                        if engine in ctx.unsupported:
                            continue
                        try:
                            row = await ctx.case(engine, case, n)
                        except Exception as exc:  # a row that broke is shown failed; the run goes on
                            row = _broken_row(engine, n, f"{type(exc).__name__}: {exc}")
                        if row is None:
                            notes.append(f"{engine}: not measured ({ctx.unsupported[engine]})")
                            continue
                        row.update(link_mbit=mbit, case=case, load_1m=os.getloadavg()[0])
                        results.append(row)
                finally:
                    if resident is not None:
                        with contextlib.suppress(Exception):
                            await agents[1].request("DELETE", f"/v1/vms/{resident}")
    finally:
        for h in hosts:
            with contextlib.suppress(Exception):
                await h.shutdown(stop_vms=True)
        for agent in agents:
            await agent.stop()
        shutil.rmtree(root, ignore_errors=True)
    return results, notes


def _broken_row(engine: str, n: int, why: str) -> dict[str, Any]:
    """The row of a case that raised before it had figures (its guests are cleaned up)."""
    return {"engine": engine, "vms": n, "total_s": None, "wall_s": None, "downtime_ms": None,
            "wire_bytes": None, "engine_wire_bytes": [], "cpu_s_source": None, "cpu_s_destination": None,
            "failed": True, "verify": "FAILED", "verify_detail": why, "per_vm": []}


def _reader(fn: Callable[..., Awaitable[tuple[str, int]]], *first: Any
            ) -> Callable[[int], Awaitable[tuple[str, int]]]:
    """A console reader (offset -> (text, next offset)) bound to one guest."""
    return lambda off: fn(*first, off)


class _Ctx:
    def __init__(self, args: argparse.Namespace, net: WanPair, agents: tuple[Any, Any],
                 hosts: tuple[Any, Any]) -> None:
        self.args, self.net, self.agents, self.hosts = args, net, agents, hosts
        self.unsupported: dict[str, str] = {}
        self._ns_lock = asyncio.Lock()
        self._seq = 0

    def _names(self, case: str, n: int) -> list[str]:
        self._seq += 1
        return [f"wan{self._seq}-{case[:4]}-{i}" for i in range(n)]

    @contextlib.asynccontextmanager
    async def in_ns(self, ns: str) -> AsyncIterator[None]:
        """The event loop's thread inside ``ns`` while a QEMU is spawned there (it inherits
        the namespace); one at a time, as the thread has one namespace."""
        async with self._ns_lock:
            with inside(ns):
                yield

    async def boot_resident(self) -> str:
        """A realistic guest of the same image already running at the destination."""
        name = self._names("resident", 1)[0]
        b = self.agents[1]
        status, doc = await b.request("POST", "/v1/vms", _spec(name, self.args, "realistic"))
        if status != 201:
            raise RuntimeError(f"cannot create the resident guest at the destination: {doc}")
        await _first_boot(lambda off: _agent_console(b, name, off), name)
        return name

    async def case(self, engine: str, case: str, n: int) -> dict[str, Any] | None:
        profile = "random" if case == "random" else "realistic"
        if engine in OURS:
            return await self._ours(engine, case, n, profile)
        return await self._qemu(engine, case, n, profile)

    async def _measure(self, ends: tuple[Callable[[], list[int]], Callable[[], list[int]]],
                       migrate: Callable[[], Any], exclude: set[int]) -> dict[str, Any]:
        wire0 = await asyncio.to_thread(self.net.wire_bytes)
        meters = [CpuMeter(ends[0]), CpuMeter(ends[1], exclude)]
        for m in meters:
            m.start()
        t0 = time.monotonic()
        try:
            rows = await migrate()
        finally:
            cpu = [await m.stop() for m in meters]
        wall = time.monotonic() - t0
        wire = await asyncio.to_thread(self.net.wire_bytes) - wire0
        failed = [r for r in rows if r["failed"]]
        pauses = [r["pause_ms"] for r in rows if r["pause_ms"] is not None]
        return {
            "vms": len(rows), "total_s": max(r["total_s"] for r in rows), "wall_s": wall,
            "downtime_ms": max(pauses) if len(pauses) == len(rows) else None,
            "wire_bytes": wire, "engine_wire_bytes": [r["wire_bytes"] for r in rows],
            "cpu_s_source": cpu[0], "cpu_s_destination": cpu[1],
            "failed": bool(failed),
            "verify": "ok" if not failed else "FAILED",
            "verify_detail": "; ".join(f"{r['name']}: {r['verify_detail']}" for r in (failed or rows)),
            "per_vm": rows,
        }

    # -- our engine: two agents ------------------------------------------------
    async def _ours(self, engine: str, case: str, n: int, profile: str) -> dict[str, Any]:
        a, b = self.agents
        names = self._names(case, n)
        for name in names:
            status, doc = await a.request("POST", "/v1/vms", _spec(name, self.args, profile))
            if status != 201:
                raise RuntimeError(f"cannot create guest {name}: {doc}")
        boots = await asyncio.gather(*(_first_boot(_reader(_agent_console, a, name), name) for name in names))
        resident = set(b.qemu_pids())  # the destination's own guest is no part of the migration
        # the destination indexes the RAM of the guests it runs (the resident one) before
        # the migration starts, as before a drain; otherwise it would learn it meanwhile
        status, index = await b.request("POST", "/v1/host/dedup-index", timeout=300.0)
        if status != 200:
            raise RuntimeError(f"destination could not index its guests' RAM: {index}")

        async def migrate() -> list[dict[str, Any]]:
            rows = await asyncio.gather(*(_ours_once(a, b, name, 0.0, boot, "abort", OURS[engine])
                                          for name, boot in zip(names, boots, strict=True)))
            for name, row in zip(names, rows, strict=True):
                row["name"] = name
            return list(rows)

        def ends(agent: Any) -> Callable[[], list[int]]:
            return lambda: [p for p in (agent.pid, *agent.qemu_pids()) if p]

        try:
            row = await self._measure((ends(a), ends(b)), migrate, resident)
        finally:
            for name in names:
                for agent in (a, b):
                    with contextlib.suppress(Exception):
                        await agent.request("DELETE", f"/v1/vms/{name}")
        row["engine"] = engine
        row["dedup_index"] = index  # the destination's index when the migration started
        dd = [r.get("dest_dedup") or {} for r in row["per_vm"]]
        row["dedup_offered"] = sum(int(d.get("offered", 0)) for d in dd)
        row["dedup_hits"] = sum(int(d.get("hits", 0)) for d in dd)  # pages copied at the destination
        return row

    # -- QEMU's own migration, bench migrate's driver -------------------------------
    async def _qemu(self, engine: str, case: str, n: int, profile: str) -> dict[str, Any] | None:
        from novacron.agent.vm.recovery import qemus_under

        src, dst = self.hosts
        names = self._names(case, n)
        vms = []
        try:
            for name in names:
                async with self.in_ns(self.net.a):
                    vms.append(await src.create(_spec(name, self.args, profile)))
            boots = await asyncio.gather(*(_first_boot(_reader(_vm_console, vm), vm.name) for vm in vms))

            async def migrate() -> list[dict[str, Any]]:
                rows = await asyncio.gather(*(
                    # no cancel: over a slow link QEMU's pre-copy takes minutes, idle guests converge
                    _qemu_once(src, dst, name, engine, 0.0, boot, 3600.0, dest_addr=self.net.b_addr, relay=False,
                               dest_ns=lambda: self.in_ns(self.net.b))
                    for name, boot in zip(names, boots, strict=True)), return_exceptions=True)
                for r in rows:
                    if isinstance(r, BaseException):
                        raise r
                out = [dict(r) for r in rows if isinstance(r, dict)]
                for name, row in zip(names, out, strict=True):
                    row["name"] = name
                return out

            def ends(host: Any) -> Callable[[], list[int]]:
                return lambda: [p.pid for procs in qemus_under(host.vms_dir).values() for p in procs]

            try:
                row = await self._measure((ends(src), ends(dst)), migrate, set())
            except _Unsupported as exc:
                self.unsupported[engine] = str(exc)
                return None
        finally:
            for host in (src, dst):
                for name in names:
                    if (vm := host.vms.get(name)) is not None:
                        with contextlib.suppress(Exception):
                            await vm.stop()
                        shutil.rmtree(vm.paths.dir, ignore_errors=True)
                        host.forget(name)
        row["engine"] = engine
        return row


# -- report --------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _report(args: argparse.Namespace, links: list[float], results: list[dict[str, Any]], notes: list[str],
            load_start: str, load_end: str, namespaces: list[str]) -> Report:
    report = Report("wan")
    table = report.table(
        f"Live migration over a tbf-shaped veth between two namespaces, TCG guests of {args.memory_mb} MiB "
        f"(working set {args.workload_mb} MiB, {args.rate_mb} MB/s dirtied; evacuation: {args.vms} VMs); "
        f"load average at start {load_start}",
        ["link Mbit/s", "case", "engine", "VMs", "guest check", "total s", "downtime ms (guest)", "wire MB",
         "CPU s source", "CPU s dest", "load", f"time vs {REFERENCE}", f"downtime vs {REFERENCE}",
         f"wire vs {REFERENCE}", "pages copied at dest / offered", "wire vs novacron-nodedup"],
    )
    ref = {(r["link_mbit"], r["case"]): r for r in results if r["engine"] == REFERENCE and not r["failed"]}
    nodd = {(r["link_mbit"], r["case"]): r for r in results if r["engine"] == "novacron-nodedup" and not r["failed"]}
    for r in results:
        base = None if r["failed"] else ref.get((r["link_mbit"], r["case"]))
        r["time_vs_ref"] = _ratio(r["total_s"], base["total_s"]) if base else None
        r["downtime_vs_ref"] = _ratio(r["downtime_ms"], base["downtime_ms"]) if base else None
        r["wire_vs_ref"] = _ratio(r["wire_bytes"], base["wire_bytes"]) if base else None
        off = None if r["failed"] or r["engine"] != "novacron" else nodd.get((r["link_mbit"], r["case"]))
        r["wire_vs_nodedup"] = _ratio(r["wire_bytes"], off["wire_bytes"]) if off else None
        hits = f"{r['dedup_hits']} / {r['dedup_offered']}" if "dedup_hits" in r else "-"
        table.add(f"{r['link_mbit']:g}", r["case"], r["engine"], r["vms"],
                  "ok" if not r["failed"] else f"FAILED: {r['verify_detail']}", r["total_s"], r["downtime_ms"],
                  None if r["wire_bytes"] is None else r["wire_bytes"] / MB, r["cpu_s_source"], r["cpu_s_destination"], r["load_1m"],
                  r["time_vs_ref"], r["downtime_vs_ref"], r["wire_vs_ref"], hits, r["wire_vs_nodedup"])
    failed = [r for r in results if r["failed"]]
    report.data = {
        "links_mbit": links, "memory_mb": args.memory_mb, "workload_mb": args.workload_mb,
        "rate_mb": args.rate_mb, "vms": args.vms, "reference": REFERENCE, "results": results,
        "guest_checks": {"rows": len(results), "failed": len(failed)},
        "load_average": {"start": load_start, "end": load_end}, "namespaces": namespaces,
    }  # fmt: skip
    report.notes += notes
    report.notes.append(
        f"guest check: {len(results) - len(failed)} of {len(results)} rows passed the guests' own page "
        f"check; {len(failed)} failed" + (" (excluded from every ratio)" if failed else "") + ".")
    report.notes.append(
        "single: one realistic guest while the destination runs another of the same image; evacuation: "
        "N realistic guests migrated at once; random: a random-memory guest. total: from the migration "
        "request (destination preparation included) until the guest runs at the destination; evacuation: "
        "the longest VM. downtime: the guest's own heartbeat gap (worst VM). wire: bytes through the shaped "
        "veth, both directions, from its kernel counters. CPU s: every process of that end (agent and its "
        "QEMUs, or QEMU), guest vCPU threads left out. Ratios < 1 favour the row's engine. "
        "novacron-nodedup: our engine with destination-side dedup off (dest_dedup: false); before each "
        "of our rows the destination indexes its running guests' RAM (POST /v1/host/dedup-index, not "
        "timed); pages copied at dest: pages the destination copied from what it held instead of "
        "receiving them (all VMs of the row).")
    report.notes.append(f"load average at start {load_start}, at end {load_end}.")
    return report


__all__ = ["CpuMeter", "cpu_without_vcpus", "run"]
