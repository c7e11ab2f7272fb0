"""The receiving side: driven by the source over an authenticated channel.

Nothing is built before a valid ``prepare`` arrives on an authenticated
channel. From then on, anything other than a clean switchover (abort, channel
loss, bad frame, timeout) destroys the destination machine, its RAM file and
its VM directory, so a failed migration leaves nothing behind here.

Liveness: the source sends keepalives, so silence for its ``liveness_s``
fails the migration here; we send ours back the same way. The destination
QEMU is watched too: its exit fails the migration at once (before ``go``,
the source then resumes its copy). Each step is journalled (``journal.py``)
before its effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from novacron.agent.channel.records import CTRL, DATA, Channel, ChannelClosed, ProtocolError
from novacron.agent.migration import diskdedup, protocol, stoptask
from novacron.agent.migration.dedupdest import IncomingDedup, PageIndex
from novacron.agent.migration.digest import ram_digest
from novacron.agent.migration.diskrelay import DestDiskRelay
from novacron.agent.migration.journal import Entry, Journal
from novacron.agent.migration.offline import OfflineFactory, receive_offline
from novacron.agent.migration.postcopy import QEMU_STREAM, QemuStream, blocktime, percentiles
from novacron.agent.migration.ramwork import RamWork
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.migration.vmport import (
    AdmissionError,
    DestFactory,
    DestVM,
    MirrorDest,
    NetworkDest,
    PostcopyDest,
)
from novacron.agent.qmp import QMPError, open_unix
from novacron.agent.safefs import open_regular
from novacron.agent.vm.ramfile import Reservation
from novacron.faults import crash_point
from novacron.native import Counters, FrameError, PageStreamReceiver, frame_is_stored

log = logging.getLogger("novacron.agent.migration")


IDLE_TIMEOUT = 60.0  # longest silence from the source before we give up
RESUME_WAIT_S = 60.0  # post-copy: the guest must be loaded and startable this soon after 'postcopy'
TRACE_BUDGET = 16 << 20  # QEMU log bytes of fault tracing per post-copy (~200k pages placed)
POSTCOPY_RECOVER_S = 300.0  # post-copy: how long we wait for the source to come back before giving up waiting
# the agent's registry of post-copy migrations a new channel may resume: id -> taker
Resumable = dict[str, Callable[[Channel], Awaitable[None]]]


class DestAborted(Exception):
    pass


async def receive_migration(
    channel: Channel,
    factory: DestFactory,
    register: Callable[[MigrationStatus], None],
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    authorise: Callable[[str, str, dict[str, Any]], None] | None = None,
    journal: Journal | None = None,
    peer_name: str = "",
    index: PageIndex | None = None,
    resumable: Resumable | None = None,
) -> MigrationStatus | None:
    """Serve one incoming migration on ``channel``; returns its final status.

    ``authorise(migration_id, vm, spec)`` raises ProtocolError for a ``prepare``
    the channel's grant does not cover. ``peer_name`` is the source host's name
    (from the grant), journalled: only it may later ask what became of this.
    ``index``: the agent's page index; None turns destination-side dedup off."""
    try:
        rec = await channel.recv(timeout=idle_timeout)
        if rec.kind != CTRL or rec.op != "prepare" or rec.ctrl is None:
            raise ProtocolError("first message must be 'prepare'")
        mid, vm_name, spec, ram_size, want_digest = protocol.check_prepare(rec.ctrl)
        liveness = protocol.liveness_of(rec.ctrl, idle_timeout)
        disks = protocol.check_disk_plan(rec.ctrl)
        postcopy = rec.ctrl.get("postcopy", False)
        if not isinstance(postcopy, bool):
            raise ProtocolError("'prepare' message: postcopy must be a boolean")
        if postcopy and (disks or want_digest):
            raise ProtocolError("'prepare' message: post-copy moves no local disks and compares no digests")
        disk_dedup = rec.ctrl.get("disk_dedup", False)  # a source without it cannot read the keys
        if not isinstance(disk_dedup, bool):
            raise ProtocolError("'prepare' message: disk_dedup must be a boolean")
        offline = rec.ctrl.get("offline", False)
        if not isinstance(offline, bool) or (offline and (postcopy or want_digest)):
            raise ProtocolError("'prepare' message: offline must be a boolean, without post-copy or digests")
        if offline and not isinstance(factory, OfflineFactory):
            raise ProtocolError("this destination cannot receive offline migrations")
        if authorise is not None:
            authorise(mid, vm_name, spec)
    except (ChannelClosed, ProtocolError) as exc:
        log.warning("incoming migration rejected", extra={"peer": channel.peer(), "reason": str(exc)})
        with contextlib.suppress(Exception):
            await channel.send_ctrl({"op": "error", "reason": str(exc)}, timeout=2)
        return None
    status = MigrationStatus(id=mid, vm=vm_name, role="destination", peer=channel.peer())
    status.pages_total = ram_size // protocol.PAGE
    register(status)
    incoming = _Incoming(channel, status, want_digest, min(idle_timeout, liveness), journal, peer_name)
    incoming.index = index
    incoming.postcopy, incoming.resumable, incoming.liveness = postcopy, resumable, liveness
    incoming.disk_dedup = disk_dedup
    # from here on the source hears from us, also while QEMU starts
    keepalive = asyncio.create_task(_keepalive(channel, liveness))
    try:
        if offline:  # a stopped VM: its disks only (offline.py)
            await receive_offline(channel, cast(OfflineFactory, factory), status, spec, disks, liveness,
                                  disk_dedup)
            return status
        return await _receive(incoming, factory, spec, ram_size, disks)
    finally:
        keepalive.cancel()


