"""Hash kernels and dirty tracking against independent references."""

from __future__ import annotations

import os

import blake3
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import novacron.native as N
from novacron.native import _kernels

PAGE = N.PAGE_SIZE


@given(st.binary(min_size=PAGE, max_size=PAGE))
@settings(max_examples=60, deadline=None)
def test_blake3_page_matches_the_blake3_package(page: bytes) -> None:
    assert N.page_digest(page) == blake3.blake3(page).digest()


def test_blake3_page_of_structured_pages() -> None:
    for page in (bytes(PAGE), b"\xff" * PAGE, bytes(range(256)) * 16):
        assert N.page_digest(page) == blake3.blake3(page).digest()
    with pytest.raises(ValueError):
        N.page_digest(b"short")


@given(st.lists(st.sampled_from(["zero", "random", "known"]), min_size=1, max_size=11))
@settings(max_examples=40, deadline=None)
def test_classify_pages_hashes_four_at_a_time_like_blake3(layout: list[str]) -> None:
    mem = bytearray(len(layout) * PAGE)
    for i, kind in enumerate(layout):
        if kind != "zero":
            mem[i * PAGE:(i + 1) * PAGE] = os.urandom(PAGE)
    pages = np.arange(len(layout), dtype=np.uint64)[::-1].copy()  # any order
    kinds = np.zeros(len(layout), dtype=np.uint8)
    kinds[[j for j, p in enumerate(pages.tolist()) if layout[p] == "known"]] = 1  # caller says zero
    digests = np.zeros((len(layout), 32), dtype=np.uint8)
    _kernels.classify_pages(memoryview(mem), pages, 0, len(layout), kinds, digests, True)
    for j, p in enumerate(pages.tolist()):
        if layout[p] == "random":
            assert kinds[j] == 0
            assert bytes(digests[j]) == blake3.blake3(mem[p * PAGE:(p + 1) * PAGE]).digest()
        else:
            assert kinds[j] == 1


def test_fingerprint_depends_on_key_and_content() -> None:
    page = os.urandom(PAGE)
    a, b = _kernels.Fingerprinter(b"k" * 32), _kernels.Fingerprinter(b"j" * 32)
    assert a.page(page) == a.page(bytes(page))
    assert a.page(page) != b.page(page)
    flipped = bytearray(page)
    flipped[PAGE - 1] ^= 0x80
    assert a.page(bytes(flipped)) != a.page(page)
    with pytest.raises(ValueError):
        _kernels.Fingerprinter(b"short")


@pytest.mark.parametrize("threads", [1, 2])
def test_tracker_reports_changed_and_zero_pages(threads: int) -> None:
    npages = 9000  # big enough to split over threads, not a multiple of 8
    mem = bytearray(npages * PAGE)
    rng = np.random.default_rng(7)
    touched = sorted(set(rng.integers(0, npages, 500).tolist()))
    for p in touched:
        mem[p * PAGE + 17] = 1
    tr = N.FingerprintTracker(mem, os.urandom(32), threads=threads)
    first = tr.scan()
    assert N.bitmap_indices(first.dirty).tolist() == touched
    assert first.zero_count == npages - len(touched)
    assert N.bitmap_count(first.zero) == npages - len(touched)
    assert tr.scan().dirty_count == 0
    # a change at the very end of a page, a page zeroed, a new page
    mem[touched[0] * PAGE + PAGE - 1] = 9
    mem[touched[1] * PAGE + 17] = 0
    mem[(npages - 1) * PAGE] = 5
    third = tr.scan()
    want = sorted({touched[0], touched[1], npages - 1})
    assert N.bitmap_indices(third.dirty).tolist() == want
    zero_now = set(N.bitmap_indices(third.zero).tolist())
    assert touched[1] in zero_now and npages - 1 not in zero_now


