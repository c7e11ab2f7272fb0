"""The destination against a misbehaving (but authenticated) source: malformed
control messages are refused before anything is built, and a bad frame in the
middle of a migration destroys what was built."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from novacron.agent.channel import Channel, ChannelServer, connect
from novacron.agent.channel.records import FRAME, HEADER
from novacron.agent.migration.dest import receive_migration
from novacron.agent.migration.status import MigrationStatus
from tests.migration.memvm import MemDestFactory

SECRET = "protocol-test-secret"


@pytest.fixture
async def dest(tmp_path: Path):
    factory = MemDestFactory(tmp_path / "dst")
    statuses: list[MigrationStatus] = []
    done: asyncio.Queue[object] = asyncio.Queue()

    async def handle(ch: Channel) -> None:
        await done.put(await receive_migration(ch, factory, statuses.append, idle_timeout=5))

    server = ChannelServer(SECRET, handle)
    await server.start()
    yield server, factory, statuses, done
    await server.close()


GOOD = {"op": "prepare", "id": "m1", "vm": "vm1", "spec": {"name": "vm1"}, "ram_size": 16 * 4096}


@pytest.mark.parametrize("msg, words", [
    ({"op": "hello"}, "first message"),
    ({**GOOD, "ram_size": -4096}, "ram_size"),
    ({**GOOD, "ram_size": 4097}, "ram_size"),
    ({**GOOD, "ram_size": 1 << 50}, "ram_size"),
    ({**GOOD, "ram_size": True}, "ram_size"),
    ({**GOOD, "vm": "../etc"}, "VM name"),
    ({**GOOD, "id": "x" * 100}, "migration id"),
    ({**GOOD, "spec": "nope"}, "spec"),
    ({**GOOD, "test_digest": "yes"}, "test_digest"),
])
async def test_bad_prepare_refused_nothing_built(dest, msg: dict, words: str) -> None:
    server, factory, statuses, done = dest
    ch = await connect("127.0.0.1", server.port, SECRET)
    await ch.send_ctrl(msg)
    reply = await ch.recv(timeout=5)
    assert reply.op == "error" and words in reply.ctrl["reason"]  # type: ignore[index]
    assert await asyncio.wait_for(done.get(), 5) is None
    assert factory.prepared == 0 and statuses == []
    await ch.close()


async def test_tampered_frame_destroys_destination(dest, tmp_path: Path) -> None:
    server, factory, _, done = dest
    ch = await connect("127.0.0.1", server.port, SECRET)
    await ch.send_ctrl(GOOD)
    assert (await ch.recv(timeout=5)).op == "prepared"
    assert (tmp_path / "dst" / "vm1" / "ram").exists()
    from novacron.native import PageStreamSender

    mem = bytearray(os.urandom(16 * 4096))
    frame = bytearray(PageStreamSender(ch.page_key_out, mem).encode([0, 1, 2])[0])
    frame[-20] ^= 1  # flip one ciphertext bit
    ch.writer.write(HEADER.pack(FRAME, len(frame)) + bytes(frame))
    await ch.drain()
    reply = await ch.recv(timeout=5)
    assert reply.op == "error" and "Tampered" in reply.ctrl["reason"]  # type: ignore[index]
    status = await asyncio.wait_for(done.get(), 5)
    assert isinstance(status, MigrationStatus) and status.phase == "failed"
    assert factory.vms["vm1"].destroyed and os.listdir(tmp_path / "dst") == []
    await ch.close()


async def test_frame_with_wrong_key_refused(dest, tmp_path: Path) -> None:
    server, _, _, done = dest
    ch = await connect("127.0.0.1", server.port, SECRET)
    await ch.send_ctrl(GOOD)
    assert (await ch.recv(timeout=5)).op == "prepared"
    from novacron.native import PageStreamSender

    frame = PageStreamSender(os.urandom(32), bytearray(16 * 4096)).encode([0])[0]
    ch.write_frame(frame)
    await ch.drain()
    reply = await ch.recv(timeout=5)
    assert reply.op == "error" and "WrongKey" in reply.ctrl["reason"]  # type: ignore[index]
    await asyncio.wait_for(done.get(), 5)
    assert os.listdir(tmp_path / "dst") == []
    await ch.close()
