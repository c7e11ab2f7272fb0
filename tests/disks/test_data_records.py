"""DATA records: the disk mirror's byte streams inside the migration channel."""

from __future__ import annotations

import asyncio

import pytest

from novacron.agent.channel import Channel, ChannelServer, ProtocolError, connect
from novacron.agent.channel.records import CTRL, DATA, HEADER, MAX_DATA_CHUNK
from novacron.agent.migration import protocol

SECRET = "cluster-secret-for-tests"


class Echo:
    """Echoes DATA records back on stream + 1 and records errors."""

    def __init__(self) -> None:
        self.errors: list[Exception] = []

    async def __call__(self, ch: Channel) -> None:
        try:
            while True:
                rec = await ch.recv(timeout=5)
                if rec.kind == DATA:
                    assert rec.frame is not None
                    ch.write_data(rec.stream + 1, rec.frame)
                    await ch.drain()
                elif rec.ctrl is not None:
                    await ch.send_ctrl({"op": "echo", "got": rec.ctrl})
        except Exception as exc:
            self.errors.append(exc)


@pytest.fixture
async def server():
    echo = Echo()
    srv = ChannelServer(SECRET, echo, handshake_timeout=2)
    await srv.start()
    yield srv, echo
    await srv.close()


async def test_data_interleaves_with_control_both_ways(server) -> None:
    srv, _ = server
    ch = await connect("127.0.0.1", srv.port, SECRET)
    big = bytes(range(256)) * (MAX_DATA_CHUNK // 256)
    ch.write_data(3, b"nbd hello")
    await ch.send_ctrl({"op": "disk_open", "stream": 3})
    ch.write_data(7, big)
    await ch.drain()
    got = [await ch.recv(timeout=5) for _ in range(3)]
    assert (got[0].kind, got[0].stream, got[0].frame) == (DATA, 4, b"nbd hello")
    assert got[1].kind == CTRL and got[1].ctrl == {"op": "echo", "got": {"op": "disk_open", "stream": 3}}
    assert (got[2].kind, got[2].stream, got[2].frame) == (DATA, 8, big)
    with pytest.raises(ValueError):
        ch.write_data(0, big + b"x")
    with pytest.raises(ValueError):
        ch.write_data(256, b"x")
    await ch.close()


async def test_forged_and_reordered_data_refused(server) -> None:
    srv, echo = server
    ch = await connect("127.0.0.1", srv.port, SECRET)
    # a control record's bytes relabelled as DATA: the AAD differs, so it fails to open
    sent: list[bytes] = []
    orig = ch.writer.write
    ch.writer.write = lambda data: sent.append(bytes(data))  # type: ignore[method-assign,assignment,misc]
    await ch.send_ctrl({"op": "x"})
    ch.writer.write = orig  # type: ignore[method-assign]
    payload = b"".join(sent)[HEADER.size:]
    orig(HEADER.pack(DATA, len(payload)) + payload)
    await ch.writer.drain()
    await asyncio.sleep(0.2)
    assert echo.errors and isinstance(echo.errors[-1], ProtocolError)
    assert "data record failed authentication" in str(echo.errors[-1])
    # too short to hold a stream id and a tag
    ch2 = await connect("127.0.0.1", srv.port, SECRET)
    ch2.writer.write(HEADER.pack(DATA, 3) + b"abc")
    await ch2.writer.drain()
    await asyncio.sleep(0.2)
    assert "data record of 3 bytes" in str(echo.errors[-1])
    for c in (ch, ch2):
        await c.close()


def test_disk_plan_validation() -> None:
    good = {"index": 0, "size": 64 << 20, "format": "qcow2", "backing_digest": "ab" * 32}
    assert protocol.check_disk_plan({"disks": [good]}) == [good]
    assert protocol.check_disk_plan({}) == []
    for bad in ([dict(good, index=-1)], [good, good], [dict(good, size=0)], [dict(good, size=513)],
                [dict(good, format="vmdk")], [dict(good, backing_digest="../x")], "x", [1],
                [dict(good, index=True)], [dict(good, index=i) for i in range(9)]):
        with pytest.raises(ProtocolError, match="'prepare' message"):
            protocol.check_disk_plan({"op": "prepare", "disks": bad})
    with pytest.raises(ProtocolError, match="not a disk of this migration"):
        protocol.check_stream({"op": "disk_open", "stream": 2}, [0, 1])
