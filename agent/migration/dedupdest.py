"""Destination-side dedup: pages the destination already holds are copied here
instead of crossing the link.

``PageIndex`` (one per agent) maps BLAKE3 digests to where that content lies on
this host: pages of its running VMs' RAM files (indexed once per VM, lazily, when
a migration arrives: no O(RAM) work per migration) and pages that incoming
migrations received (indexed as they land, so several VMs evacuated here at once
send each distinct content once; what one received as plain data before another
arrived is hashed in the background when that one arrives). Only the pages a file
holds are read, never its holes (``_data_runs``). Memory is bounded by ``dedup_index_max_mb``;
entries are never trusted: every page copied from the index is re-hashed at the
moment it is copied, and a stale entry (the page changed, its VM went away) is a
miss, answered "need" (the source then sends the data).

``IncomingDedup`` (one per incoming migration) answers the source's ``have``
batches (see protocol.py): it copies the pages it finds, and answers the others
"need" at once, except content another migration here was already asked for
(in flight): that waits until the page lands and verifies (then it is copied),
or is answered "need" when it does not (that migration failed, the page changed,
``DEFER_S`` passed). A migration that ends rolls back its own in-flight promises.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import mmap
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from novacron.agent.channel.records import ProtocolError
from novacron.agent.migration import protocol
from novacron.agent.migration.stopscan import data_runs
from novacron.native import PageCache, page_digest

log = logging.getLogger("novacron.agent.migration")

PAGE = 4096
ENTRY_BYTES = 107  # digest table: 40-byte slot at <= 75 % load, worst case after a doubling
FLIGHT_BYTES = 400  # a Python record per page promised by one migration and awaited by others
DEFER_S = 20.0  # longest wait for content in flight for another migration
INDEX_CHUNK = 4096  # pages of a running VM hashed per hold of the index lock (16 MiB)
REINDEX_S = 600.0  # a running VM's RAM drifts: hashed again (background) at most this often


@dataclass
class _Waiter:
    mig: IncomingDedup
    batch: int
    page: int
    digest: bytes
    deadline: float


@dataclass
class _Flight:
    """Content one migration was told to send (``need``), not landed yet."""

    owner: IncomingDedup
    page: int
    waiters: list[_Waiter] = field(default_factory=list)


@dataclass
class _Slot:
    """A RAM file the index refers to."""

    slot: int  # its buffer number in the PageCache
    mm: mmap.mmap | None  # None: parked between migrations
    path: Path
    next_page: int = 0  # indexed this far (incoming RAM: once another migration arrives)
    pages: int = 0
    indexed_at: float = -math.inf  # monotonic time its indexing last completed


def _data_runs(path: Path, key: tuple[int, int], first: int, end: int) -> list[tuple[int, int]]:
    """(first page, count) of the runs in ``[first, end)`` that hold data in the file
    (SEEK_DATA/SEEK_HOLE). A hole reads as zeros, and on tmpfs reading one through a
    mapping allocates its page: RAM for nothing, and with the file system full the
    read is a SIGBUS that kills the agent. Where holes cannot be told, all of it;
    nothing when the file at ``path`` is no longer the one mapped (``key``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key:
            return []
        try:
            return data_runs(fd, first, end)
        except OSError:  # no SEEK_DATA here (not tmpfs: holes read freely)
            return [(first, end - first)]
    finally:
        os.close(fd)


class PageIndex:
    """The agent's digest -> page index (see the module docstring). Thread-safe:
    copies and indexing run in worker threads under ``lock``.

    A running VM's RAM is indexed once, in the background, ``INDEX_CHUNK`` pages
    at a time (the lock is released between chunks, so answering the source
    never waits long): the first migration after a VM started here may find less
    than later ones."""

    def __init__(self, max_mb: int, running_rams: Callable[[], list[Path]] | None = None) -> None:
        if max_mb < 1:
            raise ValueError("dedup_index_max_mb must be at least 1")
        self.max_entries = max(16, max_mb * (1 << 20) // ENTRY_BYTES)
        self.cache = PageCache(self.max_entries)
        self.lock = threading.Lock()
        self.running_rams = running_rams  # called in the event loop thread
        self._slots: dict[tuple[int, int], _Slot] = {}  # by (st_dev, st_ino)
        self._incoming: dict[IncomingDedup, tuple[int, int]] = {}
        self.flights: dict[bytes, _Flight] = {}
        self.refused = 0  # digests the full table turned away
        self.defer_s = DEFER_S
        # promises bounded too: past this many, content is simply needed again
        self.max_flights = max(64, max_mb * (1 << 20) // 4 // FLIGHT_BYTES)
        self._indexer: asyncio.Task[None] | None = None
        self._more = False
        self.indexed_pages = 0

    # -- slots -----------------------------------------------------------
    def _open_slot(self, path: Path, running: bool) -> tuple[int, int] | None:
        """Map a RAM file read-only (``running``: a VM's, to be indexed); returns its
        key. Called with the lock held."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            known = self._slots.get(key)
            if known is not None and known.mm is not None:
                return key
            size = st.st_size - st.st_size % PAGE
            if size < PAGE:
                return None
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        if known is not None:  # parked: same file, its entries still stand (verified on use)
            self.cache.unpark_slot(known.slot, mm)
            known.mm = mm
            return key
        pages = size // PAGE
        self._slots[key] = _Slot(self.cache.add_slot(mm), mm, path,
                                 next_page=0 if running else pages, pages=pages)
        return key

    def _close_slot(self, key: tuple[int, int]) -> None:
        s = self._slots.pop(key)
        if self.cache.drop_slot(s.slot) and s.mm is not None:
            with contextlib.suppress(BufferError):
                s.mm.close()

    def _park(self) -> None:
        """No migration is arriving: unmap every RAM file (a VM deleted meanwhile then
        frees its space at once) but keep the digests; ``refresh`` maps them again.
        Called with the lock held."""
        for s in self._slots.values():
            if s.mm is not None and self.cache.park_slot(s.slot):
                with contextlib.suppress(BufferError):
                    s.mm.close()
                s.mm = None

    def refresh(self) -> None:
        """A migration arrives: map the RAM of the VMs running here (new ones are
        indexed in the background), forget VMs that are gone. Cheap: no hashing."""
        paths = [] if self.running_rams is None else self.running_rams()
        with self.lock:
            live: set[tuple[int, int]] = set(self._incoming.values())
            now = time.monotonic()
            for path in paths:
                key = self._open_slot(path, running=True)
                if key is not None:
                    live.add(key)
                    s = self._slots[key]
                    if s.next_page >= s.pages and now - s.indexed_at >= REINDEX_S:
                        s.next_page = 0  # new, committed here, or drifted since
            for key in [k for k in self._slots if k not in live]:
                self._close_slot(key)
        self._kick()

    def _kick(self) -> None:
        self._more = True  # a running indexer may have found nothing just before: it looks again
        if self._indexer is None or self._indexer.done():
            self._indexer = asyncio.create_task(self._index_running())

    def index_incoming(self, arriving: tuple[int, int]) -> None:
        """Another migration arrives (``arriving``, its RAM file) while others are under
        way: hash what those others received so far. Their first pages may have come
        as data, before anyone offered here (a drain whose VMs prepared one by one):
        unindexed, that content would cross again for the newcomer. A page still
        being written hashes to a stale entry: a miss, like any other (verified on use).
        Called with the lock held."""
        for key in set(self._incoming.values()) - {arriving}:
            s = self._slots.get(key)
            if s is not None:  # (mid-pass too: pages landed behind its cursor since)
                s.next_page = 0
        self._kick()

    async def _index_running(self) -> None:
        while self._more:
            self._more = False
            while await asyncio.to_thread(self._index_chunk):
                pass

    def _index_chunk(self) -> bool:
        """Index the next ``INDEX_CHUNK`` pages of a RAM file not fully indexed yet;
        False when there is nothing (mapped) left to do or the table is full."""
        with self.lock:
            key, todo = next(((k, s) for k, s in self._slots.items()
                              if s.mm is not None and s.next_page < s.pages), (None, None))
            if key is None or todo is None or len(self.cache) >= self.max_entries:
                return False
            a, b = todo.next_page, min(todo.pages, todo.next_page + INDEX_CHUNK)
            added = sum(self.cache.index_pages(todo.slot, first, first + n)
                        for first, n in _data_runs(todo.path, key, a, b))
            self.refused += (b - a) - added if len(self.cache) >= self.max_entries else 0
            todo.next_page = b
            self.indexed_pages += b - a
            if b == todo.pages:
                todo.indexed_at = time.monotonic()
                log.info("dedup index: a RAM file is indexed",
                         extra={"path": str(todo.path), "entries": len(self.cache)})
            return True

    async def wait_indexed(self) -> None:
        """Until the background indexing has nothing left (tests, benchmarks)."""
        if self._indexer is not None:
            await asyncio.shield(self._indexer)

    async def warm(self) -> dict[str, Any]:
        """Index the RAM of the VMs running here now, ahead of migrations (a drain
        about to arrive, a benchmark): ``refresh`` then wait for the indexing. The
        files are parked again unless a migration is arriving; returns ``stats``."""
        self.refresh()
        await self.wait_indexed()
        with self.lock:
            if not self._incoming:
                self._park()
        return self.stats()

    # -- accounting ------------------------------------------------------
    @property
    def memory_bytes(self) -> int:
        # read without the lock (the event loop must not wait on a copy): list() takes the
        # values in one step, a worker may not change the dict while the sum iterates
        flights = list(self.flights.values())
        return self.cache.memory_bytes + FLIGHT_BYTES * sum(1 + len(f.waiters) for f in flights)

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.cache), "max_entries": self.max_entries,
                "memory_bytes": self.memory_bytes, "files": len(self._slots),
                "pages_indexed": self.indexed_pages,
                "in_flight": len(self.flights), "incoming": len(self._incoming),
                "refused": self.refused}


class IncomingDedup:
    """One incoming migration's side of the have/need exchange."""

    def __init__(self, index: PageIndex, mem: Any, ram_path: Path, mig_id: str,
                 send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self.index = index
        self.id = mig_id
        self._send = send
        self._mem: memoryview | None = memoryview(mem).cast("B")
        self.npages = self._mem.nbytes // PAGE
        self._next_batch = 0
        self._seq = 0
        self._open: dict[int, int] = {}  # batch -> pages not answered yet
        self._replied: set[int] = set()  # batches whose first answer went out
        self._pending: dict[int, list[tuple[int, bytes]]] = {}  # need seq -> (page, digest) to land
        self._ready: list[_Waiter] = []  # deferred pages whose content landed or failed
        self._wake = asyncio.Event()
        self._closed = False
        self.stats = {"offered": 0, "hits": 0, "needed": 0, "stale": 0, "waited": 0,
                      "waited_hits": 0, "repaired": 0}
        with index.lock:
            key = index._open_slot(ram_path, running=False)
            if key is None:
                raise OSError(f"cannot map {ram_path} for the dedup index")
            index._incoming[self] = key
            self._slot = index._slots[key].slot
            index.index_incoming(key)
        self._answerer = asyncio.create_task(self._answer_loop())

    # -- the source's messages -------------------------------------------
    async def on_have(self, data: bytes) -> None:
        batch, pages, digests = protocol.check_have(data, self.npages, self._next_batch)
        self._next_batch += 1
        self.stats["offered"] += int(pages.size)
        need = await asyncio.to_thread(self._offer, batch, pages, digests)
        await self._reply(batch, need)
        if batch in self._open:  # only now may later answers follow (and be final)
            self._replied.add(batch)
            if self._ready:
                self._wake.set()  # waits of this batch that were answered meanwhile

    def _offer(self, batch: int, pages: npt.NDArray[np.uint32], digests: npt.NDArray[np.uint8]
               ) -> list[tuple[int, bytes]]:
        """Copy what the index holds (verified), promise the rest; returns the needed pages."""
        idx = self.index
        need: list[tuple[int, bytes]] = []
        deferred = 0
        now = time.monotonic()
        with idx.lock:
            mem = self._mem
            if mem is None:
                raise ProtocolError("migration already closed")
            for i in range(pages.size):
                p, d = int(pages[i]), digests[i].tobytes()
                known = idx.cache.table.get(d) is not None
                data = idx.cache.lookup(d) if known else None  # re-hashed as it is copied
                if data is not None:
                    mem[p * PAGE:(p + 1) * PAGE] = data
                    self.stats["hits"] += 1
                    continue
                self.stats["stale"] += known  # the page changed or its VM went away
                flight = idx.flights.get(d)
                if flight is not None:
                    flight.waiters.append(_Waiter(self, batch, p, d, now + idx.defer_s))
                    self.stats["waited"] += 1
                    deferred += 1
                    continue
                if len(idx.flights) < idx.max_flights:
                    idx.flights[d] = _Flight(self, p)
                need.append((p, d))
            self._open[batch] = deferred
        return need

    async def _reply(self, batch: int, need: list[tuple[int, bytes]]) -> None:
        left = self._open.get(batch, 0)
        final = left == 0
        if final:
            self._open.pop(batch, None)
            self._replied.discard(batch)
        if not need and not final:
            return
        step = protocol.MAX_NEED_PAGES  # a control message is at most 64 KiB
        parts = [need[i:i + step] for i in range(0, len(need), step)] or [[]]
        for i, part in enumerate(parts):
            seq = self._seq
            self._seq += 1
            if part:
                self._pending[seq] = part
                self.stats["needed"] += len(part)
            await self._send(protocol.need_message(batch, seq, [p for p, _ in part],
                                                   final and i == len(parts) - 1))

    def on_repaired(self, msg: dict[str, Any]) -> None:
        """The source sent the pages of need ``seq``: index those that hold the
        promised content and hand it to the migrations waiting for it."""
        seq = protocol.check_int(msg, "seq", 0, 1 << 40)
        items = self._pending.pop(seq, None)
        if items is None:
            raise ProtocolError(f"'repaired' for need {seq}, which is not outstanding")
        self.stats["repaired"] += len(items)
        idx = self.index
        with idx.lock:
            mem = self._mem
            assert mem is not None
            landed_pages, landed_digests = [], []
            for p, d in items:
                # the source sent the page as it is now: it may differ from what it offered
                if page_digest(mem[p * PAGE:(p + 1) * PAGE]) == d:
                    landed_pages.append(p)
                    landed_digests.append(np.frombuffer(d, dtype=np.uint8))
            if landed_pages:
                stored = idx.cache.add_pages(self._slot, np.asarray(landed_pages, dtype=np.uint64),
                                             np.stack(landed_digests))
                idx.refused += len(landed_pages) - stored
            for p, d in items:  # waiters look it up again: landed content is found, verified
                flight = idx.flights.get(d)
                if flight is not None and flight.owner is self and flight.page == p:
                    del idx.flights[d]
                    self._wake_waiters(flight)

    @staticmethod
    def _wake_waiters(flight: _Flight) -> None:
        for w in flight.waiters:
            if not w.mig._closed:
                w.mig._ready.append(w)
                w.mig._wake.set()

    def check_settled(self) -> None:
        """At ``round_end``: every offered page was answered and every need repaired."""
        if self._open or self._pending:
            raise ProtocolError(f"round ended with {len(self._open)} have batch(es) unanswered "
                                f"and {len(self._pending)} need(s) not repaired")

    # -- deferred pages ----------------------------------------------------
    async def _answer_loop(self) -> None:
        """Answer pages that waited for content in flight, once it landed (or not)."""
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)
            self._wake.clear()
            self._expire()
            ready = [w for w in self._ready if w.batch in self._replied]
            self._ready = [w for w in self._ready if w.batch not in self._replied]
            if not ready:
                continue
            results = await asyncio.to_thread(self._fill, ready)
            for batch, need, answered in results:
                self._open[batch] -= answered
                await self._reply(batch, need)

    def _expire(self) -> None:
        """Waiters past their deadline are answered 'need' (bounded waits, never a hang)."""
        now = time.monotonic()
        with self.index.lock:
            for flight in self.index.flights.values():
                late = [w for w in flight.waiters if w.mig is self and w.deadline <= now]
                for w in late:
                    flight.waiters.remove(w)
                    self._ready.append(w)

    def _fill(self, ready: list[_Waiter]) -> list[tuple[int, list[tuple[int, bytes]], int]]:
        """Copy landed content (verified) or answer need; per batch. No new promise
        is made here: a page still missing is simply needed."""
        idx = self.index
        out: dict[int, tuple[list[tuple[int, bytes]], int]] = {}
        with idx.lock:
            mem = self._mem
            if mem is None:
                return []
            for w in ready:
                need, n = out.get(w.batch, ([], 0))
                data = idx.cache.lookup(w.digest)
                if data is not None:
                    mem[w.page * PAGE:(w.page + 1) * PAGE] = data
                    self.stats["waited_hits"] += 1
                    self.stats["hits"] += 1
                else:
                    need.append((w.page, w.digest))
                out[w.batch] = (need, n + 1)
        return [(b, need, n) for b, (need, n) in out.items()]

    # -- end ---------------------------------------------------------------
    async def close(self, committed: bool) -> None:
        """Withdraw this migration's promises and waits, and let go of guest memory
        (call before unmapping it). Content in flight for us is answered "need" to
        whoever waits for it. A committed VM's RAM stays indexed (it runs here now);
        a failed one's is dropped (its file is deleted)."""
        self._closed = True
        self._answerer.cancel()
        with contextlib.suppress(BaseException):
            await self._answerer
        idx = self.index
        with idx.lock:
            for d, f in list(idx.flights.items()):
                f.waiters = [w for w in f.waiters if w.mig is not self]
                if f.owner is self:
                    del idx.flights[d]
                    self._wake_waiters(f)  # they look the content up again, likely "need"
            if self._mem is not None:
                self._mem.release()
                self._mem = None
            key = idx._incoming.pop(self, None)
            if key is not None and not committed and key in idx._slots:
                idx._close_slot(key)
            elif key is not None and key in idx._slots:  # hashed mid-way, if at all: whole at the next refresh
                idx._slots[key].indexed_at = -math.inf
            if not idx._incoming:
                idx._park()

    def as_dict(self) -> dict[str, Any]:
        return {**self.stats, "index": self.index.stats()}
