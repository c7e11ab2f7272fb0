"""The file that backs guest RAM (``memory-backend-file,share=on``)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
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


def _reserve(fd: int, path: Path, size: int, offset: int = 0) -> None:
    """Reserve the file's space: running out later would kill the guest with SIGBUS."""
    try:
        os.posix_fallocate(fd, offset, size)
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


RESERVE_CHUNK = 8 * MIB  # reserved at a time, lowest offsets first (Reservation)
# File systems whose fallocate the kernel does itself (glibc emulates it elsewhere):
# only on these is the space reserved while pages are already being written.
NATIVE_FALLOCATE = ("tmpfs", "hugetlbfs", "ext4", "xfs", "btrfs", "f2fs", "overlay")


class Reservation:
    """An incoming VM's RAM file, its space reserved in a worker thread while QEMU
    starts and the first pages arrive: ``posix_fallocate`` allocates every page of
    a tmpfs file, 0.1-0.4 s at 256 MiB on busy cores, which no longer waits in front
    of the migration.

    A page written through a mapping of the file before its space is reserved would
    kill the writer with SIGBUS if the file system ran out meanwhile, so a writer
    calls ``ensure(start, end)`` first: at once when the range is below ``reserved``
    (the thread reserves in ascending ``RESERVE_CHUNK`` steps, and round 1's pages
    arrive in that order), else it reserves the range itself. It raises
    InsufficientSpace when the space is not there, as ``wait`` does: whoever writes
    or runs the guest (QEMU's device state, post-copy) must have awaited ``wait``."""

    def __init__(self, fd: int, path: Path, size: int, reserved: int = 0) -> None:
        self.path = path
        self.size = size
        self.reserved = reserved  # bytes [0, reserved) have their space
        self.error: Exception | None = None
        self.done_at: float | None = None  # time.monotonic() when the whole file had its space
        self._fd = fd
        self._lock = threading.Lock()  # ensure() against the thread closing the descriptor
        self._stopping = False
        self._task = asyncio.create_task(asyncio.to_thread(self._run))

    def _run(self) -> None:
        try:
            while self.reserved < self.size and not self._stopping:
                n = min(RESERVE_CHUNK, self.size - self.reserved)
                _reserve(self._fd, self.path, n, self.reserved)
                self.reserved += n
            if self.reserved >= self.size:
                self.done_at = time.monotonic()
        except Exception as exc:
            self.error = exc
            raise
        finally:
            with self._lock:  # here, not in the awaiting task: a cancelled await leaves the thread running
                os.close(self._fd)
                self._fd = -1

    @property
    def complete(self) -> bool:
        return self.reserved >= self.size

    def ensure(self, start: int, end: int) -> None:
        """Bytes [start, end) of the file have their space when this returns (any thread)."""
        if end <= self.reserved:
            return
        with self._lock:
            if end <= self.reserved:
                return
            if self.error is not None:
                raise self.error
            if self._fd < 0:
                raise InsufficientSpace(f"the RAM file {self.path} is no longer being reserved")
            start = max(start, self.reserved)  # what the thread has done is not walked again
            _reserve(self._fd, self.path, end - start, start)

    async def wait(self) -> None:
        """Until the whole file has its space; raises InsufficientSpace if it has not."""
        await asyncio.shield(self._task)
        if not self.complete:  # stopped by close(): the file is going, never run a guest on it
            raise InsufficientSpace(f"the RAM file {self.path} is no longer being reserved")

    async def close(self) -> None:
        """Stop reserving (the file is going) and wait for the thread to let go of it."""
        self._stopping = True
        with contextlib.suppress(Exception):
            await asyncio.shield(self._task)


async def create_ram_file(path: Path, size: int, share: Callable[[int], None] = lambda fd: None
                          ) -> tuple[os.stat_result, Reservation]:
    """Like ``prepare_ram_file``, but only creates and sizes the file now; its space is
    reserved in the background (``Reservation``). For a VM whose memory nothing writes
    before the reservation has been awaited or ``ensure``d: an incoming migration's,
    whose QEMU starts in the meantime. The reservation raises InsufficientSpace when
    the space is not there (the caller removes the file)."""
    st, fd = await asyncio.to_thread(_sized, path, size, share)
    if filesystem_type(path.parent) in NATIVE_FALLOCATE:
        return st, Reservation(fd, path, size)
    # Elsewhere glibc may emulate posix_fallocate by reading each block and writing a
    # zero back where it read one: beside incoming pages that could undo a write. So
    # the space is reserved before anything writes, as prepare_ram_file does.
    try:
        await asyncio.to_thread(_reserve, fd, path, size)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    return st, Reservation(fd, path, size, reserved=size)


def remove_ram_file(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
