"""The page stream: records of (page, kind) packed into frames, zstd-compressed
unless incompressible, sealed with AES-256-GCM, written by the receiver
straight into guest memory.

Frame = 40-byte header (authenticated, not encrypted) + ciphertext + 16-byte tag::

    magic "NCPF" | version u8 | kind u8 | flags u8 | reserved u8 | key id 8 |
    stream id 4 | sequence u64 | body length u32 | raw length u32 | blob tag u32

All integers little-endian. The nonce is stream id + sequence (big-endian), so
it never repeats for one sender; the key id (derived from the key) lets the
receiver tell a wrong key from tampering. The plaintext of a page frame is
a 16-byte count header, run-length records (first page, count, kind), the
dedup references (source page or "cache", BLAKE3 digest) and the data pages.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import blake3
import numpy as np
import numpy.typing as npt
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import novacron.native._kernels as _kernels
from novacron.native._pool import check_threads, pool
from novacron.native.bitmap import bitmap_test
from novacron.native.counters import Counters
from novacron.native.dedup import DedupIndex, PageCache
from novacron.native.tracking import FingerprintTracker, page_buffer

PAGE_SIZE = 4096
MAGIC = b"NCPF"
VERSION = 1
HEADER = struct.Struct("<4sBBBB8s4sQIII")
HEADER_SIZE = HEADER.size  # 40
TAG_SIZE = 16
KIND_PAGES = 1
KIND_BLOB = 2
FLAG_ZSTD = 1
MAX_BODY = 64 << 20  # receivers refuse larger frames before allocating anything
MAX_RAW = 64 << 20  # plaintext of a frame; also what its data and referenced pages may expand to
_ZERO_PAGES_PER_FRAME = 1 << 16
_CHUNK_PAGES = 4096  # pages classified and planned at a time (16 MiB staging area)
_SAMPLE = 4096  # bytes per compressibility probe slice
_KEY_ID_CONTEXT = "novacron 2026 page-stream key id"


class FrameError(ValueError):
    """A frame was rejected; nothing was written to guest memory."""


class FrameTruncated(FrameError):
    """Fewer bytes than the header announces."""


class FrameMalformed(FrameError):
    """Not a NovaCron frame, an unknown version, or contents that do not parse."""


class FrameWrongKey(FrameError):
    """Sealed under another key than the receiver's."""


class FrameTampered(FrameError):
    """Authentication failed: header or body changed in transit."""


class FrameReplayed(FrameError):
    """An authentic frame seen before (sequence already consumed, or another stream)."""


class FrameReordered(FrameError):
    """An authentic frame that arrived ahead of its turn (a frame is missing)."""


class DedupMiss(FrameError):
    """A reference to a page the receiver does not hold, or whose digest no longer matches."""


@dataclass
class EncodeStats:
    """What one ``encode`` call did, for a caller that adapts the pipeline to the link."""

    raw_bytes: int = 0  # pages conveyed x 4096
    plain_bytes: int = 0  # frame plaintexts built (records + data pages)
    body_bytes: int = 0  # what went into the frames after (maybe) compression
    compressed_plain: int = 0  # plaintext bytes that went through zstd
    compress_s: float = 0.0  # thread-seconds in zstd
    wall_s: float = 0.0  # the whole call, wall clock
    compressed: bool = True  # compression was on for this call
    deduped: bool = True  # pages were hashed and looked up in the dedup index
    zero_skipped: int = 0  # zero pages left out (``skip_zero``), not in raw_bytes


@dataclass
class Opened:
    pages: int  # pages written into guest memory
    blob: tuple[int, bytes] | None  # (tag, data) for blob frames
    seq: int


def key_id(key: bytes) -> bytes:
    """8 bytes naming a key without revealing it."""
    return blake3.blake3(key, derive_key_context=_KEY_ID_CONTEXT).digest(length=8)


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes | bytearray) or len(key) != 32:
        raise ValueError("page-stream key must be 32 bytes (AES-256)")
    return bytes(key)


