"""The pause does not grow with RAM: while the guest is stopped the engine
fingerprints only the pages the VM's process may have written (its page tables),
and no page is lost doing so (the RAM digests of both ends must match)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import novacron.native as N
from tests.migration.memvm import MemSourceVM
from tests.migration.test_engine_memory import Dest, dest, migrate  # noqa: F401

pytestmark = pytest.mark.skipif(N.residency_unsafe_reason("/dev/shm") != "",
                                reason=f"page tables bound nothing here: {N.residency_unsafe_reason('/dev/shm')}")


@pytest.fixture
def shm() -> Iterator[Path]:
    # RAM files live on tmpfs, as the agent's do (tmp_path may be a disk)
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="nc-stopscan-") as d:
        yield Path(d)


async def test_pause_reads_only_what_the_guest_may_have_written(shm: Path, dest: Dest) -> None:  # noqa: F811
    pages, hot = 32768, 512  # 128 MiB of RAM; the guest keeps writing 2 MiB of it
    src = MemSourceVM(shm / "src", "vm1", pages=pages, dirty_pages_per_s=4000, hot_pages=hot)
    try:
        _, st = await migrate(src, dest.server.port, downtime_ms=50, pause_factor=10_000)
        await asyncio.wait_for(dest.done.wait(), 10)
        dirtied = src.dirtied
    finally:
        src.close()
    assert st.phase == "completed", st.error
    assert dirtied > 0
    assert st.digest_source == st.digest_destination and st.digest_source  # nothing lost
    scan = st.metrics()["stop_scan"]
    assert scan["mode"] in ("resident", "soft-dirty"), scan
    # Fails if the paused scan reads all of RAM: it may read at most the pages the
    # guest touched (plus the kernel's 64 KiB read fault-around), never RAM size.
    assert 0 < scan["pages_examined"] <= hot + 16, scan
    assert scan["bytes_examined"] == scan["pages_examined"] * 4096
    assert st.native["pages_scanned"] < 3 * pages  # later pre-copy scans are bounded too


async def test_without_the_process_the_pause_scans_everything(shm: Path, dest: Dest) -> None:  # noqa: F811
    pages = 8192
    src = MemSourceVM(shm / "src", "vm2", pages=pages, dirty_pages_per_s=2000, expose_pid=False)
    try:
        _, st = await migrate(src, dest.server.port, downtime_ms=50, pause_factor=10_000)
    finally:
        src.close()
    assert st.phase == "completed", st.error
    assert st.digest_source == st.digest_destination
    scan = st.metrics()["stop_scan"]
    assert scan["mode"] == "full" and "unknown" in scan["reason"]
    assert scan["pages_examined"] == pages  # correct, but O(RAM): the fallback


async def test_bounded_pause_off_scans_everything(shm: Path, dest: Dest) -> None:  # noqa: F811
    pages = 8192
    src = MemSourceVM(shm / "src", "vm3", pages=pages, dirty_pages_per_s=2000, hot_pages=64)
    try:
        _, st = await migrate(src, dest.server.port, downtime_ms=50, pause_factor=10_000, bounded_pause=False)
    finally:
        src.close()
    assert st.phase == "completed", st.error
    scan = st.metrics()["stop_scan"]
    assert scan["mode"] == "full" and scan["pages_examined"] == pages


async def test_another_writer_of_the_ram_file_means_a_full_scan(shm: Path, dest: Dest) -> None:  # noqa: F811
    import multiprocessing

    pages = 4096
    src = MemSourceVM(shm / "src", "vm4", pages=pages, dirty_pages_per_s=2000, hot_pages=64)
    ctx = multiprocessing.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_map_writable, args=(str(src.ram_path), pages * 4096, ready, done))
    other.start()
    try:
        assert await asyncio.to_thread(ready.wait, 30)
        _, st = await migrate(src, dest.server.port, downtime_ms=50, pause_factor=10_000)
    finally:
        done.set()
        other.join(10)
        src.close()
    assert st.phase == "completed", st.error
    scan = st.metrics()["stop_scan"]
    # its writes would not show in the VM process's page tables: no bound, scan it all
    assert scan["mode"] == "full" and "other processes" in scan["reason"], scan
    assert scan["pages_examined"] == pages and st.digest_source == st.digest_destination


def _map_writable(path: str, size: int, ready: Any, done: Any) -> None:
    import mmap
    import os

    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, size)
    ready.set()
    done.wait(60)
    mm.close()
