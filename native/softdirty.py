"""Dirty-page tracking with the kernel's soft-dirty bits (/proc/PID/pagemap).

Needs a kernel built with CONFIG_MEM_SOFT_DIRTY. ``soft_dirty_supported()``
checks by experiment on this process (clear, write one page, read the bit), so
callers can fall back to fingerprints when it says no.
"""

from __future__ import annotations

import functools
import mmap
import os

import numpy as np

from novacron.native.bitmap import Bitmap

PAGE_SIZE = 4096
_SOFT_DIRTY_BIT = 55
_CLEAR_SOFT_DIRTY = b"4"


class SoftDirtyUnsupported(OSError):
    """The kernel does not track soft-dirty bits (or we may not use them here)."""


def _clear(pid: int | str) -> None:
    with open(f"/proc/{pid}/clear_refs", "wb", buffering=0) as f:
        f.write(_CLEAR_SOFT_DIRTY)


def _read_entries(pid: int | str, addr: int, npages: int) -> np.ndarray:
    want = npages * 8
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY)
    try:
        data = bytearray()
        offset = (addr // PAGE_SIZE) * 8
        while len(data) < want:  # bounded: every pass reads > 0 bytes or stops
            chunk = os.pread(fd, min(want - len(data), 1 << 24), offset + len(data))
            if not chunk:
                raise OSError(f"short read from /proc/{pid}/pagemap")
            data += chunk
    finally:
        os.close(fd)
    return np.frombuffer(bytes(data), dtype="<u8")


@functools.cache
def _probe() -> str:
    """Empty string when soft-dirty works in this process, else why not."""
    buf = mmap.mmap(-1, PAGE_SIZE)
    try:
        buf[0] = 1
        addr = _address_of(buf)
        _clear("self")
        before = int(_read_entries("self", addr, 1)[0])
        buf[0] = 2
        after = int(_read_entries("self", addr, 1)[0])
    except OSError as exc:
        return f"cannot use /proc/self/clear_refs or pagemap: {exc}"
    finally:
        buf.close()
    if (after >> _SOFT_DIRTY_BIT) & 1 and not (before >> _SOFT_DIRTY_BIT) & 1:
        return ""
    return "kernel does not set soft-dirty bits (built without CONFIG_MEM_SOFT_DIRTY)"


def _address_of(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def soft_dirty_supported() -> bool:
    """True when this kernel tracks soft-dirty bits (checked once, by experiment)."""
    return _probe() == ""


class SoftDirtyTracker:
    """Dirty pages of ``[addr, addr+length)`` in process ``pid`` via soft-dirty bits.

    ``clear()`` resets the bits of the whole process (the kernel has no
    per-range clear); ``read()`` returns the bitmap of pages written since.
    Raises SoftDirtyUnsupported when the kernel lacks the feature.
    """

    def __init__(self, pid: int, addr: int, length: int) -> None:
        reason = _probe()
        if reason:
            raise SoftDirtyUnsupported(reason)
        if addr % PAGE_SIZE or length <= 0 or length % PAGE_SIZE:
            raise ValueError("address and length must be positive multiples of 4096")
        if not os.path.exists(f"/proc/{pid}"):
            raise ProcessLookupError(f"no process {pid}")
        self.pid = pid
        self.addr = addr
        self.npages = length // PAGE_SIZE

    def clear(self) -> None:
        _clear(self.pid)

    def read(self) -> Bitmap:
        entries = _read_entries(self.pid, self.addr, self.npages)
        bits = ((entries >> np.uint64(_SOFT_DIRTY_BIT)) & np.uint64(1)).astype(np.uint8)
        return np.packbits(bits, bitorder="little")
