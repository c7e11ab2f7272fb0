"""The sealed page stream: bit-exact round trips and every rejection class."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import novacron.native as N

PAGE = N.PAGE_SIZE
NPAGES = 64
KEY = bytes(range(32))


def make_memory(kinds: list[int], seed: int) -> np.ndarray:
    """Pages of four kinds: 0 zero, 1 random, 2 text, 3 copy of an earlier page."""
    rng = np.random.default_rng(seed)
    mem = np.zeros(len(kinds) * PAGE, dtype=np.uint8)
    for i, k in enumerate(kinds):
        page = mem[i * PAGE:(i + 1) * PAGE]
        if k == 1:
            page[:] = rng.integers(0, 256, PAGE, dtype=np.uint8)
        elif k == 2:
            line = f"page {i} line of text {seed}\n".encode()
            page[:] = np.frombuffer((line * (PAGE // len(line) + 1))[:PAGE], dtype=np.uint8)
        elif k == 3 and i:
            src = int(rng.integers(0, i))
            page[:] = mem[src * PAGE:(src + 1) * PAGE]
    return mem


page_kinds = st.lists(st.integers(0, 3), min_size=NPAGES, max_size=NPAGES)


@given(kinds=page_kinds, seed=st.integers(0, 2**16),
       pages=st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=80),
       dedup=st.sampled_from([None, 16, 0]), threads=st.sampled_from([1, 2]),
       frame_pages=st.sampled_from([1, 3, 16, 256]), use_zero_map=st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_pages_round_trip_bit_exact(kinds: list[int], seed: int, pages: list[int],
                                        dedup: int | None, threads: int, frame_pages: int,
                                        use_zero_map: bool) -> None:
    """dedup: None = off, 16 = a tiny index that fills up, 0 = default size."""
    src = make_memory(kinds, seed)
    dst = np.frombuffer(bytearray(os.urandom(NPAGES * PAGE)), dtype=np.uint8).copy()
    expect = dst.copy()
    index = None if dedup is None else N.DedupIndex(dedup or None)
    sender = N.PageStreamSender(KEY, src, dedup=index, threads=threads, frame_pages=frame_pages)
    receiver = N.PageStreamReceiver(KEY, dst)
    zero = None
    if use_zero_map:
        zero = N.FingerprintTracker(src, os.urandom(32), threads=1).scan().zero
    # two rounds, the second after the source changed, so references to pages
    # sent earlier (and since overwritten) are exercised
    for round_ in range(2):
        for p in pages:
            expect[p * PAGE:(p + 1) * PAGE] = src[p * PAGE:(p + 1) * PAGE]
        written = sum(receiver.open(f).pages for f in sender.encode(pages, zero))
        assert written == len(pages)
        assert np.array_equal(dst, expect)
        if round_ == 0:
            src[: PAGE * 4] = np.roll(src[: PAGE * 4], PAGE)  # move pages around
            zero = None


def test_dedup_sends_references_and_cache_pages() -> None:
    kinds = [1] * 16 + [0] * 48
    src = make_memory(kinds, 3)
    src[20 * PAGE:36 * PAGE] = src[0:16 * PAGE]  # 16 duplicate pages
    other_vm = bytearray(src[:8 * PAGE].tobytes())  # receiver already has 8 of them
    cache = N.PageCache()
    assert cache.add_buffer(other_vm) == 8
    index = N.DedupIndex()
    index.add_remote(cache.digests())
    sender = N.PageStreamSender(KEY, src, dedup=index, frame_pages=8)
    dst = np.zeros_like(src)
    receiver = N.PageStreamReceiver(KEY, dst, cache=cache)
    for f in sender.encode(np.arange(NPAGES)):
        receiver.open(f)
    assert np.array_equal(dst, src)
    # 8 pages from the cache, and pages 20..35 refer to the earlier frames
    assert sender.counters.pages_dedup == 24
    assert receiver.counters.pages_dedup == 24
    assert sender.counters.bytes_wire < 10 * PAGE


def test_stale_cache_page_is_a_dedup_miss_and_writes_nothing() -> None:
    src = make_memory([1] * 4, 5)
    other_vm = bytearray(src.tobytes())
    cache = N.PageCache()
    cache.add_buffer(other_vm)
    index = N.DedupIndex()
    index.add_remote(cache.digests())
    sender = N.PageStreamSender(KEY, src, dedup=index)
    frames = sender.encode([0, 1, 2, 3])
    other_vm[2 * PAGE] ^= 1  # that VM wrote to the page after we indexed it
    dst = np.zeros_like(src)
    receiver = N.PageStreamReceiver(KEY, dst, cache=cache)
    with pytest.raises(N.DedupMiss, match="digest"):
        receiver.open(frames[0])
    assert not dst.any()
    # a receiver without that cache cannot resolve the references at all
    with pytest.raises(N.DedupMiss, match="cache"):
        N.PageStreamReceiver(KEY, dst).open(frames[0])
    assert not dst.any()


def sealed_frames(n_pages: int = 24) -> tuple[np.ndarray, list[bytes]]:
    src = make_memory([1, 2, 0, 3] * (n_pages // 4), 9)
    sender = N.PageStreamSender(KEY, src, frame_pages=4, threads=1)
    return src, sender.encode(np.arange(n_pages))


@given(data=st.data())
@settings(max_examples=80, deadline=None)
def test_tampered_frames_are_rejected_without_writing(data: st.DataObject) -> None:
    src, frames = sealed_frames()
    frame = bytearray(frames[0])
    length_field = range(28, 32)  # body length: decides how many bytes are read
    pos = data.draw(st.integers(0, len(frame) - 1).filter(lambda i: i not in length_field))
    frame[pos] ^= data.draw(st.integers(1, 255))
    dst = np.zeros_like(src)
    receiver = N.PageStreamReceiver(KEY, dst)
    if pos < 5:
        expected: type[N.FrameError] = N.FrameMalformed  # magic, version
    elif 8 <= pos < 16:
        expected = N.FrameWrongKey  # key id
    else:
        expected = N.FrameTampered
    with pytest.raises(expected):
        receiver.open(bytes(frame))
    assert not dst.any()
    assert receiver.open(frames[0]).pages > 0  # the stream goes on from the same place


def test_truncated_reordered_replayed_wrong_key_malformed() -> None:
    src, frames = sealed_frames()
    dst = np.zeros_like(src)
    receiver = N.PageStreamReceiver(KEY, dst)
    for cut in (0, 10, N.HEADER_SIZE, len(frames[0]) - 1):
        with pytest.raises(N.FrameTruncated):
            receiver.open(frames[0][:cut])
    with pytest.raises(N.FrameMalformed, match="stray"):
        receiver.open(frames[0] + b"x")
    with pytest.raises(N.FrameReordered):
        receiver.open(frames[1])
    with pytest.raises(N.FrameWrongKey):
        N.PageStreamReceiver(os.urandom(32), dst).open(frames[0])
    with pytest.raises(N.FrameMalformed):
        receiver.open(b"GET / HTTP/1.1\r\n" + bytes(40))
    assert not dst.any()
    receiver.open(frames[0])
    before = dst.copy()
    with pytest.raises(N.FrameReplayed):
        receiver.open(frames[0])
    with pytest.raises(N.FrameReordered):
        receiver.open(frames[2])
    # a frame of another stream under the same key is a replay from elsewhere
    other = N.PageStreamSender(KEY, src, threads=1).encode([0])[0]
    with pytest.raises(N.FrameReplayed, match="another stream"):
        receiver.open(other)
    assert np.array_equal(dst, before)
    for f in frames[1:]:
        receiver.open(f)
    assert np.array_equal(dst, src)


def test_frame_length_and_blobs() -> None:
    src = make_memory([1, 0], 1)
    sender = N.PageStreamSender(KEY, src)
    blob = sender.seal_blob(42, b"device state" * 1000)
    assert N.frame_length(blob[:N.HEADER_SIZE]) == len(blob)
    assert len(blob) < 2000  # compressible blob was compressed
    receiver = N.PageStreamReceiver(KEY, bytearray(2 * PAGE))
    opened = receiver.open(blob)
    assert opened.blob == (42, b"device state" * 1000) and opened.pages == 0
    noise = os.urandom(100_000)
    raw = sender.seal_blob(1, noise)
    assert len(raw) == N.HEADER_SIZE + 100_000 + 16  # incompressible: sent as is
    assert receiver.open(raw).blob == (1, noise)
    # the header's hint the destination schedules by (inline when stored)
    assert not N.frame_is_stored(blob) and N.frame_is_stored(raw) and not N.frame_is_stored(raw[:10])


def test_bad_arguments_are_refused() -> None:
    src = bytearray(4 * PAGE)
    with pytest.raises(ValueError, match="32 bytes"):
        N.PageStreamSender(b"short", src)
    with pytest.raises(ValueError, match="outside"):
        N.PageStreamSender(KEY, src).encode([4])
    with pytest.raises(ValueError, match="writable"):
        N.PageStreamReceiver(KEY, bytes(4 * PAGE))
    with pytest.raises(ValueError, match="frame_pages"):
        N.PageStreamSender(KEY, src, frame_pages=0)
    with pytest.raises(ValueError, match="threads"):
        N.PageStreamSender(KEY, src, threads=0)
    # a frame whose records point past the receiver's memory is malformed
    big = bytearray(64 * PAGE)
    big[63 * PAGE] = 1
    frame = N.PageStreamSender(KEY, big).encode([63])[0]
    small = bytearray(4 * PAGE)
    with pytest.raises(N.FrameMalformed, match="past memory"):
        N.PageStreamReceiver(KEY, small).open(frame)
    assert not any(small)


def test_header_layout_is_stable() -> None:
    _src, frames = sealed_frames(4)
    magic, version, kind, _flags, _res, _kid, _stream, seq, body, _raw, _tag = struct.unpack(
        "<4sBBBB8s4sQIII", frames[0][:40])
    assert (magic, version, kind, seq) == (b"NCPF", 1, 1, 0)
    assert body == len(frames[0]) - 40


@pytest.mark.parametrize("threads", [1, 2])
def test_open_many_matches_open_and_stops_at_a_bad_frame(threads: int) -> None:
    src, frames = sealed_frames(64)
    dst = np.zeros_like(src)
    receiver = N.PageStreamReceiver(KEY, dst)
    opened = receiver.open_many(frames, threads=threads)
    assert [o.seq for o in opened] == list(range(len(frames)))
    assert np.array_equal(dst, src)
    dst2 = np.zeros_like(src)
    bad = [*frames[:2], frames[3], frames[2]]
    r2 = N.PageStreamReceiver(KEY, dst2)
    with pytest.raises(N.FrameReordered):
        r2.open_many(bad, threads=threads)
    assert r2.next_seq == 2
    r2.open_many(frames[2:], threads=threads)
    assert np.array_equal(dst2, src)


def test_live_guest_writes_during_rounds_never_break_references() -> None:
    """Pages change while they are hashed and sent (pre-copy runs beside the guest):
    digests must always match the bytes sent, and a final quiet round converges."""
    import threading

    npages = 512
    rng = np.random.default_rng(11)
    pool_pages = rng.integers(0, 256, (8, PAGE), dtype=np.uint8)  # few distinct contents
    src = np.zeros(npages * PAGE, dtype=np.uint8)
    view = src.reshape(npages, PAGE)
    view[:] = pool_pages[rng.integers(0, 8, npages)]
    dst = np.zeros_like(src)
    key = os.urandom(32)
    tracker = N.FingerprintTracker(src, key, threads=2)
    sender = N.PageStreamSender(key, src, dedup=N.DedupIndex(), threads=2, frame_pages=16,
                                tracker=tracker)
    receiver = N.PageStreamReceiver(key, dst)
    stop = threading.Event()

    def guest() -> None:
        wr = np.random.default_rng(12)
        for _ in range(200_000):  # bounded
            if stop.is_set():
                return
            view[int(wr.integers(0, npages))] = pool_pages[int(wr.integers(0, 8))]

    writer = threading.Thread(target=guest)
    writer.start()
    try:
        for _ in range(6):
            scan = tracker.scan()
            receiver.open_many(sender.encode(N.bitmap_indices(scan.dirty), scan.zero))
    finally:
        stop.set()
        writer.join()
    scan = tracker.scan()
    receiver.open_many(sender.encode(N.bitmap_indices(scan.dirty), scan.zero))
    assert np.array_equal(dst, src)
    assert sender.counters.pages_dedup > 0


def test_page_cache_indexes_files(tmp_path: os.PathLike[str]) -> None:
    from pathlib import Path

    src = make_memory([1, 1, 0, 2], 21)
    ram = Path(tmp_path) / "other-vm.ram"
    ram.write_bytes(src.tobytes() + b"tail")  # a partial last page is ignored
    cache = N.PageCache()
    assert cache.add_file(ram) == 3 and len(cache) == 3
    digest = N.page_digest(src[:PAGE].tobytes())
    assert cache.lookup(digest) == src[:PAGE].tobytes()
    assert cache.lookup(bytes(32)) is None
    assert len(cache.digests()) == 3 * 32
    cache.close()


def test_close_releases_the_mapping(tmp_path: os.PathLike[str]) -> None:
    import mmap
    from pathlib import Path

    path = Path(tmp_path) / "ram"
    path.write_bytes(bytes(8 * PAGE))
    with open(path, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 8 * PAGE)
    tracker = N.FingerprintTracker(mm, os.urandom(32))
    sender = N.PageStreamSender(KEY, mm, tracker=tracker)
    receiver = N.PageStreamReceiver(KEY, mm)
    with pytest.raises(BufferError):
        mm.close()
    for obj in (tracker, sender, receiver):
        obj.close()
    mm.close()  # no views left


def test_resending_unchanged_pages_costs_only_references() -> None:
    src = make_memory([1] * 32, 31)
    dst = np.zeros_like(src)
    sender = N.PageStreamSender(KEY, src, dedup=N.DedupIndex(), frame_pages=8)
    receiver = N.PageStreamReceiver(KEY, dst)
    receiver.open_many(sender.encode(np.arange(32)))
    for _ in range(2):  # e.g. fingerprint says dirty, content is the same
        before = sender.counters.pages_dedup
        frames = sender.encode(np.arange(32))
        receiver.open_many(frames)
        assert sender.counters.pages_dedup - before == 32
        assert sum(map(len, frames)) < 32 * 64
    assert np.array_equal(dst, src)


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_any_truncation_or_delivery_order_is_caught(data: st.DataObject) -> None:
    src, frames = sealed_frames(32)
    frame = frames[0]
    cut = data.draw(st.integers(0, len(frame) - 1))
    dst = np.zeros_like(src)
    receiver = N.PageStreamReceiver(KEY, dst)
    with pytest.raises(N.FrameTruncated):
        receiver.open(frame[:cut])
    assert not dst.any()
    # deliver in any order: each frame is accepted exactly when it is next,
    # rejected as reordered when early and as replayed when seen before
    order = data.draw(st.lists(st.integers(0, len(frames) - 1), min_size=1, max_size=30))
    for i in order:
        before = dst.copy()
        nxt = receiver.next_seq
        if i == nxt:
            receiver.open(frames[i])
        else:
            with pytest.raises(N.FrameReordered if i > nxt else N.FrameReplayed):
                receiver.open(frames[i])
            assert np.array_equal(dst, before)


def test_page_cache_close_unmaps_or_says_why_not(tmp_path: os.PathLike[str]) -> None:
    import mmap
    from pathlib import Path

    path = Path(tmp_path) / "other-vm.ram"
    path.write_bytes(make_memory([1, 2], 41).tobytes())
    with open(path, "r+b") as f:
        mine = mmap.mmap(f.fileno(), 2 * PAGE)
    cache = N.PageCache()
    cache.add_file(path)
    cache.add_buffer(mine)
    held = cache.view()  # e.g. a receiver still applying a frame
    with pytest.raises(BufferError, match="still in use"):
        cache.close()
    with pytest.raises(BufferError):
        mine.close()  # still exported, as close() said
    del held
    cache.close()  # finishes the job
    mine.close()  # no view of the caller's buffer is left behind


def test_stored_frames_when_compression_is_off() -> None:
    kinds = [2] * 40 + [1] * 8 + [0] * 16  # text compresses well
    mem = make_memory(kinds, 5)
    sender = N.PageStreamSender(KEY, mem)
    packed = sender.encode(np.arange(NPAGES, dtype=np.uint64))
    assert sender.last.compressed and sender.last.compressed_plain > sender.last.body_bytes
    sender.compress = False
    stored = sender.encode(np.arange(NPAGES, dtype=np.uint64))
    last = sender.last
    assert not last.compressed and last.compressed_plain == 0 and last.compress_s == 0
    assert last.body_bytes == last.plain_bytes and last.wall_s > 0
    assert sum(map(len, stored)) > sum(map(len, packed))
    out = np.zeros_like(mem)
    receiver = N.PageStreamReceiver(KEY, out)
    for frame in packed + stored:
        receiver.open(frame)
    assert np.array_equal(out, mem)


def test_unhashed_batch_drops_stale_dedup_entries() -> None:
    mem = make_memory([2] * NPAGES, 9)
    sender = N.PageStreamSender(KEY, mem, dedup=N.DedupIndex())
    out = np.zeros_like(mem)
    receiver = N.PageStreamReceiver(KEY, out)
    old = mem[5 * PAGE:6 * PAGE].copy()
    frames = sender.encode(np.array([5], dtype=np.uint64))  # indexed: page 5 holds `old`
    mem[5 * PAGE:6 * PAGE] = 0x5A  # page 5 changes, sent without hashing
    sender.use_dedup = False
    frames += sender.encode(np.array([5], dtype=np.uint64))
    assert not sender.last.deduped
    mem[9 * PAGE:10 * PAGE] = old  # `old` appears elsewhere: must not point at page 5 now
    sender.use_dedup = True
    frames += sender.encode(np.array([9], dtype=np.uint64))
    assert sender.counters.pages_dedup == 0
    for f in frames:
        receiver.open(f)
    assert np.array_equal(out[5 * PAGE:6 * PAGE], mem[5 * PAGE:6 * PAGE])
    assert np.array_equal(out[9 * PAGE:10 * PAGE], old)


class RecordingGuard:
    """A SpaceGuard that records what it was asked to reserve."""

    def __init__(self) -> None:
        self.complete = False
        self.asked: list[tuple[int, int]] = []

    def ensure(self, start: int, end: int) -> None:
        self.asked.append((start, end))


def test_receiver_has_each_frames_range_reserved_before_writing_it() -> None:
    """While guest memory's space is being reserved, every page a frame writes, or a
    reference reads, lies in the range the receiver asked the guard for first; once
    the guard is complete it is not asked any more."""
    kinds = [1] * NPAGES
    src = make_memory(kinds, 5)
    src[40 * PAGE:41 * PAGE] = src[3 * PAGE:4 * PAGE]  # page 40 goes as a reference to page 3
    dst = np.zeros(NPAGES * PAGE, dtype=np.uint8)
    sender = N.PageStreamSender(KEY, src, dedup=N.DedupIndex(), threads=1, frame_pages=8)
    receiver = N.PageStreamReceiver(KEY, dst)
    guard = RecordingGuard()
    receiver.guard = guard
    zero = np.zeros(NPAGES // 8, dtype=np.uint8)
    zero[7] = 1  # page 56 sent as a zero record: written (zeroed) too
    src[56 * PAGE:57 * PAGE] = 0
    pages = [3, 4, 5, 40, 41, 56, 10, 11]
    for frame in sender.encode(pages, zero):
        receiver.open(frame)
    assert guard.asked and min(a for a, _ in guard.asked) <= 3 * PAGE
    for p in pages:
        assert any(a <= p * PAGE and (p + 1) * PAGE <= b for a, b in guard.asked), p
    assert np.array_equal(dst.reshape(NPAGES, PAGE)[pages], src.reshape(NPAGES, PAGE)[pages])
    guard.complete, guard.asked = True, []
    src[20 * PAGE] ^= 1
    for frame in sender.encode([20]):
        receiver.open(frame)
    assert guard.asked == []


def test_payload_span_of_malformed_plaintext_is_empty() -> None:
    from novacron.native.stream import payload_span

    assert payload_span(b"", NPAGES) == (0, 0)
    assert payload_span(struct.pack("<IIII", 5, 0, 0, 0), NPAGES) == (0, 0)  # counts past its size
    record = struct.pack("<QIB3x", 7, 2, 1)  # two zero pages from page 7
    assert payload_span(struct.pack("<IIII", 1, 0, 0, 2) + record, NPAGES) == (7, 9)


def test_receiver_writes_data_pages_through_the_mapped_file(tmp_path: os.PathLike[str]) -> None:
    """With ``write_fd`` data pages go in with pwrite, zero and referenced pages
    through the mapping: the mapping reads back every page bit-exact; a write the
    file refuses raises OSError instead of being skipped."""
    import mmap

    kinds = [1, 2, 0, 3] * (NPAGES // 4)
    src = make_memory(kinds, 9)
    path = os.path.join(tmp_path, "ram")
    with open(path, "wb") as f:
        f.write(os.urandom(NPAGES * PAGE))  # stale content everywhere: every page must be overwritten
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, NPAGES * PAGE)
    try:
        sender = N.PageStreamSender(KEY, src, dedup=N.DedupIndex(), threads=1, frame_pages=16)
        receiver = N.PageStreamReceiver(KEY, mm)
        receiver.write_fd = fd
        zero = N.FingerprintTracker(src, os.urandom(32), threads=1).scan().zero
        for frame in sender.encode(range(NPAGES), zero):
            receiver.open(frame)
        assert bytes(mm) == src.tobytes()
        receiver.write_fd = os.open(path, os.O_RDONLY)  # writes through it fail (EBADF)
        try:
            src[0] ^= 1
            [frame] = sender.encode([0])
            with pytest.raises(OSError, match="writing guest memory"):
                receiver.open(frame)
        finally:
            os.close(receiver.write_fd)
        receiver.close()
    finally:
        mm.close()
        os.close(fd)


@pytest.mark.parametrize("threads", [1, 2])
def test_unstaged_frames_record_the_fingerprints_of_what_they_carry(threads: int) -> None:
    """Without dedup the pages are copied straight into their frames: the tracker
    must hold the fingerprint of each page as the receiver got it (zero pages the
    zero page's), so an unchanged guest scans clean and a page changed after it was
    sent, even back and forth, scans dirty."""
    kinds = [1, 2, 0, 3] * (NPAGES // 4)
    src = make_memory(kinds, 13)
    dst = np.zeros(NPAGES * PAGE, dtype=np.uint8)
    tracker = N.FingerprintTracker(src, os.urandom(32), threads=1)
    first = tracker.scan_fresh()
    sender = N.PageStreamSender(KEY, src, threads=threads, frame_pages=8, tracker=tracker)
    sender.compress = False
    receiver = N.PageStreamReceiver(KEY, dst)
    for frame in sender.encode(N.bitmap_indices(first.dirty), first.zero):
        receiver.open(frame)
    assert np.array_equal(dst, src)
    for p in range(NPAGES):
        assert tracker._fps[p] == tracker.fingerprinter.page(bytes(dst[p * PAGE:(p + 1) * PAGE])), p
    assert tracker.scan().dirty_count == 0
    src[5 * PAGE] ^= 0xFF
    assert N.bitmap_indices(tracker.scan().dirty).tolist() == [5]
