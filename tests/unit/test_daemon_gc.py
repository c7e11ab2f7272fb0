"""The daemons' garbage-collection schedule (novacron.daemon.tune_gc / collect_garbage)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from novacron import daemon


@pytest.fixture
def gc_state() -> Iterator[list[int]]:
    """Restore the interpreter's thresholds and callbacks; yield the generations collected."""
    thresholds, callbacks = gc.get_threshold(), list(gc.callbacks)
    seen: list[int] = []

    def record(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(record)
    try:
        yield seen
    finally:
        gc.callbacks[:] = callbacks
        gc.set_threshold(*thresholds)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_allocation_triggers_only_young_collections(gc_state: list[int]) -> None:
    daemon.tune_gc()
    kept: list[list[list[int]]] = []
    for _ in range(400):  # 400 x 1,000 surviving containers: many young collections
        kept.append([[] for _ in range(1000)])
    assert gc_state.count(0) >= 20
    assert not [g for g in gc_state if g > 0], "an older generation ran on allocations"


def test_schedule_collects_young_often_and_everything_on_the_full_interval(gc_state: list[int]) -> None:
    daemon.tune_gc()
    cycle = Node()
    cycle.other = Node()
    cycle.other.other = cycle
    gone = weakref.ref(cycle)
    gc.collect(0)  # the cycle is now past the young generation: only a full collection frees it
    del cycle
    gc_state.clear()

    async def run() -> None:
        task = asyncio.create_task(daemon.collect_garbage(young_every_s=0.01, full_every_s=0.3))
        await asyncio.sleep(0.15)
        assert gone() is not None, "the old cycle went before the full collection was due"
        deadline = time.monotonic() + 5
        while gone() is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert gone() is None, "the full collection never ran"
    assert gc_state.count(0) >= 5
    assert gc_state.count(2) >= 1


def test_a_long_collection_is_logged(gc_state: list[int], caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "GC_PAUSE_WARN_S", 0.0)  # any collection counts as long
    daemon.tune_gc()
    with caplog.at_level(logging.WARNING, logger="novacron.gc"):
        gc.collect()
    record = next(r for r in caplog.records if r.getMessage() == "garbage collection paused the daemon")
    assert record.generation == 2 and record.pause_ms >= 0 and record.cpu_ms >= 0  # type: ignore[attr-defined]