def frame_is_stored(frame: bytes | bytearray | memoryview) -> bool:
    """Whether the frame's header says its body is not zstd-compressed. Not yet
    authenticated: a hint for how to schedule opening it, never trusted otherwise."""
    if len(frame) < HEADER_SIZE:
        return False
    return not HEADER.unpack_from(frame)[3] & FLAG_ZSTD


def frame_length(header: bytes | bytearray | memoryview) -> int:
    """Total length of the frame that starts with ``header`` (>= HEADER_SIZE bytes)."""
    if len(header) < HEADER_SIZE:
        raise FrameTruncated(f"header needs {HEADER_SIZE} bytes, got {len(header)}")
    magic, version, *_rest, body_len, _raw, _tag = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise FrameMalformed("not a NovaCron page-stream frame (bad magic)")
    if version != VERSION:
        raise FrameMalformed(f"unsupported frame version {version}")
    if body_len < TAG_SIZE or body_len > MAX_BODY + TAG_SIZE:
        raise FrameMalformed(f"frame body length {body_len} out of bounds")
    return HEADER_SIZE + int(body_len)


def _nonce(stream: bytes, seq: int) -> bytes:
    return stream + seq.to_bytes(8, "big")


_local = threading.local()
_T = TypeVar("_T")
_R = TypeVar("_R")


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstandard objects are not thread-safe: one per worker thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "zc", None)
    if cache is None:
        cache = _local.zc = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "zd", None)
    if d is None:
        d = _local.zd = zstandard.ZstdDecompressor()
    return d


def _zero_bitmap(zero: npt.ArrayLike, npages: int) -> npt.NDArray[np.uint8]:
    bits = np.asarray(zero, dtype=np.uint8)
    if bits.size * 8 < npages:
        raise ValueError("zero bitmap is smaller than guest memory")
    return bits


def compress_or_skip(plain: bytes | bytearray, level: int) -> tuple[int, bytes | bytearray]:
    """(flags, body): zstd when it pays, the plaintext itself when the frame is
    incompressible. A few spread-out slices are test-compressed first so random
    data costs only a probe."""
    n = len(plain)
    if n < 256:
        return 0, plain
    c = _compressor(level)
    if n > 8 * _SAMPLE:
        view = memoryview(plain)
        step = (n - _SAMPLE) // 3
        probe = b"".join(view[i * step:i * step + _SAMPLE] for i in range(4))
        if len(c.compress(probe)) > 0.92 * len(probe):
            return 0, plain
    packed = c.compress(plain)
    if len(packed) >= n:
        return 0, plain
    return FLAG_ZSTD, packed


