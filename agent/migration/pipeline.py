"""Per batch: compress the page frames or not, whichever moves pages faster.

Encoding (hash, copy, seal) and sending overlap: batch i+1 is encoded while
batch i goes out. Per raw byte, a batch then costs the slower of the two::

    stored:      max(e,     l)
    compressed:  max(e + c, l * r)

with e the encode time without zstd, c the zstd time (thread-seconds over the
encode threads), r the compressed/plain ratio and l the send time per wire
byte (token bucket, socket writes and drains: the link, or a receiver slower
than the link). All four are measured on the running migration (moving
averages). On loopback or 10 GbE, l is below c and frames go stored; under a
50 MB/s cap l dominates and zstd pays whenever r < 1. Compression is switched
back on for one batch every ``RESAMPLE`` batches, so c and r follow the data.
"""

from __future__ import annotations

from novacron.native import EncodeStats

RESAMPLE = 16  # batches between compressed samples while frames go stored
MARGIN = 0.9  # switch only for a clear gain (hysteresis against noise)
ALPHA = 0.3  # weight of the newest batch in the moving averages


def _avg(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new


class CompressionPolicy:
    def __init__(self, threads: int, enabled: bool = True) -> None:
        self.threads = max(1, threads)
        self.enabled = enabled  # False: always compress (the old behaviour)
        self.e: float | None = None  # encode s per plain byte, zstd excluded
        self.c: float | None = None  # zstd s per plain byte (wall, over the threads)
        self.r: float | None = None  # body / plain when compressed
        self.l: float | None = None  # send s per wire byte
        self.batches = 0
        self.compressed_batches = 0
        self._since_sample = 0

    def observe(self, enc: EncodeStats, send_s: float, wire_bytes: int) -> None:
        """Record one batch: its encode figures and how long sending its frames took."""
        self.batches += 1
        if enc.plain_bytes <= 0:
            return
        zstd_wall = enc.compress_s / self.threads
        self.e = _avg(self.e, max(enc.wall_s - zstd_wall, 0.0) / enc.plain_bytes)
        if enc.compressed and enc.compressed_plain > 0:
            self.compressed_batches += 1
            self.c = _avg(self.c, zstd_wall / enc.compressed_plain)
            self.r = _avg(self.r, enc.body_bytes / enc.plain_bytes)
        if wire_bytes > 0:
            self.l = _avg(self.l, send_s / wire_bytes)

    def compress_next(self) -> bool:
        """Whether the next batch should be compressed."""
        if not self.enabled:
            return True
        if self.c is None or self.r is None or self.e is None or self.l is None:
            return True  # learn what zstd costs and gains on this guest first
        stored = max(self.e, self.l)
        packed = max(self.e + self.c, self.l * self.r)
        if packed < MARGIN * stored:
            self._since_sample = 0
            return True
        self._since_sample += 1
        if self._since_sample >= RESAMPLE:  # refresh c and r: the data may have changed
            self._since_sample = 0
            return True
        return False

    def as_dict(self) -> dict[str, float | int | None]:
        def rate(x: float | None) -> float | None:
            return round(1 / x / 1e6, 1) if x else None

        return {
            "batches": self.batches,
            "compressed_batches": self.compressed_batches,
            "encode_mb_s": rate(self.e),  # without zstd
            "zstd_mb_s": rate(self.c),
            "link_mb_s": rate(self.l),
            "ratio": None if self.r is None else round(self.r, 3),
        }
