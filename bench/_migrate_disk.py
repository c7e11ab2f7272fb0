"""``novacron bench migrate --disk-gb N``: a guest with a local disk, our engine vs QEMU's own path.

The guest (TCG, 128 MiB) has one local qcow2 data disk of N GiB that starts as a
copy of N GiB of incompressible data (so every cluster is allocated and must be
copied; ``--disk-seed compressed``: a compressed qcow2 image, as distribution cloud
images ship, of clusters an eighth random, the rest text), and its disk workload rewrites checksummed 4 KiB blocks over the first
``--disk-blocks`` blocks at ``--disk-rate-kb`` KiB/s throughout. It migrates once
per engine, between two hosts on loopback:

- **novacron**: two real agents; the source's QEMU mirrors the disk
  (``blockdev-mirror``, background copy) into the destination's NBD export
  through the agents' channel (TLS + AES-GCM), then RAM moves as usual and the
  mirror completes at switchover (agent/migration/diskrelay.py). Once with the
  image the disk was copied from held at the destination too (its clusters are
  named by digest: agent/migration/diskdedup.py) and once with it absent (the
  destination agent does not list the seed's image dir), as ``--disk-image`` says.
- **qemu-nbd**: what libvirt's ``virsh migrate --copy-storage-all`` does: the
  destination QEMU (``-incoming``) exports its empty disk with
  ``nbd-server-start`` on plain TCP, the source mirrors into it
  (``blockdev-mirror``, ``sync=top``, background copy, as ours) until the job
  is ready, then ``migrate`` with ``pause-before-switchover``: at
  ``pre-switchover`` (guest stopped) the mirror is completed
  (``block-job-cancel`` on a ready job), then ``migrate-continue``; the
  destination stops its NBD server and resumes.

Figures per engine: **total** (harness wall clock from destination preparation
to the guest running at the destination), **pause** (the guest's heartbeat
gap, as in ``bench migrate``), the engine's own **downtime**, **wire**, source ->
destination (ours: the page stream's frames plus the NBD bytes relayed in the
channel's DATA records, whose few bytes of record framing are not counted; QEMU:
bytes through counting relays in front of the NBD server and the migration
listener) and **disk check**: the guest's own disk verifier, which reads
back every block it wrote and must report ``result=ok`` twice at the
destination, with the same boot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from novacron.bench._relay import CountingRelay
from novacron.bench.report import Report

GIB = 1 << 30
MB = 1_000_000
SEED = "bench-seed.qcow2"
DISK_VERIFY = re.compile(r"NOVACRON-DISK-VERIFY boot=(\w+) pass=\d+ written=(\d+) bad=(\d+) result=(\w+)")
VERIFY_TIMEOUT_S = 120.0  # two verifier passes at the destination, on a loaded TCG guest
MIRROR_READY_TIMEOUT_S = 1800.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The disk case's options (``migrate.add_arguments`` calls this)."""
    parser.add_argument("--disk-gb", type=float, default=0.0,
                        help="run the local-disk case instead: a guest with a local qcow2 disk of this "
                             "many GiB, all of it written before the migration (default 0: not run; "
                             "fractions allowed, e.g. 0.0625)")
    parser.add_argument("--disk-rate-kb", type=int, default=512,
                        help="KiB/s the guest's disk workload rewrites during the disk case (default 512)")
    parser.add_argument("--disk-blocks", type=int, default=2048,
                        help="4 KiB blocks the disk workload rewrites and verifies (default 2048 = 8 MiB)")
    parser.add_argument("--disk-seed", choices=("random", "compressed"), default="random",
                        help="the image the disk is a copy of: random data in a plain qcow2, or a compressed "
                             "qcow2 of clusters an eighth random, the rest text (as a cloud image ships: the "
                             "destination indexes it through an uncompressed copy, agent/vm/expanded.py; "
                             "default random)")
    parser.add_argument("--disk-image", choices=("both", "held", "absent"), default="both",
                        help="whether the destination holds the image the disk was copied from: held (our "
                             "engine names its clusters by digest), absent (every cluster is sent), or both, "
                             "one row each (default both; QEMU's row is the same either way)")


