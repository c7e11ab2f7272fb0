"""``novacron bench migrate``: our live migration against QEMU's own, same guest.

Every case boots the test guest (TCG) with the same spec and migrates it
between two hosts on loopback:

- **novacron**: two real ``novacron-agent`` processes; the engine copies RAM
  from the shared RAM file (fingerprint dirty tracking, zero skip, dedup,
  zstd, AES-256-GCM) and QEMU sends only device state (``x-ignore-shared``).
- **qemu-tcp**: QEMU's native pre-copy over TCP with default settings.
- **qemu-autoconverge**: QEMU's pre-copy with its ``auto-converge`` capability
  (it throttles the vCPUs when the guest dirties faster than the link).
- **qemu-multifd-zstd**: QEMU's multifd (2 channels) with zstd, when this QEMU
  has it.
- **qemu-postcopy**: QEMU's pre-copy with ``postcopy-ram``; when it has not
  converged after ``POSTCOPY_AFTER_SYNCS`` passes over RAM the harness issues
  ``migrate-start-postcopy`` and the guest runs at the destination while the
  rest of its RAM arrives.

Every row says whether pre-copy converged (reached the 300 ms budget on its
own), the policy taken when it did not, and the pause against the budget. Our
engine's policy is ``--policy`` (``abort``: the guest stays on the source and
the row says so; ``force``: stop-and-copy with a longer pause, reported).
QEMU's plain pre-copy engines never stop trying: the harness cancels one still
running after ``--qemu-timeout`` seconds (policy ``cancel``, the guest stays on
the source). A row whose guest stayed at the source by its policy, with its
page check passing, is not a failure, but has no total time to compare.

Idle (workload dirtying nothing) and busy guests (one case per ``--busy-rate``;
the rate the guest really dirtied, from its heartbeats' ``dirtied_mb``, is in
each row), uncapped and capped (``--cap``
MB/s on both engines: our ``bandwidth_mbps``, QEMU's ``max-bandwidth``; ``--cap 0``
runs uncapped only), for each ``--memory-mb`` size (a size whose two RAM files do
not fit in /dev/shm and free memory is skipped, with a note). Both engines keep
guest RAM on /dev/shm (QEMU's hosts live beside our agents' state).
"Uncapped" lifts QEMU's default 128 MiB/s ``max-bandwidth``; QEMU's downtime
limit and ours are both 300 ms.

Every migration of every engine is checked by the guest itself: after the
guest runs at the destination the harness types ``verify`` on its serial
console and reads the workload's full page check (``NOVACRON-VERIFY``), and
the destination's console must show the same boot, no ``NOVACRON-BAD`` page
and ``ok=1`` heartbeats. A row whose guest failed (or whose migration failed)
is shown as failed, counted in a summary line and left out of every ratio;
the guest is booted afresh before the next case.

Each engine's two ends run in sessions of their own, so each gets its own
scheduler autogroup on a busy machine: every QEMU (``VM.start``) and each of our
two agents (``LocalAgent(own_session=True)``).

Figures, measured the same way for both engines:

- **total**: harness wall clock from the start of destination preparation
  (our ``POST /v1/migrations``, which prepares the destination; QEMU: starting
  the destination QEMU with ``-incoming``) until the guest runs at the
  destination. QEMU: until the harness's ``cont`` there returned. Ours: the
  request's time plus the engine's ``resumed_s`` (from the start it stamps
  inside that request until the destination confirmed it runs the guest), an
  upper bound that does not wait for the harness's status poll. Both include
  the destination's preparation (its QEMU start among it); neither includes
  stopping the source's copy.
- **total+release** (``total_released_s``; until 2026-12-01 ours was reported
  this way as ``total``): until the source's copy is stopped and its files
  removed as well. Ours: the request's time plus the engine's ``total_s``
  (until its status said ``completed``: journal commit, source QEMU stopped;
  the harness polls the status every 100 ms, which no figure depends on); QEMU: the
  harness stopped the source QEMU and removed its folder after the resume.
  Each engine's own figure (ours: the status's ``total_s``; QEMU: ``query-migrate`` ``total-time``, which excludes the
  destination's start and ends before the resume) is in ``--json`` as
  ``engine_total_s``.
- **pause**: the guest's own heartbeat gap. The workload prints a heartbeat
  with its uptime once a second; the guest's clocks stand still while it is
  paused, so for consecutive heartbeats (host arrival gap) - (guest uptime
  gap) is the time the guest stood still. The harness polls the source's and
  the destination's serial logs every 5 ms and takes the largest such excess
  during the migration (resolution: the poll interval plus host scheduling).
  Beside it: the engine's own downtime figure (ours: source pause until the
  destination confirmed running; QEMU: ``query-migrate`` ``downtime``) and,
  for QEMU, its STOP -> RESUME event timestamps (``qemu_event_downtime_ms``).
- **after prepare**: total minus the destination's preparation (ours: the
  engine's ``prepare`` phase, destination admission, RAM file and QEMU start;
  QEMU: starting the destination QEMU with ``-incoming`` until the harness
  issues ``migrate``): the copy and switch-over alone.
- **wire**: ours: every frame written to the channel; QEMU: the bytes of its
  migration streams, counted by a splice relay in front of the destination,
  all multifd streams included.
- **CPU s/GiB**: CPU seconds per GiB of guest RAM on both ends together; ours:
  both agent processes (every thread); QEMU: the source QEMU minus its vCPU
  threads, plus the whole destination QEMU (its guest is paused), both from
  /proc. **load**: the 1-minute load average when the row finished.
- ``--json`` adds our stop-phase scan (pages read while paused) and pipeline
  (compression choices) per row.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import secrets
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novacron.bench import _migrate_disk
from novacron.bench._relay import CountingRelay
from novacron.bench.report import Report

DESCRIPTION = "live migration: novacron engine vs QEMU native (tcp, multifd+zstd), idle/busy, capped/uncapped"
EPILOG = ("total s: from the start of the destination's preparation (our POST /v1/migrations; QEMU: "
          "starting its -incoming QEMU) until the guest runs at the destination, for every engine "
          "(ours: the request's time plus the engine's resumed_s stamp). total+release s: until the "
          "source's copy is stopped and removed as well (what our total measured until 2026-12-01). "
          "after prepare s: total minus the destination's preparation.")
MB = 1_000_000
HB = re.compile(r"NOVACRON-HB boot=(\w+) seq=(\d+) uptime=([\d.]+) ok=(\d)")
DIRTIED = re.compile(r"uptime=([\d.]+) .*dirtied_mb=(\d+)")
VERIFY = re.compile(r"NOVACRON-VERIFY boot=(\w+) pages=\d+ bad=(\d+) result=(\w+)")
HB_POLL_S = 0.005  # how often the serial logs are read for heartbeats (the pause's resolution)
VERIFY_TIMEOUT_S = 60.0  # a guest that does not answer ``verify`` by then failed (crashed or hung)
BUDGET_MS = 300.0  # downtime budget of both engines (QEMU's default downtime-limit)
ENGINES = ("novacron", "qemu-tcp", "qemu-autoconverge", "qemu-multifd-zstd", "qemu-postcopy")
POLICIES = ("abort", "force", "postcopy")  # ours; the engine refuses what it does not implement
POSTCOPY_AFTER_SYNCS = 3  # QEMU post-copy: passes over RAM pre-copy gets before the switch

# Test seam: called with (engine, destination RAM file) after QEMU's migration
# completed and before the destination resumes; a test corrupts guest RAM here
# to prove a broken migration is caught. Never set outside tests.
DEST_RAM_HOOK: Callable[[str, Path], None] | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-mb", default="256",
                        help="guest RAM in MiB, comma-separated sizes run one after another "
                             "(default 256; e.g. 256,1024,4096)")
    parser.add_argument("--workload-mb", type=int, default=96,
                        help="MB of memory the guest workload fills and checks (default 96)")
    parser.add_argument("--busy-rate", default="16",
                        help="MB/s the busy guest dirties, comma-separated rates run one after another "
                             "(default 16; e.g. 16,64,128)")
    parser.add_argument("--cap", type=float, default=50.0,
                        help="bandwidth cap in MB/s for the capped runs; 0 runs uncapped only (default 50)")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated subset of {','.join(ENGINES)} (default: all)")
    parser.add_argument("--policy", default="abort", choices=POLICIES,
                        help="our engine's policy when pre-copy cannot reach the 300 ms budget: abort "
                             "(guest stays on the source) or force (longer pause, reported) (default abort)")
    parser.add_argument("--qemu-timeout", type=float, default=60.0,
                        help="seconds after which a QEMU pre-copy that has not converged is cancelled "
                             "(the guest stays on the source; default 60)")
    parser.add_argument("--guests", default="idle,busy", help="comma-separated subset of idle,busy (default: both)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole matrix this many times, one pass after another, and report "
                             "each cell's median (--json keeps every run; default 1)")
    _migrate_disk.add_arguments(parser)  # --disk-gb: the local-disk case (bench/_migrate_disk.py)
    parser.add_argument("--hypervisor", choices=("qemu", "libvirt"), default="qemu",
                        help="qemu: agents run QEMU, compared with QEMU's own migration; libvirt: two "
                             "libvirtd daemons, libvirt's own engine against ours on the same domain "
                             "(--engines ignored; needs root and libvirtd) (default qemu)")


def run(args: argparse.Namespace) -> Report:
    # defaults for callers that build the namespace themselves (tests)
    args = argparse.Namespace(**{"policy": "abort", "qemu_timeout": 60.0, "repeat": 1, **vars(args)})
    if not 1 <= args.repeat <= 20:
        raise SystemExit("novacron bench migrate: --repeat must be 1..20")
    if args.repeat > 1 and (getattr(args, "disk_gb", 0) or getattr(args, "hypervisor", "qemu") == "libvirt"):
        raise SystemExit("novacron bench migrate: --repeat applies to the QEMU RAM matrix only "
                         "(not --disk-gb or --hypervisor libvirt)")
    if getattr(args, "disk_gb", 0):
        return _migrate_disk.run(args)
    if args.policy not in POLICIES:
        raise SystemExit(f"novacron bench migrate: --policy must be one of {', '.join(POLICIES)}")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    guests = [g.strip() for g in args.guests.split(",") if g.strip()]
    for e in engines:
        if e not in ENGINES:
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
    try:
        rates = [int(r) for r in str(args.busy_rate).split(",") if r.strip()]
    except ValueError:
        raise SystemExit("novacron bench migrate: --busy-rate takes comma-separated integers") from None
    if "busy" in guests and (not rates or any(not 1 <= r <= 10_000 for r in rates)):
        raise SystemExit("novacron bench migrate: each --busy-rate must be 1..10000 MB/s")
    if args.cap < 0:
        raise SystemExit("novacron bench migrate: --cap must be >= 0")
    if not 1 <= args.qemu_timeout <= 3600:
        raise SystemExit("novacron bench migrate: --qemu-timeout must be 1..3600 s")
    args = argparse.Namespace(**{**vars(args), "busy_rates": rates})
    if getattr(args, "hypervisor", "qemu") == "libvirt":
        from novacron.bench import _migrate_libvirt as migrate_libvirt

        return migrate_libvirt.run(args, sizes, guests)
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    fitting = []
    for mem in sizes:  # decided once: every cell gets all its passes or none
        if why := _does_not_fit(mem):
            notes.append(f"{mem} MiB: not run ({why})")
        else:
            fitting.append(mem)
    # whole passes one after another: a drift of the machine's load spreads over every cell
    for rep in range(args.repeat):
        for mem in fitting:
            rows, more = asyncio.run(_run_all(argparse.Namespace(**{**vars(args), "memory_mb": mem}),
                                              engines, guests))
            for r in rows:
                r["memory_mb"], r["run"] = mem, rep + 1
            results += rows
            notes += [n for n in more if n not in notes]
    return _report(args, sizes, results, notes)


MEDIAN_FIELDS = ("total_s", "total_released_s", "prepare_s", "after_prepare_s", "pause_ms", "engine_downtime_ms",
                 "downtime_ms", "engine_total_s", "complete_s", "wire_bytes", "rounds", "cpu_s_per_gib", "load_1m",
                 "dirty_mb_s")
# per-run detail that has no median: kept in 'runs' only
PER_RUN_FIELDS = ("run", "downtime_parts", "phase_seconds", "prepare_parts", "prepare_parts_destination",
                  "stop_scan", "pipeline", "round_log", "estimate_parts", "wire_parts", "native", "error",
                  "qemu_event_downtime_ms", "qemu_reported_downtime_ms", "compression_ratio", "dedup_ratio")


def _cell_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return r["memory_mb"], r["guest"], r.get("busy_rate_mb", 0), r["cap_mbps"]


def _medians(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell and engine: the median of each figure over the runs that moved
    the guest and passed its check (else those that moved, else all), every run's pause
    and total beside it. A cell whose runs ended differently says so in its policy
    (e.g. ``postcopy ×2; abort ×1``) and in ``runs_moved``."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in results:
        r.setdefault("after_prepare_s", r["total_s"] - r["prepare_s"])  # per run, then its median
        groups.setdefault((*_cell_key(r), r["engine"]), []).append(r)
    out: list[dict[str, Any]] = []
    for runs in groups.values():
        moved = [r for r in runs if r["migrated"]]
        use = [r for r in moved if not r["failed"]] or moved or runs
        row = {k: v for k, v in use[0].items() if k not in PER_RUN_FIELDS}
        for f in MEDIAN_FIELDS:
            vals = [r[f] for r in use if r.get(f) is not None]
            row[f] = statistics.median(vals) if vals else None
        row["runs"], row["runs_moved"], row["runs_in_median"] = len(runs), len(moved), len(use)
        row["runs_pause_ms"] = [r["pause_ms"] for r in runs]
        row["runs_total_s"] = [r["total_s"] if r["migrated"] else None for r in runs]
        bad = [r for r in runs if r["failed"]]
        row["failed"] = bool(bad)
        row["verify"] = "ok" if not bad else "FAILED"
        row["verify_detail"] = "; ".join(f"run {r['run']}: {r['verify_detail']}" for r in bad) or "ok"
        row["migrated"] = len(moved) == len(runs)
        if row.get("converged") is not None:
            row["converged"] = all(r.get("converged") for r in runs)
        if row.get("throttle_pct") is not None:
            row["throttle_pct"] = max(r.get("throttle_pct") or 0 for r in runs)
        policies = collections.Counter(str(r.get("policy") or "?") for r in runs)
        if len(policies) > 1:
            row["policy"] = "; ".join(f"{p} ×{n}" for p, n in policies.most_common())
        out.append(row)
    return out


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
    cases = [(kind, rate) for kind in guests for rate in ([0] if kind == "idle" else args.busy_rates)]
    for kind, rate in cases:
        rows = []
        if "novacron" in engines:
            rows += await _ours(args, kind, rate, caps)
        qemu = [e for e in engines if e.startswith("qemu")]
        if qemu:
            qrows, qnotes = await _qemu(args, kind, rate, caps, qemu)
            rows += qrows
            notes += [n for n in qnotes if n not in notes]
        for r in rows:
            r["guest"], r["busy_rate_mb"], r["budget_ms"] = kind, rate, BUDGET_MS
        results += rows
    return results, notes


# -- what the guest says -----------------------------------------------------------
@dataclass
class _Beat:
    seq: int
    uptime: float
    arrived: float  # host monotonic clock when the harness read the line
    dirtied_mb: int | None = None  # the workload's own count of MB written so far


@dataclass
class HeartbeatWatch:
    """Reads serial log files as they grow and stamps each heartbeat with the
    host clock: the guest's stand-still is measured the same way for every engine."""

    paths: list[Path]
    beats: dict[int, _Beat] = field(default_factory=dict)
    _pos: dict[Path, int] = field(default_factory=dict)
    _rest: dict[Path, bytes] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def add(self, path: Path) -> None:
        if path not in self.paths:
            self.paths.append(path)

    def start(self) -> None:
        for path in self.paths:  # only what the guest prints from now on counts
            with contextlib.suppress(OSError):
                self._pos[path] = path.stat().st_size
        self._task = asyncio.create_task(self._run(), name="heartbeat-watch")

    async def beat_after(self, t: float, timeout: float = 5.0) -> None:
        """Until a heartbeat read after host time ``t`` follows one it saw before:
        only then does some pair of consecutive heartbeats span the pause."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(b.arrived > t and b.seq - 1 in self.beats for b in self.beats.values()):
                return
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.poll()

    async def _run(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(HB_POLL_S)

    def poll(self) -> None:
        now = time.monotonic()
        for path in list(self.paths):
            try:
                with open(path, "rb") as f:
                    f.seek(self._pos.get(path, 0))
                    chunk = f.read()
            except OSError:
                continue  # not created yet, or removed with the source's folder
            if not chunk:
                continue
            self._pos[path] = self._pos.get(path, 0) + len(chunk)
            data = self._rest.pop(path, b"") + chunk
            *lines, rest = data.split(b"\n")
            if rest:
                self._rest[path] = rest
            for line in lines:
                text = line.decode(errors="replace")
                m = HB.search(text)
                if m and int(m.group(2)) not in self.beats:
                    d = DIRTIED.search(text)
                    self.beats[int(m.group(2))] = _Beat(int(m.group(2)), float(m.group(3)), now,
                                                        int(d.group(2)) if d else None)

    def dirty_mb_s(self) -> float | None:
        """MB/s the guest really dirtied while watched, by its own count and clock
        (a throttled guest dirties less than asked; None: too few heartbeats)."""
        beats = [b for b in sorted(self.beats.values(), key=lambda b: b.seq) if b.dirtied_mb is not None]
        if len(beats) < 2 or beats[-1].uptime <= beats[0].uptime:
            return None
        assert beats[-1].dirtied_mb is not None and beats[0].dirtied_mb is not None
        return (beats[-1].dirtied_mb - beats[0].dirtied_mb) / (beats[-1].uptime - beats[0].uptime)

    def pause_ms(self) -> float | None:
        """The longest time the guest stood still between two consecutive heartbeats
        (None: no two consecutive ones were seen)."""
        gaps = [(b.arrived - a.arrived) - (b.uptime - a.uptime)
                for a in self.beats.values() if (b := self.beats.get(a.seq + 1)) is not None]
        return max(0.0, max(gaps)) * 1000.0 if gaps else None


@dataclass
class GuestCheck:
    ok: bool
    detail: str


async def check_guest(read: Callable[[int], Awaitable[tuple[str, int]]],
                      send: Callable[[str], Awaitable[None]], boot: str) -> GuestCheck:
    """The guest's own verdict at the destination: a full page check on request,
    the same boot, no bad page reported, heartbeats saying ok=1."""
    text, offset = await read(0)
    try:
        await send("verify\n")
    except Exception as exc:
        return GuestCheck(False, f"cannot type on the console: {exc}")
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    verdict = None
    while verdict is None:
        chunk, offset = await read(offset)
        text += chunk
        verdict = VERIFY.search(text)
        if verdict is None:
            if time.monotonic() > deadline:
                return GuestCheck(False, f"no page check answer in {VERIFY_TIMEOUT_S:.0f} s "
                                         "(guest crashed or hung)")
            await asyncio.sleep(0.2)
    beats = HB.findall(text)
    boots = {verdict.group(1)} | {b for b, *_ in beats}
    if boots != {boot}:
        return GuestCheck(False, f"guest rebooted (boot {sorted(boots)}, expected {boot})")
    if verdict.group(3) != "ok" or verdict.group(2) != "0":
        return GuestCheck(False, f"page check: {verdict.group(2)} bad pages")
    if "NOVACRON-BAD" in text:
        return GuestCheck(False, f"background check: {text.count('NOVACRON-BAD')} bad pages")
    if beats and beats[-1][3] != "1":
        return GuestCheck(False, "heartbeat says ok=0")
    return GuestCheck(True, f"ok ({verdict.group(0).split('pages=')[1].split()[0]} pages)")


def _row_check(row: dict[str, Any], check: GuestCheck) -> None:
    row["verify"] = "ok" if check.ok else "FAILED"
    row["verify_detail"] = check.detail
    row["failed"] = not check.ok


# -- our engine, two real agents ---------------------------------------------
async def _ours(args: argparse.Namespace, kind: str, rate: int, caps: list[float]) -> list[dict[str, Any]]:
    from novacron.agent.local import LocalAgent

    secret = secrets.token_urlsafe(32)
    rows: list[dict[str, Any]] = []
    name = f"bench-{kind}"
    # each agent in its own session, so its own scheduler autogroup, as each QEMU of the
    # QEMU rows is (VM.start): sharing the harness's, our two ends got one fair share of
    # a busy machine's CPU where QEMU's two got two (256 MiB at load 6-7, median of 8:
    # 1.56 -> 1.22 s)
    async with LocalAgent("bench-a", cluster_secret=secret, accel="tcg", own_session=True) as a, \
            LocalAgent("bench-b", cluster_secret=secret, accel="tcg", own_session=True) as b:
        boot = await _ours_boot(a, name, args, rate)
        src, dst = a, b
        broken = False
        for cap in caps:
            if broken:  # the next case gets a healthy guest on a clean pair of hosts
                for h in (src, dst):
                    await h.request("DELETE", f"/v1/vms/{name}")
                boot = await _ours_boot(src, name, args, rate)
            row = await _ours_once(src, dst, name, cap, boot, args.policy)
            row["cpu_s_per_gib"] = row.pop("cpu_s") / (args.memory_mb / 1024)
            row["load_1m"] = os.getloadavg()[0]
            rows.append(row)
            broken = row["failed"]
            if row["migrated"] and not broken:
                src, dst = dst, src
    return rows


async def _ours_boot(agent: Any, name: str, args: argparse.Namespace, rate: int) -> str:
    status, doc = await agent.request("POST", "/v1/vms", _spec(name, args, rate))
    if status != 201:
        raise RuntimeError(f"cannot create the guest: {doc}")
    return await _first_boot(lambda off: _agent_console(agent, name, off), name)


async def _agent_console(agent: Any, name: str, offset: int) -> tuple[str, int]:
    status, doc = await agent.request("GET", f"/v1/vms/{name}/console?offset={offset}")
    if status != 200:
        return "", offset
    return str(doc["text"]), int(doc["next_offset"])


async def _first_boot(read: Callable[[int], Awaitable[tuple[str, int]]], name: str,
                      timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    text, offset = "", 0
    while time.monotonic() < deadline:
        chunk, offset = await read(offset)
        text += chunk
        if m := HB.search(text):
            return m.group(1)
        await asyncio.sleep(0.5)
    raise RuntimeError(f"guest {name} printed no heartbeat in {timeout}s")


async def _ours_once(src: Any, dst: Any, name: str, cap: float, boot: str, policy: str,
                     options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One migration by our engine (``options``: more migration options, e.g. ``dest_dedup``)."""
    # the destination receives into incoming/NAME and renames it to vms/NAME at commit
    watch = HeartbeatWatch([src.state_dir / "vms" / name / "serial.log",
                            dst.state_dir / "incoming" / name / "serial.log",
                            dst.state_dir / "vms" / name / "serial.log"])
    watch.start()
    await watch.beat_after(time.monotonic())  # a heartbeat before the pause, to pair with one after
    grant = src.grant_to(dst, name)
    t0 = time.monotonic()
    try:
        status, doc = await src.request("POST", "/v1/migrations", {
            "vm": name, "grant": grant,
            "options": {"bandwidth_mbps": cap, "downtime_ms": BUDGET_MS, "on_no_converge": policy,
                        **(options or {})},
        })  # fmt: skip
        # the engine's clock starts inside this request: the request's whole time counts
        accepted_s = time.monotonic() - t0
        if status != 202:
            raise RuntimeError(f"migration refused: {doc}")
        # the totals come from the engine's stamps: a coarse poll costs the agent little
        st = await _wait_migration(src, doc["id"], poll_s=0.1)
        polled_s = time.monotonic() - t0
        m = st["metrics"]
        # the engine's own stamps from the start it took inside the request: the guest runs
        # at the destination (resumed_s), the source's copy is stopped and removed too
        # (total_s); upper bounds (the request's reply counts twice), the poll's delay not
        released_s = accepted_s + float(m["total_s"])
        resumed = m.get("resumed_s")
        total_s = accepted_s + resumed if st["phase"] == "completed" and resumed is not None else released_s
        landed = dst if st["phase"] == "completed" else src
        check = await check_guest(lambda off: _agent_console(landed, name, off),
                                  lambda text: _agent_type(landed, name, text), boot)
        await watch.beat_after(t0 + polled_s)
    finally:
        await watch.stop()
    _, dst_st = await dst.request("GET", f"/v1/migrations/{doc['id']}")
    dm = dst_st.get("metrics", {}) if isinstance(dst_st, dict) else {}
    row = {
        "cap_mbps": cap, "engine": "novacron", "total_s": total_s, "total_released_s": released_s,
        # the engine's prepare phase: destination admission, RAM file and QEMU start
        "prepare_s": float((m.get("phase_seconds") or {}).get("prepare", 0.0)),
        "engine_total_s": m["total_s"], "pause_ms": watch.pause_ms(),
        "downtime_ms": m["downtime_ms"], "engine_downtime_ms": m["downtime_ms"],
        "wire_bytes": m["bytes_wire"], "rounds": st["round"],
        "compression_ratio": m["compression_ratio"], "dedup_ratio": m["dedup_ratio"],
        "downtime_parts": m.get("downtime_parts"),
        "cpu_s": float(m.get("cpu_s") or 0.0) + float(dm.get("cpu_s") or 0.0),
        "cpu_s_source": m.get("cpu_s"), "cpu_s_destination": dm.get("cpu_s"),
        "stop_scan": m.get("stop_scan"), "pipeline": m.get("pipeline"),
        "phase_seconds": m.get("phase_seconds"), "prepare_parts": m.get("prepare_parts"),
        "prepare_parts_destination": dm.get("prepare_parts"),
        "dirty_mb_s": watch.dirty_mb_s(),
        "migrated": st["phase"] == "completed", "converged": m.get("converged"),
        "policy": _precopy_policy(m.get("throttle_pct")) if m.get("converged") else policy,
        "throttle_pct": m.get("throttle_pct"), "no_converge": m.get("no_converge"),
        "budget_exceeded": st.get("budget_exceeded"), "error": st.get("error"),
        "round_log": st.get("rounds"), "estimate_parts": m.get("estimate_parts"),
        "final_rate_bytes_s": m.get("final_rate_bytes_s"),
        "dest_dedup": m.get("dest_dedup"), "link_share": m.get("link_share"),
        "wire_parts": m.get("wire_parts"), "native": m.get("native"),
    }  # fmt: skip
    # pre-copy gave up and the policy kept the guest at the source: an outcome, not a failure
    by_policy = (st["phase"] == "failed" and policy == "abort" and m.get("converged") is False
                 and "did not converge" in str(st.get("error")))
    if st["phase"] != "completed" and not by_policy:
        check = GuestCheck(False, f"migration {st['phase']}: {st.get('error')} (guest: {check.detail})")
    _row_check(row, check)
    return row


