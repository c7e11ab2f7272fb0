"""The sending side of a live migration: prepare -> precopy -> stopcopy -> commit.

Guest RAM is read straight from the VM's shared RAM file; QEMU only pauses,
resumes and hands over device state. Any failure before the destination has
confirmed that the guest runs there rolls back: the source resumes and the
destination is told to destroy what it built (and does so by itself when the
channel breaks). With ``on_no_converge = postcopy`` QEMU moves the RAM itself
and may switch to post-copy (``_qemu_ram``, see ``postcopy.py``).

Each irreversible step is journalled first (``journal.py``), so a restarted
agent can settle what this one left. A watchdog runs beside the phases: a
destination silent for ``liveness_s`` (it sends keepalives) or a pause that
reaches its ceiling before ``go`` stops the migration at once, whatever the
phases are waiting on, and the source resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import zstandard

from novacron.agent.channel.records import CTRL, DATA, Channel, ChannelClosed, ProtocolError
from novacron.agent.migration import diskdedup, estimate, protocol, stoptask
from novacron.agent.migration.devicetap import DeviceStateTap
from novacron.agent.migration.digest import ram_digest
from novacron.agent.migration.diskrelay import SourceDiskRelay
from novacron.agent.migration.doubt import Outcome, OutcomeProbe, settle
from novacron.agent.migration.journal import Journal
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.pipeline import CompressionPolicy, OfferPolicy, first_round_offer
from novacron.agent.migration.postcopy import (
    POLL_S,
    QEMU_STREAM,
    RECOVER_TRY_S,
    QemuStream,
    ram_progress,
)
from novacron.agent.migration.ramwork import RamWork
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.migration.stopscan import StopScan, release_resident, written_pages
from novacron.agent.migration.throttle import Throttle
from novacron.agent.migration.unixsock import start_unix_server_at
from novacron.agent.migration.vmport import MirrorSource, PostcopySource, SourceVM
from novacron.agent.safefs import open_regular
from novacron.faults import crash_point
from novacron.native import (
    Counters,
    DedupIndex,
    EncodeStats,
    FingerprintTracker,
    PageStreamSender,
    ScanResult,
    TokenBucket,
    bitmap_count,
    bitmap_indices,
    soft_dirty_supported,
)
from novacron.tls import is_loopback

log = logging.getLogger("novacron.agent.migration")

WATCH_S = 0.02  # watchdog period: how late a pause ceiling may be noticed
MEASURE_BYTES = 1 << 20  # a round this large measures the link
ROUND_ACK_S = 60.0  # longest wait for the destination to acknowledge a round's bytes
DISK_POLL_S = 0.1  # how often the disk mirrors' progress is read while they catch up
# Under a cap, the first bytes of pre-copy go unheld, once: a run long enough for the
# acks to time the link (see estimate.py); the pause sends more than this uncapped anyway
PROBE_BYTES = 1 << 20
FIRST_BATCH_PAGES = 64  # the first two batches of data (see _send_pages)
FIRST_ACK_S = 1.0  # longest wait for the first ack before choosing how to send (_first_ack)
FRAME_PAGES = 256  # pages a page-stream frame holds (1 MiB) ...
LOCAL_FRAME_PAGES = 1024  # ... and sent stored to a destination on this host (see _send_pages)
DISK_FINISH_S = 60.0  # completing ready mirrors (paused guest): drains in-flight writes only


# Linux 5.14's MADV_POPULATE_READ (Python 3.11's mmap lacks the name): the first
# scan touches every page of a fresh mapping, one page fault each; mapping them in
# one call first cut the first scan of 1 GiB by about half on this machine.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
T = TypeVar("T")


def _populate_then(mm: mmap.mmap, fn: Callable[[], T]) -> T:
    with contextlib.suppress(OSError, ValueError):  # an older kernel: the faults it is
        mm.madvise(_MADV_POPULATE_READ)
    return fn()


def _first_scan_of(mm: mmap.mmap, tracker: FingerprintTracker,
                   written: tuple[np.ndarray, list[tuple[int, int]]] | None) -> ScanResult:
    """The first scan, before round 1: the pages the RAM file ever had written
    (``written_pages``), read by nobody yet: round 1 takes them all, tells their zero
    pages from the others as it encodes them (``PageStreamSender.skip_zero``) and
    records each sent page's fingerprint from the bytes it sent; the rest are holes,
    zero. Where that cannot be told, every page is read (populated first, one call
    rather than a fault per page) and only told zero or not (``scan_fresh``)."""
    if written is None:
        return _populate_then(mm, tracker.scan_fresh)
    t0 = time.perf_counter()
    mask, runs = written
    with contextlib.suppress(OSError, ValueError):  # round 1 reads them all: no fault each
        for first, count in runs:
            mm.madvise(_MADV_POPULATE_READ, first * protocol.PAGE, count * protocol.PAGE)
    holes = np.bitwise_not(mask)
    tail = tracker.npages % 8
    if tail:  # bits past the last page stay clear
        holes[-1] &= (1 << tail) - 1
    listed = bitmap_count(mask)
    return ScanResult(mask, holes, listed, tracker.npages - listed, time.perf_counter() - t0, 0)


def _timed_scan(tracker: FingerprintTracker, stop_scan: StopScan) -> tuple[ScanResult, float, float]:
    """A pre-copy scan, when it started and how long it took (the final one, paused,
    will take about as long)."""
    t0 = time.monotonic()
    stop_scan.last_release_s = 0.0
    scan = tracker.scan(stop_scan.before_scan(first=False))
    # (the paused scan releases nothing: that time is no part of its estimate)
    return scan, t0, time.monotonic() - t0 - stop_scan.last_release_s


def _listed(mm: mmap.mmap, tracker: FingerprintTracker, ram_path: Any, ram_stat: Any) -> ScanResult | None:
    """The first scan where the RAM file tells its written pages (see _first_scan_of),
    else None: every page must then be read, after the watch is set up."""
    written = written_pages(ram_path, ram_stat, tracker.npages)
    return None if written is None else _first_scan_of(mm, tracker, written)


SAMPLE_PAGES = 64  # of the dirty set, compressed to weigh the pages the pause will send
PAGE_RECORD_BYTES = 16  # a page's share of its frame's records, header and tag (about)


def _sampled_page_bytes(mm: mmap.mmap, dirty: np.ndarray, packed: bool, level: int) -> float | None:
    """Wire bytes a page of the ``dirty`` set will weigh, from up to ``SAMPLE_PAGES``
    of them, evenly spread, compressed as the pipeline would (``packed``) or stored;
    None for an empty set. Pages written again are the guest's working set, often
    unlike the average of its memory: a 40 Mbit/s migration priced them at round 1's
    1.6 KB a page and paused twice its estimate (they weighed 4 KB)."""
    # the bitmap's non-zero bytes, not its pages: a large guest's page list would be big
    nz = np.flatnonzero(dirty)
    if nz.size == 0:
        return None
    if not packed:
        return float(protocol.PAGE + PAGE_RECORD_BYTES)
    chosen = nz[np.linspace(0, nz.size - 1, min(SAMPLE_PAGES, nz.size)).astype(np.int64)]
    low = dirty[chosen] & -dirty[chosen].astype(np.int16)  # each byte's lowest set bit
    pick = chosen.astype(np.int64) * 8 + np.log2(low.astype(np.float64)).astype(np.int64)
    sample = b"".join(mm[int(p) * protocol.PAGE:(int(p) + 1) * protocol.PAGE] for p in pick)
    packed_len = min(len(zstandard.ZstdCompressor(level=level).compress(sample)), len(sample))
    return packed_len / len(pick) + PAGE_RECORD_BYTES


async def _tick(event: asyncio.Event) -> None:
    """Up to 0.1 s for ``event``: a loop waiting on the destination checks its inbox
    and for a cancel between ticks."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), 0.1)


class MigrationFailed(Exception):
    pass


@dataclass
class _Work:
    """One batch, encoded in a worker thread: its have frame (pages offered by
    digest) and/or data frames, and the pages the destination asked for since."""

    have: bytes | None = None
    batch_no: int = -1
    offered: np.ndarray | None = None
    frames: list[bytes] = field(default_factory=list)
    enc: EncodeStats | None = None
    # (need seq, frames, pages, their encode figures)
    repairs: list[tuple[int, list[bytes], int, EncodeStats | None]] = field(default_factory=list)


