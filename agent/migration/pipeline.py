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
data. The first batch goes stored, unless the link was already measured slower
than any stored encoder (``SLOW_LINK_B_S``). Packing does the stored work plus
hashing and zstd, so it can only pay where sending, not encoding, limits the
stored batches: only then is a packed batch tried (from the second batch on,
never on a link faster than the encoder). Where the packer outruns the link (a
raw byte packed faster than a wire byte sent) every batch is packed: it cannot
be slower than stored, and guest RAM changes from region to region, so past
batches that did not shrink say little about the next. Otherwise the losing
mode gets one batch every ``RESAMPLE`` so its figures follow the data (packed:
again only while stored is limited by sending; stored: not while sending bounds
the packed batches, where it would only send more).

A destination on this very host (a loopback peer) is the exception: its decoder
runs on our CPUs and no wire lies between the two, so the figures above mislead
(a receiver starved of CPU by our own zstd looks like a slow link, and packing
then looks free: measured, 42 of 44 batches of a 256 MiB guest packed at 133 MB/s
where stored encodes at 670). There, uncapped, every batch goes stored
(``same_host``); under a cap the cap is the link and the policy decides as above.

While packing, the zstd level follows the same figures (``level``): where
sending the packed output takes well over the encode time (a slow link), a
higher level buys fewer bytes for CPU the link leaves idle; one step at a time
up ``LEVELS``, and back down once encoding nears the send time. The option
``compression_level`` is the floor.
"""

from __future__ import annotations

from typing import Any

from novacron.native import EncodeStats

RESAMPLE = 16  # batches between samples of the mode not chosen
MARGIN = 0.9  # leave packing only for a clear gain (hysteresis against noise)
DECAY = 0.7  # weight of the past in the running sums (recent batches count most)
# a link slower than this (bytes/s) is slower than the stored encoder anywhere (it copies
# pages at several hundred MB/s): packing can only pay there, so it is the first choice
SLOW_LINK_B_S = 50e6
DECAY_LONG = 0.95  # the same over ~20 batches: whether packing shrinks this guest's data
# zstd levels tried while the link is the bound: each about as fast as or ~2x slower
# than the one before. Measured here on the realistic guest's working set (1 MiB
# frames, one thread): level 1 261 MB/s 0.624 of the bytes, 3 255 MB/s 0.612, 5 120
# MB/s 0.610, 7 63 MB/s 0.604: past 5 the CPU (which the destination may share)
# buys under 1 %
LEVELS = (1, 3, 5)
LEVEL_UP = 2.5  # step up while sending the packed output takes this many times the encode
LEVEL_DOWN = 1.25  # step down once it takes less than this (the encoder nears the bound)
LEVEL_SETTLE = 3  # packed batches at a level before the next step (its own figures)


class _Sums:
    """Decaying sums, so ratios are of totals (robust to tiny batches)."""

    def __init__(self) -> None:
        self.encode_s = self.raw = self.wire = 0.0
        self.raw_long = self.wire_long = 0.0  # over ~20 batches: what the data is like
        self.n = 0

    def add(self, encode_s: float, raw: float, wire: float) -> None:
        self.encode_s = DECAY * self.encode_s + encode_s
        self.raw = DECAY * self.raw + raw
        self.wire = DECAY * self.wire + wire
        self.raw_long = DECAY_LONG * self.raw_long + raw
        self.wire_long = DECAY_LONG * self.wire_long + wire
        self.n += 1


class CompressionPolicy:
    def __init__(self, enabled: bool = True, floor_level: int = 1, same_host: bool = False) -> None:
        self.enabled = enabled  # False: always pack (the old behaviour)
        self.same_host = same_host  # the destination shares our CPUs (see the module docstring)
        self.floor_level = floor_level  # the compression_level option: never below it
        self._level = floor_level
        self._at_level = 0  # packed batches observed since the level last changed
        self.level_changes = 0
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
        self._at_level += packed
        self._mode[packed].add(enc.wall_s, enc.raw_bytes, wire_bytes)
        self._send_s = DECAY * self._send_s + send_s
        self._send_wire = DECAY * self._send_wire + wire_bytes

    def _cost(self, packed: bool) -> float | None:
        m = self._mode[packed]
        if m.n == 0 or m.raw <= 0 or self._send_wire <= 0:
            return None
        per_wire = self._send_s / self._send_wire
        return max(m.encode_s / m.raw, per_wire * m.wire / m.raw)

    def pack_next(self, link_bytes_s: float = 0.0, capped: bool = False) -> bool:
        """Whether the next batch should be packed (deduplicated and compressed).
        ``link_bytes_s``: the link's rate as measured so far (0: not yet); ``capped``:
        a bandwidth cap holds this batch."""
        if not self.enabled:
            return True
        if self.stored_only(capped):
            self._last_choice = False
            return False
        packed, stored = self._cost(True), self._cost(False)
        if stored is None and packed is None:
            # stored first: on a fast link it is the answer, and the cheaper one; but a
            # link already measured slower than any stored encoder (the acks of the have
            # frames) packs from the first batch: the first batch of repairs can be
            # thousands of pages, all sent stored (measured: 4,000 of 20,600)
            choice = 0 < link_bytes_s < SLOW_LINK_B_S
        elif self._packing_free():
            # the packer outruns the link even on data it cannot shrink (zstd keeps such
            # frames stored after a probe): packing costs no time, whatever the last
            # batches were like; guest RAM changes from region to region (measured: the
            # two batches after the first were incompressible, and the next 64 MiB of
            # page cache, ~3x with zstd, went stored)
            choice = True
        elif stored is None:
            pm = self._mode[True]
            # stored cannot win while sending bounds the packed batches and packing shrinks
            choice = self._bound_by_sending(True) and pm.wire_long < MARGIN * pm.raw_long
        elif packed is None:
            # a packed sample only where it could win; the choice stays stored meanwhile
            self._last_choice = False
            return self._send_bound()
        else:
            choice = packed < (1.0 / MARGIN if self._last_choice else MARGIN) * stored
            pm = self._mode[True]
            if pm.wire_long >= MARGIN * pm.raw_long:
                # shrinks by less than the margin: packing's gain is noise, its CPU is not
                # (the hysteresis above would otherwise keep a lucky packed choice). Over
                # many batches: a few of random pages in a mixed guest (runs of them,
                # or repairs of them alone) must not send the next ones stored
                choice = False
            self._since_sample += 1
            if self._since_sample >= RESAMPLE:  # the other mode's figures may have aged
                self._since_sample = 0
                # a stored sample cannot win while sending bounds the packed batches: it
                # would send more bytes over the same link (measured: 1,563 pages of a
                # 100 Mbit/s migration, 3 MB, went stored as samples)
                if (choice and not self._bound_by_sending(True)) or (not choice and self._send_bound()):
                    return not choice
        self._last_choice = choice
        return choice

    @property
    def packing(self) -> bool:
        """Whether the batches mostly go packed now (the last settled choice; a sample
        of the other mode may go between)."""
        return self._last_choice if self.enabled else True

    @property
    def current_level(self) -> int:
        """The zstd level in use (``level()`` may step it; this does not)."""
        return self._level

    def stored_only(self, capped: bool) -> bool:
        """Whether every batch goes stored whatever is measured: an uncapped
        destination on this host (see the module docstring)."""
        return self.enabled and self.same_host and not capped

    def level(self) -> int:
        """zstd level for the next packed batch: higher while the link leaves the
        encoder idle (see the module docstring), back down when it no longer does."""
        m = self._mode[True]
        if not self.enabled or m.n == 0 or m.encode_s <= 0 or self._send_wire <= 0:
            return self._level
        if self._at_level < LEVEL_SETTLE:
            return self._level
        headroom = self._send_s / self._send_wire * m.wire / m.encode_s
        up = [lv for lv in LEVELS if lv > self._level]
        down = [lv for lv in LEVELS if self.floor_level <= lv < self._level]
        if headroom >= LEVEL_UP and up:
            self._set_level(up[0])
        elif headroom < LEVEL_DOWN and down:
            self._set_level(down[-1])
        return self._level

    def _set_level(self, level: int) -> None:
        self._level, self._at_level = level, 0
        # the sums keep the old level's batches (they decay within LEVEL_SETTLE): cut
        # short, one batch of random pages would read as "packing does not pay"
        self.level_changes += 1

    def _packing_free(self) -> bool:
        """Whether packing a raw byte takes less time than sending one: then a packed
        batch is never slower than a stored one (at worst as large, never larger)."""
        m = self._mode[True]
        if m.n == 0 or m.raw <= 0 or self._send_wire <= 0:
            return False
        return m.encode_s / m.raw < self._send_s / self._send_wire

    def _send_bound(self) -> bool:
        """Whether sending (link, cap or receiver), not encoding, limits stored batches."""
        return self._bound_by_sending(False)

    def _bound_by_sending(self, packed: bool) -> bool:
        m = self._mode[packed]
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
            "zstd_level": self._level,
            "zstd_level_changes": self.level_changes,
            "same_host": self.same_host,
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
