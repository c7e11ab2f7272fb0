"""The worker threads that touch one migration's RAM mapping, and letting go of it.

Scans, encodes and frames being applied run in threads and read or write guest
RAM through views of the migration's mapping. A cancelled asyncio task does not
stop the thread it awaits, so a failed migration could unmap while a thread
still holds a view: ``mmap.close`` then raises BufferError and the mapping (for
a deleted incoming RAM file: its whole space) stays until the agent exits.
Found by the fault matrix. So each migration runs that work on its own
``RamWork``, and its teardown (``let_go``) waits for every call still running
there, closes the native objects (which release their views) and only then
unmaps, without relying on the garbage collector to drop views left in frames.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import mmap
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger("novacron.agent.migration")

T = TypeVar("T")
DRAIN_S = 60.0  # one scan, encode or frame takes far less; a hung call must not hang the teardown


class HoldsView(Protocol):
    """A native object holding a view of guest RAM (tracker, sender, receiver)."""

    def close(self) -> None: ...


class RamWork:
    def __init__(self, migration: str, threads: int = 2) -> None:
        self.migration = migration
        self._ex = concurrent.futures.ThreadPoolExecutor(max_workers=threads,
                                                         thread_name_prefix=f"ram-{migration[:16]}")
        self._calls: set[concurrent.futures.Future[Any]] = set()
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in one of this migration's threads."""
        if self._closed:
            raise RuntimeError(f"migration {self.migration}: its RAM is being let go")
        fut = self._ex.submit(fn, *args)
        self._calls.add(fut)
        fut.add_done_callback(self._calls.discard)
        return await asyncio.wrap_future(fut)

    async def drain(self, timeout: float = DRAIN_S) -> bool:
        """Refuse new calls, drop queued ones and wait for running ones (bounded);
        True when no thread touches the RAM any more."""
        self._closed = True
        calls = list(self._calls)
        for fut in calls:
            fut.cancel()  # one not started yet never touches the RAM
        running = [asyncio.wrap_future(f) for f in calls if not f.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=timeout)
            if late:
                log.error("RAM work still running after the migration ended",
                          extra={"migration": self.migration, "calls": len(late)})
                return False
        self._ex.shutdown(wait=False)
        return True

    async def let_go(self, mm: mmap.mmap | None, *holders: HoldsView | None) -> bool:
        """Wait for the threads, release every holder's view, unmap ``mm``.
        Returns False (and says so in the log) if the mapping stays."""
        if not await self.drain():
            return False
        for holder in holders:
            if holder is not None:
                try:
                    holder.close()
                except BufferError:  # a view of its own view: a bug, say so below
                    pass
        if mm is None or mm.closed:
            return True
        try:
            mm.close()
        except BufferError:
            log.error("guest RAM mapping still in use after the migration ended; its pages stay "
                      "mapped until the agent exits", extra={"migration": self.migration})
            return False
        return True
