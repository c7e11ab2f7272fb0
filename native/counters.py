"""Counters of the transfer path, shared by the tracker, the sender and the receiver."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Counters:
    """Pages and bytes through each stage, and wall seconds spent per stage.

    The tracker counts pages_scanned/dirty/zero (zero pages found in memory);
    the sender counts pages_sent (every page conveyed), pages_dedup (sent as
    references), pages_zero_sent (sent as zero records) and bytes raw (pages x
    4096), compressed (frame bodies) and wire (whole frames). The receiver
    counts the same figures for what it applied.

    Stage seconds are summed over worker threads, so with two threads they may
    exceed elapsed time. Not thread-safe: the objects in this package update
    them from the calling thread only.
    """

    pages_scanned: int = 0
    pages_dirty: int = 0
    pages_zero: int = 0
    pages_dedup: int = 0
    pages_sent: int = 0
    pages_zero_sent: int = 0
    frames: int = 0
    bytes_raw: int = 0
    bytes_compressed: int = 0
    bytes_wire: int = 0
    seconds_scan: float = 0.0
    seconds_hash: float = 0.0
    seconds_compress: float = 0.0
    seconds_encrypt: float = 0.0
    seconds_decode: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)

    def merge(self, other: Counters) -> None:
        """Add ``other``'s figures to this one (e.g. per-round into per-migration)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
