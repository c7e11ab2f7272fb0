"""Record layer over an authenticated stream.

Every record is ``kind (1 byte) | length (4 bytes, big endian) | payload``.
``CTRL`` payloads are JSON control messages sealed with AES-256-GCM under the
per-direction control key, nonce = record counter, so a dropped, replayed or
reordered control record fails to open. ``FRAME`` payloads are sealed frames of
novacron.native's page stream (pages and blobs such as QEMU device state),
which carry their own sequence numbers and authentication. Control messages
have their own keys because they are needed before the destination has a RAM
mapping to build its page-stream receiver on.

``DATA`` payloads are byte streams multiplexed by a one-byte stream id (the
bytes of a disk mirror's NBD connection, one stream per disk, both ways),
sealed like control records: same key, same record counter as nonce (so their
order against control records is authenticated too), a different AAD so one can
never be opened as the other. Unlike frames they need no RAM mapping, and both
sides send them.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from novacron import httpjson
from novacron.agent.channel.handshake import ByteReader, ByteWriter, SessionKeys

CTRL = 1
FRAME = 2
DATA = 3
HEADER = struct.Struct(">BI")
MAX_CTRL = 64 * 1024  # control messages are small JSON objects
MAX_DATA = 1024 * 1024 + 64  # a stream chunk (at most MAX_DATA_CHUNK) plus id and tag
MAX_DATA_CHUNK = 1024 * 1024
MAX_STREAMS = 256
MAX_FRAME = 16 * 1024 * 1024  # a native frame holds at most a few MiB of pages


class ProtocolError(Exception):
    """The peer sent something that is not a valid record (oversized, forged, garbled)."""


class ChannelClosed(Exception):
    """The connection ended (peer closed, reset, or timed out)."""


@dataclass
class Record:
    kind: int
    ctrl: dict[str, Any] | None = None
    # a FRAME's sealed frame (a bytearray when it was received in place), or a DATA record's opened bytes
    frame: bytes | bytearray | None = None
    stream: int = 0  # a DATA record's stream id

    @property
    def op(self) -> str:
        return str(self.ctrl.get("op")) if self.ctrl else ""


class Channel:
    """One authenticated, encrypted connection; ``is_client`` picks the key directions."""

    def __init__(
        self,
        reader: ByteReader,
        writer: ByteWriter,
        keys: SessionKeys,
        *,
        is_client: bool,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.keys = keys
        self.is_client = is_client
        self._seal = AESGCM(keys.ctrl_c2s if is_client else keys.ctrl_s2c)
        self._open = AESGCM(keys.ctrl_s2c if is_client else keys.ctrl_c2s)
        self._send_seq = 0
        self._recv_seq = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self._closed = False
        # the peer certificate's common name when the data port runs mutual TLS (its
        # host identity, verified against the fleet CA); None without TLS
        self.peer_identity: str | None = None

    @property
    def page_key_out(self) -> bytes:
        return self.keys.pages_c2s if self.is_client else self.keys.pages_s2c

    @property
    def page_key_in(self) -> bytes:
        return self.keys.pages_s2c if self.is_client else self.keys.pages_c2s

    def peer(self) -> str:
        info = self.writer.get_extra_info("peername")
        return f"{info[0]}:{info[1]}" if isinstance(info, tuple) else str(info)

    # -- sending -----------------------------------------------------------
    def _write(self, kind: int, payload: bytes) -> None:
        if self._closed or self.writer.is_closing():
            raise ChannelClosed("channel is closed")
        self.writer.write(HEADER.pack(kind, len(payload)))
        self.writer.write(payload)
        self.bytes_sent += HEADER.size + len(payload)

    async def drain(self, timeout: float = 60.0) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
        except TimeoutError:
            raise ChannelClosed(f"peer accepted no data for {timeout:g}s") from None
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(f"connection lost while sending: {exc}") from None

    async def send_ctrl(self, msg: dict[str, Any], timeout: float = 60.0) -> None:
        data = httpjson.dumps(msg, separators=(",", ":")).encode()  # the peer refuses NaN
        if len(data) + 16 > MAX_CTRL:
            raise ValueError(f"control message too large ({len(data)} bytes)")
        nonce = self._send_seq.to_bytes(12, "big")
        self._send_seq += 1
        self._write(CTRL, self._seal.encrypt(nonce, data, b"ctrl"))
        await self.drain(timeout)

    def write_data(self, stream: int, data: bytes) -> None:
        """Queue ``data`` (at most MAX_DATA_CHUNK bytes) on byte stream ``stream``; then ``drain``."""
        if not 0 <= stream < MAX_STREAMS or len(data) > MAX_DATA_CHUNK:
            raise ValueError(f"data record: stream {stream}, {len(data)} bytes")
        nonce = self._send_seq.to_bytes(12, "big")
        self._send_seq += 1
        self._write(DATA, self._seal.encrypt(nonce, bytes([stream]) + data, b"data"))

    def write_frame(self, frame: bytes) -> None:
        """Queue one native frame; call ``drain`` to apply backpressure."""
        if len(frame) > MAX_FRAME:
            raise ValueError(f"frame too large ({len(frame)} bytes)")
        self._write(FRAME, frame)

    # -- receiving ---------------------------------------------------------
    async def recv(self, timeout: float = 60.0) -> Record:
        try:
            head = await asyncio.wait_for(self.reader.readexactly(HEADER.size), timeout)
            kind, length = HEADER.unpack(head)
            if kind == CTRL:
                if length > MAX_CTRL or length < 16:
                    raise ProtocolError(f"control record of {length} bytes")
            elif kind == FRAME:
                if length > MAX_FRAME or length == 0:
                    raise ProtocolError(f"frame record of {length} bytes")
            elif kind == DATA:
                if length > MAX_DATA or length < 17:
                    raise ProtocolError(f"data record of {length} bytes")
            else:
                raise ProtocolError(f"unknown record kind {kind}")
            payload = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except asyncio.IncompleteReadError:
            raise ChannelClosed("peer closed the channel") from None
        except TimeoutError:
            raise ChannelClosed(f"peer sent nothing for {timeout:g}s") from None
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(f"connection lost: {exc}") from None
        self.bytes_received += HEADER.size + length
        if kind == FRAME:
            return Record(FRAME, frame=payload)
        nonce = self._recv_seq.to_bytes(12, "big")
        try:
            data = self._open.decrypt(nonce, payload, b"data" if kind == DATA else b"ctrl")
        except InvalidTag:
            raise ProtocolError(f"{'data' if kind == DATA else 'control'} record failed authentication") from None
        self._recv_seq += 1
        if kind == DATA:
            return Record(DATA, frame=data[1:], stream=data[0])
        try:
            msg = httpjson.loads(data)
        except ValueError:
            raise ProtocolError("control record is not JSON") from None
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise ProtocolError("control record is not an object with an 'op'")
        return Record(CTRL, ctrl=msg)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)
        except (TimeoutError, ConnectionError, OSError):
            pass
