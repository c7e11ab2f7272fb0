"""Auto-converge: slow a guest that dirties memory faster than we can send it.

QEMU's own cpu-throttle only works inside QEMU's migration, so we throttle
from outside with a duty cycle of QMP ``stop``/``cont``: at level 0.6 the
vCPUs are stopped for 60 ms of every 100 ms. The guest sees a slower CPU,
not a pause long enough to notice; pre-copy gets the bandwidth to converge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from novacron.agent.migration.vmport import SourceVM
from novacron.faults import crash_point

log = logging.getLogger("novacron.agent.migration")

PERIOD_S = 0.1
MAX_LEVEL = 0.9


class Throttle:
    def __init__(self, vm: SourceVM, period_s: float = PERIOD_S) -> None:
        self.vm = vm
        self.period = period_s
        self.level = 0.0
        self.cycles = 0
        self._task: asyncio.Task[None] | None = None
        self._stopped_by_us = False

    def raise_level(self, step: float = 0.2) -> float:
        """Throttle harder (up to MAX_LEVEL); starts the duty cycle on first use."""
        self.level = min(MAX_LEVEL, round(self.level + step, 3))
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="auto-converge throttle")
        return self.level

    async def _run(self) -> None:
        while True:
            self._stopped_by_us = True
            await self.vm.pause()
            crash_point("migration.source.throttled")
            await asyncio.sleep(self.level * self.period)
            await self.vm.resume()
            self._stopped_by_us = False
            self.cycles += 1
            await asyncio.sleep((1.0 - self.level) * self.period)

    async def stop(self) -> None:
        """End throttling and leave the guest running (the caller may pause it next)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self._stopped_by_us:  # cancelled (or failed) with the vCPUs possibly stopped
            try:
                await self.vm.resume()
            except Exception as exc:
                log.error("could not resume the guest after throttling", extra={"error": str(exc)})
                raise
        self._stopped_by_us = False