async def _agent_type(agent: Any, name: str, text: str) -> None:
    status, doc = await agent.request("POST", f"/v1/vms/{name}/console", {"text": text})
    if status != 200:
        raise RuntimeError(f"console write refused: {doc}")


async def _wait_migration(agent: Any, mid: str, timeout: float = 600, poll_s: float = 0.02) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, st = await agent.request("GET", f"/v1/migrations/{mid}")
        if status == 200 and st["phase"] in ("completed", "failed", "cancelled"):
            return st
        await asyncio.sleep(poll_s)  # a total read here needs a fine poll
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
    name = f"bench-q{kind}"
    try:
        for h in hosts:
            await h.load()
        src, dst = 0, 1
        boot = await _qemu_boot(hosts[src], name, args, rate)
        broken = False
        for engine in engines:
            for cap in caps:
                if broken:  # a broken guest is not migrated again: boot a fresh one
                    for h in hosts:
                        if (vm := h.vms.get(name)) is not None:
                            await vm.stop()
                            shutil.rmtree(vm.paths.dir, ignore_errors=True)
                            h.forget(name)
                    boot = await _qemu_boot(hosts[src], name, args, rate)
                try:
                    row = await _qemu_once(hosts[src], hosts[dst], name, engine, cap, boot,
                                           args.qemu_timeout)
                except _Unsupported as exc:
                    notes.append(f"{engine}: not measured ({exc})")
                    break
                row["cpu_s_per_gib"] = row.pop("cpu_s") / (args.memory_mb / 1024)
                row["load_1m"] = os.getloadavg()[0]
                rows.append(row)
                broken = row["failed"]
                if row["migrated"] and not broken:
                    src, dst = dst, src
    finally:
        for h in hosts:
            await h.shutdown(stop_vms=True)
        shutil.rmtree(root, ignore_errors=True)
    return rows, notes


