"""Destination-side dedup (have/need, dedupdest.py) on file-backed VMs: pages the
destination already holds are copied there, stale ones are repaired, several
VMs evacuated at once share what landed, and RAM always matches at switchover."""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from novacron.agent.channel import Channel, ChannelServer, connect
from novacron.agent.migration.dedupdest import PageIndex
from novacron.agent.migration.dest import receive_migration
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from tests.migration.memvm import PAGE, MemDestFactory, MemSourceVM

SECRET = "dedup-test-secret-0123"
PAGES = 4096  # 16 MiB guests


def image(seed: int, pages: int = PAGES) -> np.ndarray:
    """What VMs booted from one image share: random (incompressible) pages, a
    tenth of them zero."""
    rng = np.random.default_rng(seed)
    mem = rng.integers(0, 256, size=(pages, PAGE), dtype=np.uint8)
    mem[rng.random(pages) < 0.1] = 0
    return mem


def fill(vm: MemSourceVM, base: np.ndarray, own: float, seed: int) -> None:
    """Give ``vm`` the image's pages except a fraction ``own`` of its own."""
    mem = base.copy()
    rng = np.random.default_rng(seed)
    mine = rng.random(len(mem)) < own
    mem[mine] = rng.integers(0, 256, size=(int(mine.sum()), PAGE), dtype=np.uint8)
    vm.mm[:] = mem.tobytes()


class Host:
    """A destination agent: the channel server, memory-backed VMs, the page index
    over the RAM of the VMs running here (``running``)."""

    def __init__(self, root: Path, max_mb: int = 16) -> None:
        self.factory = MemDestFactory(root / "vms")
        self.running: list[Path] = []
        self.index = PageIndex(max_mb, lambda: list(self.running))
        self.statuses: list[MigrationStatus] = []
        self.server = ChannelServer(SECRET, self.handle)

    async def handle(self, ch: Channel) -> None:
        await receive_migration(ch, self.factory, self.statuses.append, idle_timeout=20,
                                index=self.index)

    def running_vm(self, root: Path, mem: np.ndarray) -> mmap.mmap:
        path = root / "running.ram"
        path.write_bytes(mem.tobytes())
        self.running.append(path)
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, mem.nbytes)
        finally:
            os.close(fd)


@pytest.fixture
async def host(tmp_path: Path):
    h = Host(tmp_path / "dst")
    await h.server.start()
    yield h
    await h.server.close()


async def migrate(src: MemSourceVM, port: int, mid: str = "m1", **opts: object) -> MigrationStatus:
    ch = await connect("127.0.0.1", port, SECRET)
    o = MigrationOptions.from_dict({"test_digest": True, **opts})
    st = MigrationStatus(id=mid, vm=src.name, role="source", options=o.as_dict())
    try:
        await SourceMigration(src, ch, st, o).run()
    finally:
        await ch.close()
    return st


async def test_pages_the_destination_runs_are_not_sent(tmp_path: Path, host: Host) -> None:
    base = image(1)
    running = host.running_vm(tmp_path, base)
    wire = {}
    try:
        for dedup in (False, True):
            src = MemSourceVM(tmp_path / f"src{dedup}", f"vm{int(dedup)}", pages=PAGES)
            fill(src, base, own=0.2, seed=2)
            try:
                st = await migrate(src, host.server.port, mid=f"m{int(dedup)}", dest_dedup=dedup)
            finally:
                src.close()
            assert st.phase == "completed", st.error
            assert st.digest_source == st.digest_destination
            wire[dedup] = st.bytes_wire
            if dedup:
                d = st.metrics()["dest_dedup"]
                assert d["enabled"] and d["hits"] > 0.7 * d["offered"], d
                dest = host.statuses[-1].metrics()["dest_dedup"]
                assert dest["hits"] == d["hits"] and dest["index"]["memory_bytes"] > 0
    finally:
        running.close()
    # 80 % of the pages are there already (a tenth of them zero, never sent anyway)
    print("wire bytes without/with dedup", wire)
    assert wire[True] < 0.35 * wire[False], wire
