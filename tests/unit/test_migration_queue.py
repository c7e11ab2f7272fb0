"""The migration limiter: which queued migrations may start, and why the others wait."""

from __future__ import annotations

from novacron.coordinator.migration_queue import QUEUED, Limits, admit, wait_reason
from novacron.coordinator.models import Migration


def mig(i: int, source: str, target: str, phase: str = QUEUED) -> Migration:
    return Migration(id=f"m-{i}", vm=f"vm{i}", source=source, target=target, phase=phase,
                     created_at=float(i))


LIMITS = Limits(outbound_per_host=2, inbound_per_host=2, fleet=3)


def test_nothing_running_admits_up_to_every_limit() -> None:
    queue = [mig(i, "a", "b") for i in range(4)]
    start, waiting = admit(LIMITS, queue)
    assert [m.id for m in start] == ["m-0", "m-1"]  # outbound of a (and inbound of b) is 2
    assert set(waiting) == {"m-2", "m-3"}
    assert "host a sends 2 migrations (outbound limit 2)" in waiting["m-2"]


def test_fleet_limit_counts_running_migrations() -> None:
    active = [mig(0, "a", "b", "precopy"), mig(1, "c", "d", "prepare"), mig(2, "e", "f", "pending"),
              mig(3, "g", "h")]
    start, waiting = admit(LIMITS, active)
    assert start == [] and waiting["m-3"] == "the fleet runs 3 migrations (limit 3)"
    # a finished one frees its slot: the oldest queued starts
    active[0].phase = "completed"
    start, waiting = admit(LIMITS, active)
    assert [m.id for m in start] == ["m-3"] and waiting == {}


def test_inbound_limit_and_oldest_first() -> None:
    active = [mig(0, "a", "z", "precopy"), mig(1, "b", "z", "precopy"),
              mig(2, "c", "z"), mig(3, "d", "y"), mig(4, "e", "z")]
    start, waiting = admit(Limits(2, 2, 10), active)
    # z receives 2 already: m-2 and m-4 wait; m-3 (another target) does not wait behind them
    assert [m.id for m in start] == ["m-3"]
    assert waiting["m-2"] == "host z receives 2 migrations (inbound limit 2)" and "m-4" in waiting
    active[0].phase = "failed"  # one slot on z: the older of the two takes it
    start, _ = admit(Limits(2, 2, 10), active)
    assert [m.id for m in start] == ["m-2", "m-3"]


def test_new_migration_queues_behind_older_queued_ones() -> None:
    running = [mig(0, "a", "b", "precopy"), mig(1, "a", "c", "precopy")]
    new = mig(9, "a", "d", "pending")
    assert wait_reason(LIMITS, running, new) == "host a sends 2 migrations (outbound limit 2)"
    assert wait_reason(LIMITS, running, mig(9, "x", "d", "pending")) is None
    # the fleet has room for one more, but an older queued migration takes it first
    older = mig(5, "x", "y")
    assert wait_reason(LIMITS, [*running, older], mig(9, "p", "q", "pending")) == \
        "the fleet runs 3 migrations (limit 3)"


def test_finished_and_queued_records_hold_no_slot() -> None:
    active = [mig(0, "a", "b", "completed"), mig(1, "a", "b", "cancelled"), mig(2, "a", "b")]
    start, waiting = admit(Limits(1, 1, 1), active)
    assert [m.id for m in start] == ["m-2"] and waiting == {}
