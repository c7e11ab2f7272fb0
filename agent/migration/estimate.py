"""Accounting of a migration's transfer: what the destination acknowledged, the
link rate measured from those acks, and the switchover (pause) estimate.

Bytes count as sent when the destination says it has them (``ack`` messages,
cumulative, see ``protocol.py``), not when they leave our socket: on a slow
link megabytes can sit in socket buffers, and a pause started with them queued
would last until they drain. The switchover estimate therefore adds every part
of the pause: the final scan, what is still queued, the final pages, the
device state, and the round trips of the hand-over and resume.

Under a bandwidth cap the acks measure the cap, not the link, yet the final
pages go at link speed (unless ``throttle_final``). The link's uncapped rate
comes from the sender's own runs of frames that left without waiting on the
cap, at the speed the link and the receiver allow: the first ``PROBE_BYTES``
(1 MiB, source.py) of pre-copy go unheld once, then the token bucket's bursts
(it refills between frames). A run is timed by the destination's clock
between the first and the last ack inside it (the receiver acks every 256 KiB,
at most every 20 ms), or else from its first write to the ack covering its last
byte (a round trip and the ack delay included); each is a lower bound on that
speed, never optimistic. The probe exceeds the cap by at most 1 MiB, once; the pause sends
its final pages uncapped anyway. Runs of only the bucket's burst are too short
to time at low caps (the acks' own granularity), hence the probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

# Before the hand-over we do not know the device state's size; QEMU's (RAM
# excluded by x-ignore-shared, no VGA) is ~300 KB (README). Only the estimate uses it.
DEVICE_STATE_GUESS = 320 * 1024
# QMP stop, device save/load and cont on both ends, beyond the round trips
HANDOVER_FIXED_S = 0.02
MIN_SAMPLE = 64 * 1024  # fewer bytes between two acks measure latency, not the link
SPAN_S = 0.2  # shortest busy run (destination time) that measures the link
RATE_WINDOW_S = 2.0  # the "current rate" is the acked rate over this window


class LinkMeter:
    """Link rate from cumulative acks. Between two acks the link was busy if every
    byte acknowledged at the second was already written when the first arrived;
    only runs of such intervals measure the link (an idle or capped sender measures
    itself). Timed by the destination's clock (``t`` in its acks) over spans of at
    least ``SPAN_S``, so acks bunched on the way back or a late event loop on
    either side do not read as a burst of speed."""

    def __init__(self) -> None:
        self.acked = 0
        self.busy_rate = 0.0  # EWMA over busy intervals (0: none seen yet)
        self.samples = 0
        self.rtt_s: float | None = None
        self.uncapped_rate = 0.0  # best lower bound of the link from runs not held by the cap
        self._run: tuple[float, int, int] | None = None  # (our time, written at start, at end)
        # acks inside that run: the first and the latest (their time, acked)
        self._run_acks: list[tuple[float, int]] = []
        self._written_then = 0
        self._span: tuple[float, int] | None = None  # (their time, acked) where a busy run began
        self._recent: deque[tuple[float, int]] = deque()

    def ack(self, now: float, acked: int, written: int, their_t: float | None = None) -> None:
        """The destination holds ``acked`` bytes (at its time ``their_t``); we had
        written ``written`` by ``now``."""
        t = now if their_t is None else their_t
        busy = self._span is not None and self._written_then >= acked and t >= self._span[0]
        if not busy:
            self._span = (t, acked)
        elif self._span is not None and t - self._span[0] >= SPAN_S and acked - self._span[1] >= MIN_SAMPLE:
            rate = (acked - self._span[1]) / (t - self._span[0])
            self.busy_rate = rate if not self.samples else 0.7 * self.busy_rate + 0.3 * rate
            self.samples += 1
            self._span = (t, acked)
        self._written_then = written
        self.acked = max(self.acked, acked)
        if self._run is not None:
            t0, start, end = self._run
            if their_t is not None and start < acked <= end:
                self._run_acks[1:] = [(their_t, acked)]  # keeps the first one
            if self.acked >= end:
                # our clock, first write to the covering ack: a round trip and the ack delay included
                rate = (end - start) / max(now - t0, 1e-6)
                if len(self._run_acks) == 2:
                    (ta, a), (tb, b) = self._run_acks
                    if b - a >= MIN_SAMPLE and tb > ta:  # the destination's clock, inside the run
                        rate = max(rate, (b - a) / (tb - ta))
                self.uncapped_rate = max(self.uncapped_rate, rate)
                self._run, self._run_acks = None, []
        self._recent.append((now, self.acked))
        while len(self._recent) > 2 and now - self._recent[1][0] >= RATE_WINDOW_S:
            self._recent.popleft()

    def unheld_run(self, t_start: float, written_start: int, written_end: int) -> None:
        """Bytes ``written_start..written_end`` left from our time ``t_start`` without
        waiting on the cap; the ack that covers them times the run (one at a time)."""
        if self._run is None and written_end - written_start >= MIN_SAMPLE:
            self._run, self._run_acks = (t_start, written_start, written_end), []
            # already covered (the sender was busy elsewhere): the first covering ack seen
            for t, acked in self._recent:
                if t >= t_start and acked >= written_end:
                    self.uncapped_rate = max(self.uncapped_rate, (written_end - written_start) / max(t - t_start, 1e-6))
                    self._run = None
                    break

    def current_rate(self, now: float) -> float:
        """Acked bytes/s over the last ``RATE_WINDOW_S`` (0 when nothing moved)."""
        if len(self._recent) < 2:
            return 0.0
        t0, b0 = self._recent[0]
        if now - self._recent[-1][0] > RATE_WINDOW_S:
            return 0.0  # stalled
        return (self.acked - b0) / max(now - t0, 1e-3)

    def rtt_sample(self, seconds: float) -> None:
        """The smallest seen: a busy destination or loop only ever adds to it."""
        self.rtt_s = seconds if self.rtt_s is None else min(self.rtt_s, seconds)


class Learned:
    """What only a hand-over shows, remembered from this agent's previous ones (a
    first migration uses the guesses above): the device state's size, and the
    fixed cost of the hand-over beyond moving bytes (QEMU saving and loading
    device state, adopting and resuming the guest at the destination)."""

    def __init__(self) -> None:
        self.device_bytes = DEVICE_STATE_GUESS
        self.handover_s = HANDOVER_FIXED_S
        self.seen = 0

    def observe(self, device_bytes: int, handover_s: float) -> None:
        if device_bytes > 0:
            self.device_bytes = device_bytes
        # EWMA: one slow hand-over on a loaded host should not dominate the next estimate
        self.handover_s = handover_s if not self.seen else 0.5 * self.handover_s + 0.5 * handover_s
        self.seen += 1


# per destination host (the hand-over cost is mostly its QEMU's), in this agent process
LEARNED: dict[str, Learned] = {}


def learned(peer: str) -> Learned:
    """What hand-overs to ``peer`` (``host[:port]``) have shown so far."""
    host = peer.rpartition(":")[0] or peer
    if host not in LEARNED and len(LEARNED) >= 1024:  # bounded: forget the oldest peer
        LEARNED.pop(next(iter(LEARNED)))
    return LEARNED.setdefault(host, Learned())


@dataclass
class Estimate:
    """The predicted pause, by part (seconds)."""

    final_scan: float
    queued: float
    final_pages: float
    device_state: float
    handover: float
    # other migrations' unacked bytes ahead of ours on a shared link (LinkShare): slowing
    # this guest does not shrink them
    queued_others: float = 0.0

    @property
    def total(self) -> float:
        return (self.final_scan + self.queued + self.final_pages + self.device_state + self.handover
                + self.queued_others)

    def parts_ms(self) -> dict[str, float]:
        return {f"{k}_ms": round(v * 1000.0, 2) for k, v in self.__dict__.items()}


# Once the pause fits the budget, pre-copy may still run rounds that shorten it (as
# QEMU's does, down to its threshold): a pause fitting 300 ms is not one nobody notices.
POLISH_FLOOR_S = 0.003  # a final-pages part below this is not worth another round
POLISH_SHRINK = 0.5  # ... nor is one after a round that left more than this share of what it sent
POLISH_ROUNDS = 4  # at most this many rounds past the first that fitted
POLISH_ROUND_S = 2.0  # ... each expected to take at most this long (the dirty set at the sending rate)


def worth_another_round(est: Estimate, *, sent_pages: int, dirty_pages: int, polished: int,
                        round_s: float) -> bool:
    """Whether another pre-copy round should shorten a pause that already fits the
    budget: its pages part (what the next round would shrink) is still noticeable,
    the last round shrank the dirty set well (a guest dirtying about as fast as we
    send would only cost time and bytes), and the round is short (``round_s``: the
    dirty set at the rate pre-copy sends; under a low cap the operator's budget rules)."""
    if polished >= POLISH_ROUNDS or sent_pages <= 0 or round_s > POLISH_ROUND_S:
        return False
    return est.final_pages + est.queued > POLISH_FLOOR_S and dirty_pages <= POLISH_SHRINK * sent_pages


def final_rate(*, link_bytes_s: float, uncapped_bytes_s: float, cap_bytes_s: float,
               throttle_final: bool, encode_bytes_s: float = 0.0) -> float:
    """Bytes/s of the pages sent while paused: at link speed (the faster of what the
    acks measured and what unheld runs showed, see the module doc), or held to the
    cap when the operator asked the cap to hold while paused; and never faster than
    the encoder makes them (``encode_bytes_s``, wire bytes/s; 0: unknown). Unheld
    runs time frames encoded before they left, so they say nothing of the encoder."""
    link = max(link_bytes_s, uncapped_bytes_s)
    rate = min(link, cap_bytes_s) if throttle_final and cap_bytes_s else link
    return min(rate, encode_bytes_s) if encode_bytes_s > 0 else rate


def switchover(*, dirty_pages: int, bytes_per_page: float, queued_bytes: int, device_bytes: int,
               link_bytes_s: float, final_bytes_s: float, scan_s: float, rtt_s: float,
               handover_s: float = HANDOVER_FIXED_S, queued_others_bytes: int = 0) -> Estimate:
    """The pause if stop-and-copy started now. ``final_bytes_s``: the rate of the pages
    sent while paused (the link, or the cap when the operator throttles them too)."""
    link = max(link_bytes_s, 1.0)
    final = max(final_bytes_s, 1.0)
    return Estimate(
        final_scan=scan_s,
        queued=queued_bytes / link,
        final_pages=dirty_pages * bytes_per_page / final,
        device_state=device_bytes / final,
        # device_end -> ready, go -> resumed: two round trips, plus the QEMU work
        handover=2 * rtt_s + handover_s,
        queued_others=queued_others_bytes / link,
    )


# -- migrations from this agent to one destination share its link --------------
TURN_ROUNDS = 3  # exclusive rounds a migration may hold the link for before it yields its turn
HOLD_MAX_S = 60.0  # longest a held migration waits for another's turn (a safety net, never a hang)


class ShareMember(Protocol):
    """What a migration tells its ``LinkShare``: its acked rate now and its bytes
    written but not acknowledged yet."""

    def share_figures(self, now: float) -> tuple[float, int]: ...


class LinkShare:
    """The link from this agent to one destination, shared by the migrations to it
    running at once (a drain). Each migration's acks measure only its share of the
    link, so each alone would budget its pause at a fraction of the link and, with
    a few of them, none would fit the budget. Instead:

    - the link's rate is the sum of the members' acked rates measured while all of
      them send (an EWMA: the acks of one flow miss the others');
    - a migration whose pause would fit the budget *with the link to itself* takes
      the **turn** (one at a time): the others hold their pre-copy writes until it
      is resumed at the destination or yields (``TURN_ROUNDS`` rounds without
      converging), so its last round and its pause do have the link alone.

    One migration alone never waits and sees its own rate (``aggregate`` is 0)."""

    def __init__(self) -> None:
        self.members: set[ShareMember] = set()
        self.announced: set[ShareMember] = set()  # started, not sending pages yet
        self.holder: ShareMember | None = None
        self.link_bytes_s = 0.0  # the whole link: EWMA of the members' summed rates
        self.samples = 0
        self._free: asyncio.Event | None = None  # set while no one holds the turn
        self._turn: asyncio.Lock | None = None

    def _sync(self) -> tuple[asyncio.Event, asyncio.Lock]:
        # created lazily in the running loop (the registry outlives any one loop in tests)
        if self._free is None or self._turn is None:
            self._free, self._turn = asyncio.Event(), asyncio.Lock()
            self._free.set()
        return self._free, self._turn

    def announce(self, m: ShareMember) -> None:
        """``m`` started (it prepares): not a member of the link's turns yet, but known
        to ``expected`` (the others then offer their pages by digest from the start)."""
        self.announced.add(m)

    def join(self, m: ShareMember) -> None:
        self.members.add(m)
        self.announced.discard(m)

    def leave(self, m: ShareMember) -> None:
        self.members.discard(m)
        self.announced.discard(m)
        self.release(m)
        if not self.members and not self.announced and self.holder is None:
            self._free = self._turn = None  # the next drain may run in another event loop

    def others(self, m: ShareMember) -> int:
        return len(self.members - {m})

    def expected(self, m: ShareMember) -> int:
        """Other migrations to this destination, sending or still preparing."""
        return len((self.members | self.announced) - {m})

    def observe(self, now: float) -> None:
        """Sample the summed rate, while no one holds the turn and several send."""
        if self.holder is not None or len(self.members) < 2:
            return
        rates = [r for r, _ in (m.share_figures(now) for m in self.members)]
        if sum(1 for r in rates if r > 0) < 2:  # one flow alone measures itself only
            return
        total = sum(rates)
        self.link_bytes_s = total if not self.samples else 0.7 * self.link_bytes_s + 0.3 * total
        self.samples += 1

    def aggregate(self, m: ShareMember, now: float) -> float:
        """The link's rate for ``m``'s pause (it will hold the turn by then); 0 when
        ``m`` is alone (its own measure is the link)."""
        if not self.others(m):
            return 0.0
        self.observe(now)
        return self.link_bytes_s

    def queued_others(self, m: ShareMember, now: float) -> int:
        """Bytes the other members wrote that the destination has not acked: they
        cross the link ahead of ``m``'s last pages."""
        return sum(q for o in self.members if o is not m for _, q in [o.share_figures(now)])

    async def acquire(self, m: ShareMember) -> None:
        """Wait for the turn (others' pauses come first, one at a time)."""
        if self.holder is m:
            return
        free, turn = self._sync()
        await turn.acquire()
        self.holder = m
        free.clear()

    def release(self, m: ShareMember) -> None:
        if self.holder is not m:
            return
        free, turn = self._sync()
        self.holder = None
        free.set()
        turn.release()

    def holds(self, m: ShareMember) -> bool:
        return self.holder is m

    async def wait_turn(self, m: ShareMember) -> float:
        """Before a pre-copy write: wait while another member holds the turn (at most
        ``HOLD_MAX_S``). Returns the seconds waited."""
        if self.holder is None or self.holder is m:
            return 0.0
        free, _ = self._sync()
        t0 = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(free.wait(), HOLD_MAX_S)
        return time.monotonic() - t0


SHARES: dict[str, LinkShare] = {}


def link_share(peer: str) -> LinkShare:
    """The share of the link to ``peer`` (``host[:port]``) among this agent's migrations."""
    host = peer.rpartition(":")[0] or peer
    share = SHARES.get(host)
    if share is None:
        for k in [k for k, v in SHARES.items() if not v.members and not v.announced][: max(0, len(SHARES) - 1023)]:
            del SHARES[k]  # bounded: forget idle destinations
        share = SHARES[host] = LinkShare()
    return share
