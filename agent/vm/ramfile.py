"""The file that backs guest RAM (``memory-backend-file,share=on``)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from pathlib import Path

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


def _prepare(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale file from an earlier run: start from zeroed memory
    available = free_bytes(path.parent)
    if available < size:
        raise InsufficientSpace(
            f"not enough space for the RAM file {path}: need {size // MIB} MiB, "
            f"{available // MIB} MiB free"
        )
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # reserve now: running out later would kill the guest with SIGBUS
        os.posix_fallocate(fd, 0, size)
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


async def prepare_ram_file(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes reserved, or raise InsufficientSpace and leave nothing."""
    await asyncio.to_thread(_prepare, path, size)


def remove_ram_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
