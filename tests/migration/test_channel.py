"""The agent-to-agent channel: mutual authentication, key agreement, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct

import pytest

from novacron.agent.channel import AuthError, Channel, ChannelServer, ProtocolError, connect
from novacron.agent.channel.handshake import CLIENT_HELLO, MAGIC
from novacron.agent.channel.records import CTRL, FRAME, HEADER, MAX_FRAME
from novacron.agent.channel.stream import ChannelStream

SECRET = "cluster-secret-for-tests"


class Recorder:
    """A handler that records every authenticated channel it is given."""

    def __init__(self) -> None:
        self.channels: list[Channel] = []
        self.messages: list[dict[str, object]] = []
        self.errors: list[Exception] = []

    async def __call__(self, ch: Channel) -> None:
        self.channels.append(ch)
        try:
            while True:
                rec = await ch.recv(timeout=5)
                if rec.ctrl is not None:
                    self.messages.append(rec.ctrl)
                    await ch.send_ctrl({"op": "echo", "got": rec.ctrl})
        except Exception as exc:
            self.errors.append(exc)


@pytest.fixture
async def server():
    rec = Recorder()
    srv = ChannelServer(SECRET, rec, handshake_timeout=2)
    await srv.start()
    yield srv, rec
    await srv.close()


async def test_authenticated_round_trip_and_distinct_keys(server) -> None:
    srv, rec = server
    ch = await connect("127.0.0.1", srv.port, SECRET)
    await ch.send_ctrl({"op": "hello", "n": 1})
    reply = await ch.recv(timeout=5)
    assert reply.ctrl == {"op": "echo", "got": {"op": "hello", "n": 1}}
    server_side = rec.channels[0]
    # both ends derived the same four keys, each distinct, and a fresh set per connection
    k = ch.keys
    assert k == server_side.keys
    assert len({k.ctrl_c2s, k.ctrl_s2c, k.pages_c2s, k.pages_s2c}) == 4
    assert ch.page_key_out == server_side.page_key_in
    ch2 = await connect("127.0.0.1", srv.port, SECRET)
    assert ch2.keys.pages_c2s != k.pages_c2s
    assert "pages" not in repr(k) and k.pages_c2s.hex() not in repr(k)
    await ch.close()
    await ch2.close()


async def test_wrong_secret_refused_before_handler(server) -> None:
    srv, rec = server
    with pytest.raises(AuthError, match="authentication"):
        await connect("127.0.0.1", srv.port, "not-the-cluster-secret")
    await asyncio.sleep(0)  # let the server's connection task finish
    assert rec.channels == []


async def test_forged_client_proof_refused(server) -> None:
    """A peer that completes the hello but cannot prove the secret gets nothing."""
    srv, rec = server
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
    writer.write(MAGIC + os.urandom(CLIENT_HELLO - len(MAGIC)))
    await writer.drain()
    await reader.readexactly(len(MAGIC) + 96)
    writer.write(os.urandom(32))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed, no verdict
    writer.close()
    for _ in range(100):
        if srv.refused:
            break
        await asyncio.sleep(0.01)
    assert srv.refused == 1 and rec.channels == []


async def test_garbage_and_silent_peers_refused(server) -> None:
    srv, rec = server
    r1, w1 = await asyncio.open_connection("127.0.0.1", srv.port)
    w1.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 100)
    await w1.drain()
    assert await asyncio.wait_for(r1.read(100), 5) == b""
    r2, w2 = await asyncio.open_connection("127.0.0.1", srv.port)  # says nothing
    assert await asyncio.wait_for(r2.read(100), 5) == b""  # handshake timeout (2 s)
    w1.close()
    w2.close()
    assert rec.channels == [] and srv.refused == 2


async def test_bad_records_rejected(server) -> None:
    srv, rec = server
    ch = await connect("127.0.0.1", srv.port, SECRET)
    # a control record sealed with the wrong key fails authentication at the peer
    ch.writer.write(HEADER.pack(CTRL, 40) + os.urandom(40))
    await ch.writer.drain()
    await asyncio.sleep(0.2)
    assert rec.errors and isinstance(rec.errors[-1], ProtocolError)
    assert "authentication" in str(rec.errors[-1])
    # oversized frame header: refused without reading (or allocating) the body
    ch2 = await connect("127.0.0.1", srv.port, SECRET)
    ch2.writer.write(HEADER.pack(FRAME, MAX_FRAME + 1))
    await ch2.writer.drain()
    await asyncio.sleep(0.2)
    assert "frame record" in str(rec.errors[-1])
    ch3 = await connect("127.0.0.1", srv.port, SECRET)
    ch3.writer.write(struct.pack(">BI", 9, 10) + b"0123456789")
    await ch3.writer.drain()
    await asyncio.sleep(0.2)
    assert "unknown record kind" in str(rec.errors[-1])
    assert rec.messages == []
    for c in (ch, ch2, ch3):
        await c.close()


async def test_replayed_control_record_rejected(server) -> None:
    srv, rec = server
    ch = await connect("127.0.0.1", srv.port, SECRET)
    sent: list[bytes] = []
    orig = ch.writer.write

    def capture(data: bytes) -> None:
        sent.append(bytes(data))
        orig(data)

    ch.writer.write = capture  # type: ignore[method-assign]
    await ch.send_ctrl({"op": "one"})
    await ch.recv(timeout=5)
    orig(b"".join(sent))  # the same record again
    await ch.writer.drain()
    await asyncio.sleep(0.2)
    assert rec.messages == [{"op": "one"}]
    assert isinstance(rec.errors[-1], ProtocolError)
    await ch.close()


async def test_connect_refused_port_is_clear() -> None:
    srv = ChannelServer(SECRET, Recorder())
    port = await srv.start()
    await srv.close()
    with pytest.raises(AuthError, match="cannot connect"):
        await connect("127.0.0.1", port, SECRET, timeout=2)


def test_short_secret_rejected() -> None:
    from novacron.agent.channel.handshake import _secret_bytes

    with pytest.raises(ValueError):
        _secret_bytes("short")


async def test_idle_peers_cannot_keep_a_real_one_out() -> None:
    """More silent peers than the per-address limit, and ones that send a hello but
    never their proof: a real peer still gets in, and the deadline ends the rest."""
    rec = Recorder()
    srv = ChannelServer(SECRET, rec, handshake_timeout=1.5, max_pending=6, max_pending_per_address=4)
    await srv.start()
    idle = []
    try:
        for i in range(10):
            r, w = await asyncio.open_connection("127.0.0.1", srv.port)
            if i % 2:
                w.write(MAGIC + os.urandom(CLIENT_HELLO - len(MAGIC)))  # a hello, then silence
            idle.append((r, w))
        await asyncio.sleep(1.1)  # past the grace a fresh connection gets
        assert srv.pending.held == 4 and srv.pending.refused == 6  # the limit held
        ch = await connect("127.0.0.1", srv.port, SECRET)  # closes the oldest idle one
        await ch.send_ctrl({"op": "hello"})
        assert (await ch.recv(timeout=5)).ctrl == {"op": "echo", "got": {"op": "hello"}}
        assert srv.pending.evicted == 1 and srv.pending.held == 3  # authenticated: off the budget
        for r, _w in idle:  # every idle one ends by the handshake deadline (closed or reset)
            with contextlib.suppress(ConnectionResetError):
                await asyncio.wait_for(r.read(), 3)  # returns at EOF; a server hello may come first
        assert srv.pending.held == 0
        await ch.close()
    finally:
        for _r, w in idle:
            w.close()
        await srv.close()


# -- the connection under the channel (agent/channel/stream.py) ----------------------
async def _stream_pair() -> tuple[ChannelStream, asyncio.StreamWriter]:
    """A ChannelStream reading what a plain asyncio writer sends, over a socketpair."""
    import socket

    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, stream = await loop.connect_accepted_socket(ChannelStream, a)
    _, writer = await asyncio.open_connection(sock=b)
    return stream, writer


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_large_frames_and_control_records_arrive_intact_in_order(tmp_path, tls: bool) -> None:
    """Frames of every size (received in place or through the small-read buffer) and
    control records between them come out exactly as sent, in order; with mutual TLS
    too (asyncio's TLS reader fills the buffers we hand it differently)."""
    from novacron import pki
    from novacron.tls import client_context

    got: list[bytes] = []
    done = asyncio.Event()

    async def collect(ch: Channel) -> None:
        while True:
            r = await ch.recv(timeout=5)
            if r.ctrl is not None:
                if r.op == "end":
                    done.set()
                    return
                got.append(str(r.ctrl["i"]).encode())
            else:
                assert r.frame is not None
                got.append(bytes(r.frame))

    server_ctx = client_ctx = None
    if tls:
        pki.init_ca(tmp_path / "pki")
        a, b = (pki.issue(tmp_path / "pki", n, ["127.0.0.1"]) for n in ("ch-a", "ch-b"))
        import ssl

        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(str(b.cert), str(b.key))
        server_ctx.load_verify_locations(str(b.ca))
        server_ctx.verify_mode = ssl.CERT_REQUIRED
        client_ctx = client_context(str(a.ca), str(a.cert), str(a.key))
    srv = ChannelServer(SECRET, collect, handshake_timeout=5, ssl=server_ctx)
    await srv.start()
    try:
        ch = await connect("127.0.0.1", srv.port, SECRET, ssl=client_ctx, server_name="ch-b" if tls else None)
        sent: list[bytes] = []
        sizes = [1, 5000, 64 * 1024 - 1, 64 * 1024, 1 << 20, (3 << 20) + 7, 300_000, 17]
        for i, size in enumerate(sizes * 2):
            frame = os.urandom(size)
            ch.write_frame(frame)
            await ch.send_ctrl({"op": "mark", "i": i})
            sent += [frame, str(i).encode()]
            await ch.drain()
        await ch.send_ctrl({"op": "end"})
        await asyncio.wait_for(done.wait(), 10)
        await ch.close()
    finally:
        await srv.close()
    assert got == sent


async def test_a_cancelled_read_loses_nothing() -> None:
    stream, writer = await _stream_pair()
    data = os.urandom(1 << 20)
    try:
        writer.write(data[: 600_000])
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.readexactly(len(data)), 0.2)
        writer.write(data[600_000:] + b"tail")
        await writer.drain()
        assert await asyncio.wait_for(stream.readexactly(len(data)), 5) == data
        assert await asyncio.wait_for(stream.readexactly(4), 5) == b"tail"
    finally:
        writer.close()
        stream.close()


async def test_unread_bytes_are_bounded_and_eof_mid_read_is_incomplete() -> None:
    """A peer that sends far more than is read: reading pauses at the limit (the
    kernel's buffers hold the rest); the stream ends mid-read: IncompleteReadError."""
    from novacron.agent.channel import stream as cs

    stream, writer = await _stream_pair()
    try:
        writer.write(os.urandom(8 << 20))  # not drained: the peer keeps sending
        deadline = asyncio.get_running_loop().time() + 5
        while len(stream._buf) < cs.LIMIT and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert cs.LIMIT <= len(stream._buf) <= cs.LIMIT + cs.SCRATCH
        assert (await stream.readexactly(8 << 20))[:1] is not None  # the rest flows once read
        writer.write(b"abc")
        writer.close()
        with pytest.raises(asyncio.IncompleteReadError) as err:
            await asyncio.wait_for(stream.readexactly(1 << 20), 5)
        assert err.value.partial == b"abc"
    finally:
        writer.close()
        stream.close()
