"""Which pages the pause has to look at: a stop-phase scan that does not grow with RAM.

The pre-copy tracker keeps, for every page, the fingerprint of the bytes the
destination holds (or the page is pending: found changed by the last scan and
not sent yet). At the pause, a page can differ from the destination only if it
is pending or was written after its fingerprint was last taken. Reading every
page to find those is O(guest RAM). Instead we ask the kernel which pages the
VM's process (QEMU) may have written, from its page tables (``GuestRamWatch``):

- ``soft-dirty``: the soft-dirty bits are cleared right before each pre-copy
  scan, so a write after the last scan read a page sets its bit; a write before
  the clear was seen by that scan (the page is resident, so in its mask). The
  pause fingerprints only soft-dirty pages: bounded by what was dirtied during
  the last round. Not where a device may write guest RAM by DMA (a disk open
  with O_DIRECT, a VFIO device): a page pinned before the clear takes the
  device's write with no bit set. Those migrations use ``resident`` (without
  any release), checked again at the pause.
- ``resident``: (kernels without soft-dirty, e.g. this project's dev hosts) a
  process writes a page only through a page-table entry, and without swap or
  shmem huge pages the kernel never drops a written entry of the tmpfs file.
  Every page written since the first scan (of every written page) is still mapped by
  QEMU at the pause, and only mapped pages are fingerprinted: bounded by the
  guest's working set, not its RAM size. Later pre-copy scans use the same mask.
  What QEMU maps is everything it touched since boot (an idle 4 GiB guest: about
  350 MB), so ``release_resident`` first unmaps QEMU's entries of the file
  (``GuestRamWatch.release``, data kept), right before the written pages are
  listed: the mask is then what the guest touched during the migration. A write
  before the release is read by the first scan (the listing comes after it); one
  after maps its page again until the pause. Each later pre-copy scan reads the
  mask, releases the mask's pages only, then fingerprints them: a write to one
  of them before its release is read by that scan, one after maps it again; a
  page outside the mask that is written meanwhile is not released, so it stays
  mapped for the next mask. (Releasing every page there would lose a write
  landing between the mask's read and the release.) The pause's mask is then
  what the guest touched during the last round, as with soft-dirty bits.
- ``full``: anything else (no pid, /proc unreadable, RAM file not on tmpfs or
  hugetlbfs, swap on, shmem huge pages, another process mapping the RAM file
  writable such as a vhost-user backend, ``bounded_pause`` off): every page, as before. Correct everywhere, O(RAM).

Any error reading /proc falls back to ``full`` for the rest of the migration.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from novacron.agent.safefs import open_regular
from novacron.native import (
    Bitmap,
    GuestRamWatch,
    bitmap_count,
    residency_unsafe_reason,
    soft_dirty_supported,
)
from novacron.native.softdirty import _TMPFS_MAGIC, _fs_type, page_runs

PAGE = 4096

log = logging.getLogger("novacron.agent.migration")


class StopScan:
    """Built in a worker thread: it reads /proc (every process's maps, once)."""

    def __init__(self, migration: str, pid: int | None, ram_path: Path, ram_stat: Any,
                 npages: int, enabled: bool = True) -> None:
        self.migration = migration
        self.ram_path = str(ram_path)
        self.mode = "full"
        self.reason = ""
        self.pages_examined = 0  # pages fingerprinted while the guest was paused
        self.release: dict[str, Any] = {}  # what release_resident did before the first scan
        self.released_bytes = 0  # released by later pre-copy scans
        self.release_rounds = False  # set once the first release worked (source.py)
        self.last_release_s = 0.0  # of the last scan's time: not the paused scan's (it releases nothing)
        self.own: mmap.mmap | None = None  # the agent's own mapping of the RAM file (source.py)
        self._npages = npages
        self._watch: GuestRamWatch | None = None
        if not enabled:
            self.reason = "bounded_pause is off"
        elif pid is None or ram_stat is None:
            self.reason = "the VM's process or RAM file identity is unknown"
        elif unsafe := residency_unsafe_reason(self.ram_path):
            self.reason = unsafe
        else:
            try:
                watch = GuestRamWatch(pid, ram_stat.st_dev, ram_stat.st_ino, npages)
                others = watch.other_writers()
            except OSError as exc:
                self.reason = f"cannot read the VM process's page tables: {exc}"
            else:
                if others:
                    self.reason = f"other processes map the RAM file writable: {others[:5]}"
                else:
                    self._watch = watch
                    self.mode = "soft-dirty" if soft_dirty_supported() else "resident"
                    self._trust_soft_dirty(watch)
        log.info("stop-phase scan", extra={"migration": migration, "mode": self.mode,
                                           "reason": self.reason or None})

    def _trust_soft_dirty(self, w: GuestRamWatch) -> None:
        """Leave soft-dirty mode where QEMU may write guest RAM by DMA (at setup, after
        each clear, at the pause). A device's DMA into a page pinned before the bits
        were cleared sets no bit (a pin after the clear write-faults, which does).
        Nothing is ever released in soft-dirty mode, so every page written since boot
        is still mapped: what QEMU maps bounds the pause instead (wider, never short of
        a write)."""
        if self.mode != "soft-dirty" or not (why := w.direct_io_reason()):
            return
        self.mode, self.reason = "resident", f"soft-dirty bits miss writes by DMA: {why}"
        log.info("stop-phase scan bound by QEMU's mapped pages", extra={"migration": self.migration,
                                                                       "reason": self.reason})

    def _fail(self, exc: Exception) -> None:
        log.warning("page-table tracking failed; scanning all RAM from now on",
                    extra={"migration": self.migration, "mode": self.mode, "error": str(exc)})
        self.mode, self.reason, self._watch = "full", f"page-table read failed: {exc}", None

    def before_scan(self, first: bool) -> Bitmap | None:
        """Call right before each pre-copy scan; returns the pages it must fingerprint
        (None: all). The first scan is not limited by page tables: it must see what was
        written before (it reads every written page of the file, see ``written_pages``)."""
        w = self._watch
        if w is None:
            return None
        try:
            if self.mode == "soft-dirty":
                w.clear()  # first: a write after this is caught by the bit, one before by the scan
                self._trust_soft_dirty(w)  # an I/O pinned before this clear may land unseen
            if first:
                return None
            mask = w.read(soft_dirty=False)
        except OSError as exc:
            self._fail(exc)
            return None
        if self.mode == "resident" and self.release_rounds:
            # only the mask's pages, and before the scan reads them (see the module notes)
            t0 = time.monotonic()
            try:
                if why := w.direct_io_reason():  # e.g. a disk attached meanwhile
                    raise OSError(why)
                if self.own is not None:
                    # the kernel keeps a page another mapping shares: our reads (scans,
                    # sends) mapped them here too; dropping our entries keeps the data
                    # (a wider range than the mask is harmless here: our mapping only reads)
                    for a, n in _merged(page_runs(mask, 0, self._npages), gap=64):
                        self.own.madvise(mmap.MADV_DONTNEED, a * PAGE, n * PAGE)
                self.released_bytes += w.release(mask)
            except (OSError, ValueError) as exc:  # they stay mapped: a wider bound, nothing lost
                log.warning("releasing the scanned pages failed; not trying again",
                            extra={"migration": self.migration, "error": str(exc)})
                self.release_rounds = False
                self.release["rounds_error"] = str(exc)
            self.last_release_s = time.monotonic() - t0
        return mask

    def at_pause(self) -> Bitmap | None:
        """With the guest paused: the pages that may differ from their last fingerprint
        (besides the pending ones). None: all of them."""
        w = self._watch
        if w is None:
            return None
        if unsafe := residency_unsafe_reason(self.ram_path):  # e.g. swap switched on meanwhile
            self._fail(OSError(unsafe))
            return None
        try:
            self._trust_soft_dirty(w)  # a disk attached meanwhile
            return w.read(soft_dirty=self.mode == "soft-dirty")
        except OSError as exc:
            self._fail(exc)
            return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "reason": self.reason or None,
            "pages_examined": self.pages_examined,
            "bytes_examined": self.pages_examined * 4096,
            "pagemap_bytes": self._watch.pagemap_bytes if self._watch is not None else 0,
            "release": {**self.release, "rounds_bytes": self.released_bytes} if self.release else None,
        }


