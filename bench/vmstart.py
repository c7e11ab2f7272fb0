"""``novacron bench vmstart``: what the agent adds to starting a VM.

The same test guest (TCG) is started two ways, alternating, ``--runs`` times:

- **bare QEMU** (the reference): the agent's own argv launched by hand with
  ``Popen`` after preallocating the RAM file the same way, QMP negotiated with
  our client;
- **agent API**: ``POST /v1/vms`` to a real ``novacron-agent`` (spec validation,
  disk-space check, RAM file, QEMU, QMP, supervisor, state file).

Figures (medians): time until QMP answers (for the API: until the 201 reply)
and until the guest's first workload heartbeat on the serial console, plus
``POST`` → ``DELETE`` round trip for the API. Ratios are against bare QEMU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from novacron.bench.report import Report

DESCRIPTION = "VM start: agent API vs the same QEMU launched by hand (QMP ready, first guest heartbeat)"
HEARTBEAT = b"NOVACRON-HB"
BOOT_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=3, help="starts per method (default 3)")
    parser.add_argument("--memory-mb", type=int, default=128, help="guest RAM (default 128)")


async def _wait_file(path: Path, needle: bytes, deadline: float) -> None:
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError):
            if needle in path.read_bytes():
                return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"{needle!r} not in {path} in time")


async def _bare(spec: Any, workdir: Path) -> tuple[float, float]:
    from novacron.agent.guest import cache_root
    from novacron.agent.qmp import QMPClient
    from novacron.agent.vm.images import ImageDirs
    from novacron.agent.vm.qemu_args import QemuFiles, VMPaths, qemu_argv
    from novacron.agent.vm.ramfile import MIB, prepare_ram_file

    paths = VMPaths(workdir / "bare")
    shutil.rmtree(paths.dir, ignore_errors=True)
    paths.dir.mkdir(parents=True)
    t0 = time.monotonic()
    await prepare_ram_file(paths.ram, spec.memory_mb * MIB)
    files = QemuFiles(ImageDirs.of([cache_root()]).open(spec),
                      os.open(paths.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    try:
        proc = subprocess.Popen(qemu_argv(spec, "tcg", paths, files), cwd=paths.dir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=files.fds)  # fmt: skip
    finally:
        files.images.close()
        os.close(files.serial_log)
    try:
        qmp = await QMPClient.connect(str(paths.qmp), timeout=30)
        ready = time.monotonic() - t0
        await _wait_file(paths.serial_log, HEARTBEAT, t0 + BOOT_TIMEOUT_S)
        beat = time.monotonic() - t0
        await qmp.close()
        return ready, beat
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(paths.dir, ignore_errors=True)


async def _api(agent: Any, doc: dict[str, Any]) -> tuple[float, float, float]:
    t0 = time.monotonic()
    status, vm = await agent.request("POST", "/v1/vms", doc)
    if status != 201:
        raise RuntimeError(f"POST /v1/vms answered {status}: {vm}")
    ready = time.monotonic() - t0
    await _wait_file(Path(vm["serial_log"]), HEARTBEAT, t0 + BOOT_TIMEOUT_S)
    beat = time.monotonic() - t0
    t1 = time.monotonic()
    status, body = await agent.request("DELETE", f"/v1/vms/{doc['name']}")
    if status != 200:
        raise RuntimeError(f"DELETE answered {status}: {body}")
    return ready, beat, time.monotonic() - t1


async def _run(args: argparse.Namespace) -> Report:
    from novacron.agent.guest import ensure_guest
    from novacron.agent.local import LocalAgent
    from novacron.agent.vm.spec import VMSpec

    guest = await asyncio.to_thread(ensure_guest)
    spec = VMSpec("bench-start", 1, args.memory_mb, kernel=str(guest.kernel), initrd=str(guest.initrd),
                  cmdline=guest.cmdline, accel="tcg")  # fmt: skip
    doc = {k: v for k, v in spec.to_dict().items() if v}
    bare: list[tuple[float, float]] = []
    api: list[tuple[float, float, float]] = []
    async with LocalAgent("bench-start", accel="tcg") as agent:
        workdir = agent.state_dir / "bare-reference"  # same filesystem for both RAM files
        for _ in range(max(1, args.runs)):  # alternate so machine noise hits both alike
            bare.append(await _bare(spec, workdir))
            api.append(await _api(agent, doc))

    ref_ready = statistics.median(r for r, _ in bare)
    ref_beat = statistics.median(b for _, b in bare)
    api_ready = statistics.median(r for r, _, _ in api)
    api_beat = statistics.median(b for _, b, _ in api)
    api_delete = statistics.median(d for _, _, d in api)
    report = Report("vmstart")
    table = report.table(
        f"VM start, {args.memory_mb} MiB TCG guest, median of {len(api)}",
        ["method", "QMP ready ms", "× ref", "first heartbeat s", "× ref", "delete ms"],
    )
    table.add("bare QEMU (reference)", ref_ready * 1000, 1.0, ref_beat, 1.0, None)
    table.add("agent API", api_ready * 1000, api_ready / ref_ready, api_beat, api_beat / ref_beat, api_delete * 1000)
    report.data = {
        "memory_mb": args.memory_mb,
        "runs": len(api),
        "bare": {"qmp_ready_s": ref_ready, "first_heartbeat_s": ref_beat, "samples": bare},
        "agent_api": {
            "ready_s": api_ready,
            "first_heartbeat_s": api_beat,
            "delete_s": api_delete,
            "samples": api,
        },
        "ratio_ready": api_ready / ref_ready,
        "ratio_first_heartbeat": api_beat / ref_beat,
    }
    report.notes.append("API 'ready' is the 201 reply: RAM file, QEMU, QMP and the state file are done.")
    return report


def run(args: argparse.Namespace) -> Report:
    return asyncio.run(_run(args))
