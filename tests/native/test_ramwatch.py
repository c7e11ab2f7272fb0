"""GuestRamWatch reads another process's page tables for a shared RAM file, and the
masked fingerprint scan reads only the pages it is given."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import novacron.native as N

PAGE = 4096

# The "QEMU": maps the file read-write and shared, writes the pages named on its
# command line (and reads a few others), says so, then waits to be told to exit.
_WRITER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
mm = mmap.mmap(fd, int(sys.argv[2]))
for p in sys.argv[3].split(","):
    mm[int(p) * 4096] = 0xAB
for p in sys.argv[4].split(","):
    _ = mm[int(p) * 4096]
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def shm_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(dir="/dev/shm", prefix="nc-ramwatch-") as d:
        yield Path(d) / "ram"


def _writer(path: Path, size: int, written: list[int], read: list[int]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(size),
                             ",".join(map(str, written)), ",".join(map(str, read))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_resident_pages_of_another_process(shm_file: Path) -> None:
    npages = 4096
    shm_file.write_bytes(b"\0" * npages * PAGE)
    st = shm_file.stat()
    written, read = [3, 100, 2047, 4095], [7, 8]
    proc = _writer(shm_file, npages * PAGE, written, read)
    try:
        # our own read-only mapping of every page must not count: it cannot write
        import mmap
        fd = os.open(shm_file, os.O_RDONLY)
        ro = mmap.mmap(fd, npages * PAGE, access=mmap.ACCESS_READ)
        os.close(fd)
        assert bytes(ro[:: 64 * PAGE])  # touch it
        watch = N.GuestRamWatch(proc.pid, st.st_dev, st.st_ino, npages)
        got = N.bitmap_indices(watch.read()).tolist()
        # never fewer than it wrote; reads map pages too, and a read fault maps its
        # neighbours already in the page cache (fault-around, 64 KiB by default)
        assert set(written) <= set(got)
        assert all(any(abs(g - t) < 16 for t in written + read) for g in got)
        # PAGEMAP_SCAN (Linux 6.7+) returns only the mapped ranges, 24 bytes each;
        # without it, 8 bytes a page: both must give the same pages
        assert 0 < watch.pagemap_bytes <= npages * 8
        scanned = watch.read()
        watch._scan_ioctl = False
        assert np.array_equal(watch.read(), scanned)
        ro.close()
        assert watch.other_writers() == []
        second = _writer(shm_file, npages * PAGE, [1], [2])  # e.g. a vhost-user backend
        try:
            assert watch.other_writers() == [second.pid]
        finally:
            second.communicate("")
        with pytest.raises(OSError, match="writable"):
            N.GuestRamWatch(os.getpid(), st.st_dev, st.st_ino, npages)  # we map it read-only only
    finally:
        proc.communicate("")
    with pytest.raises(OSError):
        N.GuestRamWatch(proc.pid, st.st_dev, st.st_ino, npages)  # gone


def test_scattered_pages_read_alike_by_both_readers(shm_file: Path) -> None:
    """A busy guest's mask: thousands of single-page regions, more than one
    PAGEMAP_SCAN call returns (``_SCAN_REGIONS``), read the same by both readers."""
    npages = 16384
    shm_file.write_bytes(b"\0" * npages * PAGE)
    st = shm_file.stat()
    written = list(range(1, npages, 3))  # write faults map no neighbours: one region each
    assert len(written) > 4096
    proc = _writer(shm_file, npages * PAGE, written, [0])
    try:
        watch = N.GuestRamWatch(proc.pid, st.st_dev, st.st_ino, npages)
        scanned = watch.read()
        if not watch._scan_ioctl:
            pytest.skip("this kernel has no PAGEMAP_SCAN: one reader only")
        got = set(N.bitmap_indices(scanned).tolist())
        assert set(written) <= got and len(got) < len(written) + 64  # + page 0's fault-around
        watch._scan_ioctl = False
        assert np.array_equal(watch.read(), scanned)
    finally:
        proc.communicate("")


# The "QEMU" of the release test: touches every page (as a guest's boot does), then
# writes the pages named on each line of its stdin, answering "done" each time.
_TOUCHER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
mm = mmap.mmap(fd, int(sys.argv[2]))
for off in range(0, len(mm), 4096):
    mm[off] = 0x11
print("ready", flush=True)
for line in sys.stdin:
    for p in line.split(","):
        mm[int(p) * 4096] = 0x22
    print("done", flush=True)
"""


@pytest.mark.skipif(N.residency_unsafe_reason("/dev/shm") != "" or os.geteuid() != 0,
                    reason="release needs tmpfs without swap, and CAP_SYS_NICE for another process")
