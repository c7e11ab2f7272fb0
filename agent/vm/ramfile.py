"""The file that backs guest RAM (``memory-backend-file,share=on``)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

from novacron.agent.safefs import create_new
from novacron.agent.vm.errors import InsufficientSpace

MIB = 1024 * 1024


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


MEMORY_FILESYSTEMS = ("tmpfs", "hugetlbfs")


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from /proc/self/mounts)."""
    target = str(path.resolve())
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _create(path: Path, size: int, share: Callable[[int], None]) -> int:
    """A new, empty RAM file's descriptor (the caller closes it), its owner and mode set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale file from an earlier run (its space counts as free)
    available = free_bytes(path.parent)
    if available < size:
        raise InsufficientSpace(
            f"not enough space for the RAM file {path}: need {size // MIB} MiB, "
            f"{available // MIB} MiB free"
        )
    # O_EXCL|O_NOFOLLOW: QEMU can write the folder, so a name it planted since is
    # refused, not followed; a new file also means zeroed memory
    fd = create_new(path, os.O_RDWR)
    try:
        share(fd)  # owner and mode on the descriptor: no name to swap in between
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return fd


def _reserve(fd: int, path: Path, size: int) -> None:
    """Reserve the file's space: running out later would kill the guest with SIGBUS."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpace(f"not enough space for the RAM file {path}: {exc.strerror}") from None
        raise


def _prepare(path: Path, size: int, share: Callable[[int], None]) -> os.stat_result:
    fd = _create(path, size, share)
    try:
        _reserve(fd, path, size)
        return os.fstat(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    finally:
        os.close(fd)


async def prepare_ram_file(path: Path, size: int,
                           share: Callable[[int], None] = lambda fd: None) -> os.stat_result:
    """Create ``path`` with ``size`` bytes reserved, or raise InsufficientSpace and leave nothing.
    ``share(fd)`` sets its owner and mode (``QemuIdentity.share_fd``) before the space is taken.
    Returns its stat: a later reopen checks it is still this inode (``safefs.open_regular``)."""
    return await asyncio.to_thread(_prepare, path, size, share)


def _sized(path: Path, size: int, share: Callable[[int], None]) -> tuple[os.stat_result, int]:
    fd = _create(path, size, share)
    try:
        os.ftruncate(fd, size)  # sized: QEMU maps all of it; the space comes below
        return os.fstat(fd), fd
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _reserve_and_close(fd: int, path: Path, size: int) -> None:
    try:
        _reserve(fd, path, size)
    finally:
        os.close(fd)  # here, not in the awaiting task: a cancelled await leaves the thread running


async def create_ram_file(path: Path, size: int, share: Callable[[int], None] = lambda fd: None
                          ) -> tuple[os.stat_result, asyncio.Task[None]]:
    """Like ``prepare_ram_file``, but only creates and sizes the file now; the returned
    task reserves its space (posix_fallocate, which zeroes every page of a tmpfs file:
    seconds at several GiB) meanwhile. For a VM whose memory nothing writes before the
    task has been awaited: an incoming migration's, whose QEMU starts in the meantime.
    The task raises InsufficientSpace when the space is not there (the caller removes
    the file)."""
    st, fd = await asyncio.to_thread(_sized, path, size, share)
    return st, asyncio.create_task(asyncio.to_thread(_reserve_and_close, fd, path, size))


def remove_ram_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
