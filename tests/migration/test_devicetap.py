"""DeviceStateTap: QEMU's device-state stream read from the pause, in order, bounded,
and its failures raised where the relay forwards it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from novacron.agent.migration import devicetap
from novacron.agent.migration.devicetap import DeviceStateTap


async def _qemu_like(path: Path, data: bytes, piece: int = 100_000) -> int:
    """Connect as QEMU does and write ``data``; returns how much was written before
    the write side stalled for 0.3 s (all of it if it never stalled)."""
    _, w = await asyncio.open_unix_connection(str(path))
    sent = 0
    try:
        for i in range(0, len(data), piece):
            w.write(data[i:i + piece])
            try:
                await asyncio.wait_for(w.drain(), 0.3)
            except (TimeoutError, ConnectionError):  # stalled, or the tap went
                return sent
            sent = i + len(data[i:i + piece])
        return sent
    finally:
        w.close()


async def test_the_stream_arrives_whole_and_in_order(tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    tap = DeviceStateTap(tmp_path / "dev.sock")
    writer: asyncio.Task[int] | None = None

    async def start(path: Path) -> None:
        nonlocal writer
        writer = asyncio.create_task(_qemu_like(path, data))

    await tap.open(start)
    assert writer is not None and await writer == len(data)  # read while nobody forwards
    got = b"".join([c async for c in tap.chunks()])
    assert got == data and tap.bytes_read == len(data)
    await tap.close()
    assert not (tmp_path / "dev.sock").exists()


async def test_the_buffer_is_bounded_and_qemu_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devicetap, "CHUNK", 64 * 1024)
    data = os.urandom(16 << 20)
    tap = DeviceStateTap(tmp_path / "dev.sock", limit=1 << 20)
    writer: asyncio.Task[int] | None = None

    async def start(path: Path) -> None:
        nonlocal writer
        writer = asyncio.create_task(_qemu_like(path, data))

    await tap.open(start)
    assert writer is not None
    stalled_at = await writer  # nobody forwards: the writer stalls past the bound
    # the tap's bound plus the socket buffers of both ends, far below 16 MiB
    assert 1 << 20 <= stalled_at < 8 << 20, stalled_at
    assert tap.bytes_read <= (1 << 20) + 64 * 1024  # the bound counts bytes
    await tap.close()


async def test_qemu_that_never_connects_fails_where_it_is_forwarded(tmp_path: Path) -> None:
    tap = DeviceStateTap(tmp_path / "dev.sock", timeout_s=0.2)

    async def start(path: Path) -> None:
        pass

    await tap.open(start)
    with pytest.raises(TimeoutError):
        async for _ in tap.chunks():
            pass
    await tap.close()


async def test_close_stops_reading_a_stream_nobody_forwards(tmp_path: Path) -> None:
    tap = DeviceStateTap(tmp_path / "dev.sock")
    writer: asyncio.Task[int] | None = None

    async def start(path: Path) -> None:
        nonlocal writer
        writer = asyncio.create_task(_qemu_like(path, os.urandom(1 << 20), piece=1 << 20))

    await tap.open(start)
    await asyncio.sleep(0)
    await tap.close()  # a rollback: the tap goes, the socket with it
    await tap.close()  # idempotent
    assert not (tmp_path / "dev.sock").exists()
    assert writer is not None
    assert await writer < 1 << 20  # its connection was closed under it


async def test_a_late_connection_is_closed_with_the_tap(tmp_path: Path) -> None:
    tap = DeviceStateTap(tmp_path / "dev.sock", timeout_s=0.1)

    async def start(path: Path) -> None:
        pass

    await tap.open(start)
    await asyncio.sleep(0.3)  # the reader gave up waiting for QEMU
    reader, writer = await asyncio.open_unix_connection(str(tmp_path / "dev.sock"))  # QEMU, late
    await asyncio.sleep(0.05)
    await tap.close()
    assert await asyncio.wait_for(reader.read(1), 5) == b""  # closed, not left open
    writer.close()
