"""The pause does not grow with RAM: while the guest is stopped the engine
fingerprints only the pages the VM's process may have written (its page tables),
and no page is lost doing so (the RAM digests of both ends must match)."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import novacron.native as N
from novacron.agent.migration.stopscan import StopScan
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
    # guest touched (plus the kernel's 64 KiB read fault-around), never RAM size;
    # where each pre-copy scan releases what it read, only those touched since (maybe none)
    assert scan["pages_examined"] <= hot + 16, scan
    assert scan["bytes_examined"] == scan["pages_examined"] * 4096
    assert st.native["pages_scanned"] < 3 * pages  # later pre-copy scans are bounded too


@pytest.mark.skipif(N.soft_dirty_supported(), reason="soft-dirty bits bound the pause: no release")
async def test_pages_touched_before_the_migration_are_not_scanned_at_the_pause(shm: Path, dest: Dest) -> None:  # noqa: F811
    # the "QEMU" maps all of its RAM before the migration, as a guest that booted and
    # read its disk does; only what it writes during the migration may be scanned paused
    pages, hot = 32768, 256
    src = MemSourceVM(shm / "src", "vm5", pages=pages, dirty_pages_per_s=4000, hot_pages=hot, touch_all=True)
    try:
        _, st = await migrate(src, dest.server.port, downtime_ms=50, pause_factor=10_000)
        await asyncio.wait_for(dest.done.wait(), 10)
    finally:
        src.close()
    assert st.phase == "completed", st.error
    assert st.digest_source == st.digest_destination and st.digest_source  # nothing lost
    scan = st.metrics()["stop_scan"]
    assert scan["mode"] == "resident", scan
    assert scan["release"]["bytes"] == pages * 4096, scan
    # Fails without the release: every page is still mapped, and all are read paused.
    assert scan["pages_examined"] <= hot + 16, scan


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


def test_first_scan_lists_written_pages_and_round_one_leaves_out_their_zero_ones(shm: Path) -> None:
    """A tmpfs RAM file whose space was reserved (posix_fallocate) but mostly never
    written: the first scan reads no page, it lists the written ones (tmpfs reports
    the others as holes, which read as zeros) for round 1 and reports the rest zero;
    round 1 leaves out the written pages it finds zero (``skip_zero``), sends the
    others bit-exact and records their fingerprints: a full scan then finds nothing."""
    import mmap
    import os

    import numpy as np

    from novacron.agent.migration.source import _first_scan_of
    from novacron.agent.migration.stopscan import written_pages
    from novacron.native import (
        FingerprintTracker,
        PageStreamReceiver,
        PageStreamSender,
        bitmap_indices,
    )

    npages = 4099  # not a multiple of 8: the bitmaps' last byte is partial
    path = shm / "ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, npages * 4096)
        written = [5, 6, 7, 1000, 4098]
        for p in written:
            os.pwrite(fd, os.urandom(4096), p * 4096)
        os.pwrite(fd, bytes(4096), 2000 * 4096)  # written, but zeros: listed, left out by round 1
        st = os.fstat(fd)
        mm = mmap.mmap(fd, npages * 4096, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    try:
        found = written_pages(path, st, npages)
        assert found is not None
        mask, runs = found
        assert runs == [(5, 3), (1000, 1), (2000, 1), (4098, 1)]
        assert list(bitmap_indices(mask)) == [5, 6, 7, 1000, 2000, 4098]
        tracker = FingerprintTracker(mm, os.urandom(32))
        scan = _first_scan_of(mm, tracker, found)
        assert scan.scanned == 0 and scan.dirty_count == 6
        assert list(bitmap_indices(scan.dirty)) == [5, 6, 7, 1000, 2000, 4098]
        assert scan.zero_count == npages - 6
        full = FingerprintTracker(mm, os.urandom(32)).scan()  # what reading every page finds
        assert not np.any(full.dirty & ~scan.dirty)  # every non-zero page is in round 1
        assert not np.any(scan.zero & ~full.zero)  # every page reported zero is
        key = bytes(range(32))
        sender = PageStreamSender(key, mm, threads=1, tracker=tracker)
        sender.compress, sender.skip_zero = False, True
        dst = bytearray(npages * 4096)
        receiver = PageStreamReceiver(key, dst)
        for frame in sender.encode(bitmap_indices(scan.dirty), scan.zero):
            receiver.open(frame)
        assert sender.last.zero_skipped == 1 and sender.last.raw_bytes == 5 * 4096
        assert bytes(dst) == bytes(mm)
        assert tracker.scan().dirty_count == 0  # the fingerprints recorded are what dst holds
        sender.close()
        receiver.close()
        tracker.close()
    finally:
        mm.close()
    # not on tmpfs (or unknowable): every page counts
    assert written_pages(Path("/proc/self/status"), None, 1) is None


class _FakeWatch:
    """Stands in for GuestRamWatch: what is mapped, and what the scan asked to release."""

    def __init__(self, mapped: list[int], npages: int) -> None:
        self.mapped, self.npages = set(mapped), npages
        self.released: list[list[int]] = []
        self.pagemap_bytes = 0

    def read(self, soft_dirty: bool = False) -> np.ndarray:
        return N.bitmap_from_indices(sorted(self.mapped), self.npages)

    def release(self, pages: np.ndarray) -> int:
        self.released.append(N.bitmap_indices(pages).tolist())
        return len(self.released[-1]) * 4096

    def direct_io_reason(self) -> str:
        return ""


def test_a_scan_releases_exactly_its_mask_and_no_other_page(shm: Path) -> None:
    """The race the release must not lose: a page written after the mask was read is
    not in it, so it must not be released (it stays mapped for the next mask)."""
    npages = 1024
    scan = StopScan("m", None, shm / "ram", None, npages)  # no process: set up by hand below
    watch = _FakeWatch([3, 4, 900], npages)
    scan._watch = watch
    scan.mode, scan.release, scan.release_rounds = "resident", {"bytes": 1}, True
    mask = scan.before_scan(first=False)
    assert mask is not None and N.bitmap_indices(mask).tolist() == [3, 4, 900]
    assert watch.released == [[3, 4, 900]]
    assert scan.released_bytes == 3 * 4096
    # no release while bounded by soft-dirty bits, nor once the first release did not work
    scan.release_rounds = False
    scan.before_scan(first=False)
    assert len(watch.released) == 1


def test_soft_dirty_bits_are_not_trusted_beside_direct_io(shm: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk open with O_DIRECT (or VFIO) writes guest RAM by DMA: a page pinned before
    the bits were cleared takes the write with no soft-dirty bit. Such a VM's pause is
    bound by what QEMU maps instead, also when the disk appears only before the pause."""
    import subprocess
    import sys

    from novacron.agent.migration import stopscan

    monkeypatch.setattr(stopscan, "soft_dirty_supported", lambda: True)  # as on a distribution kernel
    npages = 256
    ram = shm / "ram"
    ram.write_bytes(b"\0" * npages * 4096)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    qemu = ("import mmap, os, sys\n"
            "mm = mmap.mmap(os.open(sys.argv[1], os.O_RDWR), int(sys.argv[2]))\n"
            "mm[5 * 4096] = 1\n"
            "print('ready', flush=True)\n"
            "for line in sys.stdin:\n"
            "    fd = os.open(sys.argv[3], os.O_RDONLY | os.O_DIRECT)\n"  # a disk attached
            "    print('ok', flush=True)\n"
            "print('bye', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", qemu, str(ram), str(npages * 4096), str(disk)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        scan = StopScan("m", proc.pid, ram, ram.stat(), npages)
        assert scan.mode == "soft-dirty", scan.reason  # no direct I/O yet
        proc.stdin.write("attach\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ok"
        mask = scan.at_pause()  # the bits are not trusted now: what QEMU maps
        assert scan.mode == "resident" and "O_DIRECT" in scan.reason, scan.reason
        assert mask is not None and 5 in N.bitmap_indices(mask).tolist()
        again = StopScan("m", proc.pid, ram, ram.stat(), npages)  # and from the start
        assert again.mode == "resident" and "DMA" in again.reason, again.reason
    finally:
        proc.communicate("")