async def _keepalive(ch: Channel, liveness: float) -> None:
    await protocol.keepalive(ch, liveness)


async def _receive(incoming: _Incoming, factory: DestFactory, spec: dict[str, Any],
                   ram_size: int, disks: list[dict[str, Any]]) -> MigrationStatus:
    status, channel = incoming.status, incoming.ch
    parts = status.prepare_parts  # seconds since 'prepare' arrived, step by step

    def stamp(name: str) -> None:
        parts[name] = round(time.monotonic() - status._t0, 4)

    try:
        if incoming.index is not None:  # maps; new running VMs are indexed in the background
            incoming.index.refresh()
        stamp("index_s")
        if disks:
            dest = await factory.prepare(spec, ram_size, status.id, disks)
        else:
            dest = await factory.prepare(spec, ram_size, status.id)
        stamp("vm_s")  # admission, RAM file, QEMU started (its own steps: vm_*, from its start)
        parts.update({f"vm_{k}": v for k, v in getattr(dest, "start_parts", {}).items()})
        incoming.disks = [int(d["index"]) for d in disks]
    except Exception as exc:  # the factory cleans up after itself; say why, never hang
        what = "admission refused" if isinstance(exc, AdmissionError) else "preparing the VM failed"
        status.fail(f"{what}: {exc}")
        with contextlib.suppress(Exception):
            await channel.send_ctrl({"op": "error", "reason": status.error}, timeout=2)
        return status
    except BaseException:
        status.fail("cancelled while preparing the VM", cancelled=True)
        raise
    incoming.begin_journal()
    await incoming.run(dest, ram_size)
    return status


class QemuExited(Exception):
    pass


