"""What another process (QEMU) may have written in a RAM file, from its page tables
(/proc/PID/pagemap).

Two signals, both read from the writable shared mappings of the file in that
process (found in /proc/PID/maps by device and inode):

- **soft-dirty** (bit 55): pages written since the last ``clear_refs``. Needs a
  kernel built with CONFIG_MEM_SOFT_DIRTY; ``soft_dirty_supported()`` checks by
  experiment (clear, write one page of a shared memfd mapping, read the bit).
- **resident** (bit 63): pages the process has mapped at all. A process can only
  write a page of the file through a page-table entry, so a page it does not map
  now was not written since it last mapped it, *provided the kernel never drops a
  written entry of the file on its own*: no swap (tmpfs pages are then never
  reclaimed) and no shmem transparent huge pages (khugepaged would retract the
  entries). ``residency_unsafe_reason()`` checks both. Soft-dirty bits rely on the
  same: they live in those entries.

Swap-format entries (bit 62: a page being migrated by the kernel) count as written.

**Releasing entries** (``GuestRamWatch.release``): the resident set is every page
the process touched since it booted, most of it long idle. ``MADV_PAGEOUT``, sent
to the process with ``process_madvise``, makes the kernel try to reclaim the
file's pages it alone maps: it unmaps each, then fails to write it out (tmpfs
without swap has nowhere to put it) and keeps it, data intact. What remains is
a resident set that starts empty: from then on, a page mapped is a page touched
since the release. Pages it skips (mapped by another process too, locked, in
use) stay mapped, which only widens the bound. Done once, before the first
scan reads anything (see stopscan.py for why not once a round).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import novacron.native._kernels as _kernels
from novacron.native.bitmap import Bitmap, bitmap_new

PAGE_SIZE = 4096
_SOFT_DIRTY_BIT = 55
_PRESENT_BIT = 63  # (bit 62, a swap-format entry, always counts: see nc_pagemap.h)
_CLEAR_SOFT_DIRTY = b"4"
_MADV_PAGEOUT = 21
_SYS_PROCESS_MADVISE = 440  # one number on every architecture (asm-generic table, Linux 5.10+)
_RELEASE_CHUNK = 1 << 30
_IOV_MAX = 1024  # iovecs per call (the kernel's UIO_MAXIOV)
_MAX_RW = (1 << 31) - 4096  # bytes per call (the kernel's MAX_RW_COUNT: longer lists are cut short)


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
    # a shared file mapping, like QEMU's of the RAM file (tmpfs, as a memfd is)
    fd = os.memfd_create("novacron-soft-dirty-probe")
    try:
        os.ftruncate(fd, PAGE_SIZE)
        buf = mmap.mmap(fd, PAGE_SIZE)
    finally:
        os.close(fd)
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


_TMPFS_MAGIC = 0x01021994
_HUGETLBFS_MAGIC = 0x958458F6


def _fs_type(path: str) -> int:
    libc = _libc()
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    if libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], "little")


def residency_unsafe_reason(ram_path: str | None = None, sys_root: str = "/") -> str:
    """Empty when the kernel keeps every written page-table entry of the RAM file
    until the process unmaps it (tmpfs or hugetlbfs, no swap, no shmem huge pages),
    else why not."""
    if ram_path is not None:
        try:
            fs = _fs_type(ram_path)
        except OSError as exc:
            return f"cannot tell the RAM file's filesystem: {exc}"
        if fs == _HUGETLBFS_MAGIC:
            return ""  # huge pages are never swapped out nor collapsed
        if fs != _TMPFS_MAGIC:
            return "the RAM file is not on tmpfs (its pages may be written back and dropped)"
    root = Path(sys_root)
    try:
        swaps = (root / "proc/swaps").read_text().splitlines()[1:]
    except OSError as exc:
        return f"cannot read /proc/swaps: {exc}"
    if any(line.strip() for line in swaps):
        return "swap is enabled (tmpfs pages may be swapped out, dropping their page-table entries)"
    thp = root / "sys/kernel/mm/transparent_hugepage"
    if thp.is_dir():
        for f in [thp / "shmem_enabled", *sorted(thp.glob("hugepages-*/shmem_enabled"))]:
            try:
                text = f.read_text()
            except OSError:
                continue
            chosen = text[text.find("[") + 1:text.find("]")] if "[" in text else text.strip()
            if chosen not in ("never", "deny", "inherit"):
                return f"shmem huge pages are enabled ({f.relative_to(root)}: {chosen})"
    return ""


@dataclass(frozen=True)
class _Mapping:
    start: int  # address in the process
    first_page: int  # page of the file it starts at
    npages: int


class GuestRamWatch:
    """Pages of a RAM file that process ``pid`` may have written, from its page tables.

    ``read(soft_dirty)`` returns a bitmap over the file's pages: with
    ``soft_dirty=True`` the pages written since ``clear()``, else the pages the
    process maps (see the module notes for why that bounds what it wrote).
    ``pagemap_bytes`` counts what was read from /proc. Raises OSError when the
    process is gone, cannot be inspected, or maps no writable part of the file.
    """

    def __init__(self, pid: int, dev: int, ino: int, npages: int) -> None:
        self.pid, self.dev, self.ino, self.npages = pid, dev, ino, npages
        self.pagemap_bytes = 0
        self._scan_ioctl = True  # until the kernel says it has no PAGEMAP_SCAN
        if not self.mappings():
            raise OSError(f"process {pid} maps no writable shared part of the RAM file")

    def mappings(self) -> list[_Mapping]:
        """The process's writable shared mappings of the file (re-read each time)."""
        return _writable_mappings(self.pid, self.dev, self.ino, self.npages)

    def other_writers(self) -> list[int]:
        """Other processes that map the file writable (e.g. a vhost-user backend): their
        writes are not in this process's page tables, so they void the bound."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == self.pid:
                continue
            try:
                if _writable_mappings(int(entry), self.dev, self.ino, self.npages):
                    pids.append(int(entry))
            except OSError:  # gone meanwhile, or a kernel thread
                continue
        return pids

    def release(self, pages: Bitmap | None = None) -> int:
        """Unmap the process's entries of the file (see the module notes), keeping its
        data: of every page, or of the pages set in ``pages`` (a bitmap over the file's
        pages). Returns the bytes the kernel advised (it may still skip a page, e.g. one
        another process maps too: ``read()`` tells what stays mapped). Only where
        ``residency_unsafe_reason()`` is empty: with swap on, this would swap the guest
        out. OSError when the kernel refuses (no process_madvise, no CAP_SYS_NICE, a
        locked or hugetlb mapping)."""
        ranges: list[tuple[int, int]] = []  # (address, bytes), each at most _RELEASE_CHUNK
        for m in self.mappings():
            runs = [(m.first_page, m.npages)] if pages is None else \
                page_runs(pages, m.first_page, m.first_page + m.npages)
            for first, count in runs:
                addr, size = m.start + (first - m.first_page) * PAGE_SIZE, count * PAGE_SIZE
                ranges += [(addr + off, min(_RELEASE_CHUNK, size - off)) for off in range(0, size, _RELEASE_CHUNK)]
        syscall = _libc().syscall
        syscall.restype = ctypes.c_long
        done = 0
        pidfd = os.pidfd_open(self.pid)
        try:
            i = 0
            while i < len(ranges):
                # the kernel takes at most UIO_MAXIOV iovecs and MAX_RW_COUNT bytes a call
                j, total = i, 0
                while j < len(ranges) and j - i < _IOV_MAX and total + ranges[j][1] <= _MAX_RW:
                    total += ranges[j][1]
                    j += 1
                iov = np.array(ranges[i:j], dtype=np.uint64)  # struct iovec {void *; size_t}
                n = syscall(ctypes.c_long(_SYS_PROCESS_MADVISE), ctypes.c_int(pidfd),
                            ctypes.c_void_p(iov.ctypes.data), ctypes.c_size_t(j - i),
                            ctypes.c_int(_MADV_PAGEOUT), ctypes.c_uint(0))
                if n < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"process_madvise(MADV_PAGEOUT) of process {self.pid}: "
                                       f"{os.strerror(err)}")
                done += n  # short: an error part way; the rest stays mapped (a wider bound only)
                i = j
        finally:
            os.close(pidfd)
        return done

    def direct_io_reason(self) -> str:
        """Empty unless the process may write guest RAM without its page tables: a file
        open with O_DIRECT (a disk with cache.direct: the device reads into pinned
        pages, by DMA) or a VFIO device. A page released while pinned for such a read
        would take the data with no entry to show it: the release is off then."""
        try:
            fds = os.listdir(f"/proc/{self.pid}/fdinfo")
        except OSError as exc:
            return f"cannot read the process's open files: {exc}"
        for fd in fds:
            try:
                if os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("/dev/vfio"):
                    return "a VFIO device is attached (its DMA bypasses the page tables)"
                with open(f"/proc/{self.pid}/fdinfo/{fd}") as f:
                    flags = next((int(line.split()[1], 8) for line in f if line.startswith("flags:")), 0)
            except (OSError, ValueError):  # closed meanwhile
                continue
            if flags & os.O_DIRECT:
                return f"file descriptor {fd} is open with O_DIRECT (a disk's reads land by DMA)"
        return ""

    def clear(self) -> None:
        """Reset the soft-dirty bits of the whole process (the kernel has no per-range clear)."""
        _kernels.clear_soft_dirty(self.pid)

    def read(self, soft_dirty: bool = False) -> Bitmap:
        out = bitmap_new(self.npages)
        fd = os.open(f"/proc/{self.pid}/pagemap", os.O_RDONLY)
        try:
            maps = self.mappings()
            if not soft_dirty and self._scan_ioctl and (bits := _present_by_scan(fd, maps, self.npages)) is not None:
                self.pagemap_bytes += bits[1]
                return bits[0]
            self._scan_ioctl = False  # this kernel has no PAGEMAP_SCAN: 8 bytes a page, as before
            for m in maps:  # nc_pagemap.h, without the GIL
                _kernels.pagemap_bits(fd, m.start, m.npages,
                                      _SOFT_DIRTY_BIT if soft_dirty else _PRESENT_BIT, out, m.first_page)
                self.pagemap_bytes += m.npages * 8
        finally:
            os.close(fd)
        return out


# PAGEMAP_SCAN (Linux 6.7+): the kernel walks the page tables and returns only the
# ranges that match, 24 bytes a range, where pagemap's read gives 8 bytes a page:
# reading what QEMU maps of a 4 GiB guest costs by what it maps, not by its size.
_PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg): 96 bytes
_PAGE_IS_PRESENT = 1 << 3
_PAGE_IS_SWAPPED = 1 << 4  # a swap-format entry (a page being migrated): counts as written
_SCAN_REGIONS = 4096
_SHORT_REGION = 64  # pages: regions up to this long are set by index arrays (_region_bits)


def _present_by_scan(fd: int, maps: list[_Mapping], npages: int) -> tuple[Bitmap, int] | None:
    """The mapped pages of ``maps`` as a bitmap over the file, and the bytes the kernel
    returned; None where the kernel has no PAGEMAP_SCAN."""
    firsts: list[np.ndarray] = []  # per call: each region's first file page, and its pages
    counts: list[np.ndarray] = []
    vec = np.zeros((_SCAN_REGIONS, 3), dtype=np.uint64)  # struct page_region {start, end, categories}
    arg = np.zeros(12, dtype=np.uint64)  # struct pm_scan_arg
    got = 0
    ioctl = _libc().ioctl
    for m in maps:
        start, end = m.start, m.start + m.npages * PAGE_SIZE
        while start < end:  # bounded: each call returns past ``start`` or fails
            arg[:] = [96, 0, start, end, 0, vec.ctypes.data, _SCAN_REGIONS, 0, 0, 0,
                      _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED, _PAGE_IS_PRESENT | _PAGE_IS_SWAPPED]
            n = ioctl(ctypes.c_int(fd), ctypes.c_ulong(_PAGEMAP_SCAN), ctypes.c_void_p(arg.ctypes.data))
            if n < 0:
                return None
            got += 24 * n
            regions = vec[:n].astype(np.int64)
            firsts.append(m.first_page + (regions[:, 0] - m.start) // PAGE_SIZE)
            counts.append((regions[:, 1] - regions[:, 0]) // PAGE_SIZE)
            walk_end = int(arg[4])
            if walk_end <= start:
                return None
            start = walk_end
    out = bitmap_new(npages)
    packed = np.packbits(_region_bits(firsts, counts, npages), bitorder="little")
    out[:packed.size] = packed
    return out, got


def _region_bits(firsts: list[np.ndarray], counts: list[np.ndarray], npages: int) -> np.ndarray:
    """One bool per page, set in the regions (first page, pages). A busy guest's mask is
    thousands of scattered regions (a Python loop over them took 17 ms at 16k): short
    ones are indexed at once, long ones filled as slices (index arrays for every mapped
    page of a large guest would cost 24 bytes a page)."""
    bits = np.zeros(npages, dtype=bool)
    first = np.concatenate(firsts) if firsts else np.zeros(0, dtype=np.int64)
    count = np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)
    long = count > _SHORT_REGION
    for a, c in zip(first[long].tolist(), count[long].tolist(), strict=True):
        bits[a:a + c] = True  # at most npages / _SHORT_REGION of these
    first, count = first[~long], count[~long]
    if count.size:
        # page k of region r is first[r] + k: an arange over their pages (at most
        # _SHORT_REGION each, so the index arrays stay within that many per region)
        ends = np.cumsum(count)
        bits[np.repeat(first - (ends - count), count) + np.arange(int(ends[-1]))] = True
    return bits


def page_runs(pages: Bitmap, first: int, end: int) -> list[tuple[int, int]]:
    """(first page, count) of the runs of set bits of ``pages`` in ``[first, end)``."""
    bits = np.unpackbits(np.asarray(pages, dtype=np.uint8), bitorder="little", count=end)[first:]
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits.astype(np.int8), [0]))))
    return [(first + int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@functools.cache
def _libc() -> ctypes.CDLL:
    # the C library this process already has loaded: find_library would spawn ldconfig
    # (a vfork child shares, until it execs, every mapping of ours, RAM files included)
    return ctypes.CDLL(None, use_errno=True)


def _writable_mappings(pid: int, dev: int, ino: int, npages: int) -> list[_Mapping]:
    out = []
    major, minor = os.major(dev), os.minor(dev)
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) < 5 or parts[4] != str(ino):
                continue
            dmaj, _, dmin = parts[3].partition(":")
            perms = parts[1]
            if int(dmaj, 16) != major or int(dmin, 16) != minor or perms[1] != "w" or perms[3] != "s":
                continue
            lo, _, hi = parts[0].partition("-")
            start, end = int(lo, 16), int(hi, 16)
            first = int(parts[2], 16) // PAGE_SIZE
            n = min((end - start) // PAGE_SIZE, npages - first)
            if n > 0:
                out.append(_Mapping(start, first, n))
    return out
