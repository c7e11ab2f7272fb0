"""Transfer-path kernels: dirty tracking, dedup and the sealed page stream.

The hot loops are Cython (``_kernels.pyx`` + ``nc_hash.h``); they release the
GIL and read/write guest memory buffers in place. Public API (stable):

- ``PAGE_SIZE`` (4096). Bitmaps: 1-D uint8 numpy arrays, one bit per page,
  little-endian bit order (page i -> byte i >> 3, bit i & 7):
  ``bitmap_new(npages)``, ``bitmap_count(bm)``, ``bitmap_runs(bm)`` ->
  (first page, length) pairs, ``bitmap_indices(bm)`` -> uint64 array,
  ``bitmap_or(a, b)``, ``bitmap_andnot(a, b)``, ``bitmap_from_indices``.
- ``FingerprintTracker(mem, key, threads=2, counters=None)``: ``scan()`` ->
  ``ScanResult(dirty, zero, dirty_count, zero_count, seconds)``; the first scan
  reports every non-zero page dirty. 8 bytes per page. ``forget()`` resets.
  A page reported dirty is reported once: send it (or keep it pending).
- ``soft_dirty_supported()``, ``SoftDirtyUnsupported(OSError)``,
  ``SoftDirtyTracker(pid, addr, length)`` with ``clear()`` / ``read()`` -> bitmap.
- ``GuestRamWatch(pid, dev, ino, npages)``: pages of a RAM file another process
  maps (``read()``) or wrote since ``clear()`` (``read(soft_dirty=True)``), from
  its page tables; ``residency_unsafe_reason()`` says when that is no bound.
- ``FingerprintTracker.scan(mask)`` fingerprints only the pages set in ``mask``.
- ``DedupIndex(max_entries=None)``: sender-side digest index; the sender fills
  it with pages it sends; ``add_remote(digests)`` adds the receiver's cached
  pages (bytes of n*32, from ``PageCache.digests()``); ``forget_remote(d)``.
- ``PageCache()``: receiver-side; ``add_file(path)``, ``add_buffer(buf)``,
  ``digests()``, ``lookup(digest)``, ``close()``.
- ``PageStreamSender(key32, mem, *, dedup=None, level=1, threads=2,
  counters=None, frame_pages=256, tracker=None)``: ``encode(pages, zero=None)``
  -> list of sealed frames (``iter_encode`` yields them); ``seal_blob(tag,
  data)``. Pass ``tracker=`` (the FingerprintTracker of the same memory) while
  the guest runs: the sender then records the fingerprint of the bytes it sent,
  so a page changed after the scan is always found dirty again. ``compress``
  (default True) may be switched off between calls (frames then go stored);
  ``last`` holds the latest call's ``EncodeStats``.
- ``PageStreamReceiver(key32, mem_writable, *, cache=None, counters=None)``:
  ``open(frame)`` -> ``Opened(pages, blob, seq)``, ``open_many(frames,
  threads=2)`` (decompresses in parallel, applies in order); raises a ``FrameError``
  subclass (``FrameTruncated``, ``FrameReordered``, ``FrameReplayed``,
  ``FrameTampered``, ``FrameWrongKey``, ``FrameMalformed``, ``DedupMiss``)
  and writes nothing on any error.
- Sender, receiver and tracker hold a view of ``mem``; call ``close()`` before
  closing the mmap.
- Frames are self-delimiting: read ``HEADER_SIZE`` bytes, then
  ``frame_length(header)`` - HEADER_SIZE more. One key per direction per
  migration (the receiver accepts the stream whose frame 0 it sees first).
- ``TokenBucket(rate_bytes_per_s, burst=None)``: ``set_rate``, ``delay_for(n)``,
  ``async acquire(n)``; rate 0 = unlimited.
- ``Counters`` dataclass with ``as_dict()`` / ``merge(other)``.
- ``memory_budget(guest_bytes)`` (1 % + 64 MB) and ``page_digest(page)`` (BLAKE3).
"""

from novacron.native.bitmap import (
    Bitmap,
    bitmap_andnot,
    bitmap_count,
    bitmap_from_indices,
    bitmap_indices,
    bitmap_new,
    bitmap_or,
    bitmap_runs,
)
from novacron.native.counters import Counters
from novacron.native.dedup import DedupIndex, PageCache, memory_budget, page_digest
from novacron.native.limiter import TokenBucket
from novacron.native.softdirty import (
    GuestRamWatch,
    SoftDirtyTracker,
    SoftDirtyUnsupported,
    residency_unsafe_reason,
    soft_dirty_supported,
)
from novacron.native.stream import (
    HEADER_SIZE,
    DedupMiss,
    EncodeStats,
    FrameError,
    FrameMalformed,
    FrameReordered,
    FrameReplayed,
    FrameTampered,
    FrameTruncated,
    FrameWrongKey,
    Opened,
    PageStreamReceiver,
    PageStreamSender,
    frame_is_stored,
    frame_length,
)
from novacron.native.tracking import FingerprintTracker, ScanResult

PAGE_SIZE = 4096

__all__ = [
    "HEADER_SIZE",
    "PAGE_SIZE",
    "Bitmap",
    "Counters",
    "DedupIndex",
    "DedupMiss",
    "EncodeStats",
    "FingerprintTracker",
    "FrameError",
    "FrameMalformed",
    "FrameReordered",
    "FrameReplayed",
    "FrameTampered",
    "FrameTruncated",
    "FrameWrongKey",
    "GuestRamWatch",
    "Opened",
    "PageCache",
    "PageStreamReceiver",
    "PageStreamSender",
    "ScanResult",
    "SoftDirtyTracker",
    "SoftDirtyUnsupported",
    "TokenBucket",
    "bitmap_andnot",
    "bitmap_count",
    "bitmap_from_indices",
    "bitmap_indices",
    "bitmap_new",
    "bitmap_or",
    "bitmap_runs",
    "frame_is_stored",
    "frame_length",
    "memory_budget",
    "page_digest",
    "residency_unsafe_reason",
    "soft_dirty_supported",
]
