"""Local disks move as a stream of the migration: QEMU's NBD bytes over the channel.

The destination's QEMU exports each local disk (empty, the source's size) on an
NBD unix socket in its own folder; the source's QEMU mirrors each disk
(``blockdev-mirror``) to an NBD client node whose socket is one the *source
agent* listens on in the VM's folder. Nothing crosses hosts but the migration
channel: the agents carry each NBD connection as ``DATA`` records (stream id =
disk index) of the channel that already carries RAM and device state, so disk
bytes get the same mutual TLS, the same grant and the same per-record
AES-256-GCM as everything else, and a dead or cut channel stops the mirror with
the rest of the migration. (A second TLS connection under the same grant would
have needed a second admission and a second liveness watch for no gain; one
TCP stream means RAM pages and disk blocks share its bandwidth, which
``bandwidth_mbps`` caps for pages only.)

Control messages: ``disk_open`` (source: QEMU connected for ``stream``; the
destination then connects to its QEMU's export), ``disk_eof`` (either way: that
side's QEMU closed the connection), ``disks_done`` (source: the mirrors are
complete; the destination stops its NBD server before the guest may run).

A live mirror's relay follows the NBD protocol (``nbdwire.NbdTracker``) so that it
never drops QEMU's connection under a running ``write-blocking`` job: on failure it
answers QEMU itself (:meth:`SourceDiskRelay.fail_over`) until the engine has cancelled
the jobs and QEMU has disconnected; only then is the socket closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import numpy as np

from novacron.agent.channel.records import MAX_DATA_CHUNK, Channel, ChannelClosed, ProtocolError
from novacron.agent.migration import diskdedup
from novacron.agent.migration.nbdwire import NbdError, NbdTracker
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.migration.unixsock import ConnHandler, start_unix_server_at
from novacron.agent.qmp import open_unix

log = logging.getLogger("novacron.agent.migration")

READ_CHUNK = 256 * 1024
RELAY_PREFIX = "nbd-relay-"  # source side: nbd-relay-<disk>.sock in the VM folder


def relay_socket(work_dir: Path, index: int) -> Path:
    return work_dir / f"{RELAY_PREFIX}{index}.sock"


class _Streams:
    """Byte streams between local unix connections and the channel, by stream id."""

    def __init__(self, ch: Channel, status: MigrationStatus) -> None:
        self.ch = ch
        self.status = status
        self.writers: dict[int, asyncio.StreamWriter] = {}
        self.pumps: dict[int, asyncio.Task[None]] = {}
        self.error: str | None = None  # a pump that failed: the migration must fail

    def _start_pump(self, stream: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers[stream] = writer
        self.pumps[stream] = asyncio.create_task(self._pump(stream, reader), name=f"disk relay {stream}")

    async def _pump(self, stream: int, reader: asyncio.StreamReader) -> None:
        """Local bytes -> DATA records, with the channel's backpressure."""
        try:
            while chunk := await reader.read(min(READ_CHUNK, MAX_DATA_CHUNK)):
                self.ch.write_data(stream, chunk)
                self._count(len(chunk))
                await self.ch.drain()
            await self.ch.send_ctrl({"op": "disk_eof", "stream": stream})
        except (ChannelClosed, ConnectionError, OSError) as exc:
            self.error = f"disk stream {stream}: {exc}"
        except asyncio.CancelledError:
            pass

    def _count(self, n: int) -> None:
        """Bytes this side pumped out; only the source counts them (``disk_bytes``)."""

    def check_stream(self, stream: int) -> asyncio.StreamWriter:
        w = self.writers.get(stream)
        if w is None:
            raise ProtocolError(f"data for disk stream {stream}, which is not open")
        return w

    def peer_eof(self, stream: int) -> None:
        w = self.writers.pop(stream, None)
        if w is not None:
            w.close()

    async def close(self) -> None:
        for task in self.pumps.values():
            task.cancel()
        for task in self.pumps.values():
            with contextlib.suppress(BaseException):
                await task
        self.pumps.clear()
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class SourceDiskRelay(_Streams):
    """The source's sockets QEMU's NBD clients connect to, one per local disk.

    ``follow_nbd`` (a live mirror): each connection is followed by an
    :class:`NbdTracker`, so that :meth:`fail_over` can answer QEMU instead of dropping
    its connection under a running mirror job (see nbdwire.py)."""

    def __init__(self, ch: Channel, status: MigrationStatus, work_dir: Path, disks: list[int],
                 *, follow_nbd: bool = False, keys: dict[int, np.ndarray] | None = None) -> None:
        super().__init__(ch, status)
        self.work_dir = work_dir
        self.disks = disks
        self.follow_nbd = follow_nbd
        # disks whose clusters the destination announced (diskdedup.py): framed streams,
        # always followed. Filled when 'prepared' arrives, before any connection.
        self.keys = keys if keys is not None else {}
        # (stream, handle) -> the payload of a write sent with digests and the positions
        # not yet repaired, until the destination's QEMU answered it
        self.kept: dict[tuple[int, int], tuple[bytes, set[int]]] = {}
        self.trackers: dict[int, NbdTracker] = {}
        self.servers: list[asyncio.Server] = []
        self._closed = False
        self._failing = asyncio.Event()

    @property
    def failing(self) -> bool:
        """:meth:`fail_over` ran: nothing written since reached the destination."""
        return self._failing.is_set()

    def _count(self, n: int) -> None:
        # not in bytes_wire: that is the page stream, which the destination acknowledges
        self.status.disk_bytes += n

    async def listen(self) -> dict[int, Path]:
        paths: dict[int, Path] = {}
        for i in self.disks:
            path = relay_socket(self.work_dir, i)
            self.servers.append(await start_unix_server_at(self._handler(i), path))
            paths[i] = path
        return paths

    def _handler(self, stream: int) -> ConnHandler:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # one connection per disk; none once failing (no job can use it yet)
            if stream in self.writers or stream in self.pumps or self.failing:
                writer.close()
                return
            try:
                await self.ch.send_ctrl({"op": "disk_open", "stream": stream})
            except (ChannelClosed, OSError) as exc:
                self.error = f"disk stream {stream}: {exc}"
                writer.close()
                return
            if self.follow_nbd or stream in self.keys:
                self.trackers[stream] = NbdTracker(capture=stream in self.keys)
            self._start_pump(stream, reader, writer)

        return on_conn

    async def _pump(self, stream: int, reader: asyncio.StreamReader) -> None:
        """QEMU's requests -> DATA records; once failing, QEMU's requests answered here."""
        tracker = self.trackers.get(stream)
        if tracker is None:
            await super()._pump(stream, reader)
            return
        try:
            while chunk := await reader.read(min(READ_CHUNK, MAX_DATA_CHUNK)):
                handshake = not tracker.transmission  # (the client waits for GO's answer)
                received = tracker.client_bytes(chunk)
                self._reply(stream, tracker.take_local())  # an option refused here (nbdwire)
                items = tracker.take() if tracker.capture or handshake else []
                if self.failing:
                    self._reply(stream, tracker.local_replies(received))
                    continue
                try:
                    if tracker.capture:
                        await self._send_framed(stream, items)
                    else:  # whole options in the handshake, then the bytes as they come
                        data = b"".join(i for i in items if isinstance(i, bytes)) if handshake else chunk
                        if data:
                            self.ch.write_data(stream, data)
                            self._count(len(data))
                    await self._drain()
                except (ChannelClosed, ConnectionError, OSError) as exc:
                    self.error = self.error or f"disk stream {stream}: {exc}"
                    self.fail_over()
            if not self.failing:
                await self.ch.send_ctrl({"op": "disk_eof", "stream": stream})
        except NbdError as exc:
            # not a stream we can answer: fail the migration, close this one (the rest are
            # answered); only a QEMU bug or not-QEMU gets here
            self.error = f"disk stream {stream}: NBD: {exc}"
            log.error("disk relay cannot follow NBD", extra={"stream": stream, "error": str(exc)})
            self.trackers.pop(stream, None)
            self.fail_over()
            w = self.writers.pop(stream, None)
            if w is not None:
                w.close()
        except (ChannelClosed, ConnectionError, OSError) as exc:
            self.error = self.error or f"disk stream {stream}: {exc}"
        except asyncio.CancelledError:
            pass

    async def _send_framed(self, stream: int, items: list[bytes | tuple[bytes, bytes]]) -> None:
        """A disk with announced clusters: writes as ``T_WRITE`` frames (named clusters as
        digests, their payload kept until answered), every other byte as ``T_RAW``."""
        stats = self.status.disk_dedup
        for item in items:
            if isinstance(item, tuple):
                header, payload = item
                if len(payload) < diskdedup.CLUSTER:  # no whole cluster to hash: a guest's small write
                    enc = diskdedup.encode_write(header, payload, self.keys[stream])
                else:  # hashing a write (up to 32 MiB) is no work for the loop the pages share
                    enc = await asyncio.to_thread(diskdedup.encode_write, header, payload, self.keys[stream])
                frame = enc.frame
                if enc.refs:
                    handle = int.from_bytes(header[8:16], "big")
                    self.kept[(stream, handle)] = (payload, set(enc.refs))
                    stats["clusters_named"] = stats.get("clusters_named", 0) + len(enc.refs)
                    stats["bytes_named"] = stats.get("bytes_named", 0) + len(enc.refs) * diskdedup.CLUSTER
            else:
                frame = diskdedup.encode_raw(item)
            for i in range(0, len(frame), MAX_DATA_CHUNK):
                self.ch.write_data(stream, frame[i:i + MAX_DATA_CHUNK])
            self._count(len(frame))

    def on_need(self, msg: dict[str, object]) -> None:
        """``disk_need``: the destination lacks clusters it was sent by digest; their
        bytes go on the repair stream from the write's kept payload."""
        stream, handle, positions = diskdedup.parse_need(msg)
        kept = self.kept.get((stream, handle))
        if kept is None or len(set(positions)) != len(positions) or not set(positions) <= kept[1]:
            raise ProtocolError(f"'disk_need' for disk stream {stream} handle {handle:#x} at {positions}, "
                                "which was not sent by digest or was repaired already")
        kept[1].difference_update(positions)  # each cluster once: the repairs stay bounded
        payload = memoryview(kept[0])
        for p in positions:
            self.ch.write_data(diskdedup.DISK_REPAIR, diskdedup.repair_record(
                stream, handle, p, payload[p:p + diskdedup.CLUSTER]))
            self._count(diskdedup.CLUSTER)
        stats = self.status.disk_dedup
        stats["repairs"] = stats.get("repairs", 0) + len(positions)

    def _forget_answered(self, stream: int, tracker: NbdTracker) -> None:
        for key in [k for k in self.kept if k[0] == stream and k[1] not in tracker.requests]:
            del self.kept[key]

    async def _drain(self) -> None:
        """The channel's backpressure, given up when failing (the destination may hang)."""
        drain = asyncio.ensure_future(self.ch.drain())
        stop = asyncio.ensure_future(self._failing.wait())
        try:
            await asyncio.wait({drain, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not drain.done():
                drain.cancel()
                with contextlib.suppress(BaseException):
                    await drain
        if not drain.cancelled():
            drain.result()

    def _reply(self, stream: int, data: bytes) -> None:
        w = self.writers.get(stream)
        if data and w is not None:
            w.write(data)

    def fail_over(self) -> None:
        """The migration failed (or the channel did): from now on nothing is forwarded and
        every outstanding and later NBD request of QEMU's is answered here, until QEMU
        disconnects after the engine cancelled the mirror jobs (then :meth:`close`).

        Why acking writes without storing them is safe: this runs only on the failure path
        (the engine calls it on rollback; the relay itself when the channel fails or the
        destination's export closes, answers an error or breaks the protocol), and once it
        ran the destination's copy is only ever deleted: the engine refuses to complete
        the migration when ``failing`` is set (``SourceMigration._stopcopy`` checks it
        after the mirrors finished). The source's own disk gets every guest write whatever
        the target answers, and stays the VM's. Reads (a mirror never reads its target)
        fail with EIO."""
        if self.failing:
            return
        self._failing.set()
        if not self.follow_nbd:
            # an offline copy (followed only to name clusters) has no job to keep alive:
            # its qemu-img sees the connection drop and fails at once
            for conn in self.writers.values():
                conn.close()
            self.writers.clear()
            return
        for stream, tracker in self.trackers.items():
            w = self.writers.get(stream)
            if w is None:
                continue
            if not tracker.transmission:
                w.close()  # still shaking hands: blockdev-add fails, no job exists to crash
                continue
            self._reply(stream, tracker.local_replies())
        log.info("disk relay answers QEMU itself until the mirrors are cancelled",
                 extra={"streams": sorted(self.trackers), "error": self.error})

    def deliver(self, stream: int, data: bytes | bytearray) -> None:
        """The destination QEMU's bytes for our QEMU (NBD replies: small; never blocks
        the channel's read loop). Followed connections get whole frames only."""
        if self.failing and (self.follow_nbd or stream in self.keys):
            return  # answered here now; a late reply from there would answer twice
        w = self.check_stream(stream)
        tracker = self.trackers.get(stream)
        if tracker is None:
            w.write(data)
            return
        frames = tracker.server_bytes(data)
        if frames:
            w.write(frames)
            if self.kept:
                self._forget_answered(stream, tracker)
        if tracker.server_error is not None:
            self.error = self.error or f"disk stream {stream}: {tracker.server_error}"
            self.fail_over()

    def peer_eof(self, stream: int) -> None:
        tracker = self.trackers.get(stream)
        if tracker is not None and not tracker.disconnecting:
            # the destination's export hung up while QEMU may still write: answer here
            self.error = self.error or f"disk stream {stream}: the destination closed its NBD export"
            self.fail_over()
            return
        super().peer_eof(stream)

    async def close(self) -> None:
        first, self._closed = not self._closed, True
        for server in self.servers:
            server.close()
        self.servers.clear()
        await super().close()
        self.trackers.clear()
        self.kept.clear()
        # once: a later call (the migration's final clean-up) may come after a retry of
        # the VM (its status was final) listens on these same paths
        for i in self.disks if first else ():
            with contextlib.suppress(OSError):
                relay_socket(self.work_dir, i).unlink()


class DestDiskRelay(_Streams):
    """The destination's connections to its QEMU's NBD export, opened when the source's open."""

    def __init__(self, ch: Channel, status: MigrationStatus, socket: str, disks: list[int],
                 decoders: dict[int, diskdedup.FrameDecoder] | None = None) -> None:
        super().__init__(ch, status)
        self.socket = socket
        self.disks = disks
        # disks whose clusters this side announced: their streams are framed (diskdedup.py)
        self.decoders = decoders or {}

    async def open_stream(self, stream: int) -> None:
        if stream not in self.disks or stream in self.writers:
            raise ProtocolError(f"'disk_open' for disk stream {stream}, which is not a local disk "
                                "or is open already")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            try:
                reader, writer = await open_unix(self.socket)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if loop.time() > deadline:
                    raise ProtocolError(f"destination NBD export not listening on {self.socket}") from None
                await asyncio.sleep(0.02)
        self._start_pump(stream, reader, writer)

    async def deliver(self, stream: int, data: bytes | bytearray) -> None:
        if stream == diskdedup.DISK_REPAIR:
            disk, handle, pos, cluster = diskdedup.parse_repair(bytes(data))
            dec = self.decoders.get(disk)
            if dec is None:
                raise ProtocolError(f"disk repair for disk stream {disk}, which is not framed")
            self.status.disk_bytes += len(data)
            await self._to_qemu(disk, *await asyncio.to_thread(dec.fill, handle, pos, cluster))
            return
        w = self.check_stream(stream)
        self.status.disk_bytes += len(data)
        dec = self.decoders.get(stream)
        if dec is None:
            w.write(data)
            await asyncio.wait_for(w.drain(), 60)
            return
        # reading and hashing named clusters: off the loop (it runs one feed at a time)
        await self._to_qemu(stream, *await asyncio.to_thread(dec.feed, data))

    async def _to_qemu(self, stream: int, out: list[bytes], need: list[int]) -> None:
        w = self.check_stream(stream)
        for piece in out:
            w.write(piece)
        dec = self.decoders[stream]
        self.status.disk_dedup.update({k: sum(d.stats[k] for d in self.decoders.values()) for k in dec.stats})
        if need:
            pending = dec.pending_handle
            await self.ch.send_ctrl({"op": "disk_need", "stream": stream, "handle": pending, "pos": need})
        if out:
            await asyncio.wait_for(w.drain(), 60)

    async def close(self) -> None:
        await super().close()
        for dec in self.decoders.values():
            dec.close()
        self.decoders.clear()

    def check_settled(self) -> None:
        """At ``disks_done``: no write still waits for a repaired cluster."""
        for stream, dec in self.decoders.items():
            if not dec.idle:
                raise ProtocolError(f"disk stream {stream}: the source declared the disks done while "
                                    "a write still waits for its clusters")