class PageStreamSender:
    """Turns guest pages into sealed frames, one direction of one migration.

    ``mem`` is the source guest RAM (read-only mmap is fine); page data is read
    at ``encode`` time. With ``dedup``, pages the receiver already holds
    (sent earlier, or in its page cache) go as 40-byte references. ``threads``
    workers hash and compress without the GIL; encryption runs in the caller's
    thread, in sequence order.

    One ``encode`` at a time (sequence numbers and the dedup index are shared
    state); it may run in a worker thread while the caller sends earlier frames.

    Pass the round's ``tracker`` when the guest runs during the transfer: the
    sender then stores the fingerprint of the bytes it actually sent, so a page
    that changed after the scan and changed back before the next one is still
    seen as dirty (without it, that rare A->B->A case leaves B at the receiver).
    """

    def __init__(self, key: bytes, mem: Any, *, dedup: DedupIndex | None = None,
                 level: int = 1, threads: int = 2, counters: Counters | None = None,
                 frame_pages: int = 256, tracker: FingerprintTracker | None = None) -> None:
        self._key = _check_key(key)
        self._aead = AESGCM(self._key)
        self._key_id = key_id(self._key)
        self._stream = os.urandom(4)
        self._seq = 0
        self._mem = page_buffer(mem)
        self.npages = self._mem.nbytes // PAGE_SIZE
        if not -7 <= level <= 22:
            raise ValueError(f"zstd level must be from -7 to 22, got {level}")
        if not 1 <= frame_pages <= 4096:
            raise ValueError(f"frame_pages must be from 1 to 4096, got {frame_pages}")
        self.level = level
        self.threads = check_threads(threads)
        self.frame_pages = frame_pages
        self.counters = counters if counters is not None else Counters()
        self.dedup = dedup
        # off: page frames go out stored (no zstd), for links faster than the compressor;
        # may change between encode calls (see agent/migration/pipeline.py)
        self.compress = True
        # off: pages are not hashed nor looked up in ``dedup`` (their index entries are
        # dropped instead); same purpose, may change between calls
        self.use_dedup = True
        self.last = EncodeStats()  # figures of the latest encode call
        # Zero pages found while encoding are left out altogether (not even a zero
        # record): for a receiver that holds zeros there already (a fresh RAM file)
        # and pages whose fingerprint in ``tracker`` is the zero page's (recorded so).
        # A round 1 can then take every page the RAM file ever had written, unread
        # before: telling its zero pages from the others happens here, in the pipeline.
        self.skip_zero = False
        self._staging: npt.NDArray[np.uint8] | None = None
        if tracker is not None and tracker.npages != self.npages:
            raise ValueError("tracker and sender must cover the same guest memory")
        self.tracker = tracker
        if dedup is not None:
            dedup.attach(self.npages)

    def close(self) -> None:
        """Let go of guest memory (an mmap can be closed afterwards)."""
        self._mem.release()

    @property
    def memory_bytes(self) -> int:
        """Sender-side buffers kept between calls (the staging area)."""
        return 0 if self._staging is None else int(self._staging.nbytes)

    @property
    def next_seq(self) -> int:
        return self._seq

    def _seal(self, kind: int, flags: int, raw_len: int, body: bytes | bytearray,
              tag: int) -> bytes:
        seq = self._seq
        self._seq += 1
        header = HEADER.pack(MAGIC, VERSION, kind, flags, 0, self._key_id, self._stream, seq,
                             len(body) + TAG_SIZE, raw_len, tag)
        t0 = time.perf_counter()
        # encrypt straight into the frame: concatenating header and ciphertext
        # cost a fresh 1 MiB allocation and copy per frame (measured 16x slower)
        out = _kernels.FrameBuffer(header, len(body))
        with memoryview(out) as tail:
            self._aead.encrypt_into(_nonce(self._stream, seq), body, header, tail)
        frame: bytes = out.frame
        c = self.counters
        c.seconds_encrypt += time.perf_counter() - t0
        c.frames += 1
        c.bytes_compressed += len(body)
        c.bytes_wire += len(frame)
        return frame

    def seal_blob(self, tag: int, data: bytes) -> bytes:
        """One sealed frame carrying opaque bytes (control messages, device state)."""
        if not 0 <= tag < 1 << 32:
            raise ValueError("blob tag must fit in 32 bits")
        if len(data) > MAX_RAW:
            raise ValueError(f"blob of {len(data)} bytes exceeds {MAX_RAW}; split it")
        t0 = time.perf_counter()
        flags, body = compress_or_skip(data, self.level)
        self.counters.seconds_compress += time.perf_counter() - t0
        return self._seal(KIND_BLOB, flags, len(data), body, tag)

    def digest_pages(self, pages: npt.ArrayLike, zero: npt.NDArray[np.uint8] | None = None
                     ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint8],
                                npt.NDArray[np.uint64]]:
        """BLAKE3 digests of pages to offer instead of their data (a have/need
        exchange): ``(non-zero pages, their (n, 32) digests, zero pages)``.

        Like ``encode``, each page is copied once and the digest and the tracker's
        fingerprint describe that copy, so a page changed after this call is found
        dirty again. The pages leave this sender's dedup index (the receiver may now
        hold other content there). Zero pages are not offered: encode them."""
        idx = np.ascontiguousarray(np.asarray(pages).reshape(-1), dtype=np.uint64)
        if idx.size and int(idx.max()) >= self.npages:
            raise ValueError(f"page index {int(idx.max())} outside guest memory of "
                             f"{self.npages} pages")
        zbits = None if zero is None else _zero_bitmap(zero, self.npages)
        out_pages, out_digests, out_zero = [], [], []
        if self._staging is None:
            self._staging = np.empty((_CHUNK_PAGES, PAGE_SIZE), dtype=np.uint8)
        t0 = time.perf_counter()
        for a in range(0, idx.size, _CHUNK_PAGES):
            chunk = idx[a:a + _CHUNK_PAGES]
            n = chunk.size
            kinds = np.zeros(n, dtype=np.uint8)
            if zbits is not None:
                kinds[bitmap_test(zbits, chunk)] = _kernels.PY_KIND_ZERO
            digests = np.empty((n, 32), dtype=np.uint8)
            fper = None if self.tracker is None else self.tracker.fingerprinter
            fps = None if self.tracker is None else np.empty(n, dtype=np.uint64)
            _kernels.classify_pages(self._mem, chunk, 0, n, kinds, digests, True, self._staging,
                                    fper, fps)
            zero_mask = kinds == _kernels.PY_KIND_ZERO
            data = ~zero_mask
            if self.tracker is not None and fps is not None:
                # zero pages are recorded when they are encoded; record only what is offered
                self.tracker.record_sent(chunk[data], fps[data])
            if self.dedup is not None:
                _kernels.forget_pages(self.dedup.table, self.dedup.page_slots, chunk[data])
            out_pages.append(chunk[data])
            out_digests.append(digests[data])
            out_zero.append(chunk[zero_mask])
        self.counters.seconds_hash += time.perf_counter() - t0
        if not out_pages:
            empty = np.zeros(0, dtype=np.uint64)
            return empty, np.zeros((0, 32), dtype=np.uint8), empty
        return (np.concatenate(out_pages), np.concatenate(out_digests),
                np.concatenate(out_zero))

    def encode(self, pages: npt.ArrayLike, zero: npt.NDArray[np.uint8] | None = None
               ) -> list[bytes]:
        """Sealed frames carrying the given pages (indices, in the order given).

        ``zero`` is an optional bitmap of pages already known to be zero (from
        ``ScanResult.zero``); they are not read again. Call with batches of a
        few thousand pages to bound memory: the frames are returned together.
        """
        return list(self.iter_encode(pages, zero))

    def iter_encode(self, pages: npt.ArrayLike, zero: npt.NDArray[np.uint8] | None = None
                    ) -> Iterator[bytes]:
        """Like ``encode`` but yields frames as they are sealed (consume them all)."""
        idx = np.ascontiguousarray(np.asarray(pages).reshape(-1), dtype=np.uint64)
        self.last = EncodeStats(raw_bytes=int(idx.size) * PAGE_SIZE, compressed=self.compress,
                                deduped=self.dedup is not None and self.use_dedup)
        if idx.size == 0:
            return
        t0 = time.perf_counter()
        if int(idx.max()) >= self.npages:
            raise ValueError(f"page index {int(idx.max())} outside guest memory of "
                             f"{self.npages} pages")
        zbits = None if zero is None else _zero_bitmap(zero, self.npages)
        # Bounded chunks. With dedup every non-zero page is staged (copied once, then
        # hashed and fingerprinted) so digests and the tracker's fingerprints describe
        # exactly the bytes sent, however the guest writes meanwhile; the 16 MiB
        # staging area is reused chunk after chunk. Without, a page is copied straight
        # into its frame and fingerprinted from that copy (build_payload).
        for a in range(0, idx.size, _CHUNK_PAGES):
            yield from self._encode_chunk(idx[a:a + _CHUNK_PAGES], zbits)
        self.last.wall_s = time.perf_counter() - t0

    def _encode_chunk(self, idx: npt.NDArray[np.uint64], zbits: npt.NDArray[np.uint8] | None
                      ) -> Iterator[bytes]:
        n = idx.size
        kinds = np.zeros(n, dtype=np.uint8)
        if zbits is not None:
            kinds[bitmap_test(zbits, idx)] = _kernels.PY_KIND_ZERO
        dedup = self.dedup is not None and self.use_dedup
        digests = np.empty((n if dedup else 0, 32), dtype=np.uint8)
        staging = None
        if dedup:
            if self._staging is None:
                self._staging = np.empty((_CHUNK_PAGES, PAGE_SIZE), dtype=np.uint8)
            staging = self._staging
        tracker = self.tracker
        fper = None if tracker is None else tracker.fingerprinter
        fps = None if tracker is None else np.empty(n, dtype=np.uint64)
        # without staging the frames' builders fingerprint the pages they copy
        classify_fper, classify_fps = (fper, fps) if dedup else (None, None)
        c = self.counters

        t0 = time.perf_counter()
        parts = self.threads if n >= 256 * self.threads else 1
        step = (n + parts - 1) // parts
        if parts == 1:
            zeros = _kernels.classify_pages(self._mem, idx, 0, n, kinds, digests, dedup, staging,
                                            classify_fper, classify_fps)
        else:
            ex = pool(self.threads)
            futs = [ex.submit(_kernels.classify_pages, self._mem, idx, a, min(n, a + step),
                              kinds, digests, dedup, staging, classify_fper, classify_fps)
                    for a in range(0, n, step)]
            zeros = sum(f.result() for f in futs)
        if tracker is not None and classify_fps is not None:
            tracker.record_sent(idx, classify_fps)
        if self.skip_zero and zeros and staging is None:  # (staged rows stay by position: records then)
            keep = kinds != _kernels.PY_KIND_ZERO
            dropped = idx[~keep]
            if tracker is not None:  # what the receiver holds: zeros
                tracker.record_sent(dropped, np.full(dropped.size, tracker.fingerprinter.zero_fp, dtype=np.uint64))
            if self.dedup is not None:
                _kernels.forget_pages(self.dedup.table, self.dedup.page_slots, dropped)
            idx, kinds = idx[keep], kinds[keep]
            if dedup:
                digests = digests[keep]
            if fps is not None:
                fps = fps[keep]
            self.last.zero_skipped += int(dropped.size)
            self.last.raw_bytes -= int(dropped.size) * PAGE_SIZE
            c.pages_zero_sent += int(dropped.size)
            n, zeros = idx.size, 0
            if n == 0:
                c.seconds_hash += time.perf_counter() - t0
                return
        c.seconds_hash += time.perf_counter() - t0

        srcs = np.empty(n, dtype=np.int64)
        if self.dedup is not None and not dedup:
            _kernels.forget_pages(self.dedup.table, self.dedup.page_slots, idx)
        if dedup:
            assert self.dedup is not None
            ends = _kernels.plan(idx, kinds, digests, self.dedup.table, self.dedup.page_slots,
                                 srcs, self.frame_pages, _ZERO_PAGES_PER_FRAME, True)
        else:
            ends = _kernels.plan(idx, kinds, digests, None, np.zeros(0, dtype=np.int32), srcs,
                                 self.frame_pages, _ZERO_PAGES_PER_FRAME, False)
        c.pages_sent += n
        c.pages_dedup += int(np.count_nonzero(kinds >= _kernels.PY_KIND_REF))
        c.pages_zero_sent += int(zeros)
        c.bytes_raw += n * PAGE_SIZE
        ranges = list(zip([0, *ends[:-1]], ends, strict=True))

        compress = self.compress

        def payload(r: tuple[int, int]) -> tuple[int, int, bytes | bytearray, float, float]:
            t = time.perf_counter()
            if dedup or tracker is None or fps is None:
                plain = _kernels.build_payload(self._mem, idx, kinds, srcs, digests, r[0], r[1],
                                               staging)
            else:  # fingerprints of the copies in the frame: what the receiver will hold
                plain = _kernels.build_payload(self._mem, idx, kinds, srcs, digests, r[0], r[1],
                                               None, fper, fps)
                tracker.record_sent(idx[r[0]:r[1]], fps[r[0]:r[1]])
            tz = time.perf_counter()
            flags, body = compress_or_skip(plain, self.level) if compress else (0, plain)
            t_end = time.perf_counter()
            return flags, len(plain), body, t_end - t, t_end - tz

        results: Iterator[tuple[int, int, bytes | bytearray, float, float]]
        if self.threads == 1 or len(ranges) == 1:
            results = map(payload, ranges)
        else:
            results = _bounded_map(pool(self.threads), payload, ranges, 2 * self.threads)
        last = self.last
        for flags, raw_len, body, secs, zsecs in results:
            c.seconds_compress += secs
            last.plain_bytes += raw_len
            last.body_bytes += len(body)
            if compress:
                last.compressed_plain += raw_len
                last.compress_s += zsecs
            if raw_len > MAX_RAW:  # cannot happen with frame_pages <= 4096; keep receivers safe
                raise RuntimeError("frame payload exceeds the protocol limit")
            yield self._seal(KIND_PAGES, flags, raw_len, body, 0)


