"""Page dedup by BLAKE3 digest: the sender's index of pages the receiver holds,
and the receiver's page cache built from local files."""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np
import numpy.typing as npt

import novacron.native._kernels as _kernels
from novacron.native.tracking import page_buffer

PAGE_SIZE = 4096
DIGEST_SIZE = 32
_ENTRY_BYTES = 107  # 40-byte slot at <= 75 % load, worst case right after a doubling
_MB = 1 << 20
_STAGING_BYTES = 16 * _MB  # PageStreamSender's per-chunk copy of the pages it sends


def page_digest(page: Any) -> bytes:
    """BLAKE3-256 of one 4 KiB page (same as ``blake3.blake3(page).digest()``)."""
    return bytes(_kernels.blake3_page(page))


def memory_budget(guest_bytes: int) -> int:
    """What tracking plus dedup may cost the agent: 1 % of guest RAM + 64 MB."""
    return guest_bytes // 100 + 64 * _MB


class DedupIndex:
    """Sender side: digest -> where the receiver already holds that content.

    Two sources: pages sent earlier in this migration (the sender's encode
    records them itself, and forgets a page when it is overwritten) and
    pages in the receiver's page cache (``add_remote(digests)``, from
    ``PageCache.digests()`` shipped over by the engine). ``max_entries``
    bounds memory; by default it is sized on first use so that tracking plus
    dedup stay within 1 % of guest RAM + 64 MB.
    """

    def __init__(self, max_entries: int | None = None) -> None:
        if max_entries is not None and max_entries < 16:
            raise ValueError("max_entries must be at least 16")
        self._max = max_entries
        self._table: _kernels.DigestTable | None = None
        self.page_slots: npt.NDArray[np.int32] = np.zeros(0, dtype=np.int32)
        self._pending_remote: list[bytes] = []

    def attach(self, npages: int) -> None:
        """Size the index for a guest of ``npages`` pages (the sender calls this)."""
        if self._table is not None:
            if npages != self.page_slots.size:
                raise ValueError("this DedupIndex already serves a guest of another size")
            return
        if self._max is None:
            # minus fingerprints + page map (12 B/page) and the sender's staging area
            budget = memory_budget(npages * PAGE_SIZE) - 12 * npages - _STAGING_BYTES
            self._max = max(16, min(2 * npages + 1024, budget // _ENTRY_BYTES))
        self._table = _kernels.DigestTable(self._max, min(self._max, 4096))
        self.page_slots = np.full(npages, -1, dtype=np.int32)
        self._table.set_reverse(self.page_slots)
        for blob in self._pending_remote:
            self._add_remote(blob)
        self._pending_remote.clear()

    @property
    def table(self) -> _kernels.DigestTable:
        if self._table is None:
            raise RuntimeError("DedupIndex is not attached to a sender yet")
        return self._table

    def add_remote(self, digests: bytes | npt.NDArray[np.uint8]) -> int:
        """Record digests of pages in the receiver's cache (n*32 bytes or an (n, 32)
        array). Returns how many were new (0 until attached; they are kept)."""
        blob = np.asarray(digests, dtype=np.uint8).tobytes() if not isinstance(digests, bytes) \
            else digests
        if len(blob) % DIGEST_SIZE:
            raise ValueError(f"digest list must be a multiple of {DIGEST_SIZE} bytes")
        if self._table is None:
            self._pending_remote.append(blob)
            return 0
        return self._add_remote(blob)

    def _add_remote(self, blob: bytes) -> int:
        assert self._table is not None
        arr = np.frombuffer(blob, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        values = np.full(arr.shape[0], _kernels.CACHE_VALUE, dtype=np.int64)
        return int(self._table.put_many(arr, values, False))

    def forget_remote(self, digest: bytes) -> None:
        """Stop referring to a cached page (e.g. after the receiver reported a DedupMiss)."""
        if self._table is not None and self._table.get(digest) == _kernels.CACHE_VALUE:
            self._table.discard(digest)

    def __len__(self) -> int:
        return 0 if self._table is None else len(self._table)

    @property
    def memory_bytes(self) -> int:
        table = 0 if self._table is None else int(self._table.nbytes)
        return table + int(self.page_slots.nbytes)


class PageCache:
    """Receiver side: pages of local files (e.g. other VMs' RAM files booted from
    the same image) indexed by BLAKE3 digest, so references can be resolved.

    Files are mapped read-only and may change under us; every page taken from
    the cache is re-hashed before use, so a stale entry yields DedupMiss, never
    wrong memory.
    """

    def __init__(self, max_entries: int = 1 << 22) -> None:
        self.table = _kernels.DigestTable(max_entries, 4096)
        self._buffers: list[Any] = []
        self._maps: list[mmap.mmap] = []
        self._view: _kernels.CacheView | None = None

    def add_file(self, path: str | os.PathLike[str]) -> int:
        """Index every non-zero page of a file; returns how many new digests it added."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < PAGE_SIZE:
                return 0
            m = mmap.mmap(f.fileno(), size - size % PAGE_SIZE, access=mmap.ACCESS_READ)
        self._maps.append(m)
        return self.add_buffer(m)

    def add_buffer(self, buf: Any) -> int:
        """Index a buffer's pages (it must stay valid while the cache lives)."""
        view = page_buffer(buf)
        n = int(_kernels.index_pages(view, self.table, len(self._buffers)))
        self._buffers.append(view)
        self._view = None
        return n

    def add_slot(self, buf: Any) -> int:
        """Register a buffer without indexing it (its pages are added one by one with
        ``add_pages``); returns its slot number."""
        self._buffers.append(page_buffer(buf))
        self._view = None
        return len(self._buffers) - 1

    def index_pages(self, slot: int, first: int, end: int) -> int:
        """Index the non-zero pages ``first`` .. ``end - 1`` of the buffer in ``slot``
        (a known digest moves here: this is the newest look at it); returns how many
        were stored."""
        view = self._buffers[slot]
        if _idle(view) or not 0 <= first <= end <= view.nbytes // PAGE_SIZE:
            raise ValueError(f"no pages {first}..{end} in slot {slot}")
        pages = np.arange(first, end, dtype=np.uint64)
        n = pages.size
        kinds = np.zeros(n, dtype=np.uint8)
        digests = np.empty((n, DIGEST_SIZE), dtype=np.uint8)
        _kernels.classify_pages(view, pages, 0, n, kinds, digests, True)
        data = kinds != _kernels.PY_KIND_ZERO
        values = (np.int64(slot) << np.int64(40)) | pages[data].astype(np.int64)
        return int(self.table.put_many(np.ascontiguousarray(digests[data]),
                                       np.ascontiguousarray(values), True))

    def add_pages(self, slot: int, pages: npt.NDArray[np.uint64],
                  digests: npt.NDArray[np.uint8]) -> int:
        """Record that page ``pages[i]`` of buffer ``slot`` holds ``digests[i]`` (newest
        location wins); returns how many were stored (the table refuses past its bound)."""
        if not 0 <= slot < len(self._buffers) or _idle(self._buffers[slot]):
            raise ValueError(f"no buffer in slot {slot}")
        values = (np.int64(slot) << np.int64(40)) | np.asarray(pages, dtype=np.int64)
        arr = np.ascontiguousarray(digests, dtype=np.uint8).reshape(-1, DIGEST_SIZE)
        return int(self.table.put_many(arr, np.ascontiguousarray(values), True))

    def drop_slot(self, slot: int) -> bool:
        """Stop using a buffer (its VM went away): entries that point into it become
        misses and are discarded when looked up. False while a view of it is exported."""
        if not 0 <= slot < len(self._buffers) or self._buffers[slot] is _GONE:
            return True
        if self._buffers[slot] is not _PARKED and not _release(self._buffers[slot]):
            return False
        self._buffers[slot] = _GONE
        self._view = None
        return True

    def park_slot(self, slot: int) -> bool:
        """Let go of a buffer but keep its entries (``unpark_slot`` gives it back, e.g.
        the same file mapped again); meanwhile they are misses. False while busy."""
        if not 0 <= slot < len(self._buffers) or _idle(self._buffers[slot]):
            return True
        if not _release(self._buffers[slot]):
            return False
        self._buffers[slot] = _PARKED
        self._view = None
        return True

    def unpark_slot(self, slot: int, buf: Any) -> None:
        if self._buffers[slot] is not _PARKED:
            raise ValueError(f"slot {slot} is not parked")
        self._buffers[slot] = page_buffer(buf)

    def forget(self, digest: bytes) -> None:
        self.table.discard(digest)

    @property
    def memory_bytes(self) -> int:
        return int(self.table.nbytes)

    def digests(self) -> bytes:
        """All cached digests, 32 bytes each, for the sender's ``DedupIndex.add_remote``."""
        return bytes(self.table.digests())

    def lookup(self, digest: bytes) -> bytes | None:
        """The cached page with this digest (verified), or None."""
        value = self.table.get(digest)
        if value is None:
            return None
        buf, page = value >> 40, value & ((1 << 40) - 1)
        view = self._buffers[buf] if buf < len(self._buffers) else _GONE
        if view is _PARKED:
            return None
        if (page + 1) * PAGE_SIZE > view.nbytes:  # its buffer was dropped (or shrank)
            self.table.discard(digest)
            return None
        data = bytes(view[page * PAGE_SIZE:(page + 1) * PAGE_SIZE])
        if page_digest(data) != digest:  # the page changed since it was indexed
            self.table.discard(digest)
            return None
        return data

    def view(self) -> _kernels.CacheView:
        if any(b is _GONE or b is _PARKED for b in self._buffers):
            raise RuntimeError("a page cache with dropped slots cannot serve stream references")
        if self._view is None:
            self._view = _kernels.CacheView(self.table, list(self._buffers))
        return self._view

    def __len__(self) -> int:
        return len(self.table)

    def close(self) -> None:
        """Release every view of the indexed buffers and unmap the files.

        Raises BufferError (and keeps what it could not release, so a later
        ``close`` finishes the job) while a ``view()`` is still held elsewhere:
        silently leaving the mapping to the GC would keep guest pages mapped."""
        self._view = None
        busy = [v for v in self._buffers if not _idle(v) and not _release(v)]
        busy_maps = [m for m in self._maps if not _release(m)]
        self._buffers, self._maps = busy, busy_maps
        if busy or busy_maps:
            raise BufferError(f"page cache still in use: {len(busy)} buffer view(s) exported "
                              "by a live view(); close again once it is dropped")


_GONE = memoryview(b"")  # a dropped slot: no pages
_PARKED = memoryview(bytearray())  # a slot whose buffer will be given back


def _idle(view: memoryview) -> bool:
    return view is _GONE or view is _PARKED


def _release(obj: memoryview | mmap.mmap) -> bool:
    try:
        if isinstance(obj, memoryview):
            obj.release()
        else:
            obj.close()
    except BufferError:
        return False
    return True