async def _qemu_boot(host: Any, name: str, args: argparse.Namespace, rate: int) -> str:
    vm = await host.create(_spec(name, args, rate))
    return await _first_boot(lambda off: _vm_console(vm, off), name)


async def _vm_console(vm: Any, offset: int) -> tuple[str, int]:
    data = vm.read_serial(offset)
    return data.decode(errors="replace"), offset + len(data)


class _Unsupported(Exception):
    pass


def _require(vm: Any) -> Any:
    """The QMP connection of a QEMU that must still run (its exit fails the row)."""
    if vm.qmp is None:
        raise RuntimeError(f"QEMU of {vm.name} exited during the migration")
    return vm.qmp


async def _qemu_once(src_host: Any, dst_host: Any, name: str, engine: str, cap: float,
                     boot: str, timeout_s: float, *, dest_addr: str = "127.0.0.1", relay: bool = True,
                     dest_ns: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None,
                     ) -> dict[str, Any]:
    """One QEMU migration of ``name``. The destination QEMU listens on ``dest_addr``
    (started inside ``dest_ns()`` when given: bench wan's destination namespace); with
    ``relay`` the stream goes through a counting relay on loopback (``wire_bytes``),
    without it straight to ``dest_addr`` (``wire_bytes`` None: the caller counts)."""
    from novacron.agent.qmp import QMPError

    src = src_host.get(name)
    dvm = dst_host.new_vm(src.spec, src.accel, dst_host.paths(name))
    dvm.paths.dir.mkdir(parents=True)
    watch = HeartbeatWatch([src.paths.serial_log, dvm.paths.serial_log])
    watch.start()
    await watch.beat_after(time.monotonic())  # a heartbeat before the pause, to pair with one after
    error = None
    t0 = time.monotonic()  # destination preparation counts, as for ours
    switched = cancelled = False  # post-copy started; pre-copy cancelled by the harness
    resumed_at: float | None = None
    throttled = 0  # the highest auto-converge throttle QEMU reported
    complete_s = 0.0
    try:
        if dest_ns is None:
            await dvm.start(incoming=True)
        else:
            async with dest_ns():
                await dvm.start(incoming=True)
        assert src.qmp is not None and dvm.qmp is not None
        multifd = engine == "qemu-multifd-zstd"
        postcopy = engine == "qemu-postcopy"
        caps = {"capabilities": [{"capability": "multifd", "state": multifd},
                                 {"capability": "auto-converge", "state": engine == "qemu-autoconverge"},
                                 {"capability": "postcopy-ram", "state": postcopy}]}
        for q in (src.qmp, dvm.qmp):
            try:
                await q.execute("migrate-set-capabilities", caps)
            except QMPError as exc:
                raise _Unsupported(exc.desc) from None
            if multifd:
                try:
                    await q.execute("migrate-set-parameters",
                                    {"multifd-compression": "zstd", "multifd-channels": 2})
                except QMPError as exc:
                    raise _Unsupported(exc.desc) from None
        await dvm.qmp.execute("migrate-incoming", {"uri": f"tcp:{dest_addr}:0"})
        info = await dvm.qmp.execute("query-migrate")
        port = int(info["socket-address"][0]["port"])
        # cap, or lift QEMU's 128 MiB/s default so "uncapped" means the same for both
        await src.qmp.execute("migrate-set-parameters",
                              {"max-bandwidth": int(cap * MB) if cap else 1 << 40,
                               "downtime-limit": int(BUDGET_MS)})
        counter = CountingRelay(port) if relay else None
        target = f"tcp:127.0.0.1:{counter.port}" if counter else f"tcp:{dest_addr}:{port}"
        stops, resumes = src.qmp.subscribe(["STOP"]), dvm.qmp.subscribe(["RESUME"])
        vcpus = [int(c["thread-id"]) for c in await src.qmp.execute("query-cpus-fast")]
        cpu0 = _qemu_cpu(src.pid, vcpus), _qemu_cpu(src.pid), _qemu_cpu(dvm.pid)
        cpu1 = cpu0
        prepare_s = time.monotonic() - t0  # destination QEMU started and listening
        try:
            await src.qmp.execute("migrate", {"uri": target})
            deadline = time.monotonic() + timeout_s
            while True:
                info = await src.qmp.execute("query-migrate")
                status = info.get("status")
                throttled = max(throttled, int(info.get("cpu-throttle-percentage", 0)))
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    error = f"QEMU migration {status}: {info.get('error-desc')}"
                    break
                if switched and resumed_at is None:
                    # the destination holds device state and runs, pages follow on demand
                    # (incoming QEMUs start with -S: it waits paused for our 'cont')
                    if dvm.qmp is None:
                        error = "the destination QEMU exited during post-copy"
                        break
                    if (await dvm.qmp.execute("query-status"))["status"] == "paused":
                        await dvm.qmp.execute("cont")
                        resumed_at = time.monotonic()
                elif (postcopy and not switched and status == "active"
                      and int(info.get("ram", {}).get("dirty-sync-count", 0)) >= POSTCOPY_AFTER_SYNCS):
                    # pre-copy did not converge in its passes: the guest moves now
                    await src.qmp.execute("migrate-start-postcopy")
                    switched = True
                elif time.monotonic() > deadline and not switched:
                    # plain pre-copy never gives up by itself: the guest stays here
                    await src.qmp.execute("migrate_cancel")
                    cancelled = True
                    while (info := await src.qmp.execute("query-migrate")).get("status") not in (
                            "cancelled", "failed", "completed"):
                        await asyncio.sleep(0.01)
                    if info.get("status") != "completed":
                        error = f"did not converge in {timeout_s:g} s: cancelled"
                        break
                    cancelled = False  # it finished before the cancel took
                    break
                await asyncio.sleep(0.01)
            if error is not None:  # what the attempt cost (a cut destination may be gone)
                with contextlib.suppress(OSError):
                    cpu1 = _qemu_cpu(src.pid, vcpus), _qemu_cpu(src.pid), _qemu_cpu(dvm.pid)
            if error is None and resumed_at is None:
                while (await _require(dvm).execute("query-status"))["status"] != "paused":
                    await asyncio.sleep(0.005)
                cpu1 = _qemu_cpu(src.pid, vcpus), _qemu_cpu(src.pid), _qemu_cpu(dvm.pid)
                if DEST_RAM_HOOK is not None:
                    DEST_RAM_HOOK(engine, dvm.paths.ram)
                await _require(dvm).execute("cont")
                resumed_at = time.monotonic()
            elif error is None:
                cpu1 = _qemu_cpu(src.pid, vcpus), _qemu_cpu(src.pid), _qemu_cpu(dvm.pid)
            complete_s = time.monotonic() - t0  # all of guest RAM at the destination
            if error is None:
                assert resumed_at is not None
                total_s = resumed_at - t0  # the guest runs at the destination
                # both QEMUs stamp events with the host clock: pause -> resume
                stopped, resumed = await stops.get(timeout=10), await resumes.get(timeout=10)
                event_ms: float | None = (_event_time(resumed) - _event_time(stopped)) * 1000.0
            wrote = counter.forward_bytes if counter else None
        except (QMPError, RuntimeError, OSError, TimeoutError) as exc:  # a row that failed, not the run
            error = f"QEMU migration broke: {type(exc).__name__}: {exc}"
            wrote = counter.forward_bytes if counter else None
        finally:
            # a cancelled migration ends the destination QEMU (its stream was cut): no QMP left
            for q, sub in ((src.qmp, stops), (dvm.qmp, resumes)):
                if q is not None:
                    q.unsubscribe(sub)
            if counter is not None:
                await asyncio.to_thread(counter.close)
        if error is None:
            dvm.state = "running"
            dvm.incoming = False
    except BaseException:
        await watch.stop()
        with contextlib.suppress(Exception):
            await dvm.stop()
        shutil.rmtree(dvm.paths.dir, ignore_errors=True)
        raise
    if error is None:
        await src.stop()
        shutil.rmtree(src.paths.dir, ignore_errors=True)
        released_s = time.monotonic() - t0  # as ours: the source's copy stopped and removed
        src_host.forget(name)
        dst_host.register(dvm)
        landed = dvm
    else:  # QEMU resumes the source itself when its migration fails
        total_s, event_ms = time.monotonic() - t0, None
        released_s = total_s
        with contextlib.suppress(Exception):
            await dvm.stop()
        shutil.rmtree(dvm.paths.dir, ignore_errors=True)
        landed = src
    try:
        check = await check_guest(lambda off: _vm_console(landed, off), landed.send_serial, boot)
        await watch.beat_after(t0 + total_s)
    finally:
        await watch.stop()
    ram = info.get("ram", {})
    throttle = float(throttled)
    row = {
        "cap_mbps": cap, "engine": engine, "total_s": total_s, "total_released_s": released_s,
        "prepare_s": prepare_s,
        "engine_total_s": info["total-time"] / 1000.0 if "total-time" in info else None,
        "pause_ms": watch.pause_ms(),
        "downtime_ms": event_ms, "qemu_event_downtime_ms": event_ms,
        "engine_downtime_ms": float(info["downtime"]) if "downtime" in info else None,
        "qemu_reported_downtime_ms": float(info["downtime"]) if "downtime" in info else None,
        "wire_bytes": wrote, "ram_transferred": int(ram.get("transferred", 0)),
        "rounds": int(ram.get("dirty-sync-count", 0)), "migrated": error is None,
        # migration work only: the source's guest (vCPU threads) is not counted
        "cpu_s": (cpu1[1] - cpu0[1]) - (cpu1[0] - cpu0[0]) + (cpu1[2] - cpu0[2]),
        "dirty_mb_s": watch.dirty_mb_s(), "converged": error is None and not switched,
        "policy": "cancel" if cancelled else "postcopy" if switched else _precopy_policy(throttle),
        "throttle_pct": throttle, "error": error,
        # post-copy: the guest ran at the destination before all its RAM had arrived
        "complete_s": complete_s if error is None else None,
    }  # fmt: skip
    if error is not None and not cancelled:  # a cancel by the harness is the policy's outcome
        check = GuestCheck(False, f"{error} (guest: {check.detail})")
    _row_check(row, check)
    return row


