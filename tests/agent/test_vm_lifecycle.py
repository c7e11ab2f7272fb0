"""The VM runtime on a real guest (TCG): one guest is booted for the module and
walked through heartbeat, pause/resume, the workload's own check, RAM-file
corruption, an agent restart (adoption), a crash, a restart, stop and delete."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from novacron.agent.guest import GuestImage
from novacron.agent.migration.qemu_port import QemuDestFactory
from novacron.agent.vm import (
    CRASHED,
    PAUSED,
    RUNNING,
    STOPPED,
    VM,
    AccelDetector,
    InsufficientSpace,
    VMManager,
    VMNotFound,
    VMStartError,
)
from novacron.agent.vm.images import ImageDirs, OpenedImages
from novacron.agent.vm.qemu_args import QemuFiles
from novacron.agent.vm.ramfile import MIB, free_bytes
from tests.agent.workload_pages import page_prefix

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MEMORY_MB = 128
HB = r"NOVACRON-HB boot=(\w+) seq=(\d+) uptime=([\d.]+) ok=(\d) bad=(\d+)"


class Env:
    def __init__(self, state_dir: Path, guest: GuestImage) -> None:
        self.state_dir = state_dir
        self.guest = guest
        self.own_images = Path(tempfile.mkdtemp(prefix="nc-vmt-img-"))  # images made by tests
        self.images = ImageDirs.of([guest.kernel.parent, self.own_images])
        self.mgr = VMManager(state_dir, AccelDetector(probe_kernels=[]), images=self.images)

    def spec(self, name: str = "g1", **over: Any) -> dict[str, Any]:
        doc = {"name": name, "vcpus": 1, "memory_mb": MEMORY_MB, "kernel": str(self.guest.kernel),
               "initrd": str(self.guest.initrd), "accel": "tcg",
               "cmdline": self.guest.workload_cmdline(mem_mb=32, rate_mb=1, verify_s=4)}  # fmt: skip
        doc.update(over)
        return doc

    @property
    def vm(self) -> VM:
        return self.mgr.get("g1")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(guest: GuestImage) -> AsyncIterator[Env]:
    state_dir = Path(tempfile.mkdtemp(prefix="nc-vmt-"))
    e = Env(state_dir, guest)
    try:
        await e.mgr.create(e.spec())
        yield e
    finally:
        await e.mgr.shutdown(stop_vms=True)
        for meta in state_dir.glob("vms/*/vm.json"):  # belt and braces: no QEMU outlives the test
            pid = json.loads(meta.read_text()).get("pid")
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(state_dir, ignore_errors=True)
        shutil.rmtree(e.own_images, ignore_errors=True)


async def last_heartbeat(vm: VM, timeout: float = 60.0, offset: int = 0) -> re.Match[str]:
    await vm.wait_serial(HB, timeout, offset)
    return list(re.finditer(HB, vm.read_serial(offset).decode(errors="replace")))[-1]


async def test_boots_and_heartbeats(env: Env) -> None:
    vm = env.vm
    assert vm.state == RUNNING and vm.pid is not None and vm.accel == "tcg"
    status = vm.status()
    assert status["state"] == "running" and status["memory_mb"] == MEMORY_MB and status["vcpus"] == 1
    assert Path(status["ram_path"]) == env.state_dir / "vms" / "g1" / "ram"
    assert vm.ram_path.stat().st_size == MEMORY_MB * MIB
    files = QemuFiles(OpenedImages(kernel=3, initrd=4), serial_log=5)
    argv = " ".join(vm.argv(files))
    assert f"memory-backend-file,id=ram0,size={MEMORY_MB}M,mem-path=ram,share=on" in argv
    assert "-machine pc,accel=tcg,memory-backend=ram0" in argv
    incoming = vm.argv(files, incoming=True)
    assert incoming[-3:] == ["-S", "-incoming", "defer"] and incoming[: len(vm.argv(files))] == vm.argv(files)
    # the real QEMU: sandboxed, and told no image path (it inherited checked descriptors)
    running = Path(f"/proc/{vm.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in running and str(env.guest.kernel).encode() not in running
    first = await last_heartbeat(vm)
    later = await vm.wait_serial(HB.replace(r"seq=(\d+)", f"seq=({int(first.group(2)) + 2})"), 15)
    assert later.group(1) == first.group(1) and later.group(4) == "1"
    assert (await vm.qmp.execute("query-status"))["status"] == "running"  # type: ignore[union-attr]


async def test_pause_freezes_the_guest_and_resume_continues(env: Env) -> None:
    vm = env.vm
    await env.mgr.pause("g1")
    assert vm.state == PAUSED and vm.status()["state"] == "paused"
    assert (await vm.qmp.execute("query-status"))["status"] == "paused"  # type: ignore[union-attr]
    await asyncio.sleep(0.3)
    offset = len(vm.read_serial())
    before = await last_heartbeat(vm)
    await asyncio.sleep(2.5)
    assert b"NOVACRON-HB" not in vm.read_serial(offset)
    await env.mgr.resume("g1")
    assert vm.state == RUNNING
    after = await last_heartbeat(vm, 15, offset)
    assert after.group(1) == before.group(1)  # same boot: no reboot
    assert int(after.group(2)) == int(before.group(2)) + 1  # the counter carries on


async def test_workload_check_passes(env: Env) -> None:
    vm = env.vm
    offset = len(vm.read_serial())
    await vm.send_serial("verify\n")
    m = await vm.wait_serial(r"NOVACRON-VERIFY boot=\w+ pages=(\d+) bad=(\d+) result=(\w+)", 15, offset)
    assert m.groups() == ("8192", "0", "ok")


async def test_ram_file_is_guest_memory(env: Env) -> None:
    """Bytes written into the RAM file land in the guest: corrupting workload
    pages there makes the workload's own check fail."""
    vm = env.vm
    boot = int((await last_heartbeat(vm)).group(1), 16)
    ram = vm.ram_path.read_bytes()
    found = []
    for idx in range(0, 8192, 37):  # pages not yet rewritten still hold generation 1
        at = ram.find(page_prefix(boot, idx))
        if at >= 0 and at % 4096 == 0:
            found.append(at)
        if len(found) == 8:
            break
    assert found, "no workload page found in the RAM file"
    fd = os.open(vm.ram_path, os.O_WRONLY)
    try:
        for at in found:
            os.pwrite(fd, b"\xde\xad\xbe\xef" * 4, at + 2048)
    finally:
        os.close(fd)
    offset = len(vm.read_serial())
    await vm.send_serial("verify\n")
    m = await vm.wait_serial(r"NOVACRON-VERIFY boot=\w+ pages=8192 bad=(\d+) result=(\w+)", 15, offset)
    assert int(m.group(1)) >= 1 and m.group(2) == "FAIL"


