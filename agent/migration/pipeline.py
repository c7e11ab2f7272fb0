"""Per batch: pack the pages (dedup + zstd) or send them stored, whichever moves
guest RAM faster on this link with this CPU.

Encoding (copy, fingerprint, seal; plus BLAKE3 and zstd when packing) and
sending overlap: batch i+1 is encoded while batch i goes out, so a batch costs
the slower of the two. Per byte of guest RAM conveyed, for each mode::

    cost = max(encode seconds per raw byte, send seconds per wire byte x wire bytes per raw byte)

The encode figures are measured per mode on the running migration; the send
time per wire byte (token bucket, socket writes and drains: the link, or a
receiver slower than the link) is one figure for both. On loopback or 10 GbE
sending is cheap and stored wins (hashing and zstd cost more than they save);
under a 50 MB/s cap the link dominates and packing wins whenever it shrinks the
data. The first batch goes stored. Packing does the stored work plus hashing
and zstd, so it can only pay where sending, not encoding, limits the stored
batches: only then is a packed batch tried (from the second batch on, never on
a link faster than the encoder). Afterwards the losing mode gets one batch
every ``RESAMPLE`` so its figures follow the data (packed: again only while
stored is limited by sending).
"""

from __future__ import annotations

from typing import Any

from novacron.native import EncodeStats

RESAMPLE = 16  # batches between samples of the mode not chosen
MARGIN = 0.9  # leave packing only for a clear gain (hysteresis against noise)
DECAY = 0.7  # weight of the past in the running sums (recent batches count most)


class _Sums:
    """Decaying sums, so ratios are of totals (robust to tiny batches)."""

    def __init__(self) -> None:
        self.encode_s = self.raw = self.wire = 0.0
        self.n = 0

    def add(self, encode_s: float, raw: float, wire: float) -> None:
        self.encode_s = DECAY * self.encode_s + encode_s
        self.raw = DECAY * self.raw + raw
        self.wire = DECAY * self.wire + wire
        self.n += 1


class CompressionPolicy:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # False: always pack (the old behaviour)
        self._mode = {True: _Sums(), False: _Sums()}  # packed, stored
        self._send_s = self._send_wire = 0.0
        self.batches = 0
        self.packed_batches = 0
        self._since_sample = 0
        self._last_choice = True

    def observe(self, enc: EncodeStats, send_s: float, wire_bytes: int) -> None:
        """Record one batch: its encode figures and how long sending its frames took."""
        self.batches += 1
        packed = enc.compressed or enc.deduped
        self.packed_batches += packed
        if enc.raw_bytes <= 0:
            return
        self._mode[packed].add(enc.wall_s, enc.raw_bytes, wire_bytes)
        self._send_s = DECAY * self._send_s + send_s
        self._send_wire = DECAY * self._send_wire + wire_bytes

    def _cost(self, packed: bool) -> float | None:
        m = self._mode[packed]
        if m.n == 0 or m.raw <= 0 or self._send_wire <= 0:
            return None
        per_wire = self._send_s / self._send_wire
        return max(m.encode_s / m.raw, per_wire * m.wire / m.raw)

    def pack_next(self) -> bool:
        """Whether the next batch should be packed (deduplicated and compressed)."""
        if not self.enabled:
            return True
        packed, stored = self._cost(True), self._cost(False)
        if stored is None:
            choice = False  # stored first: on a fast link it is the answer, and the cheaper one
        elif packed is None:
            # a packed sample only where it could win; the choice stays stored meanwhile
            self._last_choice = False
            return self._send_bound()
        else:
            choice = packed < (1.0 / MARGIN if self._last_choice else MARGIN) * stored
            pm = self._mode[True]
            if pm.wire >= MARGIN * pm.raw:
                # shrinks by less than the margin: packing's gain is noise, its CPU is not
                # (the hysteresis above would otherwise keep a lucky packed choice)
                choice = False
            self._since_sample += 1
            if self._since_sample >= RESAMPLE:  # the other mode's figures may have aged
                self._since_sample = 0
                if choice or self._send_bound():
                    return not choice
        self._last_choice = choice
        return choice

    def _send_bound(self) -> bool:
        """Whether sending (link, cap or receiver), not encoding, limits stored batches."""
        m = self._mode[False]
        if m.n == 0 or m.raw <= 0 or self._send_wire <= 0:
            return False
        return self._send_s / self._send_wire * m.wire > m.encode_s

    def encode_wire_rate(self) -> float:
        """Wire bytes/s the encoder produces in the mode it would choose now (0: not
        measured): the pages sent while paused go no faster than they are encoded."""
        m = self._mode[self._last_choice if self.enabled else True]
        if m.n == 0 or m.encode_s <= 0:
            m = self._mode[not self._last_choice]
        return m.wire / m.encode_s if m.n and m.encode_s > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        def mb_s(num: float, den: float) -> float | None:
            return round(num / den / 1e6, 1) if den > 0 else None

        p, s = self._mode[True], self._mode[False]
        return {
            "batches": self.batches,
            "packed_batches": self.packed_batches,
            "packed_encode_mb_s": mb_s(p.raw, p.encode_s),
            "stored_encode_mb_s": mb_s(s.raw, s.encode_s),
            "link_mb_s": mb_s(self._send_wire, self._send_s),
            "packed_wire_ratio": round(p.wire / p.raw, 3) if p.raw else None,
        }