def _precopy_policy(throttle_pct: float | None) -> str:
    """How a pre-copy that reached its budget got there."""
    return f"pre-copy, throttle {throttle_pct:.0f}%" if throttle_pct else "pre-copy"


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
def _pause_vs_budget(r: dict[str, Any]) -> str:
    """The guest's pause against the downtime budget, in words an operator reads."""
    if not r["migrated"] and r.get("runs_moved"):  # a median row where some runs stayed
        stayed = f"{r['runs'] - r['runs_moved']} of {r['runs']} runs stayed on the source"
        return f"{_pause_vs_budget({**r, 'migrated': True, 'runs_moved': None})}; {stayed}"
    if not r["migrated"]:
        return "none: stayed on the source"
    if r["pause_ms"] is None:
        return "unmeasured"
    verdict = "within" if r["pause_ms"] <= r.get("budget_ms", BUDGET_MS) else "OVER"
    return f"{r['pause_ms']:.0f}/{r.get('budget_ms', BUDGET_MS):.0f} ms {verdict}"



def _report(args: argparse.Namespace, sizes: list[int], results: list[dict[str, Any]],
            notes: list[str]) -> Report:
    report = Report("migrate")
    runs = results
    repeat = getattr(args, "repeat", 1)
    if repeat > 1:
        results = _medians(runs)
    table = report.table(
        f"Live migration of a TCG guest on loopback, {','.join(map(str, sizes))} MiB "
        f"(workload {args.workload_mb} MB, busy = {args.busy_rate} MB/s asked; "
        f"budget {BUDGET_MS:g} ms; our policy {args.policy}"
        + (f"; medians of {repeat} runs" if repeat > 1 else "") + ")",
        ["MiB", "guest", "dirtied MB/s", "cap MB/s", "engine", "guest check", "converged", "policy",
         "total s", "total+release s", "after prepare s", "pause ms (guest)", "pause vs budget", "engine downtime ms",
         "wire MB", "rounds", "CPU s/GiB", "load", "time vs qemu-tcp", "wire vs qemu-tcp"],
    )
    # a broken reference is no reference, a broken row is no result, and a guest
    # that stayed on the source by its policy has no migration time to compare
    key = _cell_key
    ref = {key(r): r for r in results if r["engine"] == "qemu-tcp" and r["migrated"] and not r["failed"]}
    for r in results:
        base = None if r["failed"] or not r["migrated"] else ref.get(key(r))
        t_ratio = r["total_s"] / base["total_s"] if base and base["total_s"] else None
        w_ratio = r["wire_bytes"] / base["wire_bytes"] if base and base["wire_bytes"] else None
        r["time_vs_qemu_tcp"], r["wire_vs_qemu_tcp"] = t_ratio, w_ratio
        released, base_released = r.get("total_released_s"), (base or {}).get("total_released_s")
        r["released_vs_qemu_tcp"] = released / base_released if released and base_released else None
        if r.get("after_prepare_s") is None:  # a median row has the median of the runs'
            r["after_prepare_s"] = r["total_s"] - r["prepare_s"]
        r["pause_vs_budget"] = _pause_vs_budget(r)
        rate = r.get("busy_rate_mb", 0)
        dirtied = r.get("dirty_mb_s")
        table.add(r["memory_mb"], r["guest"],
                  f"{rate} asked, {dirtied:.1f}" if dirtied is not None else f"{rate} asked",
                  r["cap_mbps"] or "none", r["engine"],
                  "ok" if not r["failed"] else f"FAILED: {r['verify_detail']}",
                  {True: "yes", False: "no"}.get(bool(r["converged"])) if r.get("converged") is not None else "?",
                  r.get("policy") or "?",
                  r["total_s"], r.get("total_released_s"), r["after_prepare_s"], r["pause_ms"], r["pause_vs_budget"],
                  r["engine_downtime_ms"], r["wire_bytes"] / MB, r["rounds"], r["cpu_s_per_gib"],
                  r["load_1m"], t_ratio, w_ratio)
    failed = [r for r in runs if r["failed"]]
    report.data = {"memory_mb": sizes, "workload_mb": args.workload_mb,
                   "busy_rate_mb": args.busy_rates, "cap_mbps": args.cap, "policy": args.policy,
                   "budget_ms": BUDGET_MS, "results": results, "repeat": repeat,
                   "guest_checks": {"rows": len(runs), "failed": len(failed)},
                   "total_includes_destination_preparation": True,
                   "total_ends": "the guest runs at the destination",
                   "total_released_ends": "the source's copy is stopped and removed too"}
    if repeat > 1:
        report.data["runs"] = runs
        report.notes.append(
            f"each row: the median over {repeat} passes of the whole matrix, run one after another, of the "
            "runs that moved the guest and passed its check (else those that moved, else all: runs_in_median); "
            "with an even count, the mean of the middle two. Ratios are of medians; a row whose runs did not "
            "all move the guest has none, and its 'pause vs budget' says how many stayed. --json: every run "
            "in 'runs' (with its own detail: downtime parts, scans, round log), and each row's runs_pause_ms "
            "and runs_total_s.")
    report.notes += notes
    report.notes.append(
        f"guest check: {len(runs) - len(failed)} of {len(runs)} migrations passed the guest's own "
        f"page check; {len(failed)} failed"
        + (" (" + ", ".join(f"{r['engine']} {r['memory_mb']} MiB {r['guest']} cap {r['cap_mbps'] or 'none'}"
                            + (f" run {r['run']}" if repeat > 1 else "")
                            for r in failed)
           + ": excluded from every ratio)" if failed else "") + ".")
    report.notes.append(
        "total: harness wall clock from the start of destination preparation to the guest running at "
        "the destination, the same for every engine (destination preparation included; novacron: the "
        "request's time plus the engine's own resumed_s stamp, an upper bound). total+release: until "
        "the source's copy is stopped and removed too (novacron: the request plus the engine's total_s, "
        "until its status said completed; QEMU: the harness stopped the source QEMU); novacron's total "
        "was this, read by a 20 ms status poll, until 2026-12-01. "
        "after prepare: total minus the destination's preparation (novacron: its prepare phase, "
        "destination admission, RAM file and QEMU start; QEMU: destination QEMU start until 'migrate'). "
        "pause: the guest's own stand-still, (host gap - guest uptime gap) between consecutive "
        "heartbeats read from the serial logs every 5 ms. engine downtime: the engine's own figure "
        "(novacron: source pause to destination confirmed running; QEMU: query-migrate downtime; "
        "its STOP->RESUME event gap is in --json). wire: novacron = all frames written to the channel; "
        "QEMU = bytes through a counting splice relay (all streams). "
        "dirtied MB/s: what the guest really wrote while watched, by its own count and clock "
        "(a throttled guest writes less). converged: pre-copy reached the budget by itself (with "
        "throttling, if the policy says so); policy: what ended the row (abort/cancel: the guest "
        "stayed on the source; force: stop-and-copy past the budget; postcopy: the guest ran at "
        "the destination before its RAM had all arrived, total = time to resume there). "
        "CPU s/GiB: both ends, per GiB of guest RAM (novacron: both agent processes; QEMU: source "
        "QEMU minus its vCPU threads plus the destination QEMU). load: 1-minute load average. "
        "Ratios < 1 favour novacron. --json adds our stop-phase scan (pages read while paused) "
        "and the compression choices per row.")
    return report