async def test_agent_restart_adopts_the_running_vm(env: Env) -> None:
    pid = env.vm.pid
    await env.mgr.shutdown(stop_vms=False)  # the old agent goes away, QEMU stays
    assert pid is not None and Path(f"/proc/{pid}").exists()
    env.mgr = VMManager(env.state_dir, AccelDetector(probe_kernels=[]), images=env.images)
    await env.mgr.load()
    vm = env.vm
    assert vm.state == RUNNING and vm.pid == pid and vm.accel == "tcg"
    assert (await vm.qmp.execute("query-status"))["status"] == "running"  # type: ignore[union-attr]


async def test_crash_is_noticed(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    vm = env.vm
    assert vm.pid is not None
    with caplog.at_level(logging.ERROR, logger="novacron.agent.vm"):
        os.kill(vm.pid, signal.SIGKILL)
        assert await vm.wait_exit(10)
    assert vm.state == CRASHED and vm.status()["state"] == "crashed" and vm.pid is None
    assert "unexpectedly" in vm.error
    assert any(r.getMessage() == "vm crashed" and getattr(r, "vm", "") == "g1" for r in caplog.records)
    assert vm.ram_path.exists()  # kept for inspection
    assert '"state": "crashed"' in vm.paths.meta.read_text()


async def test_restart_after_crash_then_stop(env: Env) -> None:
    vm = env.vm
    old_boot = (await last_heartbeat(vm)).group(1)
    offset = len(vm.read_serial())
    await env.mgr.start("g1")
    assert vm.state == RUNNING and vm.pid is not None
    pid = vm.pid
    fresh = await last_heartbeat(vm, 60, offset)
    assert fresh.group(1) != old_boot and fresh.group(4) == "1"  # a new boot, clean memory
    await env.mgr.stop("g1")
    assert vm.state == STOPPED and vm.pid is None and not vm.error
    assert not vm.ram_path.exists()
    assert not Path(f"/proc/{pid}").exists()


async def test_incoming_vm_is_handed_over_while_qemu_starts(env: Env) -> None:
    """An incoming VM comes back as soon as its QEMU is launched (pages may go into its
    RAM file while QEMU starts); ``ready`` waits for QEMU. Destroyed before QEMU answered
    (a migration failing at once), QEMU is killed and its folder and RAM file go; once
    ready, it listens for device state and is destroyed as any VM."""
    factory = QemuDestFactory(env.mgr)
    early = await factory.prepare(env.spec("inc1"), MEMORY_MB * MIB, "m-early")
    assert early.early and early.vm.pid is not None and early.reservation is not None
    assert "qmp_s" not in early.start_parts  # handed over before QEMU answered
    pid, folder = early.vm.pid, early.vm.paths.dir
    await early.destroy()
    assert not folder.exists()
    assert not Path(f"/proc/{pid}").exists() or "qemu" not in Path(f"/proc/{pid}/cmdline").read_text()
    ready = await factory.prepare(env.spec("inc2"), MEMORY_MB * MIB, "m-ready")
    sock = await ready.listen_device_state()
    assert Path(sock).parent == ready.vm.paths.dir, sock  # its device-state socket, in its folder
    assert "qmp_s" in ready.start_parts and (ready.vm.paths.dir / "incoming.json").exists()
    folder = ready.vm.paths.dir
    await ready.destroy()
    assert not folder.exists()


async def test_delete_removes_everything(env: Env) -> None:
    folder = env.vm.paths.dir
    await env.mgr.delete("g1")
    assert not folder.exists()
    with pytest.raises(VMNotFound):
        env.mgr.get("g1")


async def test_no_space_for_the_ram_file(env: Env) -> None:
    too_big = free_bytes(env.state_dir) // MIB + 1024
    if too_big > 1024 * 1024:
        pytest.skip("more than 1 TiB free: cannot ask for more than the spec range allows")
    with pytest.raises(InsufficientSpace, match="not enough space for the RAM file"):
        await env.mgr.create(env.spec("huge", memory_mb=too_big))
    assert "huge" not in env.mgr.vms and not (env.state_dir / "vms" / "huge").exists()


async def test_qemu_start_failure_is_reported(env: Env) -> None:
    (env.own_images / "not-a-kernel").write_bytes(b"not a kernel\n" * 8)
    with pytest.raises(VMStartError, match="did not start") as err:
        await env.mgr.create(env.spec("bogus", kernel="not-a-kernel", initrd=""))  # a name in an image dir
    assert "kernel" in str(err.value).lower()
    assert "bogus" not in env.mgr.vms and not (env.state_dir / "vms" / "bogus").exists()