def test_release_unmaps_the_entries_and_keeps_the_data(shm_file: Path) -> None:
    npages = 8192
    shm_file.write_bytes(b"\0" * npages * PAGE)
    st = shm_file.stat()
    proc = subprocess.Popen([sys.executable, "-c", _TOUCHER, str(shm_file), str(npages * PAGE)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        watch = N.GuestRamWatch(proc.pid, st.st_dev, st.st_ino, npages)
        assert N.bitmap_count(watch.read()) == npages  # touched since "boot": all of it
        assert watch.direct_io_reason() == ""
        assert watch.release() == npages * PAGE
        # what stays mapped is what it touches meanwhile (here: nothing but a few stragglers)
        assert N.bitmap_count(watch.read()) < 64
        data = np.fromfile(shm_file, dtype=np.uint8).reshape(npages, PAGE)
        assert (data[:, 0] == 0x11).all()  # unmapped, not dropped: tmpfs without swap keeps it
        written = [5, 4000, 8191]
        proc.stdin.write(",".join(map(str, written)) + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        got = set(N.bitmap_indices(watch.read()).tolist())
        assert set(written) <= got and len(got) < 64 + 3 * 16  # a write maps its page again
        data = np.fromfile(shm_file, dtype=np.uint8).reshape(npages, PAGE)
        assert (data[written, 0] == 0x22).all() and (np.delete(data[:, 0], written) == 0x11).all()
        # a release of some pages leaves every other entry mapped: a page written while
        # a scan's mask was read is not in it, and must still be mapped at the next
        assert watch.release(N.bitmap_from_indices([5], npages)) == PAGE
        after = set(N.bitmap_indices(watch.read()).tolist())
        assert 5 not in after and {4000, 8191} <= after
        assert watch.release(N.bitmap_from_indices([0, 1, 2, 4000, 4001], npages)) == 5 * PAGE  # two runs
        assert 4000 not in set(N.bitmap_indices(watch.read()).tolist())
    finally:
        proc.communicate("")


def test_residency_is_no_bound_off_tmpfs_or_with_swap(tmp_path: Path) -> None:
    assert N.residency_unsafe_reason("/dev/shm") == "" or "swap" in N.residency_unsafe_reason("/dev/shm")
    root = tmp_path / "sys"
    (root / "proc").mkdir(parents=True)
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n/swapfile file 1 0 -2\n")
    assert "swap" in N.residency_unsafe_reason(sys_root=str(root))
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    thp = root / "sys/kernel/mm/transparent_hugepage"
    thp.mkdir(parents=True)
    (thp / "shmem_enabled").write_text("always within_size advise [never] deny force\n")
    assert N.residency_unsafe_reason(sys_root=str(root)) == ""
    (thp / "shmem_enabled").write_text("always within_size [advise] never deny force\n")
    assert "huge pages" in N.residency_unsafe_reason(sys_root=str(root))
    if N.residency_unsafe_reason("/tmp") == "":  # /tmp may itself be a tmpfs
        return
    assert "tmpfs" in N.residency_unsafe_reason("/tmp")


def test_masked_scan_reads_only_masked_pages() -> None:
    npages = 1 << 14
    mem = np.zeros(npages * PAGE, dtype=np.uint8)
    tr = N.FingerprintTracker(mem, os.urandom(32))
    mem[5 * PAGE] = 1
    mem[9000 * PAGE] = 1
    first = tr.scan()
    assert first.scanned == npages and N.bitmap_indices(first.dirty).tolist() == [5, 9000]
    mem[5 * PAGE] = 2
    mem[9000 * PAGE] = 2
    mem[12000 * PAGE] = 3
    mask = N.bitmap_from_indices([5, 6, 12000], npages)
    part = tr.scan(mask)
    assert part.scanned == 3
    # 9000 changed but was not in the mask: not reported, and its fingerprint kept ...
    assert N.bitmap_indices(part.dirty).tolist() == [5, 12000]
    assert N.bitmap_indices(part.zero).tolist() == [6]  # only scanned pages are known zero
    # ... so a later full scan still finds it
    assert N.bitmap_indices(tr.scan().dirty).tolist() == [9000]
    with pytest.raises(ValueError, match="mask"):
        tr.scan(np.zeros(10, dtype=np.uint8))


def test_a_process_with_a_direct_io_file_is_not_released(shm_file: Path, tmp_path: Path) -> None:
    """A disk opened with O_DIRECT (QEMU's cache.direct) reads into pinned guest pages by
    DMA, not through the page tables: such a process's entries must never be released."""
    npages = 64
    shm_file.write_bytes(b"\0" * npages * PAGE)
    st = shm_file.stat()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    script = _WRITER.replace('print("ready"', 'dfd = os.open(sys.argv[5], os.O_RDONLY | os.O_DIRECT)\nprint("ready"')
    proc = subprocess.Popen([sys.executable, "-c", script, str(shm_file), str(npages * PAGE), "1", "2", str(disk)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        reason = N.GuestRamWatch(proc.pid, st.st_dev, st.st_ino, npages).direct_io_reason()
        assert "O_DIRECT" in reason, reason
    finally:
        proc.communicate("")


@pytest.mark.parametrize("regions", [0, 3, 64, 65, 5000])
def test_region_bits_mark_exactly_the_regions(regions: int) -> None:
    from novacron.native.softdirty import _region_bits

    npages = 1 << 20
    rng = np.random.default_rng(regions)
    starts = np.sort(rng.choice(npages // 128, regions, replace=False)) * 128  # disjoint
    count = rng.integers(1, 8, regions)
    count[::3] = rng.integers(60, 128, count[::3].size)  # short and long ones (64 pages is the split)
    want = np.zeros(npages, dtype=bool)
    for a, c in zip(starts, count, strict=True):
        want[a:a + c] = True
    half = regions // 2  # as two PAGEMAP_SCAN calls return them
    got = _region_bits([starts[:half], starts[half:]], [count[:half], count[half:]], npages)
    assert np.array_equal(got, want)
