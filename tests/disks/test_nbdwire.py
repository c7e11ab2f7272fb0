"""The disk relay's NBD follower: frame boundaries, outstanding handles, local answers, bad frames."""

from __future__ import annotations

import struct

import pytest

from novacron.agent.migration import nbdwire as nw
from novacron.agent.migration.nbdwire import NbdError, NbdTracker


def greeting() -> bytes:
    return struct.pack(">QQH", nw.NBDMAGIC, nw.IHAVEOPT, 3)


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nw.IHAVEOPT, opt, len(data)) + data


def opt_reply(opt: int, rtype: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", nw.OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


def request(cmd: int, handle: int, length: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", nw.REQUEST_MAGIC, 0, cmd, handle, 4096, length) + payload


def simple(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack(">IIQ", nw.SIMPLE_REPLY_MAGIC, error, handle) + data


def chunk(handle: int, flags: int, rtype: int, payload: bytes) -> bytes:
    return struct.pack(">IHHQI", nw.STRUCTURED_REPLY_MAGIC, flags, rtype, handle, len(payload)) + payload


def connected(structured: bool = True) -> NbdTracker:
    """A tracker past QEMU's handshake: structured replies (if asked), then GO with an info reply."""
    t = NbdTracker()
    assert t.server_bytes(greeting()) == greeting()
    client = struct.pack(">I", 3) + (option(nw.OPT_STRUCTURED_REPLY) if structured else b"")
    client += option(nw.OPT_GO, b"\0\0\0\x05disk0\0\0")
    for b in client:  # byte by byte: boundaries must not matter
        assert t.client_bytes(bytes([b])) == []
    replies = (opt_reply(nw.OPT_STRUCTURED_REPLY, nw.REP_ACK) if structured else b"")
    replies += opt_reply(nw.OPT_GO, 3, b"\0\0" + bytes(10)) + opt_reply(nw.OPT_GO, nw.REP_ACK)
    assert t.server_bytes(replies) == replies
    assert t.transmission and t.structured == structured
    return t


def test_requests_and_replies_are_framed_whatever_the_chunking() -> None:
    t = connected()
    data = bytes(range(256)) * 16
    stream = request(nw.CMD_WRITE, 1, len(data), data) + request(nw.CMD_FLUSH, 2) + request(nw.CMD_READ, 3, 512)
    done = []
    for i in range(0, len(stream), 7):
        done += t.client_bytes(stream[i:i + 7])
    assert done == [1, 2, 3] and t.outstanding == [1, 2, 3]
    # the write's reply in two pieces: nothing reaches QEMU until it is whole
    reply = simple(1)
    assert t.server_bytes(reply[:5]) == b""
    assert t.server_bytes(reply[5:]) == reply
    # a structured read in two chunks, the first split mid-payload
    first = chunk(3, 0, 1, struct.pack(">Q", 0) + b"x" * 256)
    last = chunk(3, nw.REPLY_FLAG_DONE, 1, struct.pack(">Q", 256) + b"y" * 256)
    assert t.server_bytes(first[:100]) == b""
    assert t.server_bytes(first[100:] + last[:3]) == first
    assert t.outstanding == [2, 3]
    assert t.server_bytes(last[3:]) == last
    assert t.outstanding == [2]


def test_local_replies_answer_what_is_outstanding_and_only_whole_requests() -> None:
    t = connected()
    assert t.client_bytes(request(nw.CMD_WRITE_ZEROES, 10, 65536) + request(nw.CMD_READ, 11, 512)
                          + request(nw.CMD_TRIM, 12, 4096)) == [10, 11, 12]
    half_write = request(nw.CMD_WRITE, 13, 8192, b"z" * 8192)
    assert t.client_bytes(half_write[:1000]) == []
    t.server_bytes(chunk(11, 0, 1, struct.pack(">Q", 0) + b"r" * 10))  # a read half answered
    out = t.local_replies()
    expect = (simple(10) + chunk(11, nw.REPLY_FLAG_DONE, nw.REPLY_TYPE_ERROR, struct.pack(">IH", nw.NBD_EIO, 0))
              + simple(12))
    assert out == expect
    assert t.outstanding == [13]  # its payload is still coming: answered once it is in
    done = t.client_bytes(half_write[1000:])
    assert done == [13] and t.local_replies(done) == simple(13) and t.outstanding == []
    # DISC: no reply, and nothing may follow
    assert t.client_bytes(request(nw.CMD_DISC, 14)) == [] and t.disconnecting
    with pytest.raises(NbdError, match="after NBD_CMD_DISC"):
        t.client_bytes(request(nw.CMD_FLUSH, 15))


def test_without_structured_replies_a_read_fails_with_a_simple_error() -> None:
    t = connected(structured=False)
    t.client_bytes(request(nw.CMD_READ, 5, 4096))
    assert t.local_replies() == simple(5, nw.NBD_EIO)
    t.client_bytes(request(nw.CMD_READ, 6, 8))
    # a successful simple read reply carries the request's length of data
    assert t.server_bytes(simple(6, 0, b"12345678")[:20]) == b""
    assert t.server_bytes(b"5678") == simple(6, 0, b"12345678")
    t.client_bytes(request(nw.CMD_READ, 7, 8))
    assert t.server_bytes(chunk(7, 1, 1, b"\0" * 16)) == b""
    assert t.server_error is not None and "not negotiated" in t.server_error


def test_handshake_replies_pass_whole_and_an_option_error_is_no_go() -> None:
    t = NbdTracker()
    t.server_bytes(greeting())
    t.client_bytes(struct.pack(">I", 3) + option(nw.OPT_GO, b"\0" * 6))
    err = opt_reply(nw.OPT_GO, nw.REP_ERROR_BIT | 6, b"no such export")
    assert t.server_bytes(err[:-1]) == b""
    assert t.server_bytes(err[-1:]) == err
    assert not t.transmission
    assert t.local_replies() == b""


@pytest.mark.parametrize("client, match", [
    (struct.pack(">I", 0) + b"GARBAGE!" + bytes(20), "neither an option nor a request"),
    (struct.pack(">I", 0) + option(nw.OPT_EXPORT_NAME, b"disk0"), "NBD_OPT_GO only"),
    (struct.pack(">I", 0) + option(nw.OPT_STRUCTURED_REPLY) + option(nw.OPT_EXTENDED_HEADERS),
     "extended headers before the server answered option 8"),
    (struct.pack(">I", 0) + struct.pack(">QII", nw.IHAVEOPT, nw.OPT_GO, 1 << 20), "carries"),
    (struct.pack(">I", 0) + request(nw.CMD_FLUSH, 1), "before the server acknowledged"),
])
def test_bad_client_frames_before_transmission(client: bytes, match: str) -> None:
    t = NbdTracker()
    with pytest.raises(NbdError, match=match):
        t.client_bytes(client)


@pytest.mark.parametrize("client, match", [
    (request(9, 1), "unknown command 9"),
    (request(nw.CMD_WRITE, 1, nw.MAX_PAYLOAD + 1), "write of"),
    (request(nw.CMD_FLUSH, 1) + request(nw.CMD_FLUSH, 1), "reused handle"),
    (option(nw.OPT_GO), "option after the handshake"),
    (struct.pack(">IHHQQI", 0x25609514, 0, 1, 1, 0, 0), "neither an option nor a request"),
])
def test_bad_client_frames_in_transmission(client: bytes, match: str) -> None:
    t = connected()
    with pytest.raises(NbdError, match=match):
        t.client_bytes(client)


@pytest.mark.parametrize("server, match", [
    (simple(99), "handle 0x63, which is not outstanding"),
    (struct.pack(">IIQ", 0x12345678, 0, 1), "reply magic 0x12345678"),
    (struct.pack(">IHHQI", nw.STRUCTURED_REPLY_MAGIC, 1, 1, 2, nw.MAX_PAYLOAD + 1), "reply chunk of"),
])
def test_bad_server_frames_stop_the_stream_after_the_good_ones(server: bytes, match: str) -> None:
    t = connected()
    t.client_bytes(request(nw.CMD_FLUSH, 1) + request(nw.CMD_READ, 2, 8))
    good = simple(1)
    assert t.server_bytes(good + server) == good  # what came whole before it still goes
    assert t.server_error is not None and match in t.server_error, t.server_error
    assert t.server_bytes(simple(2, 0, b"8 bytes!")) == b""  # nothing more is followed
    assert t.outstanding == [2]


def test_an_error_reply_from_the_destination_is_answered_here() -> None:
    """The destination failing a write (its disk full): QEMU must not see the error (a
    mirror that fails by itself ends while the guest writes); the relay answers it."""
    t = connected()
    t.client_bytes(request(nw.CMD_WRITE, 1, 4, b"abcd") + request(nw.CMD_WRITE, 2, 4, b"efgh"))
    assert t.server_bytes(simple(1) + simple(2, 28)) == simple(1)
    assert t.server_error is not None and "NBD error 28" in t.server_error
    assert t.local_replies() == simple(2)
    err = chunk(3, nw.REPLY_FLAG_DONE, nw.REPLY_TYPE_ERROR, struct.pack(">IH", 28, 0))
    t2 = connected()
    t2.client_bytes(request(nw.CMD_WRITE_ZEROES, 3, 4096))
    assert t2.server_bytes(err) == b"" and "NBD error 28" in str(t2.server_error)
    assert t2.outstanding == [3]


def test_bad_handshake_from_the_server() -> None:
    t = NbdTracker()
    assert t.server_bytes(b"NBDMAGIC" + struct.pack(">Q", 0x00420281861253) + b"\0" * 8) == b""
    assert "fixed newstyle" in str(t.server_error)
    t = NbdTracker()
    t.server_bytes(greeting())
    assert t.server_bytes(opt_reply(nw.OPT_GO, nw.REP_ACK)) == b""
    assert "did not send" in str(t.server_error)


@pytest.mark.parametrize("capture", [False, True])
@pytest.mark.parametrize("step", [1, 7, 1000])
def test_extended_headers_are_refused_here_and_never_reach_the_server(capture: bool, step: int) -> None:
    """QEMU >= 8.2 asks for extended headers first; the relay answers NBD_REP_ERR_UNSUP
    itself (the client then falls back to compact requests, as with an older server) and
    passes on everything else of the handshake, whole options only, in order."""
    t = NbdTracker(capture=capture)
    assert t.server_bytes(greeting()) == greeting()
    asked = struct.pack(">I", 3) + option(nw.OPT_EXTENDED_HEADERS, b"x" * 5)  # (data: skipped too)
    passed = bytearray()

    def feed(data: bytes) -> None:
        for i in range(0, len(data), step):
            t.client_bytes(data[i:i + step])
            passed.extend(b"".join(x for x in t.take() if isinstance(x, bytes)))

    feed(asked)
    assert t.take_local() == opt_reply(nw.OPT_EXTENDED_HEADERS, nw.REP_ERR_UNSUP)
    assert t.take_local() == b""
    rest = option(nw.OPT_STRUCTURED_REPLY) + option(nw.OPT_GO, b"\0\0\0\x05disk0\0\0")
    feed(rest[:16])  # the client waits for each answer; the server's pass through whole
    assert t.server_bytes(opt_reply(nw.OPT_STRUCTURED_REPLY, nw.REP_ACK)) == opt_reply(nw.OPT_STRUCTURED_REPLY,
                                                                                        nw.REP_ACK)
    feed(rest[16:])
    assert bytes(passed) == struct.pack(">I", 3) + rest  # the refused option is nowhere
    t.server_bytes(opt_reply(nw.OPT_GO, nw.REP_ACK))
    assert t.transmission and t.structured
    # then compact requests, followed as ever
    assert t.client_bytes(request(nw.CMD_FLUSH, 9)) == [9]
    assert t.take() == ([request(nw.CMD_FLUSH, 9)] if capture else [])  # (plain: passed on as they come)
    assert t.server_bytes(simple(9)) == simple(9) and t.take_local() == b""
