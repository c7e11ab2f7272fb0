"""Post-copy's fault timing (QEMU trace lines -> latencies), its option checks and the
bound on its recovery."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.postcopy import QemuStream, blocktime, fault_latencies, percentiles
from novacron.agent.migration.source import MigrationFailed, SourceMigration
from novacron.agent.migration.status import MigrationStatus

# lines as QEMU 7.2 writes them with -msg timestamp=on (log trace backend), trimmed
TRACE = b"""\
20506@1796061238.799280:mark_postcopy_blocktime_begin addr: 0x7f861bd93000, dd: 0x55e4, time: 19173, cpu: 0, already_received: 0
20507@1796061238.795646:postcopy_place_page host=0x7f8612fff000
20506@1796061238.891261:mark_postcopy_blocktime_begin addr: 0x7f861bd31000, dd: 0x55e4, time: 19265, cpu: 0, already_received: 0
20506@1796061238.891300:mark_postcopy_blocktime_begin addr: 0x7f861bd40000, dd: 0x55e4, time: 19265, cpu: 0, already_received: 1
20507@1796061238.899280:postcopy_place_page host=0x7f861bd93000
20507@1796061238.901261:postcopy_place_page host=0x7f861bd31000
20507@1796061238.901300:postcopy_place_page host=0x7f861bd40000
20506@1796061239.000000:mark_postcopy_blocktime_begin addr: 0x7f861bd50000, dd: 0x55e4, time: 19300, cpu: 0, already_received: 0
qemu-system-x86_64: some unrelated error line
"""


def test_fault_latencies_pair_each_fault_with_its_page() -> None:
    got = fault_latencies(TRACE)
    # 0x...93000 waited 100 ms, 0x...31000 10 ms; an already-received page is no fault,
    # a page placed before any fault on it (background push) is none either, and the
    # last fault is still waiting
    assert [round(x, 3) for x in got] == [100.0, 10.0]


def test_percentiles_nearest_rank() -> None:
    assert percentiles([]) == {"count": 0, "p50": None, "p99": None, "max": None}
    values = [float(i) for i in range(1, 101)]
    assert percentiles(values) == {"count": 100, "p50": 50.0, "p99": 99.0, "max": 100.0}
    assert percentiles([3.0, 1.0, 2.0])["p50"] == 2.0


def test_blocktime_reads_query_migrate() -> None:
    info = {"status": "completed", "postcopy-blocktime": 2720, "postcopy-vcpu-blocktime": [2720, 5]}
    assert blocktime(info) == {"total_ms": 2720, "vcpu_ms": [2720, 5]}
    assert blocktime({}) == {"total_ms": None, "vcpu_ms": []}


def test_postcopy_options() -> None:
    opts = MigrationOptions.from_dict({"on_no_converge": "postcopy", "postcopy_recover_s": 5})
    assert opts.on_no_converge == "postcopy" and opts.postcopy_recover_s == 5
    for bad, words in [({"on_no_converge": "postcopy", "test_digest": True}, "test_digest"),
                       ({"postcopy_recover_s": 0}, "postcopy_recover_s"),
                       ({"on_no_converge": "later"}, "'abort', 'force' or 'postcopy'")]:
        with pytest.raises(ValueError, match=words):
            MigrationOptions.from_dict(bad)


class _PausedQemu:
    """A post-copy source whose QEMU sits in postcopy-paused (the stream is down)."""

    name, ram_size, ram_stat = "vm", 4096, None
    ram_path = work_dir = Path("/nonexistent")
    pid = None
    queries = 0

    async def query_migration(self) -> dict[str, Any]:
        self.queries += 1
        return {"status": "postcopy-paused"}

    async def start_ram_migration(self, *a: Any, **kw: Any) -> None:
        raise AssertionError("never reconnected, so never resumed")

    async def set_ram_limits(self, *a: Any) -> None: ...

    async def start_postcopy(self) -> None: ...

    async def mark_paused(self) -> None: ...


async def test_postcopy_recovery_gives_up_after_its_window() -> None:
    """Bounded: a destination that never comes back ends the recovery after
    postcopy_recover_s with a failure that says the guest waits there (nothing resumed)."""
    attempts = []

    async def reconnect() -> Any:
        attempts.append(time.monotonic())
        raise OSError("connection refused")

    st = MigrationStatus(id="m1", vm="vm", role="source", peer="127.0.0.1:1")
    st.postcopy = {"used": True, "recoveries": 0}
    opts = MigrationOptions.from_dict({"on_no_converge": "postcopy", "postcopy_recover_s": 1})
    mig = SourceMigration(_PausedQemu(), None, st, opts, reconnect=reconnect)
    mig.qemu_stream = QemuStream(None)
    mig._peer_lost = "connection reset"
    t0 = time.monotonic()
    with pytest.raises(MigrationFailed, match=r"not recovered within 1s \(\d+ attempts\); the guest waits"):
        await mig._postcopy_recover()
    assert 1.0 <= time.monotonic() - t0 < 6.0 and len(attempts) >= 2
    assert st.postcopy["recovering"] is True and st.postcopy["recoveries"] == 0
