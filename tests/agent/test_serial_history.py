"""The bounded serial history: trimming keeps about the cap, offsets stay those of
the whole output, reads from trimmed offsets start at the oldest byte kept, a
planted file is refused (no QEMU: the log is written here as QEMU would append)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.safefs import UnsafeFile
from tests.agent.test_vm_folder_nofollow import make_vm


def append(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)  # as QEMU holds it
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


async def test_trim_keeps_the_cap_and_logical_offsets(tmp_path: Path, guest: GuestImage) -> None:
    vm = make_vm(tmp_path, guest)
    cap = 1000
    written = b"".join(b"%04d\n" % i for i in range(400))  # 2000 bytes, line i at 5*i
    append(vm.serial_log, written[:800])
    assert vm.trim_serial(cap) is True  # 800 > cap/2: the last 500 bytes become serial.log.1
    assert vm.serial_base == 800 and vm.serial_log.stat().st_size == 0
    assert vm.paths.serial_prev.read_bytes() == written[300:800]
    assert vm.trim_serial(cap) is False
    append(vm.serial_log, written[800:])
    assert vm.serial_end() == 2000
    assert vm.read_serial_at(2000) == (2000, b"")
    assert vm.read_serial_at(1500, 10) == (1500, written[1500:1510])
    assert vm.read_serial_at(700) == (700, written[700:800])  # from serial.log.1, up to its end
    assert vm.read_serial_at(0) == (300, written[300:800])  # 0..299 are gone: the oldest kept
    # wait_serial reads on across the two parts
    match = await vm.wait_serial(r"0399", timeout=2, offset=0)
    assert match.group(0) == "0399"
    assert vm.trim_serial(cap) is True  # 1200 > 500: the total stays within the cap
    sizes = vm.serial_log.stat().st_size + vm.paths.serial_prev.stat().st_size
    assert sizes <= cap and vm.serial_base == 2000
    assert vm.read_serial_at(1499, 1) == (1500, written[1500:1501])


async def test_trim_refuses_a_planted_log(tmp_path: Path, guest: GuestImage) -> None:
    vm = make_vm(tmp_path, guest)
    victim = tmp_path / "victim"  # stands for a file of the host's the agent must never touch
    victim.write_bytes(b"x" * 5000)
    vm.serial_log.symlink_to(victim)
    with pytest.raises(UnsafeFile):
        await asyncio.to_thread(vm.trim_serial, 10)  # the link itself is longer than 5 bytes
    assert not await asyncio.to_thread(vm.trim_serial, 1000)  # the link is short: not even opened
    assert victim.read_bytes() == b"x" * 5000 and not vm.paths.serial_prev.exists()
