"""The RAM file: reserved up front, or (an incoming VM's) sized now and reserved
while its QEMU starts."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from novacron.agent.vm import ramfile
from novacron.agent.vm.errors import InsufficientSpace
from novacron.agent.vm.ramfile import MIB, create_ram_file

SIZE = 8 * MIB


async def test_created_file_is_sized_at_once_and_reserved_by_its_task(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    st, reserving = await create_ram_file(path, SIZE)
    assert st.st_size == SIZE and os.stat(path).st_ino == st.st_ino
    await reserving
    assert os.stat(path).st_blocks * 512 >= SIZE  # every byte has its space now


async def test_space_that_is_not_there_fails_the_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-space check passed but the space went meanwhile: the task says so
    (the caller kills QEMU and removes the file); no descriptor is left open."""
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ramfile.os, "posix_fallocate", full)
    fds_before = len(os.listdir("/proc/self/fd"))
    _, reserving = await create_ram_file(tmp_path / "ram", SIZE)
    with pytest.raises(InsufficientSpace, match="not enough space for the RAM file"):
        await reserving
    assert len(os.listdir("/proc/self/fd")) == fds_before


async def test_too_big_for_the_folder_creates_nothing(tmp_path: Path) -> None:
    too_big = ramfile.free_bytes(tmp_path) + 1024 * MIB
    with pytest.raises(InsufficientSpace):
        await create_ram_file(tmp_path / "ram", too_big)
    assert not (tmp_path / "ram").exists()
