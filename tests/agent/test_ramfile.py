"""The RAM file: reserved up front, or (an incoming VM's) sized now and reserved
in the background, a writer reserving what it is about to write first."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

from novacron.agent.vm import ramfile
from novacron.agent.vm.errors import InsufficientSpace
from novacron.agent.vm.ramfile import MIB, create_ram_file

SIZE = 8 * MIB


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def test_created_file_is_sized_at_once_and_reserved_in_the_background(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    st, reservation = await create_ram_file(path, SIZE)
    assert st.st_size == SIZE and os.stat(path).st_ino == st.st_ino
    await reservation.wait()
    assert reservation.complete and reservation.reserved == SIZE
    assert allocated(path) >= SIZE  # every byte has its space now
    reservation.ensure(0, SIZE)  # nothing left to do


async def test_a_writer_reserves_its_range_ahead_of_the_thread(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread is held after its first chunk: a range past it is reserved by the
    writer's own ensure(), at once, not after the thread gets there."""
    monkeypatch.setattr(ramfile, "RESERVE_CHUNK", 1 * MIB)
    held, real = threading.Event(), ramfile._reserve

    def slow(fd: int, path: Path, size: int, offset: int = 0) -> None:
        if offset > 0 and threading.current_thread() is not threading.main_thread():
            assert held.wait(30)
        real(fd, path, size, offset)

    monkeypatch.setattr(ramfile, "_reserve", slow)
    path = tmp_path / "ram"
    _, reservation = await create_ram_file(path, SIZE)
    try:
        before = allocated(path)
        assert not reservation.complete
        reservation.ensure(6 * MIB, 7 * MIB)  # from the event loop's thread, as inline frames are
        assert allocated(path) >= before + MIB
        assert not reservation.complete
    finally:
        held.set()
    await reservation.wait()
    assert allocated(path) >= SIZE


async def test_space_that_is_not_there_fails_the_reservation_and_writers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-space check passed but the space went meanwhile: the reservation says
    so (the migration fails, the caller kills QEMU and removes the file), as does a
    writer asking for space past what was reserved; no descriptor is left open."""
    monkeypatch.setattr(ramfile, "RESERVE_CHUNK", 1 * MIB)
    real = ramfile.os.posix_fallocate

    def full_past_2mib(fd: int, offset: int, length: int) -> None:
        if offset + length > 2 * MIB:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(ramfile.os, "posix_fallocate", full_past_2mib)
    fds_before = len(os.listdir("/proc/self/fd"))
    _, reservation = await create_ram_file(tmp_path / "ram", SIZE)
    with pytest.raises(InsufficientSpace, match="not enough space for the RAM file"):
        await reservation.wait()
    assert reservation.reserved == 2 * MIB and not reservation.complete
    reservation.ensure(0, 2 * MIB)  # what was reserved stays usable
    with pytest.raises(InsufficientSpace, match="not enough space for the RAM file"):
        reservation.ensure(3 * MIB, 4 * MIB)
    assert len(os.listdir("/proc/self/fd")) == fds_before


async def test_closing_stops_the_reservation_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is going (the migration failed): the thread stops after its chunk and
    lets go of the file; a writer is refused from then on."""
    monkeypatch.setattr(ramfile, "RESERVE_CHUNK", 1 * MIB)
    held, real = threading.Event(), ramfile._reserve

    def slow(fd: int, path: Path, size: int, offset: int = 0) -> None:
        if offset > 0:
            assert held.wait(30)
        real(fd, path, size, offset)

    monkeypatch.setattr(ramfile, "_reserve", slow)
    fds_before = len(os.listdir("/proc/self/fd"))
    _, reservation = await create_ram_file(tmp_path / "ram", SIZE)
    closing = asyncio.create_task(reservation.close())
    await asyncio.sleep(0.05)
    held.set()
    await closing
    assert reservation.reserved <= 2 * MIB and not reservation.complete
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with pytest.raises(InsufficientSpace, match="no longer being reserved"):
        reservation.ensure(6 * MIB, 7 * MIB)
    with pytest.raises(InsufficientSpace, match="no longer being reserved"):
        await reservation.wait()  # stopped is not done: no guest may run on it


async def test_where_glibc_would_emulate_fallocate_the_space_is_reserved_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulated posix_fallocate writes zeroes back block by block: it must not run beside
    incoming pages, so on such a file system the file is whole before anything writes."""
    monkeypatch.setattr(ramfile, "filesystem_type", lambda path: "nfs")
    background = []
    monkeypatch.setattr(ramfile.Reservation, "_run",
                        lambda self: background.append(self.reserved) or os.close(self._fd))
    _, reservation = await create_ram_file(tmp_path / "ram", SIZE)
    assert reservation.complete and allocated(tmp_path / "ram") >= SIZE
    await reservation.wait()
    assert background == [SIZE]  # the thread found nothing left to do


async def test_too_big_for_the_folder_creates_nothing(tmp_path: Path) -> None:
    too_big = ramfile.free_bytes(tmp_path) + 1024 * MIB
    with pytest.raises(InsufficientSpace):
        await create_ram_file(tmp_path / "ram", too_big)
    assert not (tmp_path / "ram").exists()
