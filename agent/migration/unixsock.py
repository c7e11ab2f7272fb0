"""Unix sockets in a VM's own folder, whatever the folder's path length.

``sun_path`` holds 107 bytes and state directories can be deeper than that.
Binding through ``/proc/self/fd/<dir fd>/<name>`` creates the socket in the
real folder (the QMP client connects the same way), so relay sockets live
beside the VM they belong to and go when it goes, instead of in /tmp.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

MAX_UNIX_PATH = 107

ConnHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _bind(sock: socket.socket, path: Path) -> None:
    if len(os.fsencode(str(path))) <= MAX_UNIX_PATH:
        sock.bind(str(path))
        return
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.bind(f"/proc/self/fd/{dir_fd}/{path.name}")
    finally:
        os.close(dir_fd)


async def start_unix_server_at(handler: ConnHandler, path: Path) -> asyncio.Server:
    """``asyncio.start_unix_server`` on ``path`` (replacing a stale socket left
    by a killed agent); the caller unlinks ``path`` when done."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _bind(sock, path)
        os.chmod(path, 0o600)  # only this user's QEMU may hand us device state
        return await asyncio.start_unix_server(handler, sock=sock)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise
