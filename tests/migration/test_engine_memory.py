"""The migration engine end to end on file-backed "VMs" (no QEMU): real dirty
tracking, compression, encryption, convergence control, device-state relay,
rollback and cleanup."""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
import threading
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.channel import Channel, ChannelServer, connect
from novacron.agent.migration.dest import receive_migration
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.vm import ramfile
from tests.migration.grants import DEST, dest_grants, present_grant
from tests.migration.memvm import MemDestFactory, MemSourceVM

SECRET = "engine-test-secret"


class Dest:
    def __init__(self, root: Path) -> None:
        self.factory = MemDestFactory(root)
        self.statuses: list[MigrationStatus] = []
        self.done = asyncio.Event()
        self.server = ChannelServer(SECRET, self.handle)

    async def handle(self, ch: Channel) -> None:
        try:
            await receive_migration(ch, self.factory, self.statuses.append, idle_timeout=10)
        finally:
            self.done.set()


@pytest.fixture
async def dest(tmp_path: Path):
    d = Dest(tmp_path / "dst")
    await d.server.start()
    yield d
    await d.server.close()


async def migrate(src: MemSourceVM, port: int, *, grant: bool = False, granted_id: str = "m1",
                  granted_vm: str | None = None, tls: ssl.SSLContext | None = None,
                  **opts: object) -> tuple[SourceMigration, MigrationStatus]:
    """``grant``: the destination is a MigrationManager, which first wants the grant
    (for migration ``granted_id`` of ``granted_vm``, by default the one run here).
    ``tls``: this source's client context (the destination's certificate is DEST's)."""
    ch = await connect("127.0.0.1", port, SECRET, ssl=tls, server_name=DEST if tls else None)
    if grant:
        await present_grant(ch, granted_vm or src.name, granted_id)
    o = MigrationOptions.from_dict({"test_digest": True, **opts})
    st = MigrationStatus(id="m1", vm=src.name, role="source", options=o.as_dict())
    mig = SourceMigration(src, ch, st, o)
    try:
        await mig.run()
    finally:
        await ch.close()
    return mig, st


async def test_busy_vm_migrates_and_ram_matches(tmp_path: Path, dest: Dest) -> None:
    src = MemSourceVM(tmp_path / "src", "vm1", pages=8192, dirty_pages_per_s=3000)
    try:
        source_ram_before = None
        # always packed: this checks dedup and zstd themselves (pipeline.py may skip them)
        _, st = await migrate(src, dest.server.port, downtime_ms=50, adaptive_compression=False)
        await asyncio.wait_for(dest.done.wait(), 10)
    finally:
        src.close()
    assert st.phase == "completed", st.error
    assert st.digest_source == st.digest_destination and st.digest_source
    assert src.released and not (tmp_path / "src" / "vm1").exists()
    assert src.paused_count == src.resumed_count + 1  # one real pause (+ any throttle cycles)
    dvm = dest.factory.vms["vm1"]
    assert dvm.running and dvm.adopted and bytes(dvm.device_state) == src.device_state
    d = dest.statuses[0]
    assert d.phase == "completed" and d.digest_destination == st.digest_source
    m = st.metrics()
    assert m["downtime_ms"] is not None and m["downtime_ms"] > 0
    assert m["pages_dedup"] > 0  # the repeated pages travel as references
    # a quarter of RAM is zero and a quarter is one repeated page: zstd squeezes those
    assert m["compression_ratio"] > 1.2
    assert st.round >= 2 and len(st.rounds) == st.round
    assert st.dirty_rate_pages_s > 0
    assert source_ram_before is None


async def test_idle_vm_converges_after_one_round(tmp_path: Path, dest: Dest) -> None:
    src = MemSourceVM(tmp_path / "src", "idle", pages=4096, dirty_pages_per_s=0)
    try:
        _, st = await migrate(src, dest.server.port)
    finally:
        src.close()
    assert st.phase == "completed" and st.converged
    assert st.round == 2  # one pre-copy round + the (empty) stop-and-copy round
    assert st.rounds[-1]["pages_sent"] == 0
    # zero pages are never sent: only the non-zero three quarters travel
    assert st.pages_sent == 4096 * 3 // 4
    assert st.metrics()["pages_zero"] == 4096 // 4  # ... and are reported as skipped


