"""Opening files by name in a folder QEMU can write to.

A VM folder (``<state_dir>/vms/<name>/``) is ``root:<qemu group> 0770`` so an
unprivileged QEMU can create its sockets there. That also lets a compromised
QEMU replace any name in it with a symlink (to /etc/shadow, /etc/ld.so.preload)
or a fifo (to hang the agent). The agent runs as root, so every open it makes
in such a folder goes through here: never follow a symlink, never block on a
fifo, refuse anything but a regular file, and create files only with O_EXCL.
Owner and mode are then set on the descriptor, never again by name.

(Lives in ``agent/``, not ``agent/vm/``: ``records`` needs it and
``agent.vm`` imports ``records``.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

SAFE_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafeFile(OSError):
    """A name that is a symlink, fifo, device or other non-regular file, or a file
    that is not the one the agent created."""


def _refuse(path: Path, what: str) -> UnsafeFile:
    return UnsafeFile(errno.EPERM, f"refusing {what}", str(path))


def open_regular(path: Path, flags: int, mode: int = 0o600, *,
                 same_as: os.stat_result | None = None) -> int:
    """A descriptor for the regular file ``path`` (``flags`` as for os.open).

    Raises UnsafeFile for a symlink, a non-regular file (a fifo does not block:
    it is opened O_NONBLOCK, then refused) or one with more than one hard link,
    or, with ``same_as``, for a file that is not that inode. FileNotFoundError passes through."""
    try:
        fd = os.open(path, flags | SAFE_FLAGS | os.O_NONBLOCK, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "a symlink") from None
        if exc.errno == errno.ENXIO:  # a fifo opened for writing with no reader
            raise _refuse(path, "a fifo") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, "a non-regular file")
        if st.st_nlink != 1:  # a hard link QEMU made to a file it could not open itself
            raise _refuse(path, "a file with other hard links")
        if same_as is not None and (st.st_ino, st.st_dev) != (same_as.st_ino, same_as.st_dev):
            raise _refuse(path, "a file replaced since the agent created it")
        if not flags & os.O_NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_new(path: Path, flags: int, mode: int = 0o600) -> int:
    """A descriptor for a fresh regular file at ``path``, after removing whatever
    was there (a stale file, or a planted symlink: unlink removes the link, not
    its target). O_EXCL: a name that reappears in between is an error."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | SAFE_FLAGS, mode)


def read_regular(path: Path, offset: int = 0, limit: int = -1) -> bytes:
    """At most ``limit`` bytes (-1: all) of the regular file ``path`` from ``offset``."""
    fd = open_regular(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        f.seek(offset)
        return f.read(limit)


def share_path(path: Path, gid: int | None, mode: int) -> None:
    """chown/chmod the socket or file ``path`` without following a symlink: pinned
    by an O_PATH descriptor, changed through /proc/self/fd (Linux has no lchmod)."""
    try:
        fd = os.open(path, os.O_PATH | SAFE_FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(path, "a symlink") from None
        raise
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            raise _refuse(path, "a non-regular file")
        pinned = f"/proc/self/fd/{fd}"
        if gid is not None:
            os.chown(pinned, -1, gid)
        os.chmod(pinned, mode)
    finally:
        os.close(fd)