def release_resident(migration: str, pid: int | None, ram_path: Path, ram_stat: Any,
                     npages: int, enabled: bool = True) -> dict[str, Any]:
    """Before the first scan of a ``resident`` migration: unmap QEMU's entries of the
    RAM file (see the module notes), so the pause's mask is what the guest touched
    since. Returns what it did, for the status; never raises: a release refused or
    failed leaves the entries mapped, which is only a wider bound."""
    if not enabled or pid is None or ram_stat is None:
        return {"skipped": "no bound is kept for this migration"}
    if soft_dirty_supported():
        return {"skipped": "soft-dirty bits bound the pause"}
    path = str(ram_path)
    # with swap on, this would swap the guest out; on hugetlbfs the kernel refuses (EINVAL)
    if unsafe := _tmpfs_unsafe_reason(path):
        return {"skipped": unsafe}
    t0 = time.monotonic()
    try:
        watch = GuestRamWatch(pid, ram_stat.st_dev, ram_stat.st_ino, npages)
        if why := watch.direct_io_reason():
            return {"skipped": why}
        before = bitmap_count(watch.read())
        released = watch.release()
        after = bitmap_count(watch.read())  # what the kernel kept mapped (or QEMU touched since)
    except OSError as exc:
        log.warning("QEMU's page-table entries of its RAM were not released; the pause's bound is "
                    "what it touched since boot", extra={"migration": migration, "error": str(exc)})
        return {"skipped": str(exc)}
    return {"bytes": released, "seconds": round(time.monotonic() - t0, 4),
            "resident_before": before, "resident_after": after}


