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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from novacron.agent.channel.records import MAX_DATA_CHUNK, Channel, ChannelClosed, ProtocolError
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
    """The source's sockets QEMU's NBD clients connect to, one per local disk."""

    def __init__(self, ch: Channel, status: MigrationStatus, work_dir: Path, disks: list[int]) -> None:
        super().__init__(ch, status)
        self.work_dir = work_dir
        self.disks = disks
        self.servers: list[asyncio.Server] = []
        self._closed = False

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
            if stream in self.writers or stream in self.pumps:  # one connection per disk
                writer.close()
                return
            try:
                await self.ch.send_ctrl({"op": "disk_open", "stream": stream})
            except (ChannelClosed, OSError) as exc:
                self.error = f"disk stream {stream}: {exc}"
                writer.close()
                return
            self._start_pump(stream, reader, writer)

        return on_conn

    def deliver(self, stream: int, data: bytes | bytearray) -> None:
        """The destination QEMU's bytes for our QEMU (NBD replies: small; never blocks
        the channel's read loop)."""
        self.check_stream(stream).write(data)

    async def close(self) -> None:
        first, self._closed = not self._closed, True
        for server in self.servers:
            server.close()
        self.servers.clear()
        await super().close()
        # once: a later call (the migration's final clean-up) may come after a retry of
        # the VM (its status was final) listens on these same paths
        for i in self.disks if first else ():
            with contextlib.suppress(OSError):
                relay_socket(self.work_dir, i).unlink()


class DestDiskRelay(_Streams):
    """The destination's connections to its QEMU's NBD export, opened when the source's open."""

    def __init__(self, ch: Channel, status: MigrationStatus, socket: str, disks: list[int]) -> None:
        super().__init__(ch, status)
        self.socket = socket
        self.disks = disks

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
        w = self.check_stream(stream)
        w.write(data)
        await asyncio.wait_for(w.drain(), 60)
        self.status.disk_bytes += len(data)