@pytest.mark.parametrize("threads", [1, 2])
def test_fresh_scan_tells_zero_pages_and_the_sender_records_the_rest(threads: int) -> None:
    """The first scan only classifies (non-zero pages: "dirty"); once the non-zero
    pages are recorded as sent, later scans find exactly what changed since,
    including a change in a page's last byte and a page written after the scan."""
    npages = 9000
    mem = bytearray(npages * PAGE)
    rng = np.random.default_rng(11)
    touched = sorted(set(rng.integers(0, npages - 1, 400).tolist()))
    for i, p in enumerate(touched):  # non-zero anywhere in the page, the last byte included
        mem[p * PAGE + (PAGE - 1 if i % 3 == 0 else i % PAGE)] = 1 + i % 200
    tr = N.FingerprintTracker(mem, os.urandom(32), threads=threads)
    mask = np.zeros(npages, dtype=bool)
    mask[: npages // 2] = True  # a mask: pages outside it are reported neither way
    outside = [p for p in touched if p >= npages // 2]
    first = tr.scan_fresh(np.packbits(mask, bitorder="little"))
    assert N.bitmap_indices(first.dirty).tolist() == [p for p in touched if p < npages // 2]
    assert first.zero_count == npages // 2 - (len(touched) - len(outside))
    assert first.scanned == npages // 2
    with pytest.raises(RuntimeError, match="not scanned"):
        tr.scan_fresh()
    sent = np.array([p for p in touched if p < npages // 2], dtype=np.uint64)
    fps = np.array([tr.fingerprinter.page(bytes(mem[int(p) * PAGE:(int(p) + 1) * PAGE])) for p in sent],
                   dtype=np.uint64)
    tr.record_sent(sent, fps)  # what the sender does for every page it encodes
    mem[(npages - 1) * PAGE] = 7  # written after the first scan
    again = tr.scan()
    assert N.bitmap_indices(again.dirty).tolist() == sorted([*outside, npages - 1])


def test_tracker_rejects_bad_memory() -> None:
    with pytest.raises(ValueError, match="multiple of 4096"):
        N.FingerprintTracker(bytearray(PAGE + 1), os.urandom(32))
    with pytest.raises(TypeError):
        N.FingerprintTracker(12, os.urandom(32))
    with pytest.raises(ValueError, match="16 bytes"):
        N.FingerprintTracker(bytearray(PAGE), b"k")


@given(st.sets(st.integers(0, 199)), st.sets(st.integers(0, 199)))
def test_bitmap_helpers_match_sets(a: set[int], b: set[int]) -> None:
    ba, bb = N.bitmap_from_indices(sorted(a), 200), N.bitmap_from_indices(sorted(b), 200)
    assert N.bitmap_count(ba) == len(a)
    assert N.bitmap_indices(ba).tolist() == sorted(a)
    assert N.bitmap_indices(N.bitmap_or(ba, bb)).tolist() == sorted(a | b)
    assert N.bitmap_indices(N.bitmap_andnot(ba, bb)).tolist() == sorted(a - b)
    runs = list(N.bitmap_runs(ba))
    assert sorted(p for s, n in runs for p in range(s, s + n)) == sorted(a)
    assert all(s + n not in a and s - 1 not in a for s, n in runs)


def test_soft_dirty_probe_is_consistent() -> None:
    if not N.soft_dirty_supported():
        with pytest.raises(N.SoftDirtyUnsupported, match="soft-dirty"):
            N.SoftDirtyTracker(os.getpid(), 0, PAGE)
        return
    import ctypes
    import mmap

    buf = mmap.mmap(-1, 8 * PAGE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    tr = N.SoftDirtyTracker(os.getpid(), addr, 8 * PAGE)
    tr.clear()
    buf[3 * PAGE] = 1
    assert 3 in N.bitmap_indices(tr.read()).tolist()


def test_digest_table_grows_keeps_reverse_map_and_respects_its_bound() -> None:
    table = _kernels.DigestTable(5000, 16)
    slots = np.full(6000, -1, dtype=np.int32)
    table.set_reverse(slots)
    digests = np.frombuffer(os.urandom(6000 * 32), dtype=np.uint8).reshape(6000, 32)
    values = np.arange(6000, dtype=np.int64)
    assert table.put_many(digests, values) == 5000  # bounded
    assert len(table) == 5000
    assert table.get(digests[4999]) == 4999 and table.get(digests[5000]) is None
    table.discard(digests[7])
    assert table.get(digests[7]) is None and len(table) == 4999
    assert table.put_many(digests[:10], values[:10] + 100, False) == 1  # only the absent one
    assert table.get(digests[3]) == 3 and table.get(digests[7]) == 107
    assert len(table.digests()) == 32 * len(table)
    with pytest.raises(ValueError):
        table.put(b"short", 1)
    # after a rehash the page -> slot map points at live entries again
    index = N.DedupIndex()
    index.attach(20000)
    src = np.frombuffer(os.urandom(20000 * PAGE), dtype=np.uint8)
    sender = N.PageStreamSender(os.urandom(32), src, dedup=index, threads=1)
    for _frame in sender.iter_encode(np.arange(20000)):
        pass
    assert len(index) == 20000
    assert np.all(index.page_slots >= 0)
    assert index.memory_bytes <= N.memory_budget(src.nbytes)


def test_frame_buffer_fills_a_bytes_object_in_place() -> None:
    fb = _kernels.FrameBuffer(b"head", 3)
    with memoryview(fb) as tail:
        assert len(tail) == 3 + 16 and not tail.readonly
        tail[:] = bytes(range(19))
        with pytest.raises(BufferError):
            _ = fb.frame  # still being written
    frame = fb.frame
    assert type(frame) is bytes and frame == b"head" + bytes(range(19))
    with pytest.raises(BufferError):
        memoryview(fb)  # handed out: no more writing


def test_dedup_index_sizes_itself_within_the_memory_budget() -> None:
    for guest in (1 << 30, 24 << 30):
        npages = guest // PAGE
        index = N.DedupIndex()
        index.attach(npages)
        worst_table = index.table.max_entries * 4 // 3 * 2 * 40  # 75 % load, just doubled
        total = 8 * npages + index.page_slots.nbytes + worst_table + 16 * 2**20
        assert total <= N.memory_budget(guest), (guest, total)
        del index


@pytest.mark.parametrize("density", [0.0, 1e-4, 0.003, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("npages", [1, 13, 4096, 100_003])
def test_bitmap_indices_sparse_and_dense(npages: int, density: float) -> None:
    """Both paths (a few set bytes unpacked, or all of them) give every set page, ascending."""
    from novacron.native import bitmap_indices

    bits = np.random.default_rng(npages).random(npages) < density
    got = bitmap_indices(np.packbits(bits, bitorder="little"))
    assert got.dtype == np.uint64 and np.array_equal(got, np.flatnonzero(bits).astype(np.uint64))


def test_bitmap_test_reads_the_pages_bits() -> None:
    from novacron.native.bitmap import bitmap_test

    rng = np.random.default_rng(7)
    bits = rng.random(100_003) < 0.3
    pages = rng.choice(bits.size, 5000, replace=False).astype(np.uint64)
    got = bitmap_test(np.packbits(bits, bitorder="little"), pages)
    assert got.dtype == bool and np.array_equal(got, bits[pages.astype(np.int64)])