async def test_round_limit_forces_stop_and_copy(tmp_path: Path, dest: Dest) -> None:
    src = MemSourceVM(tmp_path / "src", "hot", pages=4096, dirty_pages_per_s=20000)
    try:
        _, st = await migrate(src, dest.server.port, downtime_ms=1, pause_factor=10_000, max_rounds=2,
                              bandwidth_mbps=40, on_no_converge="force")
    finally:
        src.close()
    assert st.phase == "completed", st.error
    assert st.converged is False and st.round == 3
    assert st.digest_source == st.digest_destination
    # forced, so the pause outlasted its 1 ms budget: never a plain success
    assert st.budget_exceeded and st.to_dict()["budget_exceeded"]
    assert st.no_converge is not None and st.no_converge["policy"] == "force"


async def test_round_limit_aborts_and_keeps_the_guest_here(tmp_path: Path, dest: Dest) -> None:
    """The default policy: a migration that cannot converge fails with its figures,
    and the guest never paused for it."""
    src = MemSourceVM(tmp_path / "src", "hot", pages=4096, dirty_pages_per_s=20000)
    try:
        _, st = await migrate(src, dest.server.port, downtime_ms=1, max_rounds=2, throttle=False,
                              bandwidth_mbps=40)
        assert st.phase == "failed" and (st.error or "").startswith("did not converge: dirty rate ")
        for word in ("MB/s", "link", "MiB remaining", "estimated pause", "budget 1 ms"):
            assert word in (st.error or ""), st.error
        nc = st.no_converge
        assert nc is not None and nc["policy"] == "abort" and nc["budget_ms"] == 1
        assert nc["dirty_rate_bytes_s"] > 0 and nc["link_rate_bytes_s"] > 0 and nc["remaining_bytes"] > 0
        assert src.running and not src.released and src.paused_count == 0
        await asyncio.wait_for(dest.done.wait(), 10)
        assert os.listdir(tmp_path / "dst") == []  # the destination destroyed its copy
    finally:
        src.close()


async def test_throttle_engages_when_dirtying_outpaces_sending(tmp_path: Path, dest: Dest) -> None:
    src = MemSourceVM(tmp_path / "src", "thr", pages=2048, dirty_pages_per_s=20000)
    try:
        mig, st = await migrate(src, dest.server.port, downtime_ms=1, pause_factor=10_000, max_rounds=6,
                                bandwidth_mbps=8, batch_pages=256, on_no_converge="force")
    finally:
        src.close()
    assert st.phase == "completed", st.error
    assert st.throttle_pct > 0 and mig.throttle.cycles > 0
    assert st.throttle_method == "stop-cont"  # a file "VM" has no QEMU process to put a quota on
    # every throttle stop was matched by a resume; then one real pause for stop-and-copy
    assert src.paused_count == src.resumed_count + 1
    assert st.digest_source == st.digest_destination


async def test_cut_while_throttled_leaves_source_running(tmp_path: Path, dest: Dest) -> None:
    src = MemSourceVM(tmp_path / "src", "thrcut", pages=2048, dirty_pages_per_s=20000)
    ch = await connect("127.0.0.1", dest.server.port, SECRET)
    st = MigrationStatus(id="m4", vm="thrcut", role="source")
    opts = {"downtime_ms": 1, "max_rounds": 50, "bandwidth_mbps": 8, "batch_pages": 256}
    mig = SourceMigration(src, ch, st, MigrationOptions.from_dict(opts))
    task = asyncio.create_task(mig.run())
    try:
        for _ in range(1000):
            if mig.throttle.cycles >= 2 or task.done():
                break
            await asyncio.sleep(0.01)
        assert mig.throttle.cycles >= 2, st.to_dict()
        ch.writer.transport.abort()
        await asyncio.wait_for(task, 20)
    finally:
        src.close()
    assert st.phase == "failed"
    assert not src.paused and src.paused_count == src.resumed_count
    await asyncio.wait_for(dest.done.wait(), 20)
    assert os.listdir(tmp_path / "dst") == []


async def test_admission_refused_leaves_source_running(tmp_path: Path, dest: Dest) -> None:
    (tmp_path / "dst" / "taken").mkdir(parents=True)
    src = MemSourceVM(tmp_path / "src", "taken", pages=256, dirty_pages_per_s=1000)
    try:
        _, st = await migrate(src, dest.server.port)
        assert st.phase == "failed" and "already exists" in (st.error or "")
        assert src.running and not src.released and src.paused_count == 0
    finally:
        src.close()