def _tmpfs_unsafe_reason(path: str) -> str:
    """Empty when the RAM file is on tmpfs and the kernel keeps its page-table entries
    (``residency_unsafe_reason``), else why not."""
    try:
        if _fs_type(path) != _TMPFS_MAGIC:
            return "the RAM file is not on tmpfs"
    except OSError as exc:
        return f"cannot tell the RAM file's filesystem: {exc}"
    return residency_unsafe_reason(path)


def _merged(runs: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """``runs`` with those fewer than ``gap`` pages apart joined (fewer syscalls)."""
    out: list[tuple[int, int]] = []
    for a, n in runs:
        if out and a - (out[-1][0] + out[-1][1]) < gap:
            out[-1] = (out[-1][0], a + n - out[-1][0])
        else:
            out.append((a, n))
    return out


def data_runs(fd: int, first: int, end: int) -> list[tuple[int, int]]:
    """(first page, count) of the runs of pages in ``[first, end)`` that hold data in
    the file (SEEK_DATA/SEEK_HOLE; a page partly data counts). OSError where the file
    system cannot tell."""
    runs: list[tuple[int, int]] = []
    pos, stop = first * PAGE, end * PAGE
    while pos < stop:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past pos
                break
            raise
        if start >= stop:
            break
        hole = min(os.lseek(fd, start, os.SEEK_HOLE), stop)
        a, b = start // PAGE, min(end, (hole + PAGE - 1) // PAGE)
        runs.append((a, b - a))
        pos = b * PAGE
    return runs


def written_pages(ram_path: Path, ram_stat: Any, npages: int) -> tuple[Bitmap, list[tuple[int, int]]] | None:
    """The pages of a tmpfs RAM file that were ever written (or read), from its holes:
    tmpfs reports a page nobody wrote (not even its ``posix_fallocate``'d space) as a
    hole, and a hole reads as zeros. Returns (bitmap of the other pages, their
    (first, count) runs), or None when that cannot be told (not tmpfs, swap or shmem
    huge pages on, SEEK_DATA unsupported): then every page counts. The first pre-copy
    scan reads only these pages: an idle guest's untouched RAM is neither read (which
    would make the kernel zero it) nor fingerprinted. A page written after this call
    is found by the next scan, as any page written after the scan read it."""
    path = str(ram_path)
    try:
        if _tmpfs_unsafe_reason(path):
            return None
        fd = open_regular(ram_path, os.O_RDONLY, same_as=ram_stat)
    except OSError:
        return None
    try:
        runs = data_runs(fd, 0, npages)
    except OSError:
        return None
    finally:
        os.close(fd)
    bits = np.zeros(npages, dtype=bool)
    for first, count in runs:
        bits[first:first + count] = True
    return np.packbits(bits, bitorder="little"), runs
