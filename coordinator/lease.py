"""Leases for the loops that must run once per fleet, whichever coordinator runs them.

Every coordinator runs a ``Lease`` per loop; the store grants it to one
coordinator at a time (``Store.acquire_lease``, the database's clock) and the
holder renews it every third of its time to live. The loop acts only while
``fence()`` returns its (name, holder, token), and passes that to the store so
a write from a holder that lost the lease (paused, partitioned) is refused.
A coordinator that dies stops renewing: another takes over once the lease
expires, within ``lease_ttl_s``. One that stops cleanly hands it over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from novacron.coordinator.store import Store

log = logging.getLogger("novacron.coordinator.lease")

Fence = tuple[str, str, int]


class Lease:
    def __init__(self, store: Store, name: str, holder: str, ttl_s: float) -> None:
        self.store, self.name, self.holder, self.ttl_s = store, name, holder, ttl_s
        self.token: int | None = None
        self._valid_until = 0.0  # monotonic; a safety margin short of the database's expiry
        self._task: asyncio.Task[None] | None = None

    def fence(self) -> Fence | None:
        """(name, holder, token) while this coordinator holds the lease, else None."""
        if self.token is None or time.monotonic() >= self._valid_until:
            return None
        return self.name, self.holder, self.token

    @property
    def held(self) -> bool:
        return self.fence() is not None

    async def renew(self) -> bool:
        asked = time.monotonic()
        token = await self.store.acquire_lease(self.name, self.holder, self.ttl_s)
        was = self.token
        self.token = token
        if token is None:
            self._valid_until = 0.0
            if was is not None:
                log.warning("lease lost", extra={"lease": self.name, "holder": self.holder})
            return False
        # Counted from before the request: the database's expiry is at least this late.
        self._valid_until = asked + self.ttl_s * 0.9
        if was != token:
            log.info("lease taken", extra={"lease": self.name, "holder": self.holder,
                                           "token": token})
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"lease-{self.name}")

    async def _loop(self) -> None:
        while True:
            try:
                await self.renew()
            except Exception as exc:  # the database is away: we hold nothing we can prove
                self.token, self._valid_until = None, 0.0
                log.warning("lease renewal failed", extra={"lease": self.name, "error": str(exc)})
            await asyncio.sleep(self.ttl_s / 3)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.token is not None:
            self.token, self._valid_until = None, 0.0
            with contextlib.suppress(Exception):
                await self.store.release_lease(self.name, self.holder)