async def test_ram_file_reserved_while_pages_arrive(tmp_path: Path, dest: Dest,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination's RAM file is reserved in small steps while pre-copy runs, and
    each frame's pages ahead of that are reserved by the receiver before it writes them
    (``guard.ensure``): the background thread is held back until four frames were, so
    an unwired guard fails here. Bit-exact, and the whole file had its space before
    switchover."""
    monkeypatch.setattr(ramfile, "RESERVE_CHUNK", 64 * 1024)
    ahead: list[tuple[int, int]] = []  # ranges a writer reserved past the thread's progress
    four = threading.Event()
    local = threading.local()
    real_ensure, real_reserve = ramfile.Reservation.ensure, ramfile._reserve

    def ensure(self: ramfile.Reservation, start: int, end: int) -> None:
        if end > self.reserved:
            ahead.append((start, end))
            if len(ahead) >= 4:
                four.set()
        local.writer = True
        try:
            real_ensure(self, start, end)
        finally:
            local.writer = False

    def reserve(fd: int, path: Path, length: int, offset: int) -> None:
        if not getattr(local, "writer", False):  # the background thread: after four frames
            four.wait(10)
        real_reserve(fd, path, length, offset)

    monkeypatch.setattr(ramfile.Reservation, "ensure", ensure)
    monkeypatch.setattr(ramfile, "_reserve", reserve)
    dest.factory.reserve_later = True
    src = MemSourceVM(tmp_path / "src", "resv", pages=8192, dirty_pages_per_s=2000)
    try:
        _, st = await migrate(src, dest.server.port)
        await asyncio.wait_for(dest.done.wait(), 10)
    finally:
        four.set()
        src.close()
    assert st.phase == "completed", st.error
    assert st.digest_source == st.digest_destination and st.digest_source
    assert len(ahead) >= 4 and all(e > s for s, e in ahead), ahead
    dvm = dest.factory.vms["resv"]
    assert dvm.reservation is not None and dvm.reservation.complete
    assert "reserved_s" in dest.statuses[0].prepare_parts


async def test_the_guest_is_not_paused_before_the_ram_file_has_its_space(
        tmp_path: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pre-copy converges while the destination still reserves its RAM file's space
    (held here until the source waits): the source waits with the guest running, and
    pauses it only once the destination says the space is there, since the device
    state would wait for it with the guest paused (4 GiB: 143 ms of a 226 ms pause)."""
    monkeypatch.setattr(ramfile, "RESERVE_CHUNK", 64 * 1024)
    go = threading.Event()
    local = threading.local()
    real_ensure, real_reserve = ramfile.Reservation.ensure, ramfile._reserve
    real_wait = SourceMigration._wait_reserved
    waiting = asyncio.Event()
    paused_when_waiting: list[int] = []

    def ensure(self: ramfile.Reservation, start: int, end: int) -> None:
        local.writer = True
        try:
            real_ensure(self, start, end)
        finally:
            local.writer = False

    def reserve(fd: int, path: Path, length: int, offset: int) -> None:
        if not getattr(local, "writer", False):  # the background thread: held
            go.wait(30)
        real_reserve(fd, path, length, offset)

    async def wait_reserved(self: SourceMigration) -> None:
        paused_when_waiting.append(src.paused_count)
        waiting.set()
        await real_wait(self)

    monkeypatch.setattr(ramfile.Reservation, "ensure", ensure)
    monkeypatch.setattr(ramfile, "_reserve", reserve)
    monkeypatch.setattr(SourceMigration, "_wait_reserved", wait_reserved)
    dest.factory.reserve_later = True
    src = MemSourceVM(tmp_path / "src", "late", pages=4096, dirty_pages_per_s=0)
    run = asyncio.create_task(migrate(src, dest.server.port))
    try:
        await asyncio.wait_for(waiting.wait(), 30)
        assert not run.done() and src.paused_count == 0 and src.running
        go.set()
        _, st = await asyncio.wait_for(run, 30)
        await asyncio.wait_for(dest.done.wait(), 10)
    finally:
        go.set()
        src.close()
    assert st.phase == "completed", st.error
    assert st.digest_source == st.digest_destination and st.digest_source
    assert paused_when_waiting == [0] and st.prepare_parts["reserve_wait_s"] > 0
    assert src.paused_count == src.resumed_count + 1


async def test_ram_file_space_gone_fails_the_migration_before_switchover(
        tmp_path: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The space goes while the RAM file is being reserved (another tenant of the file
    system took it): the migration fails with that reason before the pause, the guest
    keeps running at the source, the destination destroys what it built."""
    monkeypatch.setattr(ramfile, "RESERVE_CHUNK", 64 * 1024)
    real = ramfile.os.posix_fallocate

    def full_past_1mib(fd: int, offset: int, length: int) -> None:
        if offset + length > 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, length)

    monkeypatch.setattr(ramfile.os, "posix_fallocate", full_past_1mib)
    dest.factory.reserve_later = True
    src = MemSourceVM(tmp_path / "src", "short", pages=8192, dirty_pages_per_s=2000)
    try:
        _, st = await migrate(src, dest.server.port)
        await asyncio.wait_for(dest.done.wait(), 10)
    finally:
        src.close()
    assert st.phase == "failed" and "not enough space for the RAM file" in (st.error or ""), st.error
    assert src.running and not src.released and src.paused_count == 0
    d = dest.statuses[0]
    assert d.phase == "failed" and "not enough space for the RAM file" in (d.error or "")
    assert dest.factory.vms["short"].destroyed
    assert os.listdir(tmp_path / "dst") == []


async def test_pages_arrive_while_the_destination_vm_starts(tmp_path: Path, dest: Dest) -> None:
    """A destination VM whose hypervisor is still starting (QEMU's 0.1-0.2 s here) takes
    pages into its RAM file meanwhile; device state waits for it; bit-exact at the end."""
    dest.factory.early = (0.3, None)
    src = MemSourceVM(tmp_path / "src", "early", pages=8192, dirty_pages_per_s=2000)
    try:
        _, st = await migrate(src, dest.server.port)
        await asyncio.wait_for(dest.done.wait(), 10)
    finally:
        src.close()
    assert st.phase == "completed", st.error
    assert st.digest_source == st.digest_destination and st.digest_source
    parts = dest.statuses[0].prepare_parts
    assert parts["prepared_s"] < 0.3 <= parts["listening_s"], parts


async def test_destination_vm_failing_to_start_fails_before_switchover(tmp_path: Path, dest: Dest) -> None:
    """Its hypervisor fails to start while pages arrive: the migration fails with that
    reason before the pause, the guest keeps running here, the destination is destroyed."""
    dest.factory.early = (0.2, RuntimeError("QEMU for early did not start: bad machine"))
    src = MemSourceVM(tmp_path / "src", "early", pages=16384, dirty_pages_per_s=2000)
    try:
        _, st = await migrate(src, dest.server.port, bandwidth_mbps=20)  # still in pre-copy at 0.2 s
        await asyncio.wait_for(dest.done.wait(), 10)
    finally:
        src.close()
    assert st.phase == "failed" and "did not start" in (st.error or ""), st.error
    assert src.running and not src.released and src.paused_count == 0
    assert dest.statuses[0].phase == "failed"
    assert dest.factory.vms["early"].destroyed
    assert os.listdir(tmp_path / "dst") == []


async def test_destination_vanishing_mid_precopy_rolls_back(tmp_path: Path, dest: Dest) -> None:
    """Cut the channel while pre-copy runs under a bandwidth cap: the source
    resumes, reports why, and the destination destroys what it built."""
    src = MemSourceVM(tmp_path / "src", "cut", pages=8192, dirty_pages_per_s=2000)
    ch = await connect("127.0.0.1", dest.server.port, SECRET)
    o = MigrationOptions.from_dict({"bandwidth_mbps": 4, "batch_pages": 256})
    st = MigrationStatus(id="m2", vm="cut", role="source")
    mig = SourceMigration(src, ch, st, o)
    task = asyncio.create_task(mig.run())
    try:
        for _ in range(500):  # wait (bounded) until pre-copy has sent something
            if st.phase == "precopy" and st.pages_sent > 0:
                break
            await asyncio.sleep(0.01)
        assert st.phase == "precopy"
        dest_ch = dest.statuses and dest.server  # the destination side is running
        assert dest_ch
        # cut: reset the TCP connection under both ends
        ch.writer.transport.abort()
        await asyncio.wait_for(task, 20)
        await asyncio.wait_for(dest.done.wait(), 20)
    finally:
        src.close()
    assert st.phase == "failed" and "lost" in (st.error or ""), st.error
    assert src.paused_count == 0 or src.resumed_count == src.paused_count
    assert not src.released and src.ram_path.exists()
    assert dest.statuses[0].phase == "failed"
    assert dest.factory.vms["cut"].destroyed
    assert os.listdir(tmp_path / "dst") == []


async def test_cancel_mid_precopy(tmp_path: Path, dest: Dest) -> None:
    src = MemSourceVM(tmp_path / "src", "cx", pages=8192, dirty_pages_per_s=2000)
    ch = await connect("127.0.0.1", dest.server.port, SECRET)
    st = MigrationStatus(id="m3", vm="cx", role="source")
    mig = SourceMigration(src, ch, st, MigrationOptions.from_dict({"bandwidth_mbps": 4, "batch_pages": 256}))
    task = asyncio.create_task(mig.run())
    try:
        for _ in range(500):
            if st.pages_sent > 0:
                break
            await asyncio.sleep(0.01)
        mig.cancel()
        await asyncio.wait_for(task, 20)
        await ch.close()
        await asyncio.wait_for(dest.done.wait(), 20)
    finally:
        src.close()
    assert st.phase == "cancelled"
    assert "abort" in (dest.statuses[0].error or "")
    assert os.listdir(tmp_path / "dst") == []


async def test_destination_failing_to_resume_gives_vm_back(tmp_path: Path, dest: Dest) -> None:
    """Even after 'go', a destination that reports failure has destroyed its copy,
    so the source resumes: the VM runs in exactly one place."""
    dest.factory.fail_resume = True
    src = MemSourceVM(tmp_path / "src", "nores", pages=1024, dirty_pages_per_s=1000)
    try:
        _, st = await migrate(src, dest.server.port)
    finally:
        src.close()
    assert st.phase == "failed" and "would not start" in (st.error or ""), st.error
    assert src.paused_count == 1 and src.resumed_count == 1 and src.running
    assert not src.released
    assert dest.factory.vms["nores"].destroyed and os.listdir(tmp_path / "dst") == []


def test_options_validation() -> None:
    assert MigrationOptions.from_dict(None).downtime_ms == 300
    for bad, msg in [
        ("x", "object"),
        ({"nope": 1}, "unknown option"),
        ({"max_rounds": 0}, "max_rounds"),
        ({"max_rounds": 2.5}, "integer"),
        ({"bandwidth_mbps": -1}, "bandwidth"),
        ({"bandwidth_mbps": "fast"}, "number"),
        ({"test_digest": 1}, "true or false"),
    ]:
        with pytest.raises(ValueError, match=msg):
            MigrationOptions.from_dict(bad)


async def test_relay_socket_in_vm_folder_replaces_stale_and_leaves_nothing(
        tmp_path: Path, dest: Dest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed agent's leftover relay socket does not block the next migration,
    and a failed migration leaves no relay socket (nor anything in /tmp)."""
    import tempfile

    from novacron.agent.migration.protocol import RELAY_SOCKET
    from tests.migration.test_relay_socket import leave_stale_socket

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # catch any /tmp use
    (tmp_path / "tmp").mkdir()
    dest.factory.fail_resume = True  # fails after the relay ran: the source keeps its folder
    src = MemSourceVM(tmp_path / "src", "sock", pages=512)
    stale = src.work_dir / RELAY_SOCKET
    if len(str(stale)) <= 107:
        leave_stale_socket(stale)
    else:
        stale.write_bytes(b"")
    try:
        _, st = await migrate(src, dest.server.port)
    finally:
        src.close()
    assert st.phase == "failed" and st.device_state_bytes == len(src.device_state), st.error
    assert not stale.exists() and src.running
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_pause_that_errors_still_resumes_the_source(tmp_path: Path, dest: Dest) -> None:
    """A pause command that fails after the vCPUs stopped must not strand the guest."""
    src = MemSourceVM(tmp_path / "src", "pz", pages=512)
    src.pause_error = RuntimeError("QMP stop timed out")
    try:
        _, st = await migrate(src, dest.server.port)
    finally:
        src.close()
    assert st.phase == "failed" and "QMP stop timed out" in (st.error or "")
    assert src.running and src.resumed_count == src.paused_count == 1
    await asyncio.wait_for(dest.done.wait(), 10)
    assert os.listdir(tmp_path / "dst") == []


async def test_unexpected_prepare_failure_is_reported(tmp_path: Path) -> None:
    """Not just admission refusals: any failure to build the destination VM ends
    the migration with a reason on both sides and frees the VM name there."""
    from novacron.agent.migration.manager import MigrationManager

    factory = MemDestFactory(tmp_path / "dst")
    factory.prepare_error = OSError(28, "No space left on device")

    async def no_source(name: str) -> MemSourceVM:
        raise AssertionError(name)

    mgr = MigrationManager(cluster_secret=SECRET, source_vm=no_source, dest_factory=factory,
                           **dest_grants())  # type: ignore[arg-type]
    await mgr.start()
    src = MemSourceVM(tmp_path / "src", "pf", pages=256)
    try:
        _, st = await migrate(src, mgr.data_port, grant=True)
        for _ in range(500):  # bounded: until the destination's handler has finished
            if not mgr.server._tasks:
                break
            await asyncio.sleep(0.01)
    finally:
        src.close()
        await mgr.close()
    assert st.phase == "failed" and "No space left" in (st.error or ""), st.error
    assert src.running and src.paused_count == 0
    d = mgr.get("m1")
    assert d is not None and d.phase == "failed" and "preparing the VM failed" in (d.error or "")
    assert not mgr.busy("pf")


class Renamed(MemSourceVM):
    """A source whose spec would build a VM of another name than the one it announces."""

    def spec(self) -> dict[str, object]:
        return {**super().spec(), "name": "someone-else"}


@pytest.mark.parametrize("case", ["wrong id", "wrong vm", "wrong spec name"])
async def test_prepare_outside_the_grant_is_refused(tmp_path: Path, case: str) -> None:
    """The destination builds only the granted migration of the granted VM: a prepare
    naming another id, another VM, or a spec of another VM is refused before anything
    is built, and the source's guest keeps running."""
    from novacron.agent.migration.manager import MigrationManager

    factory = MemDestFactory(tmp_path / "dst")

    async def no_source(name: str) -> MemSourceVM:
        raise AssertionError(name)

    mgr = MigrationManager(cluster_secret=SECRET, source_vm=no_source, dest_factory=factory,
                           **dest_grants())  # type: ignore[arg-type]
    await mgr.start()
    src = (Renamed if case == "wrong spec name" else MemSourceVM)(tmp_path / "src", "gb", pages=64)
    try:
        _, st = await migrate(src, mgr.data_port, grant=True,
                              granted_id="m-other" if case == "wrong id" else "m1",
                              granted_vm="gb-other" if case == "wrong vm" else None)
    finally:
        src.close()
        await mgr.close()
    want = {"wrong id": "grant is for migration 'm-other'", "wrong vm": "grant is for VM 'gb-other'",
            "wrong spec name": "the spec builds 'someone-else'"}[case]
    assert st.phase == "failed" and want in (st.error or ""), st.error
    assert src.running and src.paused_count == 0
    assert factory.vms == {} and mgr.statuses == {}
    assert not (tmp_path / "dst" / "someone-else").exists() and not mgr.busy("gb")


async def test_tls_data_port_admits_only_the_granted_source(tmp_path: Path) -> None:
    """With mutual TLS on the data port, a fleet host holding a valid grant for another
    source (the cluster secret too) is refused; the granted source migrates."""
    from novacron import pki, tls
    from novacron.agent.migration.manager import MigrationManager

    pki.init_ca(tmp_path / "pki")
    files = {n: pki.issue(tmp_path / "pki", n, ["127.0.0.1"]) for n in (DEST, "src", "intruder")}

    def client(name: str) -> ssl.SSLContext:
        return tls.client_context(str(files[name].ca), str(files[name].cert), str(files[name].key))

    cfg: Any = type("Cfg", (), {"tls_ca": str(files[DEST].ca), "tls_cert": str(files[DEST].cert),
                                "tls_key": str(files[DEST].key)})()
    factory = MemDestFactory(tmp_path / "dst")

    async def no_source(name: str) -> MemSourceVM:
        raise AssertionError(name)

    mgr = MigrationManager(cluster_secret=SECRET, source_vm=no_source, dest_factory=factory,
                           data_ssl=tls.server_context(cfg, require_client_cert=True),
                           **dest_grants())  # type: ignore[arg-type]
    await mgr.start()
    src = MemSourceVM(tmp_path / "src", "tv", pages=128)
    try:
        ch = await connect("127.0.0.1", mgr.data_port, SECRET, ssl=client("intruder"), server_name=DEST)
        try:
            await present_grant(ch, "tv")  # the grant names "src" as the source
            rec = await ch.recv(timeout=10)
        finally:
            await ch.close()
        assert rec.op == "error" and "'intruder'" in str(rec.ctrl), rec.ctrl
        assert factory.vms == {} and mgr.statuses == {}
        _, st = await migrate(src, mgr.data_port, grant=True, tls=client("src"))
    finally:
        src.close()
        await mgr.close()
    assert st.phase == "completed", st.error