def _bounded_map(ex: ThreadPoolExecutor, fn: Callable[[_T], _R], items: list[_T], ahead: int
                 ) -> Iterator[_R]:
    """Results of fn over items, in order, with at most ``ahead`` in flight (so a
    chunk's frames do not all sit in memory at once)."""
    pending: deque[Future[_R]] = deque()
    it = iter(items)
    try:
        for item in it:
            pending.append(ex.submit(fn, item))
            if len(pending) >= ahead:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(ex.submit(fn, item))
                break
            yield result
    finally:
        for fut in pending:
            fut.cancel()


@dataclass
class _Authentic:
    """A frame whose header and body passed authentication and sequencing."""

    kind: int
    flags: int
    raw_len: int
    tag: int
    seq: int
    stream: bytes
    body: bytes | memoryview  # a view of the receiver's scratch buffer when opened by ``open``
    wire_len: int


def _inflate(auth: _Authentic) -> bytes | memoryview:
    plain = auth.body
    if auth.flags & FLAG_ZSTD:
        try:
            plain = _decompressor().decompress(plain, max_output_size=auth.raw_len)
        except zstandard.ZstdError as exc:
            raise FrameMalformed(f"frame {auth.seq} does not decompress: {exc}") from None
    if len(plain) != auth.raw_len:
        raise FrameMalformed(f"frame {auth.seq} holds {len(plain)} bytes, header says "
                             f"{auth.raw_len}")
    return plain


