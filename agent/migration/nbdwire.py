"""Following one NBD connection through the source's disk relay, so the relay can end
it without QEMU ever seeing it drop under a live mirror job.

QEMU 7.2 aborts with heap corruption when a ``write-blocking`` mirror ends while guest
writes are in flight, e.g. because its NBD connection dropped or its target failed a
request (see ``MIRROR_COPY_MODE`` in qemu_port.py). The relay therefore never drops the
connection nor passes on an error reply while a job may run: when the migration fails
it stops forwarding and answers every outstanding and later request itself until the
engine has cancelled the jobs (guest held paused) and QEMU has disconnected
(``NBD_CMD_DISC``). To do that it has
to know where the requests and replies begin and end and which handles are still
unanswered: :class:`NbdTracker` parses both directions (fixed newstyle handshake with
``NBD_OPT_GO``, compact 28-byte requests, simple and structured replies; what QEMU 7.2
speaks). Replies reach QEMU only as whole frames, so a channel that dies mid-reply never
leaves QEMU with half a frame that no local answer could complete.

A client that asks for extended headers (``NBD_OPT_EXTENDED_HEADERS``: QEMU 8.2 and
later) is answered here that they are unsupported, and the option never reaches the
server: the client then falls back to compact requests, as with any older server. So
the relay holds each option header of the client's handshake until it is whole (its
data then passes as it comes; ``take``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

OPT_EXPORT_NAME, OPT_GO, OPT_STRUCTURED_REPLY, OPT_EXTENDED_HEADERS = 1, 7, 8, 11
REP_ACK = 1
REP_ERROR_BIT = 1 << 31
REP_ERR_UNSUP = REP_ERROR_BIT | 1

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
CMD_RESIZE = 8
# answered "done" when the destination copy is being thrown away: nothing reads it back
DISCARDABLE = frozenset({CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES})
CMD_NAMES = {CMD_READ: "read", CMD_WRITE: "write", CMD_FLUSH: "flush", CMD_TRIM: "trim", CMD_CACHE: "cache",
             CMD_WRITE_ZEROES: "write-zeroes", CMD_BLOCK_STATUS: "block-status", CMD_RESIZE: "resize"}
ERRNO_NAMES = {1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC: its disk is full",
               75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}  # the NBD spec's error values
REPLY_FLAG_DONE = 1
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT | 1
NBD_EIO = 5

MAX_OPTION_DATA = 64 * 1024  # QEMU's options: an export name, a few info requests
MAX_PAYLOAD = 32 * 1024 * 1024 + 4096  # QEMU's NBD_MAX_BUFFER_SIZE (32 MiB), plus a chunk header

_GREETING = struct.Struct(">QQH")
_OPTION = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")


class NbdError(Exception):
    """The NBD stream is not what the relay can follow (malformed or an unsupported variant)."""


@dataclass
class _Request:
    cmd: int
    length: int
    received: bool  # header and payload all read from the client
    partial: bool = False  # structured chunks forwarded, not yet the one with DONE


class NbdTracker:
    """Both directions of one NBD connection, client (QEMU's mirror target) and server
    (the destination's export). Feed the client's bytes to :meth:`client_bytes` (they are
    forwarded as they come) and the server's to :meth:`server_bytes` (forward only what it
    returns: whole frames). :meth:`local_replies` answers what is outstanding."""

    def __init__(self, *, capture: bool = False) -> None:
        # capture: the client's bytes are kept for :meth:`take` as runs of other bytes and
        # whole writes (header, payload), for a relay that rewrites writes (diskdedup.py).
        # Without it, only the handshake's (see the module notes)
        self.capture = capture
        self.local = bytearray()  # answers to the client from here (a refused option), in order
        self._dropping = False  # the data of a refused option is being skipped
        self._out = bytearray()
        self._items: list[bytes | tuple[bytes, bytes]] = []
        self._w_header = b""
        self._w_payload = bytearray()
        self.transmission = False  # the server acknowledged NBD_OPT_GO
        self.structured = False  # NBD_OPT_STRUCTURED_REPLY acknowledged
        self.disconnecting = False  # the client sent NBD_CMD_DISC
        self.requests: dict[int, _Request] = {}  # by handle, in the order sent
        self._options: list[int] = []  # sent, not yet answered (ACK or an error)
        self._c = bytearray()
        self._c_flags = False  # the client's 4 flag bytes were read
        self._c_skip = 0  # payload bytes still to come (option data or a write's data)
        self._c_writing: int | None = None  # the write whose payload is being skipped
        self._s = bytearray()
        self._s_greeted = False
        self.server_error: str | None = None  # the server's stream stopped being followed here

    @property
    def outstanding(self) -> list[int]:
        return list(self.requests)

    # ----- client -> server --------------------------------------------------------
    def client_bytes(self, data: bytes | bytearray) -> list[int]:
        """Follow the client's bytes; returns the handles of requests now received whole."""
        done: list[int] = []
        view = memoryview(data)
        while view:
            if self._c_skip:
                n = min(self._c_skip, len(view))
                if self._dropping:
                    pass
                elif self.capture or not self.transmission:
                    (self._w_payload if self._c_writing is not None else self._out).extend(view[:n])
                self._c_skip -= n
                view = view[n:]
                if not self._c_skip:
                    self._dropping = False
                if not self._c_skip and self._c_writing is not None:
                    self.requests[self._c_writing].received = True
                    done.append(self._c_writing)
                    self._c_writing = None
                    if self.capture:
                        self._flush_out()
                        self._items.append((self._w_header, bytes(self._w_payload)))
                        self._w_payload = bytearray()
                continue
            need = self._client_need()
            take = min(need - len(self._c), len(view))
            self._c += view[:take]
            view = view[take:]
            if len(self._c) < need or (self._c_flags and need == 4):
                continue  # more to come, or just the magic: now the frame's size is known
            handle = self._client_frame()
            if handle is not None:
                done.append(handle)
        return done

    def _client_need(self) -> int:
        if not self._c_flags:
            return 4
        if len(self._c) < 4:
            return 4
        magic = int.from_bytes(self._c[:4], "big")
        if magic == REQUEST_MAGIC:
            return _REQUEST.size
        if magic == IHAVEOPT >> 32:
            return _OPTION.size
        raise NbdError(f"client sent magic {magic:#010x}, neither an option nor a request")

    def take(self) -> list[bytes | tuple[bytes, bytes]]:
        """The client's bytes to pass on, followed since the last call, in order: runs of
        bytes to pass on as they are, and (``capture``) each write received whole as (its
        28-byte header, its payload). A write still arriving is kept for a later call.
        Without ``capture``, only the handshake's bytes (an option's header once whole, a
        refused option left out); from the server's NBD_OPT_GO acknowledgement on, the
        client's bytes go as they come."""
        self._flush_out()
        items, self._items = self._items, []
        return items

    def _flush_out(self) -> None:
        if self._out:
            self._items.append(bytes(self._out))
            self._out.clear()

    def _is_write_with_payload(self, buf: bytes) -> bool:
        if not (self.transmission and self._c_flags and len(buf) == _REQUEST.size):
            return False
        _, _flags, cmd, _handle, _offset, length = _REQUEST.unpack(buf)
        return cmd == CMD_WRITE and length > 0

    def _refused(self, buf: bytes) -> bool:
        """``buf`` is an option header the relay answers itself (never the server)."""
        if self.transmission or not self._c_flags or len(buf) != _OPTION.size:
            return False
        magic, option, _length = _OPTION.unpack(buf)
        return magic == IHAVEOPT and option == OPT_EXTENDED_HEADERS

    def take_local(self) -> bytes:
        """What to answer the client from here, since the last call (see ``local``)."""
        out, self.local = bytes(self.local), bytearray()
        return out

    def _client_frame(self) -> int | None:
        buf, self._c = bytes(self._c), bytearray()
        if self._refused(buf):
            pass  # neither passed on nor captured
        elif not self.capture and not self.transmission:
            self._out += buf
        elif self.capture:
            if self._is_write_with_payload(buf):
                self._w_header = buf  # the payload follows; the write is one item
            else:
                self._out += buf
        if not self._c_flags:
            self._c_flags = True
            return None
        if len(buf) == _OPTION.size:
            magic, option, length = _OPTION.unpack(buf)
            if magic != IHAVEOPT:
                raise NbdError(f"client option magic {magic:#018x}")
            if self.transmission:
                raise NbdError("client sent an option after the handshake")
            if option == OPT_EXPORT_NAME:
                raise NbdError("client uses NBD_OPT_EXPORT_NAME; the relay follows NBD_OPT_GO only")
            if length > MAX_OPTION_DATA:
                raise NbdError(f"client option {option} carries {length} bytes (at most {MAX_OPTION_DATA})")
            if option == OPT_EXTENDED_HEADERS:  # QEMU >= 8.2 asks; compact requests it gets
                if self._options:  # a reply from here would overtake the server's
                    raise NbdError("client asks for NBD extended headers before the server answered "
                                   f"option {self._options[0]}")
                self.local += _OPT_REPLY.pack(OPT_REPLY_MAGIC, OPT_EXTENDED_HEADERS, REP_ERR_UNSUP, 0)
                self._c_skip, self._dropping = length, length > 0
                return None
            self._options.append(option)
            self._c_skip = length
            return None
        _, _flags, cmd, handle, _offset, length = _REQUEST.unpack(buf)
        if not self.transmission:
            raise NbdError("client sent a request before the server acknowledged NBD_OPT_GO")
        if self.disconnecting:
            raise NbdError("client sent a request after NBD_CMD_DISC")
        if cmd > CMD_RESIZE:
            raise NbdError(f"client sent unknown command {cmd}")
        if cmd == CMD_DISC:
            self.disconnecting = True  # no reply; the client closes
            return None
        if handle in self.requests:
            raise NbdError(f"client reused handle {handle:#x} while it is outstanding")
        if cmd == CMD_WRITE:
            if length > MAX_PAYLOAD:
                raise NbdError(f"client write of {length} bytes (at most {MAX_PAYLOAD})")
            self.requests[handle] = _Request(cmd, length, received=length == 0)
            if length:
                self._c_skip, self._c_writing = length, handle
                return None
            return handle
        self.requests[handle] = _Request(cmd, length, received=True)
        return handle

    # ----- server -> client --------------------------------------------------------
    def server_bytes(self, data: bytes | bytearray) -> bytes:
        """Follow the server's bytes; returns the whole frames among them (the rest waits).
        A frame the relay must not pass on (malformed, or an error reply: see
        :meth:`_reply_error`) stops it: the frames before it are returned, ``server_error``
        says why, and its handle stays outstanding (for :meth:`local_replies`)."""
        if self.server_error is not None:
            return b""
        self._s += data
        pos = 0
        try:
            while (end := self._server_frame(pos)) is not None:
                pos = end
        except NbdError as exc:
            self.server_error = str(exc)
        out = bytes(self._s[:pos])
        del self._s[:pos]
        return out

    def _server_frame(self, pos: int) -> int | None:
        """The end of the whole frame at ``pos``, or None if it is not all here yet."""
        buf, have = self._s, len(self._s) - pos
        if not self._s_greeted:
            if have < _GREETING.size:
                return None
            magic, opt_magic, _flags = _GREETING.unpack_from(buf, pos)
            if magic != NBDMAGIC or opt_magic != IHAVEOPT:
                raise NbdError("server greeting is not fixed newstyle NBD")
            self._s_greeted = True
            return pos + _GREETING.size
        if not self.transmission:
            if have < _OPT_REPLY.size:
                return None
            magic, option, rtype, length = _OPT_REPLY.unpack_from(buf, pos)
            if magic != OPT_REPLY_MAGIC:
                raise NbdError(f"server option reply magic {magic:#018x}")
            if not self._options or self._options[0] != option:
                raise NbdError(f"server replied to option {option}, which the client did not send")
            if length > MAX_OPTION_DATA:
                raise NbdError(f"server option reply of {length} bytes (at most {MAX_OPTION_DATA})")
            if have < _OPT_REPLY.size + length:
                return None
            if rtype == REP_ACK or rtype & REP_ERROR_BIT:
                self._options.pop(0)
                if rtype == REP_ACK and option == OPT_STRUCTURED_REPLY:
                    self.structured = True
                if rtype == REP_ACK and option == OPT_GO:
                    self.transmission = True
            return pos + _OPT_REPLY.size + length
        if have < 4:
            return None
        magic = int.from_bytes(buf[pos:pos + 4], "big")
        if magic == SIMPLE_REPLY_MAGIC:
            if have < _SIMPLE.size:
                return None
            _, error, handle = _SIMPLE.unpack_from(buf, pos)
            req = self._reply_to(handle)
            if error:
                self._reply_error(handle, req, error)
            size = _SIMPLE.size + (req.length if req.cmd == CMD_READ and not error else 0)
            if have < size:
                return None
            del self.requests[handle]
            return pos + size
        if magic == STRUCTURED_REPLY_MAGIC:
            if not self.structured:
                raise NbdError("server sent a structured reply, which was not negotiated")
            if have < _CHUNK.size:
                return None
            _, flags, rtype, handle, length = _CHUNK.unpack_from(buf, pos)
            req = self._reply_to(handle)
            if rtype & REPLY_TYPE_ERROR_BIT:
                self._reply_error(handle, req, int.from_bytes(buf[pos + _CHUNK.size:pos + _CHUNK.size + 4], "big"))
            if length > MAX_PAYLOAD:
                raise NbdError(f"server reply chunk of {length} bytes (at most {MAX_PAYLOAD})")
            if have < _CHUNK.size + length:
                return None
            if flags & REPLY_FLAG_DONE:
                del self.requests[handle]
            else:
                req.partial = True
            return pos + _CHUNK.size + length
        raise NbdError(f"server sent reply magic {magic:#010x}")

    @staticmethod
    def _reply_error(handle: int, req: _Request, error: int) -> None:
        """The destination failed a request (its disk full, say): the migration fails, and
        QEMU must not see it either, for a mirror job that fails by itself ends while the
        guest writes (see ``cancel_disk_mirrors`` in qemu_port.py). The relay answers it."""
        what = CMD_NAMES.get(req.cmd, f"command {req.cmd}")
        raise NbdError(f"the destination failed a {what} (handle {handle:#x}) with NBD error {error}"
                       f"{f' ({ERRNO_NAMES[error]})' if error in ERRNO_NAMES else ''}")

    def _reply_to(self, handle: int) -> _Request:
        req = self.requests.get(handle)
        if req is None:
            raise NbdError(f"server replied to handle {handle:#x}, which is not outstanding")
        return req

    # ----- answering locally (the failure path only) --------------------------------
    def local_replies(self, handles: list[int] | None = None) -> bytes:
        """Replies, made here, to ``handles`` (default: every request received whole and
        unanswered), which are then no longer outstanding. Writes, write-zeroes, trims,
        flushes and cache hints are answered as done; reads and anything else fail with
        EIO (a mirror never reads its target)."""
        out = bytearray()
        for handle in list(self.requests) if handles is None else handles:
            req = self.requests.get(handle)
            if req is None or not req.received:
                continue
            del self.requests[handle]
            if req.cmd in DISCARDABLE and not req.partial:
                out += _SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, handle)
            elif self.structured:
                # a read must not get a simple reply once structured replies are on
                out += _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6)
                out += struct.pack(">IH", NBD_EIO, 0)
            else:
                out += _SIMPLE.pack(SIMPLE_REPLY_MAGIC, NBD_EIO, handle)
        return bytes(out)
