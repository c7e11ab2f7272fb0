"""Helpers for migration tests that boot the real test guest under QEMU."""

from __future__ import annotations

import os
import re
from pathlib import Path

HB = re.compile(r"NOVACRON-HB boot=(\w+) seq=(\d+) uptime=([\d.]+) ok=(\d)")
VERIFY = re.compile(r"NOVACRON-VERIFY boot=(\w+) pages=\d+ bad=(\d+) result=(\w+)")


def heartbeats(text: str) -> list[tuple[str, int, float, int]]:
    return [(b, int(s), float(u), int(ok)) for b, s, u, ok in HB.findall(text)]


def guest_spec(name: str, memory_mb: int = 128, mem_mb: int = 32, rate_mb: int = 4) -> dict[str, object]:
    from novacron.agent.guest import ensure_guest

    g = ensure_guest()
    return {
        "name": name, "vcpus": 1, "memory_mb": memory_mb, "accel": "tcg",
        "kernel": str(g.kernel), "initrd": str(g.initrd),
        "cmdline": g.workload_cmdline(mem_mb=mem_mb, rate_mb=rate_mb, verify_s=4),
    }  # fmt: skip


def qemu_processes_using(path: Path) -> list[int]:
    """PIDs of QEMUs running in a folder under ``path`` (leak check; QEMU's
    command line names no host path, it runs in its VM's folder)."""
    pids = []
    root = path.resolve()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            cwd = Path(os.readlink(d / "cwd"))
        except OSError:
            continue
        if b"qemu" in cmd and cwd.is_relative_to(root):
            pids.append(int(d.name))
    return pids


def deleted_but_held(pid: int, root: Path) -> list[str]:
    """Files under ``root`` that process ``pid`` still maps or holds open although they
    were deleted (their space is not given back until it lets go)."""
    prefix, held = str(root.resolve()), set()
    proc = Path(f"/proc/{pid}")
    names = set()
    for fd in (proc / "fd").iterdir():
        try:
            names.add(os.readlink(fd))
        except OSError:
            continue
    names |= {line.split(None, 5)[-1] for line in (proc / "maps").read_text().splitlines()
              if line.count(" ") >= 5}
    for name in names:
        if name.startswith(prefix) and name.endswith("(deleted)"):
            held.add(name)
    return sorted(held)


class CuttableProxy:
    """A loopback TCP relay in front of a data port; ``cut()`` resets every
    connection through it (the "channel cut" fault)."""

    def __init__(self, target_port: int) -> None:
        import asyncio

        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.bytes = 0

    async def start(self) -> int:
        import asyncio

        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _conn(self, r1, w1) -> None:  # type: ignore[no-untyped-def]
        import asyncio
        import contextlib

        r2, w2 = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [w1, w2]

        async def pump(r, w) -> None:  # type: ignore[no-untyped-def]
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    self.bytes += len(data)
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pump(r1, w2), pump(r2, w1))

    def cut(self) -> None:
        for w in self._writers:
            w.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
