"""A failed incoming migration lets go of its RAM file at once, whatever failed.

The destination agent maps the incoming RAM file to write pages into it. A
view of that mapping left anywhere (the page receiver, a frame still being
opened in a worker thread, a task not awaited, an exception whose frames hold
the receiver) keeps the mapping, and so the deleted file's space, until the
agent exits (found by the fault matrix). Here the destination runs in this
process on file-backed VMs, so ``/proc/self/maps`` shows its mappings; the
garbage collector is off during each case, so a teardown that only works once
cycles are collected fails too."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.channel import Channel, ChannelServer, connect
from novacron.agent.migration.dest import receive_migration
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from tests.migration.memvm import MemDestFactory, MemSourceVM

SECRET = "teardown-test-secret"


def mapped(path: Path, perms: str = "") -> list[str]:
    """This process's mappings of ``path`` (also once it was deleted), with ``perms``
    (e.g. "r--s": the source engine's read-only view; the memory VM's own is "rw-s")."""
    name = str(path)
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if line.split(None, 5)[-1].removesuffix(" (deleted)") == name
            and (not perms or line.split()[1] == perms)]


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Dest:
    def __init__(self, root: Path) -> None:
        self.factory = MemDestFactory(root)
        self.statuses: list[MigrationStatus] = []
        self.done = asyncio.Event()
        self.server = ChannelServer(SECRET, self.handle)
        self.ram: Path | None = None
        self.mapped_when_final: list[str] | None = None

    def register(self, st: MigrationStatus) -> None:
        def final(s: MigrationStatus) -> None:  # a final status means the file is let go
            if self.ram is not None:
                self.mapped_when_final = mapped(self.ram)

        st.on_finish = final
        self.statuses.append(st)

    async def handle(self, ch: Channel) -> None:
        try:
            await receive_migration(ch, self.factory, self.register, idle_timeout=10)
        finally:
            self.done.set()


@pytest.fixture
async def dest(tmp_path: Path):
    d = Dest(tmp_path / "dst")
    await d.server.start()
    yield d
    await d.server.close()


async def until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


Fault = Callable[[Dest, SourceMigration, Channel], Awaitable[None]]


async def qemu_exit(dest: Dest, mig: SourceMigration, ch: Channel) -> None:
    dest.factory.vms["t"].exited.set()


async def channel_cut(dest: Dest, mig: SourceMigration, ch: Channel) -> None:
    ch.writer.transport.abort()


async def source_cancel(dest: Dest, mig: SourceMigration, ch: Channel) -> None:
    mig.cancel()


async def exit_at_stopcopy(dest: Dest, mig: SourceMigration, ch: Channel) -> None:
    await until(lambda: dest.statuses[0].phase == "stopcopy")
    dest.factory.vms["t"].exited.set()


async def run_with_fault(tmp_path: Path, dest: Dest, fault: Fault, **opts: object) -> MigrationStatus:
    src = MemSourceVM(tmp_path / "src", "t", pages=8192, dirty_pages_per_s=4000)
    ch = await connect("127.0.0.1", dest.server.port, SECRET)
    o = MigrationOptions.from_dict({"bandwidth_mbps": 8, "batch_pages": 128, **opts})
    st = MigrationStatus(id="f1", vm=src.name, role="source", options=o.as_dict())
    mig = SourceMigration(src, ch, st, o)
    task = asyncio.create_task(mig.run())
    try:
        await until(lambda: bool(dest.statuses) and dest.statuses[0].phase == "precopy"
                    and dest.statuses[0].pages_sent > 0)
        dest.ram = dest.factory.vms["t"].ram_path
        assert mapped(dest.ram), "the destination should map its incoming RAM file"
        assert mapped(src.ram_path, "r--s"), "the source engine should map the RAM file"
        await fault(dest, mig, ch)
        await asyncio.wait_for(task, 30)
        await asyncio.wait_for(dest.done.wait(), 30)
    finally:
        if not task.done():
            task.cancel()
        await ch.close()
        src.close()
    assert st.phase in ("failed", "cancelled"), st.phase
    assert src.running and not src.released
    assert mapped(src.ram_path, "r--s") == [], "the source engine still maps the RAM file"
    return dest.statuses[0]


@pytest.mark.parametrize("fault", [qemu_exit, channel_cut, source_cancel])
async def test_failed_incoming_migration_unmaps_its_ram_file(tmp_path: Path, dest: Dest, no_gc: None,
                                                             fault: Fault) -> None:
    theirs = await run_with_fault(tmp_path, dest, fault)
    assert theirs.phase in ("failed", "cancelled"), theirs.phase
    assert dest.ram is not None and not dest.ram.exists()
    assert dest.mapped_when_final == [], f"mapped once the status was final: {dest.mapped_when_final}"
    assert mapped(dest.ram) == []


async def test_qemu_exit_at_stopcopy_unmaps_the_ram_file(tmp_path: Path, dest: Dest, no_gc: None) -> None:
    """The destination "QEMU" dies while device state is being relayed."""
    factory_prepare = dest.factory.prepare

    async def prepare(spec: dict[str, Any], ram_size: int, mid: str) -> Any:
        vm = await factory_prepare(spec, ram_size, mid)

        async def never_loads(timeout: float) -> None:  # QEMU would be loading it when killed
            await asyncio.sleep(timeout)

        vm.wait_device_state_loaded = never_loads  # type: ignore[method-assign]
        return vm

    dest.factory.prepare = prepare  # type: ignore[method-assign]
    theirs = await run_with_fault(tmp_path, dest, exit_at_stopcopy, max_rounds=2, on_no_converge="force",
                                  downtime_ms=5000)
    assert theirs.phase == "failed" and "QEMU exited" in (theirs.error or ""), theirs.error
    assert dest.mapped_when_final == []
    assert dest.ram is not None and mapped(dest.ram) == []


async def test_bad_frame_unmaps_the_ram_file(tmp_path: Path, dest: Dest, no_gc: None) -> None:
    """A frame that fails authentication (the receiver raised inside a worker thread)."""
    async def tamper(dest: Dest, mig: SourceMigration, ch: Channel) -> None:
        write = ch.write_frame

        def bad(frame: bytes) -> None:
            b = bytearray(frame)
            b[-1] ^= 1
            write(bytes(b))

        ch.write_frame = bad  # type: ignore[method-assign]

    theirs = await run_with_fault(tmp_path, dest, tamper)
    assert theirs.phase == "failed" and "bad page frame" in (theirs.error or ""), theirs.error
    assert dest.mapped_when_final == []
    assert dest.ram is not None and mapped(dest.ram) == []
    assert os.path.exists(tmp_path / "src" / "t")


async def test_completed_migration_unmaps_the_source_ram_file(tmp_path: Path, dest: Dest, no_gc: None) -> None:
    """After a move the source's RAM file is deleted: the engine must not keep it mapped."""
    src = MemSourceVM(tmp_path / "src", "t", pages=4096, dirty_pages_per_s=2000)
    ram = src.ram_path
    ch = await connect("127.0.0.1", dest.server.port, SECRET)
    o = MigrationOptions.from_dict({"downtime_ms": 500})
    st = MigrationStatus(id="c1", vm=src.name, role="source", options=o.as_dict())
    try:
        await SourceMigration(src, ch, st, o).run()
        await asyncio.wait_for(dest.done.wait(), 30)
    finally:
        await ch.close()
        src.close()
    assert st.phase == "completed", st.error
    assert src.released and not ram.exists()
    assert mapped(ram) == []
