"""Dirty-page tracking by keyed page fingerprints, for kernels without soft-dirty."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

import novacron.native._kernels as _kernels
from novacron.native._pool import check_threads, pool
from novacron.native.bitmap import Bitmap, bitmap_count, bitmap_new
from novacron.native.counters import Counters

PAGE_SIZE = 4096


@dataclass
class ScanResult:
    dirty: Bitmap  # fingerprint changed since the previous scan
    zero: Bitmap  # page is all zero now
    dirty_count: int
    zero_count: int
    seconds: float
    scanned: int = 0  # pages fingerprinted (all of them, or those in the scan's mask)


def page_buffer(mem: Any, *, writable: bool = False) -> memoryview:
    """A flat byte view of ``mem`` (mmap, bytes, bytearray, numpy, memoryview),
    checked to be a whole number of pages."""
    try:
        view = memoryview(mem)
    except TypeError:
        raise TypeError(f"guest memory must support the buffer protocol, got {type(mem).__name__}") from None
    if not view.c_contiguous:
        raise ValueError("guest memory must be a contiguous buffer")
    view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
    if view.nbytes % PAGE_SIZE:
        raise ValueError(f"guest memory is {view.nbytes} bytes, not a multiple of {PAGE_SIZE}")
    if writable and view.readonly:
        raise ValueError("destination memory must be writable (open the mmap read-write)")
    return view


class FingerprintTracker:
    """Finds pages changed between scans by a keyed 64-bit fingerprint per page.

    ``mem`` is any buffer over guest RAM (a read-only mmap is fine); ``key`` is
    per-migration secret material (at least 16 bytes), so a guest cannot craft
    pages whose fingerprints collide. Holds 8 bytes per page. ``scan()`` splits
    the pages over ``threads`` workers that run without the GIL.
    """

    def __init__(self, mem: Any, key: bytes, threads: int = 2,
                 counters: Counters | None = None) -> None:
        if not isinstance(key, bytes | bytearray) or len(key) < 16:
            raise ValueError("fingerprint key must be at least 16 bytes")
        self._mem = page_buffer(mem)
        self.npages = self._mem.nbytes // PAGE_SIZE
        self.threads = check_threads(threads)
        self.counters = counters
        self._fp = _kernels.Fingerprinter(bytes(key))
        # "Previous" state of a fresh tracker: every page zero, so the first
        # scan reports every non-zero page as dirty.
        self._fps = np.full(self.npages, self._fp.zero_fp, dtype=np.uint64)
        self._scanned = False  # scan_fresh only before any scan

    @property
    def memory_bytes(self) -> int:
        return int(self._fps.nbytes)

    def scan(self, mask: Bitmap | None = None) -> ScanResult:
        """Fingerprint every page, or only those set in ``mask``; report pages changed
        since they were last fingerprinted, and zero pages (pages outside ``mask`` are
        reported neither dirty nor zero, and keep their fingerprints)."""
        self._scanned = True
        return self._split(lambda a, b, dirty, zero, m: self._fp.scan(self._mem, a, b, self._fps, dirty, zero, m),
                           mask)

    def scan_fresh(self, mask: Bitmap | None = None) -> ScanResult:
        """The first scan of a fresh tracker: which pages (of ``mask``, or all) are
        non-zero (reported dirty) and which are zero, without fingerprinting them.
        Every stored fingerprint is still the zero page's, so the zero pages' stay
        right; the non-zero pages must all be sent before the next scan, the sender
        recording the fingerprints of the bytes it sent (``record_sent``). Reads a
        non-zero page only up to its first non-zero word: a fraction of a
        fingerprinting pass, which the sender would repeat anyway."""
        if self._scanned:
            raise RuntimeError("scan_fresh is for a tracker that has not scanned or recorded yet")
        self._scanned = True
        return self._split(lambda a, b, dirty, zero, m: _kernels.zero_scan(self._mem, a, b, dirty, zero, m),
                           mask)

    def _split(self, kernel: Any, mask: Bitmap | None) -> ScanResult:
        """Run ``kernel(first, last, dirty, zero, mask)`` over the pages, split over the threads."""
        t0 = time.perf_counter()
        dirty = bitmap_new(self.npages)
        zero = bitmap_new(self.npages)
        n = self.npages
        if mask is not None:
            mask = np.ascontiguousarray(mask, dtype=np.uint8)
            if mask.size * 8 < n:
                raise ValueError("scan mask is smaller than guest memory")
        parts = self.threads if n >= 4096 * self.threads else 1
        step = ((n + parts - 1) // parts + 7) // 8 * 8
        bounds = [(a, min(n, a + step)) for a in range(0, n, step)] or [(0, 0)]
        if len(bounds) == 1:
            results = [kernel(0, n, dirty, zero, mask)]
        else:
            ex = pool(self.threads)
            futs = [ex.submit(kernel, a, b, dirty, zero, mask) for a, b in bounds]
            results = [f.result() for f in futs]
        nd = sum(r[0] for r in results)
        nz = sum(r[1] for r in results)
        scanned = n if mask is None else bitmap_count(mask)
        seconds = time.perf_counter() - t0
        if self.counters is not None:
            c = self.counters
            c.pages_scanned += scanned
            c.pages_dirty += nd
            c.pages_zero += nz
            c.seconds_scan += seconds
        return ScanResult(dirty, zero, nd, nz, seconds, scanned)

    @property
    def fingerprinter(self) -> _kernels.Fingerprinter:
        return self._fp

    def record_sent(self, pages: npt.NDArray[np.uint64], fps: npt.NDArray[np.uint64]) -> None:
        """Store the fingerprints of the bytes actually sent for ``pages`` (the sender
        calls this), so the next scan compares against what the receiver holds."""
        self._scanned = True
        self._fps[pages.astype(np.int64)] = fps

    def close(self) -> None:
        """Let go of guest memory (an mmap can be closed afterwards)."""
        self._mem.release()

    def forget(self) -> None:
        """Make the next scan report every non-zero page again (e.g. after a failed round)."""
        self._fps.fill(self._fp.zero_fp)
