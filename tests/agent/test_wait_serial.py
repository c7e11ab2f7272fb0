"""wait_serial reads the serial log incrementally (no QEMU: the log is a plain file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from novacron.agent.vm import machine
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.machine import VM
from novacron.agent.vm.qemu_args import VMPaths
from novacron.agent.vm.spec import parse_spec


def make_vm(tmp_path: Path) -> VM:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not booted here")
    spec = parse_spec({"name": "ser", "vcpus": 1, "memory_mb": 64, "kernel": str(kernel)})
    return VM(spec, "tcg", VMPaths(tmp_path), ImageDirs.of([tmp_path]))


class CountingReads:
    """Wraps VM.read_serial: how many bytes were read, and the largest read asked for."""

    def __init__(self, vm: VM) -> None:
        self.inner = vm.read_serial
        self.bytes = 0
        self.limits: list[int] = []

    def __call__(self, offset: int = 0, limit: int = -1) -> bytes:
        self.limits.append(limit)
        data = self.inner(offset, limit)
        self.bytes += len(data)
        return data


async def test_each_byte_is_read_once_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "SERIAL_POLL_S", 0.01)
    vm = make_vm(tmp_path)
    log = vm.serial_log
    log.write_bytes(b"boot noise\n" * 5000)
    offset = 11 * 100  # skip the first 100 lines
    reads = CountingReads(vm)
    monkeypatch.setattr(vm, "read_serial", reads)
    waiter = asyncio.create_task(vm.wait_serial(r"READY seq=(\d+)", timeout=20, offset=offset))
    for i in range(30):  # a chatty guest: lines arrive over many polls
        await asyncio.sleep(0.02)
        with log.open("ab") as f:
            f.write(f"HB seq={i} ".encode() * 50 + b"\n")
    assert not waiter.done()
    with log.open("ab") as f:
        f.write(b"partial READY ")  # half a line first: the match must still be found
    await asyncio.sleep(0.05)
    with log.open("ab") as f:
        f.write(b"seq=42\nmore\n")
    match = await asyncio.wait_for(waiter, 20)
    assert match.group(1) == "42"
    # every byte after the offset read at most once, never the whole file per poll
    assert reads.bytes <= log.stat().st_size - offset
    assert all(0 < limit <= machine.SERIAL_READ_CHUNK for limit in reads.limits)


async def test_offset_and_split_utf8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "SERIAL_READ_CHUNK", 3)  # split the multi-byte characters
    vm = make_vm(tmp_path)
    vm.serial_log.write_bytes("old ÄÖÜ done\nnew ÄÖÜ done\n".encode())
    offset = len("old ÄÖÜ done\n".encode())
    match = await vm.wait_serial(r"(\w+) ÄÖÜ done", timeout=5, offset=offset)
    assert match.group(1) == "new"


async def test_times_out_without_a_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "SERIAL_POLL_S", 0.01)
    vm = make_vm(tmp_path)  # no serial log at all yet
    with pytest.raises(TimeoutError, match="not on ser's serial console"):
        await vm.wait_serial("never", timeout=0.1)
