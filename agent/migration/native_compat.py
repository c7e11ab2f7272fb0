"""The slice of ``novacron.native`` the engine uses, with a pure-Python stand-in.

The engine imports these names from here. When the compiled ``novacron.native``
provides them, they are re-exported unchanged; otherwise (native not built
yet) a small numpy/zstandard/AES-GCM implementation of the same contract is
used so the engine still runs and its tests still exercise real encryption,
compression and dirty tracking. ``NATIVE`` says which one is live.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

try:  # pragma: no cover - depends on the native build
    from novacron.native import (  # type: ignore[attr-defined, unused-ignore]
        Counters,
        FingerprintTracker,
        FrameError,
        PageStreamReceiver,
        PageStreamSender,
        TokenBucket,
        bitmap_count,
        bitmap_indices,
    )

    NATIVE = True
except ImportError:
    NATIVE = False

PAGE_SIZE = 4096

if not NATIVE:
    import zstandard
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def bitmap_count(bm: np.ndarray) -> int:  # type: ignore[misc, unused-ignore]
        return int(np.unpackbits(bm).sum())

    def bitmap_indices(bm: np.ndarray) -> np.ndarray:  # type: ignore[misc, unused-ignore]
        return np.flatnonzero(np.unpackbits(bm, bitorder="little")).astype(np.uint64)

    def _bits(mask: np.ndarray) -> np.ndarray:
        return np.packbits(mask.astype(np.uint8), bitorder="little")

    @dataclass
    class Counters:  # type: ignore[no-redef, unused-ignore]
        pages_scanned: int = 0
        pages_dirty: int = 0
        pages_zero: int = 0
        pages_dedup: int = 0
        pages_sent: int = 0
        bytes_raw: int = 0
        bytes_compressed: int = 0
        bytes_wire: int = 0
        seconds_scan: float = 0.0
        seconds_compress: float = 0.0
        seconds_decode: float = 0.0

        def as_dict(self) -> dict[str, Any]:
            return asdict(self)

    @dataclass
    class ScanResult:
        dirty: np.ndarray
        zero: np.ndarray
        seconds: float

    class FingerprintTracker:  # type: ignore[no-redef, unused-ignore]
        """Keyed 64-bit page fingerprints (random odd multipliers, wrapping sum)."""

        CHUNK = 4096  # pages per numpy step, bounds temporaries to 16 MiB

        def __init__(self, mem: Any, key: bytes, threads: int = 2) -> None:
            self.words = np.frombuffer(mem, dtype=np.uint64)
            self.npages = len(self.words) // 512
            rng = np.random.default_rng(int.from_bytes(key[:16], "little"))
            self.mult = rng.integers(1, 2**63, size=512, dtype=np.uint64) | np.uint64(1)
            self.prev: np.ndarray | None = None

        def scan(self) -> ScanResult:
            t0 = time.perf_counter()
            pages = self.words[: self.npages * 512].reshape(self.npages, 512)
            fp = np.empty(self.npages, dtype=np.uint64)
            zero = np.empty(self.npages, dtype=bool)
            with np.errstate(over="ignore"):
                for s in range(0, self.npages, self.CHUNK):
                    blk = pages[s : s + self.CHUNK]
                    fp[s : s + len(blk)] = (blk * self.mult).sum(axis=1, dtype=np.uint64)
                    zero[s : s + len(blk)] = ~blk.any(axis=1)
            dirty = ~zero if self.prev is None else fp != self.prev
            self.prev = fp
            return ScanResult(_bits(dirty), _bits(zero), time.perf_counter() - t0)

    class FrameError(Exception):  # type: ignore[no-redef, unused-ignore]
        pass

    _HDR = struct.Struct(">4sBBQI")  # magic, version, kind, sequence, body length
    _MAGIC = b"NCPF"
    _PAGES, _BLOB = 1, 2

    class PageStreamSender:  # type: ignore[no-redef, unused-ignore]
        def __init__(self, key: bytes, mem: Any, *, level: int = 1,
                     counters: Counters | None = None, **_: Any) -> None:
            self.aead = AESGCM(key)
            self.mem = memoryview(mem)
            self.zstd = zstandard.ZstdCompressor(level=level)
            self.seq = 0
            self.counters = counters or Counters()

        def _seal(self, kind: int, body: bytes) -> bytes:
            head = _HDR.pack(_MAGIC, 1, kind, self.seq, len(body) + 16)
            frame = head + self.aead.encrypt(self.seq.to_bytes(12, "big"), body, head)
            self.seq += 1
            self.counters.bytes_wire += len(frame)
            return frame

        def encode(self, pages: np.ndarray, zero: np.ndarray | None = None,
                   frame_pages: int = 256) -> list[bytes]:
            out = []
            zmask = (np.unpackbits(zero, bitorder="little").astype(bool)
                     if zero is not None else None)
            for s in range(0, len(pages), frame_pages):
                idx = pages[s : s + frame_pages].astype(np.uint64)
                isz = (zmask[idx.astype(np.int64)] if zmask is not None
                       else np.zeros(len(idx), bool))
                data = b"".join(self.mem[int(i) * PAGE_SIZE : (int(i) + 1) * PAGE_SIZE]
                                for i in idx[~isz])
                t0 = time.perf_counter()
                comp = self.zstd.compress(data)
                self.counters.seconds_compress += time.perf_counter() - t0
                body = (struct.pack(">II", len(idx), int(isz.sum())) + idx.tobytes()
                        + np.packbits(isz).tobytes() + comp)
                out.append(self._seal(_PAGES, body))
                self.counters.pages_sent += int((~isz).sum())
                self.counters.pages_zero += int(isz.sum())
                self.counters.bytes_raw += len(data)
                self.counters.bytes_compressed += len(comp)
            return out

        def seal_blob(self, tag: int, data: bytes) -> bytes:
            return self._seal(_BLOB, struct.pack(">I", tag) + data)

    @dataclass
    class Opened:
        pages: int
        blob: tuple[int, bytes] | None

    class PageStreamReceiver:  # type: ignore[no-redef, unused-ignore]
        def __init__(self, key: bytes, mem: Any, *, counters: Counters | None = None,
                     **_: Any) -> None:
            self.aead = AESGCM(key)
            self.mem = memoryview(mem)
            self.npages = len(self.mem) // PAGE_SIZE
            self.seq = 0
            self.zstd = zstandard.ZstdDecompressor()
            self.counters = counters or Counters()

        def open(self, frame: bytes) -> Opened:
            if len(frame) < _HDR.size + 16:
                raise FrameError("frame truncated")
            magic, ver, kind, seq, n = _HDR.unpack_from(frame)
            if magic != _MAGIC or ver != 1 or n != len(frame) - _HDR.size:
                raise FrameError("frame malformed")
            if seq != self.seq:
                raise FrameError(f"frame out of order (got {seq}, expected {self.seq})")
            try:
                body = self.aead.decrypt(seq.to_bytes(12, "big"), frame[_HDR.size :],
                                         frame[: _HDR.size])
            except InvalidTag:
                raise FrameError("frame failed authentication") from None
            self.seq += 1
            if kind == _BLOB:
                return Opened(0, (struct.unpack_from(">I", body)[0], body[4:]))
            if kind != _PAGES or len(body) < 8:
                raise FrameError("frame malformed")
            count, nzero = struct.unpack_from(">II", body)
            idx = np.frombuffer(body, np.uint64, count, 8)
            flag_len = (count + 7) // 8
            isz = np.unpackbits(np.frombuffer(body, np.uint8, flag_len, 8 + 8 * count),
                                count=count).astype(bool)
            if len(idx) and int(idx.max()) >= self.npages:
                raise FrameError("page index out of range")
            data = self.zstd.decompress(body[8 + 8 * count + flag_len :],
                                        max_output_size=count * PAGE_SIZE)
            if len(data) != int((~isz).sum()) * PAGE_SIZE or int(isz.sum()) != nzero:
                raise FrameError("page payload size mismatch")
            j = 0
            for i, z in zip(idx, isz, strict=True):
                off = int(i) * PAGE_SIZE
                if z:
                    self.mem[off : off + PAGE_SIZE] = bytes(PAGE_SIZE)
                else:
                    self.mem[off : off + PAGE_SIZE] = data[j * PAGE_SIZE : (j + 1) * PAGE_SIZE]
                    j += 1
            return Opened(count, None)

    class TokenBucket:  # type: ignore[no-redef, unused-ignore]
        def __init__(self, rate_bytes_per_s: float, burst: int | None = None) -> None:
            self.rate = rate_bytes_per_s
            self.burst = burst or max(int(rate_bytes_per_s / 20), 256 * 1024)
            self.tokens = float(self.burst)
            self.t = time.monotonic()

        def set_rate(self, r: float) -> None:
            self.rate = r

        def delay_for(self, n: int) -> float:
            if self.rate <= 0:
                return 0.0
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
            self.t = now
            self.tokens -= n
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

        async def acquire(self, n: int) -> None:
            delay = self.delay_for(n)
            if delay > 0:
                await asyncio.sleep(delay)


def iter_batches(indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for s in range(0, len(indices), size):
        yield indices[s : s + size]
