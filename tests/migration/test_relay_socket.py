"""The source's device-state relay socket lives in the VM folder (any path
length), replaces a stale one a killed agent left, and is gone afterwards."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from novacron.agent.migration.protocol import RELAY_SOCKET
from novacron.agent.migration.qemu_port import clean_stale_relay_sockets
from novacron.agent.migration.unixsock import MAX_UNIX_PATH, start_unix_server_at
from novacron.agent.qmp import open_unix


def leave_stale_socket(path: Path) -> None:
    """What a SIGKILLed agent leaves: a bound socket file nobody listens on."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


async def test_server_on_a_path_longer_than_sun_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / RELAY_SOCKET
    assert len(str(path)) > MAX_UNIX_PATH
    path.write_bytes(b"")  # a leftover in the way is replaced
    got = asyncio.Event()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert await r.readexactly(5) == b"hello"
        w.close()
        got.set()

    server = await start_unix_server_at(on_conn, path)
    try:
        assert path.is_socket() and path.stat().st_mode & 0o777 == 0o600
        _, w = await open_unix(str(path))
        w.write(b"hello")
        await w.drain()
        await asyncio.wait_for(got.wait(), 5)
        w.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_stale_relay_sockets_cleaned_at_start(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / "vms" / name).mkdir(parents=True)
    leave_stale_socket(tmp_path / "vms" / "a" / RELAY_SOCKET)
    (tmp_path / "vms" / "b" / "other.sock").write_text("")
    assert clean_stale_relay_sockets(tmp_path) == ["a"]
    assert not (tmp_path / "vms" / "a" / RELAY_SOCKET).exists()
    assert (tmp_path / "vms" / "b" / "other.sock").exists()
    assert clean_stale_relay_sockets(tmp_path / "nothing-here") == []