_ERRORS: dict[int, type[FrameError]] = {
    _kernels.PY_ERR_MALFORMED: FrameMalformed,
    _kernels.PY_ERR_RANGE: FrameMalformed,
    _kernels.PY_ERR_DEDUP_MISS: DedupMiss,
}


class SpaceGuard(Protocol):
    """Where guest memory is a file whose space is still being reserved (an incoming
    VM's RAM file, ``agent/vm/ramfile.Reservation``): the receiver has each frame's
    byte range reserved before it touches it."""

    @property
    def complete(self) -> bool: ...

    def ensure(self, start: int, end: int) -> None: ...


_RECORD = np.dtype([("first", "<u8"), ("count", "<u4"), ("kind", "u1"), ("pad", "V3")])


def payload_span(plain: bytes | bytearray | memoryview, npages: int) -> tuple[int, int]:
    """Pages [lo, hi) of guest memory a page frame's plaintext writes or reads (its
    records and referenced source pages); (0, 0) for a plaintext whose counts do not
    match its size, which ``apply_payload`` rejects before touching memory."""
    size = len(plain)
    if size < 16:
        return 0, 0
    nrec, nref = struct.unpack_from("<II", plain, 0)
    if size < 16 + nrec * 16 + nref * 40:
        return 0, 0
    lo, hi = npages, 0
    if nrec:
        rec = np.frombuffer(plain, dtype=_RECORD, count=nrec, offset=16)
        first = rec["first"]
        lo = min(lo, int(first.min()))
        hi = max(hi, int((first + rec["count"]).max()))  # past memory: rejected before writing
    if nref:
        refs = np.frombuffer(plain, dtype="<u8", count=nref * 5, offset=16 + nrec * 16)[::5]
        local = refs[refs < npages]  # the others name the page cache (or are rejected)
        if local.size:
            lo, hi = min(lo, int(local.min())), max(hi, int(local.max()) + 1)
    hi = min(hi, npages)
    return (lo, hi) if hi > lo else (0, 0)


