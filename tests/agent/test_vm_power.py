"""Graceful lifecycle on real guests (TCG): ``stop`` presses the ACPI power button
and the guest powers itself off (its marker on the console, QEMU exits 0, well
within the timeout); a guest that ignores the button is powered off after the
timeout; ``stop --force`` powers off at once; ``reboot`` shuts the guest down
and resets it (a new boot id), ``reboot --force`` resets it at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from novacron.agent.guest import GuestImage
from novacron.agent.vm import RUNNING, STOPPED, AccelDetector, VMConflict, VMManager
from novacron.agent.vm.images import ImageDirs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

BOOT_TIMEOUT_S = 150.0
READY = r"NOVACRON-READY boot=(\w+)"
POWEROFF = "NOVACRON-POWEROFF clean"


@pytest_asyncio.fixture(loop_scope="module")
async def mgr(guest: GuestImage) -> AsyncIterator[VMManager]:
    state_dir = Path(tempfile.mkdtemp(prefix="nc-pwr-"))
    manager = VMManager(state_dir, AccelDetector(probe_kernels=[]),
                        images=ImageDirs.of([guest.kernel.parent]))
    try:
        yield manager
    finally:
        await manager.shutdown(stop_vms=True)
        for meta in state_dir.glob("vms/*/vm.json"):  # no QEMU outlives the test
            pid = json.loads(meta.read_text()).get("pid")
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state_dir, ignore_errors=True)


def spec(guest: GuestImage, name: str, extra: str = "") -> dict[str, Any]:
    return {"name": name, "vcpus": 1, "memory_mb": 128, "kernel": str(guest.kernel),
            "initrd": str(guest.initrd), "accel": "tcg",
            "cmdline": (guest.workload_cmdline(mem_mb=16, rate_mb=1) + " " + extra).strip()}


async def boot_id(mgr: VMManager, name: str, offset: int = 0) -> str:
    return (await mgr.get(name).wait_serial(READY, BOOT_TIMEOUT_S, offset)).group(1)


async def test_graceful_stop_and_reboot(mgr: VMManager, guest: GuestImage) -> None:
    vm = await mgr.create(spec(guest, "calm"))
    await vm.wait_serial("NOVACRON-POWER button=handle", BOOT_TIMEOUT_S)
    first = await boot_id(mgr, "calm")

    # graceful reboot: the guest shuts down (its marker), then boots again with a new id
    mark = len(vm.read_serial())
    _vm, outcome = await mgr.reboot("calm", force=False, timeout=60)
    assert outcome["graceful"] is True, outcome
    assert vm.state == RUNNING and vm.pid is not None
    assert POWEROFF in vm.read_serial(mark).decode(errors="replace")
    second = await boot_id(mgr, "calm", mark)
    assert second != first

    # forced reboot: reset at once, no shutdown on the way
    await vm.wait_serial("NOVACRON-POWER button=handle", BOOT_TIMEOUT_S, mark)
    mark = len(vm.read_serial())
    _vm, outcome = await mgr.reboot("calm", force=True, timeout=60)
    assert outcome == {"graceful": False, "seconds": outcome["seconds"], "reason": "forced reset"}
    third = await boot_id(mgr, "calm", mark)
    assert third not in (first, second)
    assert POWEROFF not in vm.read_serial(mark).decode(errors="replace")

    # graceful stop: the guest powers itself off well within the timeout; QEMU exits 0
    await vm.wait_serial("NOVACRON-POWER button=handle", BOOT_TIMEOUT_S, mark)
    mark = len(vm.read_serial())
    began = time.monotonic()
    _vm, outcome = await mgr.power_down("calm", timeout=60)
    took = time.monotonic() - began
    print(f"\ngraceful stop took {took:.2f} s (outcome {outcome})")
    assert outcome["graceful"] is True and outcome["reason"] == "guest powered off", outcome
    assert took < 60
    text = vm.read_serial(mark).decode(errors="replace")
    assert "NOVACRON-POWER button pressed" in text and POWEROFF in text, text[-500:]
    assert vm.state == STOPPED and vm.exit_code == 0 and vm.error == ""
    assert not vm.ram_path.exists()
    with pytest.raises(VMConflict):
        await mgr.reboot("calm", force=False, timeout=5)  # only a running VM reboots


async def test_ignored_button_then_forced_stop(mgr: VMManager, guest: GuestImage) -> None:
    vm = await mgr.create(spec(guest, "deaf", "novacron.power_button=ignore"))
    await boot_id(mgr, "deaf")
    assert "NOVACRON-POWER button=handle" not in vm.read_serial().decode(errors="replace")

    # stop --force cuts into a graceful stop that waits for a guest ignoring the button
    graceful = asyncio.create_task(mgr.power_down("deaf", timeout=120))
    deadline = time.monotonic() + 30
    while not vm.powering_down:  # the button is being pressed
        assert time.monotonic() < deadline and not graceful.done()
        await asyncio.sleep(0.05)
    began = time.monotonic()
    await mgr.stop("deaf")
    _vm, outcome = await asyncio.wait_for(graceful, 30)
    assert time.monotonic() - began < 15 and vm.state == STOPPED
    assert outcome["graceful"] is False and "forced" in outcome["reason"], outcome

    # a graceful stop whose guest ignores the button: powered off after the timeout
    await mgr.start("deaf")
    mark = len(vm.read_serial())
    await boot_id(mgr, "deaf", mark)
    began = time.monotonic()
    _vm, outcome = await mgr.power_down("deaf", timeout=3)
    took = time.monotonic() - began
    assert outcome["graceful"] is False and "within 3 s" in outcome["reason"], outcome
    assert 3 <= took < 3 + 20  # the timeout, then a power-off that does not linger
    assert vm.state == STOPPED
    assert not re.search("NOVACRON-POWER|" + POWEROFF, vm.read_serial().decode(errors="replace"))