class _Incoming:
    def __init__(self, ch: Channel, status: MigrationStatus, want_digest: bool, idle: float,
                 journal: Journal | None = None, peer_name: str = ""):
        self.ch = ch
        self.peer_name = peer_name
        self.status = status
        self.journal = journal
        self.want_digest = want_digest
        self.idle = idle
        self.counters = Counters()
        self.device_writer: asyncio.StreamWriter | None = None
        self.committed = False
        self.resume_tried = False  # 'go' arrived: the guest may have started here
        self._t_ack = 0.0  # when we last acknowledged bytes (loop time)
        self.disks: list[int] = []  # local disks the source mirrors here
        self.disk_dedup = False  # the source reads announced disk keys (diskdedup.py)
        self.disk_relay: DestDiskRelay | None = None
        self.index: PageIndex | None = None
        self.dedup: IncomingDedup | None = None  # the have/need exchange (dedupdest.py)
        # post-copy (postcopy.py)
        self.postcopy = False  # QEMU moves RAM; the source may switch to post-copy
        self.postcopy_live = False  # the guest may run here while pages are still at the source
        self.qemu_stream: QemuStream | None = None
        self.resumable: Resumable | None = None
        self.liveness = idle
        self._pc_task: asyncio.Task[None] | None = None
        self._resume_q: asyncio.Queue[Channel] = asyncio.Queue()
        self._channel_done: list[asyncio.Future[None]] = []  # recovered channels' handlers wait on these
        self._side_tasks: list[asyncio.Task[None]] = []
        self._ended = False  # no channel can be handed over any more
        self._pc_sent: list[dict[str, Any]] = []  # post-copy news for the source (resumed, done)
        # frames are applied in its threads; teardown waits for them before unmapping
        self.ram_work = RamWork(status.id, threads=1)
        self.opening: asyncio.Task[None] | None = None  # the frame being opened
        self.reservation: Reservation | None = None  # the RAM file's space, while it is being reserved
        self.ram_fd = -1  # the RAM file, open while frames are applied
        self.listening: asyncio.Task[str] | None = None  # QEMU's start, then its device-state socket

    def begin_journal(self) -> None:
        if self.journal is not None:
            host, _, port = self.ch.peer().rpartition(":")
            self.status.journal = self.journal.begin(Entry(
                id=self.status.id, vm=self.status.vm, role="destination", step="prepared",
                peer_host=host, peer_port=int(port) if port.isdigit() else 0, peer_name=self.peer_name))

    def _journal(self, step: str, reason: str = "") -> None:
        if self.journal is not None and self.status.id in self.journal.entries:
            self.journal.step(self.status.id, step, reason)

    async def run(self, dest: DestVM, ram_size: int) -> None:
        st = self.status
        mm: mmap.mmap | None = None
        receiver: PageStreamReceiver | None = None
        try:
            fd = open_regular(dest.ram_path, os.O_RDWR, same_as=dest.ram_stat)  # see safefs
            try:
                mm = mmap.mmap(fd, ram_size, access=mmap.ACCESS_WRITE)
            except BaseException:
                os.close(fd)
                raise
            self.ram_fd = fd  # data pages are written through it (closed in _let_go)
            receiver = PageStreamReceiver(self.ch.page_key_in, mm, counters=self.counters)
            receiver.write_fd = fd
            self.reservation = getattr(dest, "reservation", None)
            if self.reservation is not None:
                # the RAM file's space is still being reserved: each frame's pages are
                # reserved before they are written (ramfile.Reservation)
                receiver.guard = self.reservation
                if self.postcopy:  # QEMU itself writes guest RAM then
                    await self._reserved()
            if self.postcopy:
                if not isinstance(dest, PostcopyDest):
                    raise ProtocolError("this destination cannot run post-copy")
                try:
                    sock = await dest.listen_device_state(postcopy=True)
                except Exception as exc:  # QEMU refuses postcopy-ram: no userfaultfd for it here
                    raise ProtocolError(f"post-copy unavailable at the destination: {exc} (QEMU needs "
                                        "userfaultfd: run it as root or set vm.unprivileged_userfaultfd=1)"
                                        ) from None
            elif getattr(dest, "early", False) and not self.disks:
                # QEMU is still starting (QemuDest.ready): pages go into the RAM file
                # meanwhile; its device-state socket is awaited at 'device_begin'
                sock = ""
                self.listening = asyncio.create_task(self._listen(dest))
            else:
                sock = await dest.listen_device_state()
            if self.disks:
                if not isinstance(dest, MirrorDest):
                    raise ProtocolError("this destination cannot receive local disks")
                nbd = await dest.export_disks(self.disks)
                self.disk_relay = DestDiskRelay(self.ch, st, nbd, self.disks, await diskdedup.announce(
                    self.ch, st, dest, self.disks) if self.disk_dedup else None)
            # whether the RAM file has all its space: the source does not pause the guest
            # before it has (the device state waits for it, paused: 143 ms of a 4 GiB pause)
            prepared: dict[str, Any] = {"op": "prepared", "reserved": self.reservation is None
                                        or self.reservation.complete}
            if self.disk_relay is not None and self.disk_relay.decoders:
                prepared["disk_keys"] = diskdedup.announced(self.disk_relay.decoders)
            if self.index is not None:
                try:
                    self.dedup = IncomingDedup(self.index, mm, dest.ram_path, st.id, self.ch.send_ctrl)
                    prepared["dedup"] = self.index.stats()  # the source may offer digests
                except OSError as exc:  # no dedup for this one: the source sends all data
                    log.warning("destination-side dedup unavailable",
                                extra={"migration": st.id, "error": str(exc)})
            await self.ch.send_ctrl(prepared)
            st.prepare_parts["prepared_s"] = round(time.monotonic() - st._t0, 4)
            st.set_phase("precopy")
            await self._watched(dest, self._loop(dest, receiver, mm, sock))
        except BaseException as exc:
            reason = protocol.failure_reason(exc, "source")
            if self.postcopy_live:
                # part of the guest's memory is only at the source: destroying nothing,
                # claiming nothing; the source's journal keeps asking (phase stays postcopy)
                st.error = f"{reason}; post-copy paused, outcome in doubt: the guest waits here for its pages"
                log.error("post-copy not recovered; the guest waits here for pages the source keeps",
                          extra={"migration": st.id, "reason": reason})
            elif self.committed:
                log.warning("source vanished after switchover; the VM runs here",
                            extra={"migration": st.id, "reason": reason})
                if not st.done:
                    st.set_phase("completed")
            else:
                log.warning("incoming migration failed; destroying destination VM",
                            extra={"migration": st.id, "reason": reason})
                if not self.resume_tried:  # the guest never ran here: the source may resume now
                    await self._send_error(reason)
                await self._close_device()
                if self.disk_relay is not None:
                    await self.disk_relay.close()  # before destroy: QEMU then drops the export
                # before the file goes and the status turns final: a view left would hold
                # the deleted file's space until the agent exits (the dedup exchange holds one)
                await self._close_dedup()
                await self._let_go(mm, receiver)
                mm = receiver = None
                destroyed = True
                try:
                    await dest.destroy()
                except Exception as dexc:
                    destroyed = False
                    reason += f"; cleaning up the destination failed: {dexc}"
                if self.resume_tried and not destroyed:
                    # The guest may run here: a 'failed' (on the channel or the API)
                    # would make the source resume it too. Leave the outcome open.
                    st.error = f"{reason}; the guest may still run here, outcome in doubt"
                    log.error("destination VM may run but could not be destroyed",
                              extra={"migration": st.id, "reason": reason})
                else:
                    if destroyed:
                        self._journal("rolled_back", reason)
                    if self.resume_tried:
                        await self._send_error(reason)
                    st.fail(reason, cancelled=isinstance(exc, DestAborted) and "cancel" in reason)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not isinstance(exc, ChannelClosed | DestAborted):
                await self._linger()
        finally:
            self._ended = True
            listening, self.listening = self.listening, None
            if listening is not None:  # QEMU's start (destroyed above if it failed): no task left behind
                if not listening.done():
                    listening.cancel()
                with contextlib.suppress(BaseException):
                    await listening
            await self._close_device()
            for task in self._side_tasks:
                task.cancel()
            if self._pc_task is not None and not self._pc_task.done() and not self.postcopy_live:
                self._pc_task.cancel()
            if self.resumable is not None:
                self.resumable.pop(st.id, None)
            for fut in self._channel_done:
                if not fut.done():
                    fut.set_result(None)
            if self.disk_relay is not None:
                await self.disk_relay.close()
            await self._close_dedup()
            await self._let_go(mm, receiver)
            st.native = self.counters.as_dict()

    async def _close_dedup(self) -> None:
        d, self.dedup = self.dedup, None
        if d is not None:
            await d.close(committed=self.committed)
            self.status.dedup = d.as_dict()

    async def _let_go(self, mm: mmap.mmap | None, receiver: PageStreamReceiver | None) -> None:
        """Stop the frame being opened and the threads applying frames, release the
        receiver's view, unmap: in that order, so nothing still holds a view."""
        task, self.opening = self.opening, None
        if task is not None:
            await stoptask.stop(task, 10)
        let_go = await self.ram_work.let_go(mm, receiver)
        fd, self.ram_fd = self.ram_fd, -1
        if fd >= 0 and let_go:  # else a thread may still write through it: never a reused number
            os.close(fd)

    async def _watched(self, dest: DestVM, loop: Any) -> None:
        """Run the receive loop; a QEMU that exits before 'go', or a RAM file whose
        space cannot be reserved, ends it at once."""
        work = asyncio.create_task(loop)
        exited = asyncio.create_task(dest.wait_exited())
        watch: set[asyncio.Future[Any]] = {work, exited}
        # side conditions that fail the migration as soon as they fail: the RAM file's
        # space (InsufficientSpace, before the guest can run here), QEMU's start
        sides: list[asyncio.Future[Any]] = []
        if self.reservation is not None:
            sides.append(asyncio.create_task(self._reserved()))
        if self.listening is not None:
            sides.append(self.listening)
        watch.update(sides)
        reserving = sides[0] if self.reservation is not None else None
        try:
            while True:
                await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
                side = next((f for f in sides if f.done() and f in watch), None)
                if side is not None and not work.done():
                    watch.discard(side)
                    failed = side.exception() if not side.cancelled() else None
                    if failed is not None:
                        await stoptask.stop(work)
                        raise failed
                    if side is reserving:
                        await self._ack(force=True)  # says so (``reserved``)
                    continue
                break
            if not work.done() and not self.resume_tried:
                await stoptask.stop(work)
                raise QemuExited(f"destination QEMU exited: {exited.result()}")
            await work
        finally:
            exited.cancel()
            if reserving is not None and not reserving.done():
                reserving.cancel()
            if not work.done():
                await stoptask.stop(work)

    async def _listen(self, dest: DestVM) -> str:
        """QEMU started (see QemuDest.ready) and listening for the device state."""
        sock = await dest.listen_device_state()
        self.status.prepare_parts.update({f"vm_{k}": v for k, v in getattr(dest, "start_parts", {}).items()})
        self.status.prepare_parts["listening_s"] = round(time.monotonic() - self.status._t0, 4)
        return sock

    async def _reserved(self) -> None:
        """Until the RAM file has all its space (raises InsufficientSpace if not)."""
        r = self.reservation
        if r is None:
            return
        if not r.complete:
            await r.wait()
        st = self.status
        if "reserved_s" not in st.prepare_parts and r.done_at is not None:
            st.prepare_parts["reserved_s"] = round(r.done_at - st._t0, 4)

    async def _ack(self, rnd: int | None = None, force: bool = False) -> None:
        """Tell the source how many page-stream bytes we hold (it counts them as sent),
        and, while the RAM file's space is being reserved, whether it is yet."""
        now = asyncio.get_running_loop().time()
        st = self.status
        news, quiet = st.bytes_wire - st.bytes_acked, now - self._t_ack
        due = (news >= protocol.ACK_BYTES and quiet >= protocol.ACK_MIN_S) or (
            news > 0 and quiet >= protocol.ACK_MAX_S)  # a slow link still hears from us
        if rnd is None and not due and not force:
            return
        msg: dict[str, object] = {"op": "ack", "bytes": st.bytes_wire, "t": round(time.monotonic(), 6)}
        if rnd is not None:
            msg["round"] = rnd
        if self.reservation is not None:
            msg["reserved"] = self.reservation.complete
        self._t_ack, st.bytes_acked = now, st.bytes_wire
        # a source that hung up is no reason to fail here: what we read next says why
        # (its 'abort' may still be queued behind the frames)
        with contextlib.suppress(ChannelClosed):
            await self.ch.send_ctrl(msg)

    async def _loop(self, dest: DestVM, receiver: PageStreamReceiver, mm: mmap.mmap, sock: str) -> None:
        # A zstd frame is opened (decrypted, inflated, applied) in a worker while the
        # next record is read off the channel, a stored one right here; frames and
        # control messages still take effect in order.
        try:
            while True:
                try:
                    await self._records(dest, receiver, mm, sock)
                    return
                except (ChannelClosed, ProtocolError, TimeoutError) as exc:
                    if not self.postcopy_live:
                        raise
                    await self._recover(dest, exc)
        except BaseException:
            # failing or cancelled (QEMU gone): the frame being opened may wait on the
            # exchange (dedupdest) that this loop no longer feeds; it must not hold us up
            if self.opening is not None:
                await stoptask.stop(self.opening, 10)
            raise
        finally:
            task = self.opening
            if task is not None and not task.done():
                with contextlib.suppress(BaseException):
                    await task

    async def _open_frame(self, receiver: PageStreamReceiver, frame: bytes | bytearray,
                          inline: bool = False) -> None:
        st = self.status
        try:
            opened = receiver.open(frame) if inline else await self.ram_work.run(receiver.open, frame)
        except FrameError as exc:
            raise ProtocolError(f"bad page frame: {type(exc).__name__}: {exc}") from None
        st.bytes_wire += len(frame) + 5
        if opened.blob is not None and opened.blob[0] == protocol.TAG_HAVE:
            if self.dedup is None:
                raise ProtocolError("have batch, but this destination offered no dedup")
            await self._reserved()  # the exchange copies pages into guest memory itself
            await self.dedup.on_have(opened.blob[1])
            st.dedup = self.dedup.as_dict()
        elif opened.blob is not None:
            tag, data = opened.blob
            if tag != protocol.TAG_DEVICE_STATE or self.device_writer is None:
                raise ProtocolError("unexpected blob frame")
            self.device_writer.write(data)
            await asyncio.wait_for(self.device_writer.drain(), 60)
            st.device_state_bytes += len(data)
        else:
            st.pages_sent += opened.pages
            st.bytes_raw += opened.pages * protocol.PAGE
        await self._ack()  # held, so counted as sent at the source

    async def _records(self, dest: DestVM, receiver: PageStreamReceiver, mm: mmap.mmap, sock: str) -> None:
        st = self.status
        while True:
            if self.opening is None:
                rec = await self.ch.recv(timeout=self.idle)
            else:
                # a bad frame fails the migration now, not when the next record arrives
                recv = asyncio.create_task(self.ch.recv(timeout=self.idle))
                try:
                    await asyncio.wait({recv, self.opening}, return_when=asyncio.FIRST_COMPLETED)
                    if self.opening.done():
                        self.opening.result()
                    rec = await recv
                finally:
                    if not recv.done():
                        recv.cancel()
                        with contextlib.suppress(BaseException):
                            await recv
                task, self.opening = self.opening, None
                await task  # the previous frame first: order is the protocol
            if rec.kind == DATA and rec.stream == QEMU_STREAM:
                if self.qemu_stream is None:
                    raise ProtocolError("QEMU stream data before 'ram_begin'")
                assert rec.frame is not None
                st.bytes_wire += len(rec.frame)
                await self.qemu_stream.deliver(rec.frame)
                continue
            if rec.kind == DATA:
                if self.disk_relay is None:
                    raise ProtocolError("disk data without local disks")
                assert rec.frame is not None
                await self.disk_relay.deliver(rec.stream, rec.frame)
                continue
            if self.disk_relay is not None and self.disk_relay.error is not None:
                raise ProtocolError(f"disk relay failed: {self.disk_relay.error}")
            if rec.kind != CTRL:
                if self.postcopy:  # QEMU owns this RAM (post-copy places pages with userfaultfd)
                    raise ProtocolError("page frame in a migration whose RAM QEMU moves")
                assert rec.frame is not None
                if frame_is_stored(rec.frame):
                    # decrypt and copy, here: about a millisecond a MiB, less than the
                    # round trip through a worker and back to this loop costs on busy
                    # cores (measured at load 3-4 on 2 cores: 4-6 ms a 1 MiB frame, 1.2
                    # of it opening; 256 MiB pre-copy, median of 8: 0.66 -> 0.56 s)
                    await self._open_frame(receiver, rec.frame, inline=True)
                else:  # zstd: inflated in a worker while the next record is read
                    self.opening = asyncio.create_task(self._open_frame(receiver, rec.frame))
                continue
            assert rec.ctrl is not None
            op = rec.op
            if op == "round_end":
                st.round = protocol.check_int(rec.ctrl, "round", 1, 100_000)
                if self.dedup is not None:  # never a page left unanswered past a round
                    self.dedup.check_settled()
                await self._ack(st.round)
            elif op == "keepalive":
                continue
            elif op == "repaired":
                if self.dedup is None:
                    raise ProtocolError("'repaired' without a have/need exchange")
                self.dedup.on_repaired(rec.ctrl)
                st.dedup = self.dedup.as_dict()
            elif op in ("disk_open", "disk_eof", "disks_done"):
                if self.disk_relay is None:
                    raise ProtocolError(f"{op!r} without local disks")
                if op == "disk_open":
                    await self.disk_relay.open_stream(protocol.check_stream(rec.ctrl, self.disks))
                elif op == "disk_eof":
                    self.disk_relay.peer_eof(protocol.check_stream(rec.ctrl, self.disks))
                else:
                    # the copies are complete: no NBD client may write them once the guest runs
                    self.disk_relay.check_settled()
                    await self.disk_relay.close()
                    assert isinstance(dest, MirrorDest)
                    await dest.stop_disk_export()
            elif op == "ram_begin":
                if not self.postcopy or self.qemu_stream is not None:
                    raise ProtocolError("'ram_begin' without post-copy, or twice")
                self.qemu_stream = QemuStream(self.ch)
                self.qemu_stream.attach(*await _connect_unix_rw(sock, timeout=30))
            elif op == "postcopy":
                if self.qemu_stream is None or self._pc_task is not None:
                    raise ProtocolError("'postcopy' before 'ram_begin', or twice")
                # from here the guest may run here while pages are still at the source
                self._journal("go", "post-copy")
                self.resume_tried = True
                self.postcopy_live = True
                st.set_phase("postcopy")
                if self.resumable is not None:
                    self.resumable[st.id] = self._take_channel
                self._pc_task = asyncio.create_task(self._run_postcopy(dest), name=f"postcopy {st.id}")
            elif op == "done" and self._pc_task is not None:
                return  # post-copy completed and the source released its copy
            elif op == "paused":
                if isinstance(dest, NetworkDest):
                    dest.announce_early()
            elif op == "device_begin":
                if self.dedup is not None:
                    self.dedup.check_settled()
                # QEMU loads the device state and the guest may run here from now on:
                # never on a page without its space (normally reserved long before)
                await self._reserved()
                st.set_phase("stopcopy")
                crash_point("migration.dest.stopcopy")
                if not sock:
                    assert self.listening is not None
                    sock = await self.listening
                self.device_writer = await _connect_unix(sock, timeout=30)
            elif op == "device_end":
                await self._close_device()
                await dest.wait_device_state_loaded(timeout=60)
                msg: dict[str, object] = {"op": "ready"}
                if self.want_digest:
                    st.digest_destination = await self.ram_work.run(ram_digest, mm)
                    msg["digest"] = st.digest_destination
                await self.ch.send_ctrl(msg)
            elif op == "go":
                if self.dedup is not None:  # never a page unanswered when the guest starts
                    self.dedup.check_settled()
                st.set_phase("commit")
                self._journal("go")
                crash_point("migration.dest.go_received")
                # Adopted while still paused: a VM that cannot be recorded here (no
                # space, a name clash) fails the migration before the guest runs here,
                # so a QEMU that runs is always one the agent knows.
                await dest.adopt()
                self.resume_tried = True
                await dest.resume()
                self.committed = True  # the guest runs here now: never destroy it
                self._journal("committed", "the guest runs here")
                # Final before telling the source: if 'resumed' is lost with the
                # channel, the source asks our API and must read a definite answer.
                st.set_phase("completed")
                await self.ch.send_ctrl({"op": "resumed"})
                # Wait (bounded) for the source's 'done'; the VM is ours either way.
                with contextlib.suppress(ChannelClosed, ProtocolError):
                    await self.ch.recv(timeout=30)
                return
            elif op == "abort":
                raise DestAborted(f"source aborted: {protocol.reason_of(rec.ctrl)}")
            else:
                raise ProtocolError(f"unexpected control message {op!r}")

    async def _linger(self, limit: float = 2.0) -> None:
        """Drop what the source still sends until it hangs up (bounded): closing with its
        page frames unread would reset the connection, and a reset discards our
        'error' unread at the source, which would then only see "connection reset"."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(limit):
                while True:
                    await self.ch.recv(timeout=limit)

    async def _send_error(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.ch.send_ctrl({"op": "error", "reason": reason}, timeout=2)

    # -- post-copy ----------------------------------------------------------
    async def _run_postcopy(self, dest: DestVM) -> None:
        """Start the guest as soon as QEMU loaded the device state, then wait until
        every page is here; only then is the migration complete (and the source freed)."""
        st = self.status
        assert isinstance(dest, PostcopyDest)
        mark: int | None = None
        tracing = True
        try:
            try:
                mark = await dest.trace_faults(True)  # figures only: never fails the migration
            except Exception as exc:
                log.warning("cannot time post-copy faults", extra={"migration": st.id, "error": str(exc)})
            loop = asyncio.get_running_loop()
            deadline = loop.time() + RESUME_WAIT_S
            while (state := await dest.run_state()) != "paused":  # QEMU loaded the package
                if state not in ("inmigrate", "prelaunch", "paused") or loop.time() > deadline:
                    raise RuntimeError(f"destination QEMU is {state!r}, not loaded, after 'postcopy'")
                await asyncio.sleep(0.005)
            await dest.adopt()
            dest.hold(True)  # not stoppable or deletable until every page is here
            await dest.resume()
            self.committed = True
            st.postcopy["resumed_at_s"] = round(st.total_s, 3)
            await self._send_postcopy({"op": "resumed"})
            log.info("guest runs here; post-copy fetching its remaining pages", extra={"migration": st.id})
            while True:
                try:  # one query at a time: QEMU answers when its main loop is free again
                    info = await dest.query_migration(timeout=POSTCOPY_RECOVER_S)
                except TimeoutError:
                    continue
                state = str(info.get("status"))
                st.postcopy["qemu_state"] = state
                if state == "completed":
                    break
                if state in ("failed", "cancelled"):
                    raise RuntimeError(f"QEMU post-copy {state}: {info.get('error-desc', 'no detail')}")
                if tracing and mark is not None and dest.log_size() - mark > TRACE_BUDGET:
                    tracing = False  # a large post-copy: time its first faults only
                    with contextlib.suppress(Exception):
                        await dest.trace_faults(False)
                await asyncio.sleep(0.1)
            figures = blocktime(info)
            if mark is not None:
                if tracing:
                    with contextlib.suppress(Exception):
                        await dest.trace_faults(False)
                figures["fault_ms"] = percentiles(await asyncio.to_thread(dest.fault_latencies, mark))
                figures["fault_ms"]["sampled"] = not tracing
            st.postcopy["blocktime"] = figures
            self.postcopy_live = False
            dest.hold(False)
            self._journal("committed", "post-copy complete: every page is here")
            st.set_phase("completed")
            log.info("post-copy complete", extra={"migration": st.id, "blocktime": figures})
            await self._send_postcopy({"op": "postcopy_done", "blocktime": figures})
        except ChannelClosed:
            pass  # recovery (or the source's query) settles it
        except Exception as exc:
            st.error = f"post-copy at the destination: {exc}"
            log.error("post-copy failed at the destination", extra={"migration": st.id, "error": str(exc)})
            with contextlib.suppress(Exception):
                await self.ch.send_ctrl({"op": "error", "reason": st.error}, timeout=2)

    async def _send_postcopy(self, msg: dict[str, Any]) -> None:
        """Send ``msg`` on the channel, and again on the next one should this one break
        first (recovery replaces it); bounded by POSTCOPY_RECOVER_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POSTCOPY_RECOVER_S
        self._pc_sent.append(msg)  # a recovery sends it again: it may have died with the channel
        while True:
            ch = self.ch
            try:
                await ch.send_ctrl(msg, timeout=10)
                return
            except (ChannelClosed, OSError, TimeoutError):
                while self.ch is ch and not self._ended:
                    if loop.time() > deadline:
                        raise ChannelClosed(f"post-copy: could not tell the source {msg['op']!r}") from None
                    await asyncio.sleep(0.1)
                if self._ended:
                    raise ChannelClosed(f"post-copy: could not tell the source {msg['op']!r}") from None

    async def _take_channel(self, ch: Channel) -> None:
        """A new channel from the source (``postcopy_resume``, grant checked by the
        manager): hand it to the recovery; its handler must not close it meanwhile."""
        if self._ended:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._channel_done.append(done)
        await self._resume_q.put(ch)
        await done

    async def _recover(self, dest: DestVM, exc: BaseException) -> None:
        """The channel broke during post-copy: wait for the source to reconnect, then
        let QEMU listen again (``migrate-recover``); bounded by POSTCOPY_RECOVER_S."""
        st = self.status
        assert isinstance(dest, PostcopyDest) and self.qemu_stream is not None
        log.warning("post-copy stream lost; waiting for the source to reconnect",
                    extra={"migration": st.id, "reason": str(exc)})
        await self.qemu_stream.close()  # QEMU sees its stream break: postcopy-paused
        loop = asyncio.get_running_loop()
        deadline = loop.time() + POSTCOPY_RECOVER_S
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ChannelClosed(f"post-copy: the source did not reconnect within {POSTCOPY_RECOVER_S:g}s")
            try:
                ch = await asyncio.wait_for(self._resume_q.get(), remaining)
            except TimeoutError:
                continue
            state = ""
            try:
                async with asyncio.timeout(10):
                    while True:  # QEMU notices the break soon; in-band queries may hang meanwhile
                        try:
                            sock = await dest.recover_postcopy()
                            break
                        except QMPError as qexc:
                            state = qexc.desc
                            await asyncio.sleep(0.05)
                    self.qemu_stream.ch = ch
                    self.qemu_stream.attach(*await _connect_unix_rw(sock, timeout=10))
                    old, self.ch = self.ch, ch
                    with contextlib.suppress(Exception):
                        await old.close()
                    await ch.send_ctrl({"op": "recovering"})
                    for msg in self._pc_sent:  # the source ignores what it already had
                        await ch.send_ctrl(msg)
                self._side_tasks.append(asyncio.create_task(protocol.keepalive(ch, self.liveness)))
                st.postcopy["recoveries"] = st.postcopy.get("recoveries", 0) + 1
                log.info("post-copy channel recovered", extra={"migration": st.id})
                return
            except (ChannelClosed, ProtocolError, OSError, TimeoutError, RuntimeError) as rexc:
                log.warning("post-copy recovery attempt failed",
                            extra={"migration": st.id, "error": str(rexc) or type(rexc).__name__,
                                   "qemu_state": state})
                await self.qemu_stream.close()
                with contextlib.suppress(Exception):
                    await ch.close()

    async def _close_device(self) -> None:
        if self.qemu_stream is not None and not self.postcopy_live:
            await self.qemu_stream.close()
        w, self.device_writer = self.device_writer, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 5)


async def _connect_unix_rw(path: str, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await open_unix(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() > deadline:
                raise ProtocolError(f"destination VM did not listen for its migration on {path}") from None
            await asyncio.sleep(0.02)


async def _connect_unix(path: str, timeout: float) -> asyncio.StreamWriter:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await open_unix(path)
            return writer
        except (FileNotFoundError, ConnectionRefusedError):
            if loop.time() > deadline:
                raise ProtocolError(f"destination VM did not listen for device state on {path}") from None
            await asyncio.sleep(0.02)