class PageStreamReceiver:
    """Checks, opens and applies frames from one PageStreamSender, in order.

    ``mem`` is the destination guest RAM as a writable buffer (mmap opened
    read-write). ``cache`` resolves references to pages of local files. Any
    rejected frame raises a FrameError subclass and writes nothing; the
    expected sequence number does not move, so the next authentic frame in
    order is still accepted.
    """

    def __init__(self, key: bytes, mem: Any, *, cache: PageCache | None = None,
                 counters: Counters | None = None) -> None:
        self._key = _check_key(key)
        self._aead = AESGCM(self._key)
        self._key_id = key_id(self._key)
        self._mem = page_buffer(mem, writable=True)
        self.npages = self._mem.nbytes // PAGE_SIZE
        self.cache = cache
        self.counters = counters if counters is not None else Counters()
        self.guard: SpaceGuard | None = None  # see SpaceGuard
        # the file ``mem`` maps (shared), or -1: data pages are written to it with
        # pwrite (see _kernels.apply_payload); the owner closes it after close()
        self.write_fd = -1
        self._stream: bytes | None = None
        self._expect = 0
        # ``open`` decrypts into this buffer, kept from frame to frame: a fresh
        # plaintext object per frame was zero-filled by the decryptor first, then
        # freed (a wasted pass over every frame's bytes); one opening at a time
        self._scratch = bytearray()
        self._scratch_lock = threading.Lock()

    @property
    def next_seq(self) -> int:
        return self._expect

    def close(self) -> None:
        """Let go of guest memory (an mmap can be closed afterwards)."""
        self._mem.release()

    def open(self, frame: bytes | bytearray | memoryview) -> Opened:
        """Check, decrypt, decompress and apply one frame (the next in sequence)."""
        t0 = time.perf_counter()
        if not self._scratch_lock.acquire(blocking=False):  # another thread opens one: its own buffer
            auth = self._authenticate(frame, self._expect, self._stream)
            return self._apply(auth, _inflate(auth), t0)
        try:
            auth = self._authenticate(frame, self._expect, self._stream, scratch=True)
            return self._apply(auth, _inflate(auth), t0)
        finally:
            self._scratch_lock.release()

    def open_many(self, frames: Iterable[bytes | bytearray | memoryview], threads: int = 2
                  ) -> list[Opened]:
        """Open consecutive frames, decompressing on ``threads`` workers while this
        thread authenticates ahead and applies in order. Stops at the first bad
        frame and raises (frames before it stay applied, nothing of it is)."""
        check_threads(threads)
        if threads == 1:
            return [self.open(f) for f in frames]
        ex = pool(threads)
        window: deque[tuple[_Authentic, Future[bytes | memoryview], float]] = deque()
        out: list[Opened] = []
        expect, stream = self._expect, self._stream
        rejected: FrameError | None = None
        try:
            for frame in frames:
                t0 = time.perf_counter()
                try:
                    auth = self._authenticate(frame, expect, stream)
                except FrameError as exc:
                    rejected = exc  # apply the good frames ahead of it first
                    break
                expect, stream = expect + 1, auth.stream
                fut: Future[bytes | memoryview]
                if auth.flags & FLAG_ZSTD:
                    fut = ex.submit(_inflate, auth)
                elif not window:  # stored frame, nothing queued: apply right away
                    out.append(self._apply(auth, _inflate(auth), t0))
                    continue
                else:  # stored frames need no worker, but must wait their turn
                    fut = Future()
                    try:
                        fut.set_result(_inflate(auth))
                    except FrameError as exc:
                        fut.set_exception(exc)
                window.append((auth, fut, time.perf_counter() - t0))
                if len(window) > 2 * threads:
                    a, fut, secs = window.popleft()
                    out.append(self._apply(a, fut.result(), time.perf_counter() - secs))
            while window:
                a, fut, secs = window.popleft()
                out.append(self._apply(a, fut.result(), time.perf_counter() - secs))
        finally:
            for _a, fut, _s in window:
                fut.cancel()
        if rejected is not None:
            raise rejected
        return out

    def _authenticate(self, frame: bytes | bytearray | memoryview, expect: int,
                      expect_stream: bytes | None, scratch: bool = False) -> _Authentic:
        total = frame_length(frame)
        if len(frame) < total:
            raise FrameTruncated(f"frame announces {total} bytes, got {len(frame)}")
        if len(frame) > total:
            raise FrameMalformed(f"{len(frame) - total} stray bytes after the frame")
        (_magic, _version, kind, flags, reserved, kid, stream, seq, _body_len, raw_len,
         tag) = HEADER.unpack_from(frame)
        if kid != self._key_id:
            raise FrameWrongKey("frame was sealed with a different key")
        view = memoryview(frame)
        header = bytes(view[:HEADER_SIZE])
        body: bytes | memoryview
        try:
            if scratch:
                size = total - HEADER_SIZE - TAG_SIZE
                if len(self._scratch) < size:
                    self._scratch = _kernels.uninitialized_bytearray(size)  # written in full below
                body = memoryview(self._scratch)[:size]
                self._aead.decrypt_into(_nonce(stream, seq), view[HEADER_SIZE:], header, body)
            else:
                body = self._aead.decrypt(_nonce(stream, seq), view[HEADER_SIZE:], header)
        except InvalidTag:
            raise FrameTampered(f"frame {seq} failed authentication") from None
        if expect_stream is None:
            if seq != 0:
                raise FrameReordered(f"stream starts at frame {seq}, expected 0")
        elif stream != expect_stream:
            raise FrameReplayed("frame belongs to another stream")
        if seq < expect:
            raise FrameReplayed(f"frame {seq} already received (expecting {expect})")
        if seq > expect:
            raise FrameReordered(f"frame {seq} arrived before frame {expect}")
        if kind not in (KIND_PAGES, KIND_BLOB) or flags & ~FLAG_ZSTD or reserved:
            raise FrameMalformed(f"unknown frame kind {kind} / flags {flags}")
        if raw_len > MAX_RAW:
            raise FrameMalformed(f"raw length {raw_len} exceeds {MAX_RAW}")
        return _Authentic(kind, flags, raw_len, tag, seq, stream, body, len(frame))

    def _apply(self, auth: _Authentic, plain: bytes | memoryview, t0: float) -> Opened:
        c = self.counters
        if auth.kind == KIND_BLOB:
            self._accept(auth.stream)
            c.frames += 1
            c.bytes_wire += auth.wire_len
            c.seconds_decode += time.perf_counter() - t0
            data = plain if isinstance(plain, bytes) else bytes(plain)  # out of the scratch buffer
            return Opened(0, (auth.tag, data), auth.seq)
        guard = self.guard
        if guard is not None and not guard.complete:
            lo, hi = payload_span(plain, self.npages)
            if hi > lo:
                guard.ensure(lo * PAGE_SIZE, hi * PAGE_SIZE)
        err, written, detail = _kernels.apply_payload(
            plain, self._mem, None if self.cache is None else self.cache.view(), MAX_RAW // PAGE_SIZE,
            self.write_fd)
        if err:
            raise _ERRORS[err](f"frame {auth.seq}: {detail}")
        self._accept(auth.stream)
        c.frames += 1
        c.pages_sent += written
        c.pages_dedup += int.from_bytes(plain[4:8], "little")
        c.bytes_raw += written * PAGE_SIZE
        c.bytes_compressed += len(auth.body)
        c.bytes_wire += auth.wire_len
        c.seconds_decode += time.perf_counter() - t0
        return Opened(int(written), None, auth.seq)

    def _accept(self, stream: bytes) -> None:
        self._stream = stream
        self._expect += 1