class SourceMigration:
    def __init__(
        self,
        vm: SourceVM,
        channel: Channel,
        status: MigrationStatus,
        opts: MigrationOptions,
        *,
        probe: OutcomeProbe | None = None,
        journal: Journal | None = None,
        reconnect: Callable[[], Awaitable[Channel]] | None = None,
    ) -> None:
        self.vm = vm
        # post-copy recovery: a new channel to the destination under the same grant,
        # ``postcopy_resume`` already sent on it (the manager knows how)
        self.reconnect = reconnect
        self.journal = journal  # None: not journalled (engine tests)
        self.probe = probe  # asks the destination's API when the channel dies after 'go'
        self.ch = channel
        self.status = status
        self.opts = opts
        self.cancel_event = asyncio.Event()
        self._inbox: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._paused = False
        self._first: ScanResult | None = None  # the first scan, made while the destination prepares
        self._stop_scan_setup: asyncio.Task[StopScan] | None = None  # see _first_scan
        self._probe_left = PROBE_BYTES  # unheld bytes still to send under a cap (see PROBE_BYTES)
        self._unheld: tuple[float, int] | None = None  # (since, wire bytes): frames the cap did not hold
        self._t_first_write: float | None = None  # the first page-stream frame (see _send_time)
        self._device_started = False
        self._go_sent = False
        self._dest_gave_up = False
        self._t_pause = 0.0
        self._t_resumed: float | None = None
        self._peer_lost: str | None = None  # set by the reader: silent or broken channel
        self._dest_failed: str | None = None  # set by the reader: the destination's 'error'
        self._stopped_by: str | None = None  # the watchdog's reason for stopping the phases
        self.counters = Counters()
        self._zero_skipped = 0  # zero pages at the first scan (see _precopy)
        self._mm: mmap.mmap | None = None
        self.ram_work = RamWork(status.id)  # scans and encodes; teardown waits for them
        self._disk_plan: list[dict[str, Any]] = []
        self._disk_keys = diskdedup.AnnouncedKeys([])  # the destination's, per disk
        self.tracker: FingerprintTracker | None = None
        self.stop_scan: StopScan | None = None
        self._release: dict[str, Any] = {}  # release_resident's report
        self.throttle = Throttle(vm)
        self.sender: PageStreamSender | None = None
        self.bucket = TokenBucket(opts.bandwidth_mbps * 1e6)
        # accounting: what the destination acknowledged (estimate.py)
        self.link = estimate.LinkMeter()
        self._ack_event = asyncio.Event()
        self._acked_round = 0
        # the destination's RAM file has all its space (None: it does not say)
        self._dest_reserved: bool | None = None
        self._reserved_event = asyncio.Event()
        self._round_pages = 0  # pages of the dirty set this round sends ...
        self._round_sent = 0  # ... and how many of them went out
        self._scan_s = 0.0  # how long the last dirty scan took (the final one will be alike)
        self._estimate: estimate.Estimate | None = None
        self._round_rate = 0.0  # best acked throughput of a whole round
        self._final_wire = 0  # bytes of the pages sent while paused
        self._dirty_per_page: float | None = None  # wire bytes of a re-sent page, lately
        self._sampled_per_page: float | None = None  # ... of the dirty set, sampled (_sampled_page_bytes)
        self._learned = estimate.learned(status.peer)  # earlier hand-overs to this destination
        # other migrations from here to the same destination share its link (a drain)
        self.share = estimate.link_share(status.peer)
        self._turn_rounds = 0  # rounds run while holding the link's turn
        self._share_stats: dict[str, Any] = status.link_share
        self._share_stats.update(peak_migrations=1, turns=0, turn_wait_s=0.0, held_s=0.0, link_bytes_s=0.0)
        self.policy = CompressionPolicy(enabled=opts.adaptive_compression, floor_level=opts.compression_level,
                                        same_host=is_loopback(status.peer.rpartition(":")[0]))
        # destination-side dedup (have/need, dedupdest.py): on when both sides want it
        self.offers = OfferPolicy()
        self._offer_on = False
        self._offer_first = False  # the first round offers (pipeline.first_round_offer)
        self.dd_first: dict[str, Any] = {}
        self._batch_no = 0
        # batch -> (offered pages, sorted; which of them are answered): 5 bytes a page
        self._outstanding: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._repairs: list[tuple[int, np.ndarray]] = []  # (need seq, pages) to send as data
        self._need_seq = 0
        self._need_event = asyncio.Event()
        self.dd = {"offered": 0, "hits": 0, "needed": 0, "repaired": 0, "have_bytes": 0,
                   "batches_offered": 0}
        # local disks move as a stream of this migration (diskrelay.py)
        self.mirror: MirrorSource | None = vm if isinstance(vm, MirrorSource) else None
        self.disk_relay: SourceDiskRelay | None = None
        self._disks_started = False
        self._disk_failed: str | None = None
        self._disk_watch: asyncio.Task[None] | None = None
        self._prepare_sent = asyncio.Event()  # set by _watch_disks: a mirror failed after it was ready
        # post-copy (postcopy.py): QEMU's migration connection, relayed over the channel
        self.qemu_stream: QemuStream | None = None
        self._qemu_conns: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue(1)
        self._deadline: asyncio.Timeout | None = None
        self._side_tasks: list[asyncio.Task[None]] = []  # keepalive/reader of a recovered channel
        self._qemu_state = ""  # QEMU's migration state, last read while recovering
        # QEMU may stop the guest by itself (its migration completing): a rollback resumes
        # it whatever we saw last ('cont' on a running guest is harmless)
        self._qemu_may_pause = False

    # -- public ----------------------------------------------------------
    async def run(self) -> MigrationStatus:
        st = self.status
        st.pause_ceiling_ms = self.opts.pause_ceiling_ms
        log.info("migration starting", extra={"migration": st.id, "vm": st.vm, "peer": st.peer})
        self._reader = asyncio.create_task(self._read_loop())
        keepalive = asyncio.create_task(self._keepalive())
        if self.opts.dest_dedup and self.opts.on_no_converge != "postcopy":
            # a drain's VMs, requested together, know of each other at once (to offer
            # pages by digest: post-copy and dedup-less migrations never do)
            self.share.announce(self)
        try:
            await self._watched(self._phases())
            await self._commit()
        except BaseException as exc:
            reason = protocol.failure_reason(
                exc, "destination", f"migration exceeded its timeout of {self.opts.timeout_s:g}s")
            aborted = isinstance(exc, asyncio.CancelledError) and self._stopped_by is None
            if self._stopped_by is not None:
                reason = self._stopped_by
            if self._go_sent and not self._dest_gave_up and not aborted and not st.done:
                await self._settle_in_doubt(reason)
            else:
                await self._rollback(reason, cancelled=aborted or self.cancel_event.is_set())
            if aborted:
                raise
        finally:
            self.share.leave(self)
            keepalive.cancel()
            for task in self._side_tasks:
                task.cancel()
            if self.qemu_stream is not None:
                await self.qemu_stream.close()
            if self._disk_watch is not None:
                self._disk_watch.cancel()
            if self.disk_relay is not None:
                await self.disk_relay.close()
            await self._cleanup()
        return st

    async def _phases(self) -> None:
        postcopy = self.opts.on_no_converge == "postcopy"
        if postcopy and not isinstance(self.vm, PostcopySource):
            raise MigrationFailed("post-copy is not available for this VM's hypervisor")
        async with asyncio.timeout(self.opts.timeout_s) as deadline:
            self._deadline = deadline
            await self._prepare()
            if postcopy:
                if self._disk_plan:
                    raise MigrationFailed("post-copy cannot move local disks; use on_no_converge "
                                          "abort or force")
                await self._qemu_ram()
                return
            await self._mirror_disks()
            self.share.join(self)
            await self._precopy()
            await self._stopcopy()
            await self._switchover()
            self.share.release(self)  # resumed at the destination: the others may go on

    async def _watched(self, phases: Any) -> None:
        """Run ``phases``; cancel them when the watchdog finds a reason to stop."""
        work = asyncio.create_task(phases)
        watch = asyncio.create_task(self._watchdog())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                self._stopped_by = watch.result()
                log.warning("stopping the migration", extra={"migration": self.status.id,
                                                             "reason": self._stopped_by})
                await stoptask.stop(work)  # a lost cancel must not keep the guest waiting
            await work
        finally:
            watch.cancel()
            if not work.done():  # we were cancelled ourselves
                await stoptask.stop(work)

    async def _watchdog(self) -> str:
        """Returns why the migration must stop now; never returns once 'go' was sent."""
        while True:
            await asyncio.sleep(WATCH_S)
            ceiling_s = self.opts.pause_ceiling_ms / 1000.0  # downtime_ms may change live
            if self._go_sent:
                await asyncio.Event().wait()  # only the destination's answer decides now
            if self._dest_failed is not None:
                self._dest_gave_up = True  # it destroyed its copy (see _raise_on_failure)
                return f"destination failed: {self._dest_failed}"
            if self._peer_lost is not None:
                return f"channel to destination lost: {self._peer_lost}"
            if self.disk_relay is not None and self.disk_relay.error is not None:
                return f"disk relay failed: {self.disk_relay.error}"
            if self._disk_failed is not None:
                return self._disk_failed
            if self._paused and time.monotonic() - self._t_pause >= ceiling_s:
                return (f"pause reached its ceiling of {self.opts.pause_ceiling_ms:g} ms before "
                        f"switchover (downtime budget {self.opts.downtime_ms:g} ms x "
                        f"{self.opts.pause_factor:g}, cap {self.opts.max_pause_ms:g} ms)")

    async def _keepalive(self) -> None:
        """Tell the destination we are alive, so it can give up on a silent source fast.
        Only after 'prepare': it must be the first message (and reading the disks for
        its plan, a backing image's digest say, can take a while)."""
        await self._prepare_sent.wait()
        await protocol.keepalive(self.ch, self.opts.liveness_s)

    def _journal(self, step: str, reason: str = "") -> None:
        if self.journal is not None and self.status.id in self.journal.entries:
            self.journal.step(self.status.id, step, reason, budget_exceeded=self.status.budget_exceeded)

    def cancel(self) -> None:
        self.cancel_event.set()

    def change(self, raw: Any) -> None:
        """Live change of ``bandwidth_mbps``/``downtime_ms`` (ValueError if invalid or
        too late): the cap applies to the next frame, the budget at the next round's end."""
        if self._paused or self._go_sent or self.status.done:
            raise ValueError("too late: the migration is already switching over")
        new = self.opts.changed(raw)
        self.opts.bandwidth_mbps, self.opts.downtime_ms = new.bandwidth_mbps, new.downtime_ms
        self.bucket.set_rate(new.bandwidth_mbps * 1e6)
        if self.qemu_stream is not None and isinstance(self.vm, PostcopySource):  # QEMU moves the RAM
            self._side_tasks.append(asyncio.create_task(
                self.vm.set_ram_limits(new.bandwidth_mbps * 1e6, new.downtime_ms)))
        self.status.options = self.opts.as_dict()
        self.status.pause_ceiling_ms = self.opts.pause_ceiling_ms
        log.info("migration limits changed", extra={"migration": self.status.id, **raw})

    @property
    def switching_over(self) -> bool:
        """'go' was sent: only the destination's answer may decide now, not a cancel."""
        return self._go_sent

    # -- helpers ---------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while True:
                # the destination sends keepalives: silence this long means dead or hung
                rec = await self.ch.recv(timeout=self.opts.liveness_s)
                if rec.kind == DATA and rec.stream == QEMU_STREAM and self.qemu_stream is not None:
                    assert rec.frame is not None
                    self.qemu_stream.deliver_nowait(rec.frame)  # the destination's return path
                    continue
                if rec.kind == DATA and rec.stream == diskdedup.DISK_KEYS:
                    assert rec.frame is not None
                    self._disk_keys.add(bytes(rec.frame))  # before 'prepared' (diskdedup.py)
                    continue
                if rec.kind == DATA and self.disk_relay is not None:
                    assert rec.frame is not None
                    self.disk_relay.deliver(rec.stream, rec.frame)  # NBD replies to our QEMU
                    continue
                if rec.kind != CTRL or rec.ctrl is None:
                    raise ProtocolError("destination sent a frame; only control messages expected")
                if rec.op == "keepalive":
                    continue
                if rec.op == "ack":
                    self._on_ack(rec.ctrl)
                    continue
                if rec.op == "need":
                    self._on_need(rec.ctrl)
                    continue
                if rec.op == "disk_need" and self.disk_relay is not None:
                    self.disk_relay.on_need(rec.ctrl)
                    continue
                if rec.op == "disk_eof" and self.disk_relay is not None:
                    self.disk_relay.peer_eof(protocol.check_stream(rec.ctrl, self.disk_relay.disks))
                    continue
                if rec.op == "error":  # its reason beats the channel closing right after
                    self._dest_failed = protocol.reason_of(rec.ctrl)
                await self._inbox.put(rec.ctrl)
        except (ChannelClosed, ProtocolError) as exc:
            self._peer_lost = str(exc)
            await self._inbox.put(exc)

    def _on_ack(self, msg: dict[str, Any]) -> None:
        st = self.status
        acked, rnd, their_t = protocol.check_ack(msg, st.bytes_wire)
        self._note_reserved(msg)
        self.link.ack(time.monotonic(), acked, st.bytes_wire, their_t)
        st.bytes_acked = self.link.acked
        if rnd is not None:
            self._acked_round = max(self._acked_round, rnd)
            self._ack_event.set()
        self._progress()

    def _note_reserved(self, msg: dict[str, Any]) -> None:
        reserved = msg.get("reserved")
        if reserved is not None and not isinstance(reserved, bool):
            raise ProtocolError(f"'{msg.get('op')}' message: reserved must be true or false")
        if reserved is not None and self._dest_reserved is not True:  # (space is not given back)
            self._dest_reserved = reserved
            if reserved:
                self._reserved_event.set()

    async def _wait_reserved(self) -> None:
        """Until the destination's RAM file has all its space, the guest running here:
        paused, the device state would wait for it. Bounded by the migration's timeout;
        a reservation that fails ends the migration (the destination says why)."""
        st = self.status
        t0 = time.monotonic()
        log.info("pre-copy converged; waiting for the destination to reserve the RAM file's space",
                 extra={"migration": st.id})
        while not self._reserved_event.is_set():
            self._check_inbox()
            await _tick(self._reserved_event)
        st.prepare_parts["reserve_wait_s"] = round(
            st.prepare_parts.get("reserve_wait_s", 0.0) + time.monotonic() - t0, 4)

    def _on_need(self, msg: dict[str, Any]) -> None:
        """The destination's answer to a have batch: these pages it could not fill."""
        batch, seq, pages, final = protocol.check_need(msg)
        if seq != self._need_seq:
            raise ProtocolError(f"'need' {seq} out of order (expected {self._need_seq})")
        self._need_seq += 1
        entry = self._outstanding.get(batch)
        if entry is None:
            raise ProtocolError(f"'need' for batch {batch}, which is not awaiting an answer")
        offered, answered = entry
        at = np.searchsorted(offered, pages)
        if pages.size and (int(at.max()) >= offered.size or not np.array_equal(offered[at], pages)
                           or answered[at].any()):
            raise ProtocolError("'need' names pages not offered in its batch, or answered already")
        answered[at] = True
        self.dd["needed"] += int(pages.size)
        if pages.size:
            self._repairs.append((seq, pages.astype(np.uint64)))
        if final:
            hits = int(answered.size - np.count_nonzero(answered))
            del self._outstanding[batch]
            self.dd["hits"] += hits
            self.offers.observe(int(offered.size), hits)
        self.status.dedup = self._dedup_status()
        self._need_event.set()

    def _data_page_bytes(self) -> float:
        """Wire bytes of a page sent as data (digest-only pages and their have frames
        excluded): what the pages still to send will weigh."""
        st = self.status
        pages = st.pages_sent - self.dd["hits"]
        wire = st.bytes_wire - self.dd["have_bytes"] - st.device_state_bytes
        return wire / pages if pages > 0 and wire > 0 else float(protocol.PAGE)

    def _dedup_status(self) -> dict[str, Any]:
        saved = self.dd["hits"] * self._data_page_bytes() - self.dd["have_bytes"]
        return {**self.dd, **self.dd_first, "enabled": self._offer_on, "bytes_saved_est": int(saved),
                "outstanding_batches": len(self._outstanding)}

    def _link_rate(self) -> float:
        """Bytes/s the link carried: busy intervals between acks, else whole rounds
        (a lower bound when the cap or the encoder held us back)."""
        st = self.status
        rate = self.link.busy_rate or self._round_rate
        if not rate:
            rate = self.opts.bandwidth_mbps * 1e6 or 1e9
        st.link_rate_bytes_s = rate
        return rate

    def _dirty_page_bytes(self) -> float:
        """Wire bytes of a page written again: measured on the last round's re-sent
        pages, else a sample of the dirty set, else the average so far."""
        return self._dirty_per_page or self._sampled_per_page or self._bytes_per_page()

    def _bytes_per_page(self) -> float:
        st = self.status
        if self.dd["offered"]:  # pages that went as digests weigh nothing like data
            return self._data_page_bytes()
        return st.bytes_wire / st.pages_sent if st.pages_sent else float(protocol.PAGE)

    def _progress(self) -> None:
        """Remaining (from the dirty set), rate, ETA and a percentage that never goes back."""
        st = self.status
        if st.phase not in ("precopy", "stopcopy"):
            return
        now = time.monotonic()
        pages = max(0, self._round_pages - self._round_sent)
        queued = max(0, st.bytes_wire - st.bytes_acked)
        device = 0 if self._device_started else self._learned.device_bytes
        remaining = int(pages * self._bytes_per_page() + queued + device)
        st.remaining_bytes = remaining
        st.rate_bytes_s = self.link.current_rate(now)
        st.eta_s = remaining / st.rate_bytes_s if st.rate_bytes_s > 0 else None
        if st.bytes_acked + remaining > 0:
            st.advance(100.0 * st.bytes_acked / (st.bytes_acked + remaining))

    def _check_inbox(self) -> None:
        """Fail fast if the destination reported an error or the channel broke."""
        if self.cancel_event.is_set():
            raise MigrationFailed("cancelled")
        while not self._inbox.empty():
            item = self._raise_on_failure(self._inbox.get_nowait())
            raise ProtocolError(f"unexpected {item.get('op')!r} from destination")

    def _raise_on_failure(self, item: dict[str, Any] | BaseException) -> dict[str, Any]:
        """``item`` from the inbox, unless it says the channel broke or the destination gave up."""
        if isinstance(item, BaseException):
            raise MigrationFailed(f"channel to destination lost: {item}")
        if item.get("op") == "error":
            self._dest_gave_up = True  # it destroyed its copy: resuming here is safe
            raise MigrationFailed(f"destination failed: {protocol.reason_of(item)}")
        return item

    async def _expect(self, op: str, timeout: float) -> dict[str, Any]:
        # past 'go' a cancel cannot undo anything: wait for the answer only
        cancel = asyncio.create_task(
            self.cancel_event.wait() if not self._go_sent else asyncio.Event().wait())
        get = asyncio.create_task(self._inbox.get())
        try:
            done, _ = await asyncio.wait({cancel, get}, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancel.cancel()
            if not get.done():
                get.cancel()
        if get not in done:
            if cancel in done:
                raise MigrationFailed("cancelled")
            raise MigrationFailed(f"destination did not answer {op!r} within {timeout:g}s")
        item = self._raise_on_failure(get.result())
        if item.get("op") != op:
            raise ProtocolError(f"expected {op!r} from destination, got {item.get('op')!r}")
        return item

    # -- phases ----------------------------------------------------------
    async def _prepare(self) -> None:
        st = self.status
        st.set_phase("prepare")
        size = self.vm.ram_size
        st.pages_total = size // protocol.PAGE
        fd = open_regular(self.vm.ram_path, os.O_RDONLY, same_as=self.vm.ram_stat)  # see safefs
        try:
            self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self._disk_plan = await self.mirror.disk_plan() if self.mirror is not None else []
        self._disk_keys = diskdedup.AnnouncedKeys([int(p["index"]) for p in self._disk_plan])
        await self.ch.send_ctrl({
            "op": "prepare", "id": st.id, "vm": self.vm.name, "spec": self.vm.spec(),
            "ram_size": size, "test_digest": self.opts.test_digest,
            "liveness_s": self.opts.liveness_s, "disks": self._disk_plan,
            "postcopy": self.opts.on_no_converge == "postcopy",
            # the destination announces its images' clusters only when asked (diskdedup.py)
            "disk_dedup": self.opts.disk_dedup and bool(self._disk_plan),
        })
        self._prepare_sent.set()
        t_sent = time.monotonic()
        st.prepare_parts["connect_s"] = round(t_sent - st._t0, 4)  # channel, handshake, grant
        # The first scan reads all of guest RAM: it runs while the destination prepares
        # (admission, RAM file, its QEMU's start) instead of after. Pages the guest
        # writes meanwhile are found by the next scan, as during any round.
        # (Not with post-copy: QEMU moves the RAM then.)
        scanning = None if self.opts.on_no_converge == "postcopy" else \
            asyncio.create_task(self._first_scan())
        try:
            prepared = await self._expect("prepared", timeout=120)
            self._note_reserved(prepared)
            self._disk_keys.settle(prepared.get("disk_keys"))
            # admission, RAM file and QEMU start at the destination
            st.prepare_parts["destination_s"] = round(time.monotonic() - t_sent, 4)
        finally:
            if scanning is not None:
                # never leave the scan's thread reading the RAM mapping _cleanup closes
                await asyncio.wait({scanning})
                if not scanning.cancelled():
                    scanning.exception()  # retrieved here; raised below when it matters
        if scanning is not None:
            self._first = scanning.result()
        # the destination offers its page index: pages it may hold go as digests first
        self._offer_on = self.opts.dest_dedup and isinstance(prepared.get("dedup"), dict)
        if self._offer_on:
            self._offer_first, why = first_round_offer(prepared["dedup"], self.opts.bandwidth_mbps > 0)
            if not self._offer_first:
                self.offers.expect_no_hits()
            self.dd_first = {"first_round_offered": self._offer_first, "first_round_reason": why}
        st.dedup = self._dedup_status()

    async def _first_scan(self) -> ScanResult:
        st = self.status
        assert self._mm is not None
        tracker = self.tracker = FingerprintTracker(self._mm, os.urandom(32))
        t_setup = time.monotonic()
        # before the written pages are listed: QEMU's page-table entries of its RAM
        # are released, so that from here its mapped pages are those touched since
        self._release = await self.ram_work.run(
            release_resident, st.id, self.vm.pid, self.vm.ram_path, self.vm.ram_stat, tracker.npages,
            self.opts.bounded_pause)
        if "seconds" in self._release:
            st.prepare_parts["release_s"] = self._release["seconds"]
        # side by side: the page-table watch's setup (it reads every process's maps)
        # and the list of written pages (the file's holes), their page-table entries
        # populated; neither reads guest RAM
        listing = asyncio.create_task(self.ram_work.run(_listed, self._mm, tracker, self.vm.ram_path,
                                                        self.vm.ram_stat))
        setup = self._stop_scan_setup = asyncio.create_task(self._set_up_stop_scan(t_setup))
        try:
            if soft_dirty_supported():
                # the bits are cleared before anything reads guest RAM: set up first
                stop_scan = await setup
                stop_scan.before_scan(first=True)
            # else nothing is needed of the watch before the scan after round 1 (resident
            # pages or a full scan): its setup, which reads every process's maps (0.03-0.16 s
            # here), goes on while round 1 runs (_stop_scan_ready)
        finally:
            await asyncio.wait({listing})
        listed = listing.result()
        if listed is None and not soft_dirty_supported():  # every page is read now: the watch first
            (await self._stop_scan_ready()).before_scan(first=True)
        t_scan = time.monotonic()
        scan = listed if listed is not None else await self.ram_work.run(_first_scan_of, self._mm, tracker, None)
        self._scan_s = time.monotonic() - t_scan
        st.prepare_parts["first_round_pages"] = scan.dirty_count  # round 1 takes these (zero ones left out)
        st.prepare_parts["first_scan_pages"] = scan.scanned
        st.prepare_parts["first_scan_s"] = round(self._scan_s, 4)  # beside the destination's
        log.info("first scan done", extra={"migration": st.id, "seconds": round(self._scan_s, 4),
                                           "dirty": scan.dirty_count, "zero": scan.zero_count})
        return scan

    async def _set_up_stop_scan(self, t0: float) -> StopScan:
        st = self.status
        assert self.tracker is not None
        stop_scan = await asyncio.to_thread(
            StopScan, st.id, self.vm.pid, self.vm.ram_path, self.vm.ram_stat, self.tracker.npages,
            self.opts.bounded_pause)
        st.prepare_parts["stop_scan_setup_s"] = round(time.monotonic() - t0, 4)
        stop_scan.release, stop_scan.own = self._release, self._mm
        stop_scan.release_rounds = bool(self._release.get("bytes"))
        self.stop_scan = stop_scan
        st.stop_scan = stop_scan.as_dict()
        return stop_scan

    async def _stop_scan_ready(self) -> StopScan:
        assert self._stop_scan_setup is not None
        return await asyncio.shield(self._stop_scan_setup)

    async def _mirror_disks(self) -> None:
        """Copy the local disks first, then RAM: the mirrors are write-blocking, so once
        ready they stay in step with the guest through pre-copy (see diskrelay.py)."""
        if not self._disk_plan:
            return
        assert self.mirror is not None
        st = self.status
        indices = [int(p["index"]) for p in self._disk_plan]
        self.disk_relay = SourceDiskRelay(self.ch, st, self.vm.work_dir, indices, follow_nbd=True,
                                          keys=self._disk_keys.keys)
        paths = await self.disk_relay.listen()
        self._disks_started = True
        for i in indices:
            await self.mirror.start_disk_mirror(i, paths[i])
        log.info("disk mirrors started", extra={"migration": st.id, "disks": indices})
        while True:
            self._check_inbox()
            if self.disk_relay.error is not None:
                raise MigrationFailed(f"disk relay failed: {self.disk_relay.error}")
            jobs = await self.mirror.disk_mirror_jobs()
            bad = {i: j for i, j in jobs.items() if j["status"] in ("concluded", "aborting", "null") or j["error"]}
            if bad or set(jobs) != set(indices):
                which, job = next(iter(bad.items())) if bad else (min(set(indices) - set(jobs)), {})
                raise MigrationFailed(f"disk {which} mirror failed: "
                                      f"{job.get('error') or job.get('status') or 'gone'}")
            if all(j["status"] == "ready" for j in jobs.values()):
                break
            await asyncio.sleep(DISK_POLL_S)
        st.disk_ready_s = time.monotonic() - st._t0
        log.info("disk mirrors ready", extra={"migration": st.id, "disk_bytes": st.disk_bytes,
                                              "seconds": round(st.disk_ready_s, 3)})
        self._disk_watch = asyncio.create_task(self._watch_disks(indices))

    async def _watch_disks(self, indices: list[int]) -> None:
        """Until the pause: a mirror that fails (the destination's disk full, say) stops
        the migration through the watchdog instead of at switchover."""
        assert self.mirror is not None
        while not self._paused:
            await asyncio.sleep(DISK_POLL_S * 5)
            if self._paused:
                return
            try:
                jobs = await self.mirror.disk_mirror_jobs()
            except Exception as exc:
                if not self._paused:
                    self._disk_failed = f"reading the disk mirrors failed: {exc}"
                return
            if self._paused:  # completing them now (_stopcopy)
                return
            for i in indices:
                job = jobs.get(i, {})
                if job.get("error") or job.get("status") != "ready":
                    self._disk_failed = (f"disk {i} mirror failed: "
                                         f"{job.get('error') or job.get('status') or 'gone'}")
                    return

    async def _precopy(self) -> None:
        st, opts = self.status, self.opts
        st.set_phase("precopy")
        assert self._mm is not None and self.tracker is not None
        assert self._first is not None
        tracker, scan = self.tracker, self._first
        self.sender = PageStreamSender(
            self.ch.page_key_out, self._mm, level=opts.compression_level, counters=self.counters,
            frame_pages=FRAME_PAGES,
            dedup=DedupIndex() if opts.dedup else None,
            # the tracker learns what was actually sent, so a page that changes and
            # changes back between two scans is still re-sent
            tracker=tracker,
        )
        # the destination's fresh RAM file is all zero: these pages never need sending,
        # nor the zero pages round 1 finds among the others
        self._zero_skipped = scan.zero_count
        self.sender.skip_zero = True
        last_scan = time.monotonic()
        prev_estimate = float("inf")
        polished = 0  # rounds run past the first whose pause fitted the budget
        while True:
            st.round += 1
            t0, wire0 = time.monotonic(), st.bytes_wire
            have0, hits0 = self.dd["have_bytes"], self.dd["hits"]
            sent = await self._send_pages(scan.dirty, scan.zero, offer=True)
            self.sender.skip_zero = False  # later rounds: a page zeroed since is sent so
            # the next scan starts now, while the destination takes in the round's last
            # frames: every page sent had its fingerprint recorded when it was encoded,
            # so the scan need not wait for the acknowledgement (tens of ms a round)
            stop_scan = await self._stop_scan_ready()
            scanning = asyncio.create_task(self.ram_work.run(_timed_scan, tracker, stop_scan))
            try:
                # counted as sent once the destination has it: the round ends with its ack
                await self._end_round()
            except BaseException:
                scanning.cancel()  # the thread itself finishes; teardown waits for it (ramwork)
                with contextlib.suppress(BaseException):
                    await scanning
                raise
            elapsed = max(time.monotonic() - t0, 1e-6)
            wire = st.bytes_wire - wire0
            if wire > 0:
                st.bandwidth_bytes_s = wire / elapsed
            if wire >= MEASURE_BYTES:  # small rounds measure the round trip, not the link
                self._round_rate = max(self._round_rate, wire / elapsed)
            data_pages = sent - (self.dd["hits"] - hits0)  # digest-only pages excluded
            if st.round >= 2 and data_pages >= 64:  # re-sent pages: what the final ones will weigh
                self._dirty_per_page = (wire - (self.dd["have_bytes"] - have0)) / data_pages
            scan, t_scan, self._scan_s = await scanning
            dirty = bitmap_count(scan.dirty)
            if self._dirty_per_page is None:  # no page re-sent yet: weigh a sample of them
                self._sampled_per_page = await self.ram_work.run(
                    _sampled_page_bytes, self._mm, scan.dirty, self.policy.packing,
                    self.policy.current_level)
            st.dirty_pages_last_round = dirty
            # written between the starts of two scans (the scan may start before the round's
            # acknowledgement: its end is no measure)
            st.dirty_rate_pages_s = dirty / max(t_scan - last_scan, 1e-6)
            last_scan = t_scan
            self._round_pages, self._round_sent = dirty, 0  # what is left: the dirty set
            self._progress()
            est = self._estimate = self._switchover_estimate(dirty)
            estimate_s = est.total
            st.estimate_ms = estimate_s * 1000.0
            st.estimate_parts = est.parts_ms()
            st.rounds.append({
                "round": st.round, "pages_sent": sent, "wire_bytes": wire,
                "seconds": round(elapsed, 4), "dirty_after": dirty,
                "estimated_stop_s": round(estimate_s, 4),
                "link_rate_bytes_s": round(st.link_rate_bytes_s, 1),
            })
            log.info("pre-copy round", extra={"migration": st.id, **st.rounds[-1]})
            cap = opts.bandwidth_mbps * 1e6  # read each round: it may change live
            sending = min(st.link_rate_bytes_s, cap) if cap else st.link_rate_bytes_s
            if estimate_s <= opts.downtime_ms / 1000.0:  # read each round: it may change live
                if self.share.others(self) and not self.share.holds(self):
                    # the pause fits with the link to ourselves: take the turn (others'
                    # pauses first), then one round alone before deciding again
                    await self._take_turn()
                    continue
                if self._dest_reserved is False:
                    # the destination still reserves the RAM file's space, and the pause
                    # would wait for it: wait with the guest running, then one more round
                    await self._wait_reserved()
                    continue
                # not while throttled or sharing the link (others wait on us), and with a
                # round left after it: a polish round that no longer fits is never the last
                if (st.round + 2 <= opts.max_rounds and not self.share.others(self)
                        and st.throttle_pct == 0 and estimate.worth_another_round(
                        est, sent_pages=sent, dirty_pages=dirty, polished=polished,
                        round_s=dirty * self._dirty_page_bytes() / max(sending, 1.0))):
                    polished += 1  # fits, but another round shortens it: as QEMU's pre-copy would
                    st.rounds[-1]["polish"] = True
                    prev_estimate = float("inf")  # a polish round that grows it is no sign of 'stuck'
                    continue
                st.converged = True
                break
            if self.share.holds(self):
                self._turn_rounds += 1
                if self._turn_rounds >= estimate.TURN_ROUNDS:  # not converging alone either: yield
                    self.share.release(self)
            if st.round >= opts.max_rounds:
                st.converged = False
                self._on_no_convergence(est)
                break
            dirty_bytes_s = st.dirty_rate_pages_s * self._dirty_page_bytes()
            outrun = dirty_bytes_s >= 0.5 * sending  # it dirties about as fast as we send
            stuck = st.round >= 2 and estimate_s > 0.8 * prev_estimate
            # only the pages part shrinks when the guest slows down
            shrinkable = est.final_pages + est.queued > opts.downtime_ms / 1000.0
            if opts.throttle and shrinkable and (outrun or stuck):
                st.throttle_pct = self.throttle.raise_level() * 100
                st.throttle_method = self.throttle.method
                log.info("throttling guest to converge",
                         extra={"migration": st.id, "throttle_pct": st.throttle_pct,
                                "method": st.throttle_method, "dirty_bytes_s": round(dirty_bytes_s),
                                "link_bytes_s": round(st.link_rate_bytes_s)})
            prev_estimate = estimate_s
        self._final_scan = scan

    async def _end_round(self) -> None:
        """Send ``round_end`` and wait until the destination acknowledged everything
        before it: nothing is left queued when we decide, or pause."""
        st = self.status
        t_sent, queued = time.monotonic(), st.bytes_wire - st.bytes_acked
        await self.ch.send_ctrl({"op": "round_end", "round": st.round})
        deadline = t_sent + ROUND_ACK_S
        while self._acked_round < st.round:
            self._check_inbox()
            if time.monotonic() > deadline:
                raise MigrationFailed(f"destination did not acknowledge round {st.round} "
                                      f"within {ROUND_ACK_S:g}s")
            self._ack_event.clear()
            await _tick(self._ack_event)
        waited = time.monotonic() - t_sent
        rate = self._link_rate()
        self.link.rtt_sample(max(0.0, waited - queued / rate))

    def share_figures(self, now: float) -> tuple[float, int]:
        """For the link's other migrations (estimate.LinkShare): our acked rate now, our
        bytes not acked yet."""
        st = self.status
        return self.link.current_rate(now), max(0, st.bytes_wire - st.bytes_acked)

    async def _take_turn(self) -> None:
        t0 = time.monotonic()
        await self.share.acquire(self)
        self._turn_rounds = 0
        self._share_stats["turns"] += 1
        self._share_stats["turn_wait_s"] = round(self._share_stats["turn_wait_s"] + time.monotonic() - t0, 3)

    def _switchover_estimate(self, dirty: int) -> estimate.Estimate:
        st, opts = self.status, self.opts
        link = self._link_rate()
        now = time.monotonic()
        others = self.share.others(self)
        queued, queued_others = max(0, st.bytes_wire - st.bytes_acked), 0
        if others:
            # we pause only holding the turn, the others' writes held: the whole link is
            # ours then, behind what they still have queued (before we hold it, that drains
            # during the round we then run alone)
            link = max(link, self.share.aggregate(self, now))
            if self.share.holds(self):
                queued_others = self.share.queued_others(self, now)
            ss = self._share_stats
            ss["peak_migrations"] = max(ss["peak_migrations"], others + 1)
            ss["link_bytes_s"] = round(self.share.link_bytes_s, 1)
        final = estimate.final_rate(link_bytes_s=link, uncapped_bytes_s=self.link.uncapped_rate,
                                    cap_bytes_s=opts.bandwidth_mbps * 1e6,
                                    throttle_final=opts.throttle_final,
                                    encode_bytes_s=self.policy.encode_wire_rate())
        st.final_rate_bytes_s = final
        return estimate.switchover(
            dirty_pages=dirty, bytes_per_page=self._dirty_page_bytes(),
            queued_bytes=queued,
            device_bytes=self._learned.device_bytes, link_bytes_s=link, final_bytes_s=final,
            scan_s=self._scan_s, rtt_s=self.link.rtt_s or 0.0,
            handover_s=self._learned.handover_s, queued_others_bytes=queued_others)

    def _on_no_convergence(self, est: estimate.Estimate) -> None:
        """Pre-copy cannot reach the budget: the operator's policy decides, and says so."""
        st, opts = self.status, self.opts
        st.no_converge = {
            "policy": opts.on_no_converge, "rounds": st.round,
            "dirty_rate_bytes_s": round(st.dirty_rate_pages_s * self._bytes_per_page(), 1),
            "link_rate_bytes_s": round(st.link_rate_bytes_s, 1),
            "remaining_bytes": st.remaining_bytes, "estimate_ms": round(est.total * 1000.0, 1),
            "budget_ms": opts.downtime_ms, "throttle_pct": st.throttle_pct,
        }
        figures = (f"dirty rate {st.no_converge['dirty_rate_bytes_s'] / 1e6:.2f} MB/s, "
                   f"link {st.link_rate_bytes_s / 1e6:.2f} MB/s, "
                   f"{(st.remaining_bytes or 0) / 2**20:.1f} MiB remaining, "
                   f"estimated pause {est.total * 1000.0:.0f} ms > budget {opts.downtime_ms:g} ms "
                   f"after {st.round} rounds (throttle {st.throttle_pct:.0f}%)")
        if opts.on_no_converge == "abort":
            log.warning("pre-copy did not converge; aborting (the guest stays here)",
                        extra={"migration": st.id, **st.no_converge})
            raise MigrationFailed(f"did not converge: {figures}")
        log.warning("pre-copy did not converge; forcing stop-and-copy (a longer pause)",
                    extra={"migration": st.id, **st.no_converge})

    async def _send_pages(self, dirty: np.ndarray, zero: np.ndarray | None,
                          throttled: bool = True, offer: bool = False) -> int:
        """Encode and send ``dirty`` pages, pipelining encode with sending
        (``throttled``: obey the bandwidth cap; ``offer``: pages the destination may
        hold go as digests first, per ``OfferPolicy``). Returns once every offered
        page is answered and every miss repaired."""
        st, sender, policy = self.status, self.sender, self.policy
        assert sender is not None
        indices = bitmap_indices(dirty)
        self._round_pages, self._round_sent = len(indices), 0
        # the migration's first data goes before the link is known (see _first_ack): two
        # small batches first, so what goes stored while it is measured stays small
        # (under a cap the cap is known, and the probe's unheld bytes stay as they were)
        capped = bool(throttled and self.bucket.rate)
        # (not where the choice is fixed: policy.stored_only)
        unknown = self._t_first_write is None and not capped and not policy.stored_only(capped)
        first = 2 * FIRST_BATCH_PAGES if unknown else 0
        bounds = [*range(0, min(first, len(indices)), FIRST_BATCH_PAGES),
                  *range(min(first, len(indices)), len(indices), self.opts.batch_pages)]
        batches = [indices[a:b] for a, b in zip(bounds, [*bounds[1:], len(indices)], strict=False)]
        offering = offer and self._offer_on

        def encode(batch: np.ndarray | None, by_digest: bool,
                   repairs: list[tuple[int, np.ndarray]]) -> _Work:
            # dedup + zstd or stored, per batch: whichever the link and the CPU make faster
            # (the cap may change live: read per batch)
            capped_now = bool(throttled and self.bucket.rate)
            sender.compress = sender.use_dedup = policy.pack_next(self._link_hint(throttled), capped_now)
            # a stored batch is a copy and a fingerprint per page, memory-bound: split over
            # two threads it cost more CPU (170 MB: 55-64 ms on one, 74-100 ms on two)
            sender.threads = 2 if sender.compress else 1
            # stored to this host: fewer, larger frames (a frame costs each loop a wake-up;
            # 256 MiB pre-copy, median of 8: 0.45 -> 0.41 s); elsewhere the cap and the
            # link's measurement keep their 1 MiB granularity
            sender.frame_pages = LOCAL_FRAME_PAGES if policy.stored_only(capped_now) else FRAME_PAGES
            sender.level = policy.level()  # higher while the link leaves the encoder idle
            w = _Work()
            if batch is not None:
                data = batch
                if by_digest:
                    pages, digests, data = sender.digest_pages(batch, zero)
                    if pages.size:
                        w.batch_no, w.offered = self._batch_no, pages
                        self._batch_no += 1
                        w.have = sender.seal_blob(protocol.TAG_HAVE,
                                                  protocol.pack_have(w.batch_no, pages, digests))
                if len(data):
                    w.frames, w.enc = sender.encode(data, zero), sender.last
            for seq, pages in repairs:  # as they are now: they may have changed since offered
                frames = sender.encode(pages)
                w.repairs.append((seq, frames, len(pages), sender.last))
            return w

        def start(i: int) -> asyncio.Task[_Work]:
            # the first round offers every non-zero page where a hit is possible or the
            # link is capped (first_round_offer): what lands there is then known by digest
            # to the migrations beside it (an evacuation sends it once); later rounds
            # carry re-dirtied pages, offered while it pays (OfferPolicy)
            if self.status.round == 1:
                if offering and not self._offer_first and self.share.expected(self):
                    # a drain: another migration to this destination started (it may still
                    # be preparing). From now on this one's pages land as repairs, which the
                    # destination indexes for the others (sent as data, they are hashed
                    # there only when another migration arrives: the first VM's share of
                    # the image crossed twice, 4-VM drain measured)
                    self._offer_first = True
                    self.dd_first = {"first_round_offered": True, "first_round_reason":
                                     "other migrations to the destination started"}
                by_digest = offering and self._offer_first
            else:
                by_digest = offering and self.offers.offer_next(self._data_page_bytes())
            repairs, self._repairs = self._repairs, []
            return asyncio.create_task(self.ram_work.run(
                encode, batches[i] if i < len(batches) else None, by_digest, repairs))

        pending: asyncio.Task[_Work] | None = start(0) if batches else None
        self._unheld = None
        skipped_all = 0
        try:
            i = 0
            while pending is not None:
                w = await pending
                pending = None
                if i + 1 < len(batches):
                    if (self.link.acked == 0 and st.bytes_wire >= protocol.ACK_BYTES and not self.bucket.rate
                            and not policy.stored_only(capped)):
                        await self._first_ack()  # (a cap says enough: _link_hint)
                    pending = start(i + 1)
                self._check_inbox()
                # another migration to this destination may hold the link's turn: wait.
                # Not with repairs: the holder's destination may be waiting on those pages
                if not w.repairs and not self._paused and (held := await self.share.wait_turn(self)):
                    self._share_stats["held_s"] = round(self._share_stats["held_s"] + held, 3)
                if w.have is not None:
                    assert w.offered is not None
                    self._outstanding[w.batch_no] = (np.sort(w.offered.astype(np.uint32)),
                                                     np.zeros(w.offered.size, dtype=bool))
                    self.dd["offered"] += int(w.offered.size)
                    self.dd["batches_offered"] += 1
                    self.dd["have_bytes"] += await self._write([w.have], throttled, "have")
                t_send = time.perf_counter()
                wire = await self._write(w.frames, throttled, self._data_part())
                if w.enc is not None:
                    self._count_pages(w.enc)
                    policy.observe(w.enc, self._send_time(t_send, wire, throttled), wire)
                    st.pipeline = policy.as_dict()
                for seq, frames, n, enc in w.repairs:
                    t_send = time.perf_counter()
                    wire = await self._write(frames, throttled, "repairs")
                    if enc is not None:  # repairs are most of the data when offers hit: the policy learns from them too
                        self._count_pages(enc)
                        policy.observe(enc, self._send_time(t_send, wire, throttled), wire)
                        st.pipeline = policy.as_dict()
                    self.dd["repaired"] += n
                    await self.ch.send_ctrl({"op": "repaired", "seq": seq})
                if i < len(batches):
                    skipped = w.enc.zero_skipped if w.enc is not None else 0  # zero: not sent at all
                    skipped_all += skipped
                    st.pages_sent += len(batches[i]) - skipped
                    st.bytes_raw += (len(batches[i]) - skipped) * protocol.PAGE
                    self._round_sent += len(batches[i])
                i += 1
                if pending is None:  # the round's pages are out: answers and repairs last
                    pending = await self._next_repairs(start, len(batches))
                self._sync_counters()
                self._progress()
            if throttled and self.bucket.rate and self._unheld is not None:
                self.link.unheld_run(self._unheld[0], self._unheld[1], st.bytes_wire)
                self._unheld = None
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        return len(indices) - skipped_all

    async def _next_repairs(self, start: Any, past: int) -> asyncio.Task[_Work] | None:
        """After the last batch: wait for the destination's answers; a task repairing
        the pages it needs, or None once every offered page is answered."""
        deadline = time.monotonic() + ROUND_ACK_S
        while True:
            self._need_event.clear()
            if self._repairs:
                task: asyncio.Task[_Work] = start(past)
                return task
            if not self._outstanding:
                return None
            self._check_inbox()
            if time.monotonic() > deadline:
                raise MigrationFailed(f"destination did not answer {len(self._outstanding)} have "
                                      f"batch(es) within {ROUND_ACK_S:g}s")
            await _tick(self._need_event)

    def _send_time(self, t_send: float, wire: int, capped: bool) -> float:
        """Seconds sending ``wire`` bytes took, for the compression policy: the write's
        own time, or what the link needs for them at its acked rate when longer. The
        socket's buffer takes a batch of repairs in no time: read alone, that looked
        like a fast link and sent a fifth of a 100 Mbit/s migration's pages stored."""
        took = time.perf_counter() - t_send
        rate = self._link_hint(capped)
        return max(took, wire / rate) if rate > 0 else took

    def _link_hint(self, capped: bool) -> float:
        """The link's rate as known so far (0: not at all): measured over busy runs, or
        before one was (SPAN_S), what was acked over the time since our first write: a
        lower bound, which only leans to packing."""
        rate = self.link.busy_rate
        if rate <= 0 and self._t_first_write is not None and self.link.acked > 0:
            rate = self.link.acked / max(time.monotonic() - self._t_first_write, 1e-3)
        if self.bucket.rate and capped:  # the cap holds these frames: no faster than it
            rate = min(rate, self.bucket.rate) if rate > 0 else self.bucket.rate
        return rate

    async def _first_ack(self) -> None:
        """Before the third batch of data is chosen packed or stored: the first ack,
        which times the link (bounded; the link is busy with what we queued meanwhile,
        so waiting costs no throughput). Without it, the first batches all went
        stored into the socket's buffer on a 100 Mbit/s link (2,048 pages)."""
        deadline = time.monotonic() + FIRST_ACK_S
        while self.link.acked == 0 and time.monotonic() < deadline:
            self._check_inbox()
            self._ack_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_event.wait(), 0.05)

    def _data_part(self) -> str:
        """Which ``wire_parts`` entry the data frames sent now belong to."""
        if self._paused:
            return "final_pages"
        return "round1_data" if self.status.round <= 1 else "later_rounds"

    def _count_pages(self, enc: EncodeStats) -> None:
        """Pages sent as data, by how their frames went (``wire_parts``' companion)."""
        kind = "pages_packed" if enc.compressed else "pages_stored"
        self.status.wire_parts[kind] = self.status.wire_parts.get(kind, 0) + enc.raw_bytes // protocol.PAGE

    async def _write(self, frames: list[bytes], throttled: bool, part: str) -> int:
        st, wire = self.status, 0
        for frame in frames:
            if not (throttled and self.bucket.rate):
                pass
            elif self._probe_left > 0:
                self._probe_left -= len(frame)  # the probe: unheld, once
            else:
                run = self._unheld
                if run is not None and self.bucket.would_wait(len(frame)):
                    # held by the cap: what went out unheld since the last wait is a
                    # run at link speed, timed by its acks (estimate.py), told before
                    # the wait so that the acks arriving meanwhile count
                    self.link.unheld_run(run[0], run[1], st.bytes_wire)
                    self._unheld = None
                await self.bucket.acquire(len(frame))
            if self._unheld is None:
                self._unheld = (time.monotonic(), st.bytes_wire)
            if self._t_first_write is None:
                self._t_first_write = time.monotonic()
            self.ch.write_frame(frame)
            wire += len(frame) + 5
            st.bytes_wire += len(frame) + 5  # before the destination can ack it
            await self.ch.drain()
        st.wire_parts[part] = st.wire_parts.get(part, 0) + wire
        return wire

    def _sync_counters(self) -> None:
        self.status.dedup = self._dedup_status()
        c = self.counters.as_dict()
        self.status.native = c
        self.status.pages_zero = self._zero_skipped + int(c.get("pages_zero_sent", 0))
        self.status.pages_dedup = int(c.get("pages_dedup", 0))

    async def _stopcopy(self) -> None:
        st = self.status
        st.set_phase("stopcopy")
        self._check_inbox()
        await self.throttle.stop()
        self._t_pause = mark = time.monotonic()
        parts = st.downtime_parts
        if self._estimate is not None:  # the pause we predicted, beside the one we get
            st.estimate_ms = self._estimate.total * 1000.0
            st.estimate_parts = self._estimate.parts_ms()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            parts[name] = round((now - mark) * 1000.0, 2)
            mark = now

        # Journalled first: a restarted agent resumes a guest it finds paused here.
        self._journal("paused")
        # Set first: a pause that errors out may still have stopped the vCPUs,
        # and resuming a running guest is harmless.
        self._paused = True
        await self.vm.pause()
        crash_point("migration.source.paused")
        # the destination announces the VM's NICs from its host now, so frames sent to the
        # guest during the pause wait there instead of being lost here (network.TapAnnouncer)
        await self.ch.send_ctrl({"op": "paused"})
        lap("pause_ms")
        if self.disk_relay is not None:
            # the guest is stopped: the write-blocking mirrors drain and complete; the
            # source keeps its own disks (authoritative until 'go')
            assert self.mirror is not None
            await self.mirror.finish_disk_mirrors(DISK_FINISH_S)
            if self.disk_relay.failing or self.disk_relay.error is not None:
                # the relay answered QEMU itself: those writes never reached the destination
                raise MigrationFailed(f"disk relay failed: {self.disk_relay.error or 'answering locally'}")
            self._check_inbox()
            await self.ch.send_ctrl({"op": "disks_done"})
            lap("disks_ms")
        # QEMU saves its devices while we scan and send the final pages (devicetap.py)
        self._device_started = True  # from here a rollback cancels QEMU's migration
        tap = DeviceStateTap(self.vm.work_dir / protocol.RELAY_SOCKET)
        try:
            await tap.open(self.vm.send_device_state)
            lap("device_start_ms")
            await self._final_copy(tap, lap)
        finally:
            await tap.close()

    async def _final_copy(self, tap: DeviceStateTap, lap: Callable[[str], None]) -> None:
        """The paused part after the disks: final scan and pages, device state, and the
        destination's 'ready'."""
        st = self.status
        st.round += 1
        tracker, stop_scan = self.tracker, self.stop_scan
        assert tracker is not None and stop_scan is not None
        # only pages that may differ from their last fingerprint (see stopscan.py)
        scan = await self.ram_work.run(lambda: tracker.scan(stop_scan.at_pause()))
        stop_scan.pages_examined = scan.scanned
        st.stop_scan = stop_scan.as_dict()
        lap("final_scan_ms")
        # pages dirtied before the last pre-copy scan were not sent yet either
        final = np.bitwise_or(scan.dirty, self._final_scan.dirty)
        # at link speed unless the operator asked the cap to hold while paused
        wire0 = st.bytes_wire
        sent = await self._send_pages(final, scan.zero, throttled=self.opts.throttle_final)
        self._final_wire = st.bytes_wire - wire0
        st.rounds.append({"round": st.round, "pages_sent": sent, "stop_and_copy": True})
        await self.ch.send_ctrl({"op": "round_end", "round": st.round})
        lap("final_pages_ms")
        await self._relay_device_state(tap)
        lap("device_state_ms")
        if self.opts.test_digest:
            assert self._mm is not None
            st.digest_source = await self.ram_work.run(ram_digest, self._mm)
        ready = await self._expect("ready", timeout=120)
        lap("destination_load_ms")
        st.bytes_acked = st.bytes_wire  # 'ready': it has read and loaded everything
        if self.opts.test_digest:
            theirs = ready.get("digest")
            st.digest_destination = theirs if isinstance(theirs, str) else None
            if theirs != st.digest_source:
                raise MigrationFailed("RAM digest mismatch at switchover "
                                      f"(source {st.digest_source}, destination {theirs})")

    async def _relay_device_state(self, tap: DeviceStateTap) -> None:
        """Carry QEMU's own migration stream (device state only, thanks to
        x-ignore-shared), read by ``tap`` since the pause, over the encrypted channel."""
        st, sender = self.status, self.sender
        assert sender is not None
        await self.ch.send_ctrl({"op": "device_begin"})
        async for chunk in tap.chunks():
            frame = sender.seal_blob(protocol.TAG_DEVICE_STATE, chunk)
            self.ch.write_frame(frame)
            st.device_state_bytes += len(chunk)
            st.bytes_wire += len(frame) + 5
            st.wire_parts["device_state"] = st.wire_parts.get("device_state", 0) + len(frame) + 5
            await self.ch.drain()
            self._check_inbox()
        await self.ch.send_ctrl({"op": "device_end", "bytes": st.device_state_bytes})
        await self.vm.wait_device_state_sent(timeout=60)

    # -- RAM by QEMU, with post-copy (postcopy.py) ------------------------------
    def _count_qemu(self, n: int) -> None:
        self.status.bytes_wire += n
        self.status.bytes_acked = self.status.bytes_wire  # a relayed stream: no page acks

    async def _on_qemu_conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            self._qemu_conns.put_nowait((r, w))
        except asyncio.QueueFull:  # one migration stream at a time; never block a handler
            w.close()

    async def _qemu_attach(self, timeout: float) -> None:
        assert self.qemu_stream is not None
        async with asyncio.timeout(timeout):
            reader, writer = await self._qemu_conns.get()
        self.qemu_stream.attach(reader, writer)

    def _qemu_progress(self, info: dict[str, Any]) -> dict[str, Any]:
        st = self.status
        ram = ram_progress(info)
        st.postcopy["qemu"] = ram
        st.round = max(st.round, ram["dirty_sync_count"])
        st.remaining_bytes = ram["remaining"]
        st.rate_bytes_s = st.bandwidth_bytes_s = ram["mbps"] * 1e6 / 8
        st.link_rate_bytes_s = max(st.link_rate_bytes_s, st.rate_bytes_s)
        st.dirty_rate_pages_s = float(ram["dirty_pages_rate"])
        st.pages_sent = ram["normal_pages"] + ram["duplicate_pages"]
        st.pages_zero = ram["duplicate_pages"]
        st.bytes_raw = ram["normal_pages"] * protocol.PAGE
        st.eta_s = st.remaining_bytes / st.rate_bytes_s if st.rate_bytes_s > 0 else None
        if ram["transferred"] + ram["remaining"] > 0:
            st.advance(100.0 * ram["transferred"] / (ram["transferred"] + ram["remaining"]))
        return ram

    async def _qemu_ram(self) -> None:
        """QEMU's pre-copy under our cap and budget; converged: the ordinary switchover;
        not after ``max_rounds`` bitmap syncs: post-copy."""
        st, opts, vm = self.status, self.opts, self.vm
        assert isinstance(vm, PostcopySource)
        st.set_phase("precopy")
        st.postcopy = {"used": False, "recoveries": 0}
        self.qemu_stream = QemuStream(self.ch, self._count_qemu)
        path = self.vm.work_dir / protocol.RELAY_SOCKET
        server = await start_unix_server_at(self._on_qemu_conn, path)
        try:
            # QEMU stops the guest by itself (at completion, or to start post-copy):
            # journalled first, so a restarted agent resumes a guest it finds paused here
            self._journal("paused")
            self._qemu_may_pause = True
            await self.ch.send_ctrl({"op": "ram_begin"})
            self._device_started = True  # a rollback cancels QEMU's migration
            await vm.start_ram_migration(path, bandwidth_bytes_s=opts.bandwidth_mbps * 1e6,
                                         downtime_ms=opts.downtime_ms)
            await self._qemu_attach(30)
            while True:
                self._check_inbox()
                if self.qemu_stream.error is not None:
                    raise MigrationFailed(self.qemu_stream.error)
                info = await vm.query_migration()
                state = info.get("status")
                ram = self._qemu_progress(info)
                if state in ("failed", "cancelled"):
                    raise MigrationFailed(f"QEMU migration {state}: {info.get('error-desc', 'no detail')}")
                if state == "completed":
                    await self._qemu_converged(info)
                    return
                if state == "active" and ram["dirty_sync_count"] > opts.max_rounds:
                    await self._postcopy(ram)
                    return
                await asyncio.sleep(POLL_S)
        finally:
            server.close()
            with contextlib.suppress(OSError):
                path.unlink()

    async def _qemu_converged(self, info: dict[str, Any]) -> None:
        """QEMU's pre-copy converged and stopped the guest: hand over as usual."""
        st, vm = self.status, self.vm
        assert isinstance(vm, PostcopySource) and self.qemu_stream is not None
        st.converged = True
        qemu_ms = float(info.get("downtime", 0))
        self._t_pause = time.monotonic() - qemu_ms / 1000.0
        self._paused = True
        await vm.mark_paused()
        st.set_phase("stopcopy")
        st.downtime_parts["qemu_downtime_ms"] = qemu_ms
        async with asyncio.timeout(30):  # QEMU closes its end once the destination shut the return path
            await self.qemu_stream.eof.wait()
        await self.ch.send_ctrl({"op": "device_end", "bytes": st.bytes_wire})
        await self._expect("ready", timeout=120)
        await self._switchover()

    async def _postcopy(self, ram: dict[str, Any]) -> None:
        """Pre-copy did not converge: switch to post-copy. From the journalled 'go' on,
        this copy never runs again; it serves pages until the destination has them all."""
        st, opts, vm = self.status, self.opts, self.vm
        assert isinstance(vm, PostcopySource)
        st.converged = False
        st.no_converge = {
            "policy": "postcopy", "rounds": ram["dirty_sync_count"] - 1,
            "dirty_rate_bytes_s": round(st.dirty_rate_pages_s * protocol.PAGE, 1),
            "link_rate_bytes_s": round(st.rate_bytes_s, 1), "remaining_bytes": ram["remaining"],
            "budget_ms": opts.downtime_ms, "throttle_pct": 0.0,
        }
        log.warning("pre-copy did not converge; switching to post-copy",
                    extra={"migration": st.id, **st.no_converge})
        self._journal("go", "post-copy")
        self._go_sent = True
        if self._deadline is not None:  # post-copy must not be cut short: it ends when all pages arrived
            self._deadline.reschedule(None)
        await self.ch.send_ctrl({"op": "postcopy"})
        self._t_pause = t_switch = time.monotonic()
        self._paused = True
        await vm.start_postcopy()
        await vm.mark_paused()
        st.postcopy["used"] = True
        st.set_phase("postcopy")
        resumed = done = False
        while not (resumed and done):
            if self._peer_lost is not None or (self.qemu_stream is not None and self.qemu_stream.error):
                await self._postcopy_recover()
                continue
            try:
                item = await asyncio.wait_for(self._inbox.get(), POLL_S)
            except TimeoutError:
                with contextlib.suppress(Exception):  # progress only; the outcome is the destination's word
                    self._qemu_progress(await vm.query_migration())
                continue
            if isinstance(item, BaseException):
                continue  # the channel broke: _peer_lost says so, recovered above
            if item.get("op") == "error":
                raise MigrationFailed(f"destination failed during post-copy: {protocol.reason_of(item)}")
            if item.get("op") == "resumed" and resumed:
                continue  # sent again on a recovered channel: it was not sure we had it
            if item.get("op") == "resumed":
                resumed = True
                st.mark_resumed()
                st.downtime_ms = (time.monotonic() - t_switch) * 1000.0
                st.postcopy["time_to_resume_ms"] = round(st.downtime_ms, 2)
                st.budget_exceeded = st.downtime_ms > opts.downtime_ms
                log.info("guest resumed at the destination (post-copy)",
                         extra={"migration": st.id, "time_to_resume_ms": round(st.downtime_ms, 1)})
            elif item.get("op") == "postcopy_done":
                done = True
                figures = item.get("blocktime")
                if isinstance(figures, dict):
                    st.postcopy["blocktime"] = figures
            else:
                raise ProtocolError(f"unexpected {item.get('op')!r} from destination during post-copy")
        st.postcopy["seconds"] = round(time.monotonic() - t_switch, 3)

    async def _postcopy_recover(self) -> None:
        """The channel (or QEMU's relayed stream) broke during post-copy: both QEMUs pause
        their page traffic; reconnect under the same grant and let QEMU resume."""
        st, opts, vm = self.status, self.opts, self.vm
        assert isinstance(vm, PostcopySource) and self.qemu_stream is not None
        reason = self._peer_lost or self.qemu_stream.error or "stream broke"
        t0 = time.monotonic()
        log.warning("post-copy stream lost; recovering",
                    extra={"migration": st.id, "reason": reason, "window_s": opts.postcopy_recover_s})
        if self.journal is not None and st.id in self.journal.entries:
            self.journal.note(st.id, f"post-copy recovering: {reason}")
        await self.qemu_stream.close()  # QEMU sees its stream break: postcopy-paused
        st.postcopy["recovering"] = True
        attempt = 0
        while True:
            attempt += 1
            if time.monotonic() - t0 > opts.postcopy_recover_s or self.reconnect is None:
                raise MigrationFailed(f"post-copy stream lost ({reason}) and not recovered within "
                                      f"{opts.postcopy_recover_s:g}s ({attempt - 1} attempts); the guest "
                                      "waits at the destination for pages this host keeps")
            ch: Channel | None = None
            try:
                async with asyncio.timeout(RECOVER_TRY_S):
                    await self._qemu_state_in({"postcopy-paused"})
                    ch = await self.reconnect()
                    rec = await ch.recv(timeout=RECOVER_TRY_S)
                    if rec.op != "recovering":
                        raise ProtocolError(f"destination answered {rec.op!r} to postcopy_resume"
                                            + (f": {protocol.reason_of(rec.ctrl)}" if rec.ctrl else ""))
                    # the old channel's reader must not report its end after the swap
                    if self._reader is not None and not self._reader.done():
                        self._reader.cancel()
                        with contextlib.suppress(BaseException):
                            await self._reader
                    old, self.ch = self.ch, ch
                    self.qemu_stream.ch = ch
                    with contextlib.suppress(Exception):
                        await old.close()
                    while not self._inbox.empty():
                        self._inbox.get_nowait()  # the old channel's end
                    self._peer_lost = None
                    self._reader = asyncio.create_task(self._read_loop())
                    self._side_tasks += [self._reader, asyncio.create_task(
                        protocol.keepalive(ch, opts.liveness_s))]
                    path = self.vm.work_dir / protocol.RELAY_SOCKET
                    while not self._qemu_conns.empty():
                        self._qemu_conns.get_nowait()[1].close()
                    server = await start_unix_server_at(self._on_qemu_conn, path)
                    try:
                        await vm.start_ram_migration(path, bandwidth_bytes_s=opts.bandwidth_mbps * 1e6,
                                                     downtime_ms=opts.downtime_ms, resume=True)
                        await self._qemu_attach(RECOVER_TRY_S)
                    finally:
                        server.close()
                        with contextlib.suppress(OSError):
                            path.unlink()
                    await self._qemu_state_in({"postcopy-active", "completed"})
                st.postcopy["recoveries"] += 1
                st.postcopy["recovering"] = False
                st.postcopy["recover_ms"] = round((time.monotonic() - t0) * 1000.0, 1)
                log.info("post-copy recovered", extra={"migration": st.id, "attempts": attempt,
                                                       "recover_ms": st.postcopy["recover_ms"]})
                return
            except (ChannelClosed, ProtocolError, OSError, TimeoutError, RuntimeError) as exc:
                log.warning("post-copy recovery attempt failed",
                            extra={"migration": st.id, "attempt": attempt, "error": str(exc) or type(exc).__name__,
                                   "qemu_state": self._qemu_state})
                if ch is not None and ch is not self.ch:
                    with contextlib.suppress(Exception):
                        await ch.close()
                await self.qemu_stream.close()
                await asyncio.sleep(min(0.5 * attempt, 3.0))

    async def _qemu_state_in(self, states: set[str]) -> str:
        """Wait (the caller bounds it) until QEMU's migration is in one of ``states``."""
        vm = self.vm
        assert isinstance(vm, PostcopySource)
        while True:
            info = await vm.query_migration()
            state = self._qemu_state = str(info.get("status"))
            if state in states:
                return state
            if state in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migration {state}: {info.get('error-desc', 'no detail')}")
            await asyncio.sleep(0.02)

    async def _switchover(self) -> None:
        # Journalled and set first: 'go' may reach the destination even if sending it
        # then fails, and from here on this copy must never resume unasked.
        self._journal("go")
        self._go_sent = True
        await self.ch.send_ctrl({"op": "go"})
        crash_point("migration.source.go_sent")
        await self._expect("resumed", timeout=60)
        crash_point("migration.source.resumed_received")  # the destination runs it; not journalled yet
        now = time.monotonic()
        st = self.status
        st.mark_resumed()
        st.downtime_ms = (now - self._t_pause) * 1000.0
        st.downtime_parts["resume_ms"] = round(
            st.downtime_ms - sum(st.downtime_parts.values()), 2)
        self._learn_handover()
        if st.downtime_ms > self.opts.downtime_ms:
            st.budget_exceeded = True  # too late to undo: say so, never a plain success
            log.warning("pause exceeded the downtime budget",
                        extra={"migration": st.id, "downtime_ms": round(st.downtime_ms, 1),
                               "budget_ms": self.opts.downtime_ms, "estimate_ms": st.estimate_ms})

    def _learn_handover(self) -> None:
        """What the pause cost beyond the scan, the bytes and the round trips: the next
        estimate to this destination adds it (estimate.learned)."""
        st = self.status
        assert st.downtime_ms is not None
        # at the rate the estimate gave them (uncapped unless throttle_final)
        moved = (self._final_wire + st.device_state_bytes) / max(st.final_rate_bytes_s or self._link_rate(), 1.0)
        rest = (st.downtime_ms / 1000.0 - st.downtime_parts.get("final_scan_ms", 0.0) / 1000.0
                - moved - 2 * (self.link.rtt_s or 0.0))
        self._learned.observe(st.device_state_bytes, max(0.0, rest))

    async def _commit(self) -> None:
        st = self.status
        st.set_phase("commit")
        self._journal("committed", st.resolution or "destination confirmed it runs the guest")
        try:
            await self.vm.release()
        except Exception as exc:  # the guest already runs at the destination
            log.error("releasing source VM after commit failed",
                      extra={"migration": st.id, "error": str(exc)})
        with contextlib.suppress(ChannelClosed, OSError):
            await self.ch.send_ctrl({"op": "done"}, timeout=5)
        self._sync_counters()
        st.set_phase("completed")
        log.info("migration completed", extra={"migration": st.id, **st.metrics()})

    async def _settle_in_doubt(self, reason: str) -> None:
        """The channel failed after 'go': ask the destination's API what happened."""
        st = self.status
        log.warning("no answer to the switchover; asking the destination agent",
                    extra={"migration": st.id, "reason": reason,
                           "timeout_s": self.opts.in_doubt_timeout_s})
        outcome, note = await settle(self.probe, self.opts.in_doubt_timeout_s)
        st.resolution = note
        if outcome is Outcome.COMMITTED:
            log.info("destination runs the guest; committing",
                     extra={"migration": st.id, "resolution": note})
            await self._commit()
        elif outcome is Outcome.ROLLED_BACK:
            self._dest_gave_up = True  # it holds no running copy: resuming here is safe
            await self._rollback(f"{reason}; {note}", cancelled=False)
        else:
            self._stay_paused(f"{reason}; {note}")

    def _stay_paused(self, reason: str) -> None:
        # The destination may run the guest: resuming here could run it twice.
        st = self.status
        log.error("migration outcome in doubt; guest left paused at the source",
                  extra={"migration": st.id, "reason": reason})
        if self.journal is not None and st.id in self.journal.entries:
            self.journal.note(st.id, f"in doubt: {reason}")
        self._sync_counters()
        st.fail(f"{reason}: outcome in doubt after switchover was ordered; "
                "the guest is left paused at the source so it never runs twice")

    async def _rollback(self, reason: str, *, cancelled: bool) -> None:
        st = self.status
        log.warning("migration failed; rolling back",
                    extra={"migration": st.id, "phase": st.phase, "reason": reason})
        if self._go_sent and not self._dest_gave_up:
            self._stay_paused(reason)
            return
        try:
            await self.throttle.stop()
        except Exception as exc:
            reason += f"; resuming the throttled source failed: {exc}"
        if self._device_started:
            with contextlib.suppress(Exception):
                await self.vm.cancel_device_state()
        if self._disks_started and self.mirror is not None:
            # QEMU's NBD connections stay up until the jobs are gone (QEMU 7.2 can abort
            # when a write-blocking mirror's connection drops under guest writes): the
            # relay answers QEMU's requests itself meanwhile, so the jobs end at once
            # instead of waiting on a peer that may never answer
            if self.disk_relay is not None:
                self.disk_relay.fail_over()
            try:
                await self.mirror.cancel_disk_mirrors()  # the source's disks stay the VM's
            except Exception as exc:
                log.warning("cancelling disk mirrors failed", extra={"migration": st.id, "error": str(exc)})
            if self.disk_relay is not None:
                await self.disk_relay.close()
        resumed = True
        if self._paused or self._qemu_may_pause:
            try:
                await self.vm.resume()
                if self._paused:
                    st.downtime_ms = (time.monotonic() - self._t_pause) * 1000.0
                    st.budget_exceeded = st.downtime_ms > self.opts.downtime_ms
                self._paused = False
            except Exception as exc:
                resumed = False
                reason += f"; resuming the source failed: {exc}"
        if resumed:  # after the resume: a restart in between resumes again (harmless)
            self._journal("rolled_back", reason)
        # last: a hung destination must not hold the guest paused for this; nor, once it
        # fell silent or hung up, the migration's end (its own liveness ends its side)
        with contextlib.suppress(Exception):
            await self.ch.send_ctrl({"op": "abort", "reason": reason},
                                    timeout=0.2 if self._peer_lost is not None else 2)
        with contextlib.suppress(Exception):
            await self.vm.stay()
        if self._reader is not None and not self._dest_gave_up and self._peer_lost is None:
            # read on (its acks) until it hangs up, bounded: closing with its messages
            # unread would reset the connection and could drop our 'abort' unread there.
            # It hangs up once it has destroyed its copy: final only then, so a retry
            # (accepted once final) finds the destination clear.
            await asyncio.wait({self._reader}, timeout=2.0)
        self._sync_counters()
        st.fail(reason, cancelled=cancelled)

    async def _cleanup(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        setup = self._stop_scan_setup
        if setup is not None and not setup.done():  # its thread reads /proc only: let it end
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(setup), 30)
        if setup is not None and setup.done() and not setup.cancelled():
            setup.exception()  # retrieved: a failed setup of a failed migration says nothing more
        # no scan or encode still runs, their views released, then unmapped: after a
        # completed migration the RAM file is deleted, and a view left would keep it
        tracker, sender, self.tracker, self.sender = self.tracker, self.sender, None, None
        await self.ram_work.let_go(self._mm, tracker, sender)
        self._mm = None

