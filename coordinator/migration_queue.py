"""Migration concurrency limits: how many may run out of a host, into a host, in the fleet.

A migration asked for while a limit is reached is recorded with phase ``queued``
(not failed) and started, oldest first, when a slot frees. The limiter is pure:
it looks at the unfinished migration records (the store is the one truth, shared
by every coordinator) and says which queued ones may start now, or why a new one
must wait. ``MigrationManager`` owns the starting and the leases.

Order: queued migrations are admitted oldest first, each counted against the
slots the ones admitted before it take, so when one slot frees the oldest
migration that fits takes it; a younger one that needs only free slots (other
hosts) does not wait behind an older one that still cannot start.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from novacron.coordinator.models import Migration

QUEUED = "queued"


@dataclass(frozen=True)
class Limits:
    outbound_per_host: int = 2
    inbound_per_host: int = 2
    fleet: int = 8


class Slots:
    """Migrations running now, counted per source, per target and in the fleet."""

    def __init__(self, limits: Limits, running: Iterable[Migration] = ()) -> None:
        self.limits = limits
        self.out: Counter[str] = Counter()
        self.into: Counter[str] = Counter()
        self.total = 0
        for mig in running:
            self.take(mig)

    def take(self, mig: Migration) -> None:
        self.out[mig.source] += 1
        self.into[mig.target] += 1
        self.total += 1

    def blocker(self, mig: Migration) -> str | None:
        """Why ``mig`` cannot start now (the first limit it would pass), or None."""
        lim = self.limits
        if self.total >= lim.fleet:
            return f"the fleet runs {_n(self.total)} (limit {lim.fleet})"
        if self.out[mig.source] >= lim.outbound_per_host:
            return (f"host {mig.source} sends {_n(self.out[mig.source])} "
                    f"(outbound limit {lim.outbound_per_host})")
        if self.into[mig.target] >= lim.inbound_per_host:
            return (f"host {mig.target} receives {_n(self.into[mig.target])} "
                    f"(inbound limit {lim.inbound_per_host})")
        return None


def _n(count: int) -> str:
    return f"{count} migration" + ("" if count == 1 else "s")


def running(active: Iterable[Migration]) -> list[Migration]:
    """The unfinished migrations that hold a slot: all but the queued ones."""
    return [m for m in active if not m.done and m.phase != QUEUED]


def queued(active: Iterable[Migration]) -> list[Migration]:
    """The queued migrations, oldest first."""
    return sorted((m for m in active if m.phase == QUEUED), key=lambda m: (m.created_at, m.id))


def admit(limits: Limits, active: Iterable[Migration]) -> tuple[list[Migration], dict[str, str]]:
    """Which queued migrations may start now (oldest first), and why each other one waits."""
    active = list(active)
    slots = Slots(limits, running(active))
    start: list[Migration] = []
    waiting: dict[str, str] = {}
    for mig in queued(active):
        why = slots.blocker(mig)
        if why is None:
            slots.take(mig)
            start.append(mig)
        else:
            waiting[mig.id] = why
    return start, waiting


def wait_reason(limits: Limits, active: Iterable[Migration], new: Migration) -> str | None:
    """Why a new migration must queue (a limit is reached, or older queued migrations
    wait for the slots it needs), or None: it may start now."""
    start, waiting = admit(limits, [*active, _as_queued(new)])
    return None if any(m.id == new.id for m in start) else waiting.get(new.id)


def _as_queued(mig: Migration) -> Migration:
    return replace(mig, phase=QUEUED, created_at=float("inf"))  # the youngest of all
