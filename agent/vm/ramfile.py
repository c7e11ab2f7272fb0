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


def _prepare(path: Path, size: int, share: Callable[[int], None]) -> os.stat_result:
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
        # reserve now: running out later would kill the guest with SIGBUS
        os.posix_fallocate(fd, 0, size)
        return os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        fd = -1
        with contextlib.suppress(OSError):
            path.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientSpace(f"not enough space for the RAM file {path}: {exc.strerror}") from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)


async def prepare_ram_file(path: Path, size: int,
                           share: Callable[[int], None] = lambda fd: None) -> os.stat_result:
    """Create ``path`` with ``size`` bytes reserved, or raise InsufficientSpace and leave nothing.
    ``share(fd)`` sets its owner and mode (``QemuIdentity.share_fd``) before the space is taken.
    Returns its stat: a later reopen checks it is still this inode (``safefs.open_regular``)."""
    return await asyncio.to_thread(_prepare, path, size, share)


def remove_ram_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