def run(args: argparse.Namespace) -> Report:
    gb = float(args.disk_gb)
    size = int(gb * GIB) & ~((1 << 20) - 1)  # whole MiB, as the spec keeps sizes
    if size < max(16 << 20, args.disk_blocks * 4096):
        raise SystemExit("novacron bench migrate: --disk-gb must give at least 16 MiB and more than "
                         "--disk-blocks x 4 KiB")
    if args.disk_rate_kb < 0 or args.disk_blocks < 1:
        raise SystemExit("novacron bench migrate: --disk-rate-kb must be >= 0 and --disk-blocks >= 1")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    wanted = [e for e in ("novacron", "qemu-nbd") if e in engines or (e == "qemu-nbd" and "qemu-tcp" in engines)]
    if not wanted:
        raise SystemExit("novacron bench migrate --disk-gb: --engines must name novacron and/or qemu-tcp "
                         "(the disk case's QEMU row is qemu-nbd)")
    # the seed image lives on disk: agents refuse image dirs under /dev (so not /dev/shm)
    images = Path(tempfile.mkdtemp(prefix="nc-bench-disk-"))
    try:
        _seed(images / SEED, size, compressed=getattr(args, "disk_seed", "random") == "compressed")
        rows = asyncio.run(_run_all(args, images, size, wanted))
    finally:
        shutil.rmtree(images, ignore_errors=True)
    return _report(args, size, rows)


def _seed(path: Path, size: int, compressed: bool = False) -> None:
    """A qcow2 image of ``size`` bytes: random data (every cluster allocated, nothing
    compressible), or (``compressed``) a compressed qcow2 of 64 KiB clusters an eighth
    random and the rest text, no two alike and no 4 KiB of zeroes."""
    raw = path.with_suffix(".raw")
    text = b"NovaCron moves running VMs between hosts. " * 1600
    with raw.open("wb") as f:
        for _ in range(size >> 20):
            if compressed:
                f.write(b"".join(os.urandom(8192) + text[:65536 - 8192] for _ in range(16)))
            else:
                f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", *(["-c"] if compressed else []), "-f", "raw", "-O", "qcow2",
                    str(raw), str(path)], check=True, timeout=1800)
    raw.unlink()