DIGEST_WIRE = 36  # bytes an offered page costs on the wire (u32 page number + BLAKE3 digest)


class OfferPolicy:
    """Per batch: offer the pages by digest first (have/need, dedupdest.py) or send
    their data straight away.

    An offered page costs ``DIGEST_WIRE`` bytes and a round trip before a miss is
    repaired; a hit saves a data page (its wire bytes, measured). Offer while the
    recent hit ratio times the data-page size is worth more than twice the digest
    (the first batches of a migration always offer: nothing is known yet); else
    offer one batch in ``RESAMPLE`` so the ratio follows the data (a VM that lands
    here meanwhile, in an evacuation, makes later pages hits)."""

    def __init__(self) -> None:
        self.offered = self.hits = 0.0  # decaying sums over answered batches
        self._since = 0
        self.batches = 0  # offered

    def expect_no_hits(self) -> None:
        """Start from one observed miss (``first_round_offer`` said nothing there can
        match): later rounds offer one batch in ``RESAMPLE`` until hits show up."""
        self.offered = max(self.offered, 1.0)

    def observe(self, offered: int, hits: int) -> None:
        self.offered = DECAY * self.offered + offered
        self.hits = DECAY * self.hits + hits

    def offer_next(self, data_page_bytes: float) -> bool:
        if self.offered <= 0 or self.hits / self.offered * data_page_bytes > 2 * DIGEST_WIRE:
            self._since = 0
            self.batches += 1
            return True
        self._since += 1
        if self._since >= RESAMPLE:
            self._since = 0
            self.batches += 1
            return True
        return False


def first_round_offer(index: dict[str, Any], capped: bool) -> tuple[bool, str]:
    """Whether the first round offers its pages by digest, from the destination's
    index as its ``prepared`` reported it, and why.

    An offered page that misses costs BLAKE3 at the source, its digest, a lookup
    and a round trip, then is encoded and sent as data anyway, and hashed again
    where it lands: on an uncapped link to a destination that holds nothing this
    made pre-copy three times slower than sending the data straight away (1 GiB
    on loopback, measured). So the first round offers only where a hit is
    possible (the destination holds pages, or other migrations' pages are on
    their way there: an evacuation) or where the link is capped (bytes are what
    is scarce; what lands is then known by digest to migrations that follow)."""
    entries = int(index.get("entries") or 0)
    peers = int(index.get("in_flight") or 0) + max(0, int(index.get("incoming") or 0) - 1)
    if entries > 0:
        return True, f"the destination holds {entries} indexed pages"
    if peers > 0:
        return True, "other migrations are arriving at the destination"
    if capped:
        return True, "the link is capped"
    return False, "the destination holds no pages and the link is not capped"