def _spec(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from novacron.agent.guest import ensure_guest

    g = ensure_guest()
    return {"name": name, "vcpus": 1, "memory_mb": 128, "accel": "tcg", "kernel": str(g.kernel),
            "initrd": str(g.initrd), "disks": [{"image": SEED}],
            "cmdline": g.disk_cmdline("vda", rate_kb=args.disk_rate_kb, verify_s=2, blocks=args.disk_blocks,
                                      mem_mb=16, rate_mb=1)}


async def _run_all(args: argparse.Namespace, images: Path, size: int, engines: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    which = getattr(args, "disk_image", "both")
    for engine in engines:
        for held in ([True, False] if which == "both" else [which == "held"]) if engine == "novacron" else [None]:
            row = await (_ours(args, images, bool(held)) if engine == "novacron" else _qemu(args, images, size))
            row["engine"] = engine
            row["dest_image"] = {True: "held", False: "absent", None: "n/a"}[held]
            row["load_1m"] = os.getloadavg()[0]
            rows.append(row)
    return rows


async def disk_verdict(read: Callable[[int], Awaitable[tuple[str, int]]], offset: int, boot: str,
                       passes: int = 2) -> tuple[bool, str]:
    """The guest's disk verifier at the destination: ``passes`` results printed after
    ``offset``, all ok, no error line, the same boot (no reboot)."""
    text = ""
    deadline = time.monotonic() + VERIFY_TIMEOUT_S
    while True:
        chunk, offset = await read(offset)
        text += chunk
        results = DISK_VERIFY.findall(text)
        if "NOVACRON-DISK-ERROR" in text or "NOVACRON-DISK-BAD" in text:
            return False, "the guest reported a bad disk block or an I/O error"
        bad = [r for r in results if r[3] != "ok" or r[2] != "0"]
        if bad:
            return False, f"disk verifier: {bad[0][2]} bad blocks"
        if {r[0] for r in results} - {boot}:
            return False, f"guest rebooted (boot {sorted({r[0] for r in results})}, expected {boot})"
        if len(results) >= passes:
            return True, f"ok ({passes} passes, {results[-1][1]} blocks written)"
        if time.monotonic() > deadline:
            return False, f"no disk verification in {VERIFY_TIMEOUT_S:.0f} s (guest crashed or hung)"
        await asyncio.sleep(0.3)


async def _boot(read: Callable[[int], Awaitable[tuple[str, int]]], name: str) -> str:
    """The guest's boot id once its disk verifier has passed once (the workload is writing)."""
    deadline = time.monotonic() + 240
    text, offset = "", 0
    while time.monotonic() < deadline:
        chunk, offset = await read(offset)
        text += chunk
        if (m := DISK_VERIFY.search(text)) and m.group(4) == "ok":
            return m.group(1)
        if "NOVACRON-DISK-ERROR" in text:
            raise RuntimeError(f"guest {name}: disk workload failed: {text[-400:]}")
        await asyncio.sleep(0.5)
    raise RuntimeError(f"guest {name} printed no disk verification in 240 s")


# -- our engine ------------------------------------------------------------------
async def _ours(args: argparse.Namespace, images: Path, held: bool) -> dict[str, Any]:
    from novacron.agent.guest import cache_root
    from novacron.agent.local import LocalAgent
    from novacron.bench.migrate import HeartbeatWatch, _agent_console, _wait_migration

    secret = secrets.token_urlsafe(32)
    name = "bench-disk"
    # absent: the destination does not list the seed's image dir (its disk is a copy made
    # at the source, so nothing else there needs the image)
    dest_dirs = [cache_root(), images] if held else [cache_root()]
    # a compressed seed is indexed through an uncompressed copy, made on disk (the agents'
    # state dirs are on tmpfs, where none is made)
    index = {"disk_index_dir": str(images / "disk-index-b")}
    async with LocalAgent("bench-da", cluster_secret=secret, accel="tcg", image_dirs=[cache_root(), images]) as a, \
            LocalAgent("bench-db", cluster_secret=secret, accel="tcg", image_dirs=dest_dirs, settings=index) as b:
        status, doc = await a.request("POST", "/v1/vms", _spec(name, args))
        if status != 201:
            raise RuntimeError(f"cannot create the guest: {doc}")
        boot = await _boot(lambda off: _agent_console(a, name, off), name)
        watch = HeartbeatWatch([a.state_dir / "vms" / name / "serial.log",
                                b.state_dir / "incoming" / name / "serial.log",
                                b.state_dir / "vms" / name / "serial.log"])
        watch.start()
        try:
            await watch.beat_after(time.monotonic())
            t0 = time.monotonic()
            status, doc = await a.request("POST", "/v1/migrations", {
                "vm": name, "grant": a.grant_to(b, name), "options": {"downtime_ms": 300}})
            if status != 202:
                raise RuntimeError(f"migration refused: {doc}")
            st = await _wait_migration(a, doc["id"], timeout=MIRROR_READY_TIMEOUT_S)
            total_s = time.monotonic() - t0
            landed = b if st["phase"] == "completed" else a
            _, offset = await _agent_console(landed, name, 0)
            ok, detail = await disk_verdict(lambda off: _agent_console(landed, name, off), offset, boot)
            await watch.beat_after(t0 + total_s)
            theirs = await _dest_disk_dedup(b, doc["id"])
        finally:
            await watch.stop()
    m = st["metrics"]
    if st["phase"] != "completed":
        ok, detail = False, f"migration {st['phase']}: {st.get('error')} (guest: {detail})"
    return {"total_s": total_s, "pause_ms": watch.pause_ms(), "engine_downtime_ms": m["downtime_ms"],
            # the page stream (bytes_wire) and the relayed NBD bytes (disk_bytes) share the channel
            "wire_bytes": m["bytes_wire"] + m.get("disk_bytes", 0), "disk_bytes": m.get("disk_bytes"),
            "disk_ready_s": m.get("disk_ready_s"), "downtime_parts": m.get("downtime_parts"),
            "disk_named_bytes": (m.get("disk_dedup") or {}).get("bytes_named", 0),
            "dest_disk_dedup": theirs,
            "phase_seconds": m.get("phase_seconds"), "verify": "ok" if ok else "FAILED",
            "verify_detail": detail, "failed": not ok}


async def _dest_disk_dedup(b: Any, mid: str) -> dict[str, Any]:
    """The destination's side of the disk cluster exchange (its index, the copy of a
    compressed image it used or waited for)."""
    status, doc = await b.request("GET", "/v1/migrations")
    if status != 200:
        return {}
    return next((dict(x["metrics"].get("disk_dedup") or {}) for x in doc["migrations"] if x["id"] == mid), {})


# -- QEMU's own path ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _qemu(args: argparse.Namespace, images: Path, size: int) -> dict[str, Any]:
    from novacron.agent.guest import cache_root
    from novacron.agent.local import state_parent
    from novacron.agent.vm.accel import AccelDetector
    from novacron.agent.vm.images import ImageDirs
    from novacron.agent.vm.manager import VMManager
    from novacron.bench.migrate import HeartbeatWatch, _vm_console

    root = Path(tempfile.mkdtemp(prefix="nc-bench-qdisk-", dir=state_parent()))
    dirs = ImageDirs.of([cache_root(), images])
    src_host = VMManager(root / "x", AccelDetector(probe_kernels=[]), images=dirs)
    dst_host = VMManager(root / "y", AccelDetector(probe_kernels=[]), images=dirs)
    name = "bench-qdisk"
    try:
        for h in (src_host, dst_host):
            await h.load()
        src = await src_host.create(_spec(name, args))
        boot = await _boot(lambda off: _vm_console(src, off), name)
        dvm = dst_host.new_vm(src.spec, src.accel, dst_host.paths(name))
        watch = HeartbeatWatch([src.paths.serial_log, dvm.paths.serial_log])
        watch.start()
        relays: list[CountingRelay] = []
        try:
            await watch.beat_after(time.monotonic())
            t0 = time.monotonic()
            row = await _qemu_once(src_host, dst_host, src, dvm, relays, t0)
            total_s = time.monotonic() - t0
            landed = dvm if row["migrated"] else src
            offset = len(landed.read_serial(0))
            ok, detail = await disk_verdict(lambda off: _vm_console(landed, off), offset, boot)
            await watch.beat_after(t0 + total_s)
        finally:
            await watch.stop()
            for r in relays:
                await asyncio.to_thread(r.close)
        if not row["migrated"]:
            ok, detail = False, f"{row['error']} (guest: {detail})"
        row.update(total_s=total_s, pause_ms=watch.pause_ms(), verify="ok" if ok else "FAILED",
                   verify_detail=detail, failed=not ok)
        return row
    finally:
        for h in (src_host, dst_host):
            await h.shutdown(stop_vms=True)
        shutil.rmtree(root, ignore_errors=True)


async def _qemu_once(src_host: Any, dst_host: Any, src: Any, dvm: Any, relays: list[CountingRelay],
                     t0: float) -> dict[str, Any]:
    """libvirt's ``--copy-storage-all`` sequence with QMP; the source keeps the guest on any error.
    ``t0``: when the harness started preparing the destination."""
    dvm.paths.dir.mkdir(parents=True)
    plan = await src_host.disks.migration_plan(src.spec, src.paths.dir)
    await dst_host.disks.create_for_migration(src.spec, dvm.paths.dir, plan)
    await dvm.start(incoming=True)
    assert src.qmp is not None and dvm.qmp is not None
    sq, dq = src.qmp, dvm.qmp
    error: str | None = None
    mirror_ready_s: float | None = None
    nbd_port = _free_port()
    await dq.execute("nbd-server-start", {"addr": {"type": "inet", "data": {"host": "127.0.0.1",
                                                                            "port": str(nbd_port)}}})
    await dq.execute("block-export-add", {"type": "nbd", "id": "export0", "node-name": "disk0",
                                          "name": "disk0", "writable": True})
    nbd = CountingRelay(nbd_port)
    relays.append(nbd)
    stops, resumes = sq.subscribe(["STOP"]), dq.subscribe(["RESUME"])
    try:
        await sq.execute("blockdev-add", {"driver": "nbd", "node-name": "target0", "export": "disk0",
                                          "server": {"type": "inet", "host": "127.0.0.1", "port": str(nbd.port)}},
                         timeout=60)
        await sq.execute("blockdev-mirror", {"job-id": "mirror0", "device": "disk0", "target": "target0",
                                             "sync": "top", "copy-mode": "background", "auto-dismiss": False})
        deadline = time.monotonic() + MIRROR_READY_TIMEOUT_S
        while error is None:
            job = await _mirror_job(sq)
            if job.get("status") == "ready":
                mirror_ready_s = time.monotonic() - t0
                break
            if job.get("status") in ("concluded", "null", None) or job.get("error"):
                error = f"mirror {job.get('status')}: {job.get('error')}"
            elif time.monotonic() > deadline:
                error = "mirror not ready in time"
            await asyncio.sleep(0.05)
        if error is None:
            await dq.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = int((await dq.execute("query-migrate"))["socket-address"][0]["port"])
            mig = CountingRelay(port)
            relays.append(mig)
            caps = [{"capability": "pause-before-switchover", "state": True}]
            await sq.execute("migrate-set-capabilities", {"capabilities": caps})
            await sq.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": 300})
            await sq.execute("migrate", {"uri": f"tcp:127.0.0.1:{mig.port}"})
            while True:
                info = await sq.execute("query-migrate")
                status = info.get("status")
                if status == "pre-switchover":  # guest stopped: complete the mirror, then hand over
                    await sq.execute("block-job-cancel", {"device": "mirror0"})
                    while (j := await _mirror_job(sq)).get("status") not in ("concluded", "null", None):
                        await asyncio.sleep(0.005)
                    if j.get("error"):
                        error = f"mirror at completion: {j['error']}"
                        await sq.execute("migrate_cancel")
                    else:
                        await sq.execute("migrate-continue", {"state": "pre-switchover"})
                elif status == "completed":
                    break
                elif status in ("failed", "cancelled"):
                    error = error or f"QEMU migration {status}: {info.get('error-desc')}"
                    break
                await asyncio.sleep(0.005)
        if error is None:
            while (await dq.execute("query-status"))["status"] != "paused":
                await asyncio.sleep(0.005)
            await dq.execute("nbd-server-stop")
            await dq.execute("cont")
            stopped, resumed = await stops.get(timeout=10), await resumes.get(timeout=10)
            event_ms: float | None = (_event_time(resumed) - _event_time(stopped)) * 1000.0
    finally:
        sq.unsubscribe(stops)
        dq.unsubscribe(resumes)
    if error is not None:  # the source's guest runs on (QEMU resumes it when migrate fails)
        with contextlib.suppress(Exception):
            await sq.execute("block-job-cancel", {"device": "mirror0", "force": True})
        with contextlib.suppress(Exception):
            await dvm.stop()
        shutil.rmtree(dvm.paths.dir, ignore_errors=True)
        return {"migrated": False, "error": error, "wire_bytes": sum(r.forward_bytes for r in relays),
                "engine_downtime_ms": None, "disk_bytes": nbd.forward_bytes, "disk_ready_s": mirror_ready_s}
    dvm.state, dvm.incoming = "running", False
    await src.stop()
    shutil.rmtree(src.paths.dir, ignore_errors=True)
    src_host.forget(src.name)
    dst_host.register(dvm)
    return {"migrated": True, "error": None, "engine_downtime_ms": event_ms,
            "qemu_reported_downtime_ms": info.get("downtime"),
            "wire_bytes": sum(r.forward_bytes for r in relays), "disk_bytes": nbd.forward_bytes,
            "disk_ready_s": mirror_ready_s}


async def _mirror_job(qmp: Any) -> dict[str, Any]:
    """The mirror job's query-jobs entry ({} once it is gone)."""
    jobs: list[dict[str, Any]] = await qmp.execute("query-jobs") or []
    return next((j for j in jobs if j.get("id") == "mirror0"), {})


def _event_time(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


# -- report --------------------------------------------------------------------
def _report(args: argparse.Namespace, size: int, rows: list[dict[str, Any]]) -> Report:
    report = Report("migrate")
    table = report.table(
        f"Live migration with a local qcow2 disk of {size / GIB:g} GiB (all written, a copy of a "
        f"{getattr(args, 'disk_seed', 'random')} image; the guest rewrites "
        f"{args.disk_blocks * 4} KiB at {args.disk_rate_kb} KiB/s), TCG guest, 128 MiB, loopback",
        ["engine", "image at destination", "disk check", "total s", "disk ready s", "pause ms (guest)",
         "engine downtime ms", "wire MB", "disk MB", "named MB", "load", "time vs qemu-nbd", "wire vs qemu-nbd"])
    ref = next((r for r in rows if r["engine"] == "qemu-nbd" and not r["failed"]), None)
    for r in rows:
        base = None if r["failed"] or r is ref else ref
        r["time_vs_qemu_nbd"] = r["total_s"] / base["total_s"] if base else None
        r["wire_vs_qemu_nbd"] = r["wire_bytes"] / base["wire_bytes"] if base and base["wire_bytes"] else None
        table.add(r["engine"], r.get("dest_image", "n/a"),
                  r["verify"] if not r["failed"] else f"FAILED: {r['verify_detail']}",
                  r["total_s"], r["disk_ready_s"], r["pause_ms"], r["engine_downtime_ms"], r["wire_bytes"] / MB,
                  (r["disk_bytes"] or 0) / MB, (r.get("disk_named_bytes") or 0) / MB, r["load_1m"],
                  r["time_vs_qemu_nbd"], r["wire_vs_qemu_nbd"])
    report.data = {"disk_bytes": size, "disk_rate_kb": args.disk_rate_kb, "disk_blocks": args.disk_blocks,
                   "disk_seed": getattr(args, "disk_seed", "random"), "results": rows}
    report.notes.append(
        "total: wall clock from destination preparation to the guest running there. disk ready: from then "
        "until the mirror had copied the disk once (ours: the engine's disk_ready_s; QEMU: the job 'ready'). pause: the guest's own heartbeat gap; engine "
        "downtime: ours = source pause to destination running, QEMU = STOP->RESUME events. wire: source -> "
        "destination bytes (ours: the page stream's frames plus the relayed NBD bytes; QEMU: NBD + migration stream through counting "
        "relays). disk MB: disk bytes sent (ours: relayed NBD bytes; QEMU: the NBD relay). named MB: disk "
        "clusters our engine sent as digests because the destination holds the image the disk was copied "
        "from (agent/migration/diskdedup.py; 'image at destination'; the seed was just written, so the "
        "destination indexes it from the page cache); QEMU has no such path. disk check: the "
        "guest's own verifier, two passes over every block it wrote, at the destination. qemu-nbd: "
        "blockdev-mirror (sync=top, background) over plain NBD/TCP, migrate with pause-before-switchover, "
        "the mirror completed at pre-switchover. Ratios < 1 favour novacron.")
    return report
