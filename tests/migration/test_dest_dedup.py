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
from novacron.agent.migration import source as source_mod
from novacron.agent.migration.dedupdest import PageIndex, _data_runs
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


def fill(vm: MemSourceVM, base: np.ndarray, own: float, seed: int) -> np.ndarray:
    """Give ``vm`` the image's pages except a fraction ``own`` of its own; returns
    which pages are its own."""
    mem = base.copy()
    rng = np.random.default_rng(seed)
    mine = rng.random(len(mem)) < own
    mem[mine] = rng.integers(0, 256, size=(int(mine.sum()), PAGE), dtype=np.uint8)
    vm.mm[:] = mem.tobytes()
    return mine


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

    async def warm(self) -> None:
        """Index the running VMs' RAM now (it happens in the background when the
        first migration arrives): hit counts then do not depend on that race."""
        self.index.refresh()
        await self.index.wait_indexed()

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
    return (await run_source(src, port, mid, **opts)).status


async def run_source(src: MemSourceVM, port: int, mid: str = "m1", **opts: object
                     ) -> SourceMigration:
    ch = await connect("127.0.0.1", port, SECRET)
    o = MigrationOptions.from_dict({"test_digest": True, **opts})
    st = MigrationStatus(id=mid, vm=src.name, role="source", options=o.as_dict())
    mig = SourceMigration(src, ch, st, o)
    try:
        await mig.run()
    finally:
        await ch.close()
    return mig


async def test_pages_the_destination_runs_are_not_sent(tmp_path: Path, host: Host) -> None:
    base = image(1)
    running = host.running_vm(tmp_path, base)
    await host.warm()
    wire = {}
    try:
        for dedup in (False, True):
            src = MemSourceVM(tmp_path / f"src{dedup}", f"vm{int(dedup)}", pages=PAGES)
            fill(src, base, own=0.2, seed=2)
            try:
                mig = await run_source(src, host.server.port, mid=f"m{int(dedup)}", dest_dedup=dedup)
            finally:
                src.close()
            st = mig.status
            assert st.phase == "completed", st.error
            # the pause estimate weighs a page still to send as data (random: ~4 KiB),
            # not as the average over pages that went as 36-byte digests
            assert mig._bytes_per_page() > 3500, (mig._bytes_per_page(), st.bytes_wire / st.pages_sent)
            assert st.digest_source == st.digest_destination
            wire[dedup] = st.bytes_wire
            # where the bytes went: the parts add up to the whole, and say what crossed
            parts = st.metrics()["wire_parts"]
            assert sum(v for k, v in parts.items() if not k.startswith("pages_")) == st.bytes_wire, parts
            assert parts.get("have", 0) == st.dedup["have_bytes"] and parts["device_state"] > 0, parts
            assert (parts.get("repairs", 0) > 0) == dedup and (parts.get("round1_data", 0) > 0) != dedup, parts
            assert parts.get("pages_packed", 0) + parts.get("pages_stored", 0) >= st.pages_sent - st.dedup["hits"]
            if not dedup:  # the option off: not one digest offered
                assert st.dedup["offered"] == 0 and not st.dedup["enabled"], st.dedup
            if dedup:
                d = st.metrics()["dest_dedup"]
                assert d["enabled"] and d["hits"] > 0.7 * d["offered"], d
                dest = host.statuses[-1].metrics()["dest_dedup"]
                assert dest["hits"] == d["hits"] and dest["index"]["memory_bytes"] > 0
        # between migrations the index maps no RAM file (a deleted VM frees its space)
        async with asyncio.timeout(10):  # once the destination side has wound up
            while not all(s.mm is None for s in host.index._slots.values()):
                await asyncio.sleep(0.02)
    finally:
        running.close()
    # 80 % of the pages are there already (a tenth of them zero, never sent anyway)
    print("wire bytes without/with dedup", wire)
    assert wire[True] < 0.35 * wire[False], wire


async def test_warming_indexes_running_vms_and_maps_nothing_after(tmp_path: Path) -> None:
    """``PageIndex.warm`` (POST /v1/host/dedup-index): the running VMs' RAM is hashed
    before any migration arrives, and no RAM file stays mapped afterwards."""
    h = Host(tmp_path / "dst")
    running = h.running_vm(tmp_path, image(8))
    try:
        stats = await h.index.warm()
    finally:
        running.close()
    assert stats["pages_indexed"] == PAGES and stats["files"] == 1, stats
    assert 0.8 * PAGES < stats["entries"] <= PAGES  # a tenth zero, all alike: one entry
    assert all(s.mm is None for s in h.index._slots.values())


def text_pages(seed: int, pages: int) -> np.ndarray:
    """Compressible pages: random sentences from a small vocabulary (zstd ~3x)."""
    rng = np.random.default_rng(seed)
    words = [bytes(rng.integers(97, 123, size=rng.integers(3, 9), dtype=np.uint8)) + b" " for _ in range(200)]
    out = np.empty((pages, PAGE), dtype=np.uint8)
    for i in range(pages):
        text = b"".join(words[j] for j in rng.integers(0, len(words), size=PAGE // 3))
        out[i] = np.frombuffer(text[:PAGE], dtype=np.uint8)
    return out


async def test_repairs_are_compressed_when_the_link_is_the_bound(tmp_path: Path, host: Host) -> None:
    """Half the guest is already at the destination, the other half is compressible
    text: the pages it needs (repairs) are weighed by the compression policy like any
    data (unseen, they all went stored and the exchange cost more than it saved on
    a real guest), so the exchange never costs more than it saves."""
    pages = 2048
    base = text_pages(9, pages)
    running = host.running_vm(tmp_path, base)
    await host.warm()
    wire = {}
    try:
        for dedup in (False, True):
            src = MemSourceVM(tmp_path / f"src{dedup}", f"tvm{int(dedup)}", pages=pages)
            mem = base.copy()
            mem[pages // 2:] = text_pages(10, pages - pages // 2)  # its own half
            src.mm[:] = mem.tobytes()
            try:
                st = await migrate(src, host.server.port, mid=f"t{int(dedup)}", dest_dedup=dedup,
                                   bandwidth_mbps=80, batch_pages=64)
            finally:
                src.close()
            assert st.phase == "completed", st.error
            assert st.digest_source == st.digest_destination
            wire[dedup] = st.bytes_wire
            if dedup:
                assert st.dedup["hits"] >= pages // 2 - 10, st.dedup
                # the 16 batches of its own pages went as repairs: the policy saw each
                assert st.pipeline["batches"] >= 16, st.pipeline
    finally:
        running.close()
    print("text guest, wire bytes without/with dedup", wire)
    assert wire[True] < 0.75 * wire[False], wire


async def test_cached_pages_that_change_are_repaired(tmp_path: Path, host: Host) -> None:
    """The destination's running VM writes its RAM all along (and 500 pages changed
    right after they were indexed): those stale entries are misses, the source
    sends those pages, and RAM still matches at switchover."""
    base = image(3)
    busy = MemSourceVM(tmp_path / "dst-running", "busy", pages=PAGES, dirty_pages_per_s=4000)
    busy.mm[:] = base.tobytes()
    host.running.append(busy.ram_path)
    src = MemSourceVM(tmp_path / "src", "vm1", pages=PAGES)
    mine = fill(src, base, own=0.1, seed=4)
    try:
        await host.warm()
        nonzero = np.flatnonzero(base.reshape(PAGES, -1).any(axis=1))
        for p in nonzero[:500]:  # indexed, then changed before anyone copies them
            busy.mm[int(p) * PAGE + 100] ^= 0xFF
        # those the source offers (it holds the image's content there, not its own):
        # each must be found stale; the busy VM's own writes add more, as many as time allows
        changed_offered = int((~mine[nonzero[:500]]).sum())
        st = await migrate(src, host.server.port)
    finally:
        src.close()
        busy.close()
    assert st.phase == "completed", st.error
    assert st.digest_source == st.digest_destination
    dest = host.statuses[-1].metrics()["dest_dedup"]
    assert changed_offered > 400
    assert dest["stale"] >= changed_offered and dest["hits"] > 0, dest
    assert st.metrics()["dest_dedup"]["repaired"] >= changed_offered


async def test_evacuation_sends_shared_pages_once(tmp_path: Path, host: Host) -> None:
    """Two VMs of one image migrate here at once over a capped link (nothing of them
    runs here yet); one of them writes its memory meanwhile. What the first one was
    asked for satisfies the second; both RAMs match. (Uncapped, the first would send
    its data straight away: pipeline.first_round_offer.)"""
    base = image(5)
    a = MemSourceVM(tmp_path / "a", "vma", pages=PAGES, dirty_pages_per_s=500)
    b = MemSourceVM(tmp_path / "b", "vmb", pages=PAGES)
    fill(a, base, own=0.1, seed=6)
    fill(b, base, own=0.1, seed=7)
    try:
        sa, sb = await asyncio.gather(
            migrate(a, host.server.port, mid="ma", downtime_ms=100, bandwidth_mbps=200),
            migrate(b, host.server.port, mid="mb", bandwidth_mbps=200))
    finally:
        a.close()
        b.close()
    for st in (sa, sb):
        assert st.phase == "completed", st.error
        assert st.digest_source == st.digest_destination
    hits = sa.metrics()["dest_dedup"]["hits"] + sb.metrics()["dest_dedup"]["hits"]
    # ~2,990 non-zero pages are the image's in both: one copy crosses, the other is
    # copied here (some of A's change before they land: those cross twice)
    print("evacuation wire bytes", sa.bytes_wire, sb.bytes_wire, "hits", hits)
    assert hits > 2000
    # without dedup: ~2 x 0.9 x 16 MiB of random pages (30 MB)
    assert sa.bytes_wire + sb.bytes_wire < 1.45 * PAGES * PAGE
    # they run here now: the next migration to arrive has their whole RAM indexed
    async with asyncio.timeout(10):  # (once the destination side has wound up)
        while host.index._incoming:
            await asyncio.sleep(0.02)
    host.running += [host.factory.vms[n].ram_path for n in ("vma", "vmb")]
    before = host.index.indexed_pages  # (what arrived as data was hashed when the other came)
    await host.warm()
    assert host.index.indexed_pages - before == 2 * PAGES, [
        (s.path, s.next_page, s.pages, s.mm is None) for s in host.index._slots.values()]


async def test_a_drain_offers_once_the_other_migrations_are_known(tmp_path: Path, host: Host,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Two VMs of one image to an empty destination, their requests together: each
    prepared before the other was known there, so nothing said to offer (as on an
    uncapped link, ``first_round_offer`` patched to say so). Once the other migration
    from this host to the same destination started, pages are offered: the image's
    pages cross once (sent as data, the destination did not index them and the second
    VM sent them again)."""
    monkeypatch.setattr(source_mod, "first_round_offer",
                        lambda index, capped: (False, "the destination holds no pages"))
    base = image(11)
    a = MemSourceVM(tmp_path / "a", "vda", pages=PAGES)
    b = MemSourceVM(tmp_path / "b", "vdb", pages=PAGES)
    fill(a, base, own=0.1, seed=12)
    fill(b, base, own=0.1, seed=13)
    try:
        sa, sb = await asyncio.gather(migrate(a, host.server.port, mid="da", bandwidth_mbps=100),
                                      migrate(b, host.server.port, mid="db", bandwidth_mbps=100))
    finally:
        a.close()
        b.close()
    for st in (sa, sb):
        assert st.phase == "completed", st.error
        assert st.digest_source == st.digest_destination
    hits = sa.dedup["hits"] + sb.dedup["hits"]
    reasons = {sa.dedup["first_round_reason"], sb.dedup["first_round_reason"]}
    assert "other migrations to the destination started" in reasons, reasons
    assert hits > 2000, (sa.dedup, sb.dedup)


async def test_a_late_second_vm_finds_what_the_first_sent_as_data(tmp_path: Path, host: Host,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A drain whose second VM starts only once the first sent three quarters of its pages as
    plain data (nothing said to offer: an empty destination on a fast link). When the
    second arrives, the destination hashes what the first received, so the second
    VM's image pages are copied there instead of crossing again (CI, 2 slow cores:
    the first VM was 2,400 pages ahead and only 1,354 pages hit)."""
    monkeypatch.setattr(source_mod, "first_round_offer",
                        lambda index, capped: (False, "the destination holds no pages"))
    base = image(21)
    a = MemSourceVM(tmp_path / "a", "vla", pages=PAGES)
    b = MemSourceVM(tmp_path / "b", "vlb", pages=PAGES)
    fill(a, base, own=0.1, seed=22)
    fill(b, base, own=0.1, seed=23)
    ch = await connect("127.0.0.1", host.server.port, SECRET)
    # small batches: few of A's pages are still to be encoded (as data) once B is known
    o = MigrationOptions.from_dict({"test_digest": True, "bandwidth_mbps": 50, "batch_pages": 256})
    st_a = MigrationStatus(id="la", vm="vla", role="source", options=o.as_dict())
    run_a = asyncio.create_task(SourceMigration(a, ch, st_a, o).run())
    try:
        async with asyncio.timeout(30):
            while st_a.pages_sent < 3 * PAGES // 4:
                await asyncio.sleep(0.01)
        sent_alone = st_a.pages_sent
        sb = await asyncio.wait_for(migrate(b, host.server.port, mid="lb", bandwidth_mbps=50), 60)
        await asyncio.wait_for(run_a, 60)
    finally:
        await ch.close()
        a.close()
        b.close()
    for st in (st_a, sb):
        assert st.phase == "completed", st.error
        assert st.digest_source == st.digest_destination
    # ~0.9 (non-zero) x 0.81 (neither VM's own) of A's first three quarters: ~2,240 pages B
    # need not send. Unindexed, they were needed: B could then hit only on A's last
    # quarter (offered once B was known), at most ~750
    from_a_data = 0.9 * 0.81 * sent_alone
    assert sb.dedup["hits"] > 0.8 * from_a_data, (sent_alone, st_a.dedup, sb.dedup, host.index.stats())


async def test_pages_awaited_from_a_failed_migration_are_needed_again(tmp_path: Path,
                                                                      host: Host) -> None:
    """VM2 offers content that VM1 was asked for and is still sending (slowly);
    VM1 is then cancelled: VM2's waiting pages are answered 'need' and repaired."""
    base = image(8)
    one = MemSourceVM(tmp_path / "one", "vm1", pages=PAGES)
    two = MemSourceVM(tmp_path / "two", "vm2", pages=PAGES)
    fill(one, base, own=0.0, seed=9)
    fill(two, base, own=0.1, seed=10)
    ch = await connect("127.0.0.1", host.server.port, SECRET)
    # 16 s of data: its pages stay in flight; small batches: the cancel takes effect soon
    o = MigrationOptions.from_dict({"bandwidth_mbps": 1.0, "batch_pages": 256})
    st1 = MigrationStatus(id="m1", vm="vm1", role="source", options=o.as_dict())
    mig1 = SourceMigration(one, ch, st1, o)
    run1 = asyncio.create_task(mig1.run())
    try:
        async with asyncio.timeout(30):
            while len(host.index.flights) < 1000:  # VM1 was asked for its pages
                await asyncio.sleep(0.05)
        run2 = asyncio.create_task(migrate(two, host.server.port, mid="m2"))
        async with asyncio.timeout(30):
            while not (host.statuses[-1].vm == "vm2"
                       and host.statuses[-1].dedup.get("waited", 0) > 500):
                await asyncio.sleep(0.05)
        mig1.cancel()
        st2 = await asyncio.wait_for(run2, 60)
        await asyncio.wait_for(run1, 30)
    finally:
        await ch.close()
        one.close()
        two.close()
    assert st1.phase in ("failed", "cancelled") and one.running  # it stays where it was
    assert st2.phase == "completed", st2.error
    assert st2.digest_source == st2.digest_destination
    d2 = host.statuses[-1].metrics()["dest_dedup"]
    assert d2["waited"] > 500 and d2["needed"] > 500, d2
    assert not host.index.flights  # nothing of VM1 is promised any more


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NOVACRON_DEDUP_BENCH"),
                    reason="measurement: set NOVACRON_DEDUP_BENCH=1 (prints the table)")
async def test_wire_bytes_table(tmp_path: Path) -> None:
    """Wire bytes with and without destination-side dedup: one VM to a host that runs
    a VM of the same image (80 % of pages identical), and 2 and 4 VMs of one image
    evacuated at once to an empty host. Guests: NOVACRON_DEDUP_BENCH_MB (64) MiB of
    random pages, a tenth zero, 20 % of each VM's own."""
    mb = int(os.environ.get("NOVACRON_DEDUP_BENCH_MB", "64"))
    pages = mb * 256
    base = image(11, pages)
    rows = []
    for case, n, running in (("1 VM, same image runs there", 1, True),
                             ("2-VM evacuation", 2, False), ("4-VM evacuation", 4, False)):
        for dedup in (False, True):
            root = tmp_path / f"{n}{running}{dedup}"
            root.mkdir()
            host = Host(root / "dst", max_mb=64)
            await host.server.start()
            mm = host.running_vm(root, base) if running else None
            await host.warm()
            srcs = []
            for i in range(n):
                vm = MemSourceVM(root / f"s{i}", f"vm{i}", pages=pages)
                fill(vm, base, own=0.2, seed=100 + i)
                srcs.append(vm)
            t0 = asyncio.get_running_loop().time()
            try:
                # idle guests: the device state alone may exceed 300 ms on a busy machine
                sts = await asyncio.gather(*(migrate(vm, host.server.port, mid=f"m{i}",
                                                     dest_dedup=dedup, downtime_ms=2000,
                                                     on_no_converge="force")
                                             for i, vm in enumerate(srcs)))
            finally:
                for vm in srcs:
                    vm.close()
                if mm is not None:
                    mm.close()
                await host.server.close()
            secs = asyncio.get_running_loop().time() - t0
            for s in sts:
                assert s.phase == "completed" and s.digest_source == s.digest_destination, s.error
            wire = sum(s.bytes_wire for s in sts)
            hits = sum(s.metrics()["dest_dedup"].get("hits", 0) for s in sts)
            index_mb = host.index.stats()["memory_bytes"] / 2**20
            rows.append((case, dedup, wire, hits, secs, index_mb))
    print(f"\n{'case':32} {'dedup':>5} {'wire MB':>9} {'ratio':>6} {'hits':>7} {'s':>6} {'index MiB':>9}")
    for case, dedup, wire, hits, secs, index_mb in rows:
        off = next(r[2] for r in rows if r[0] == case and not r[1])
        print(f"{case:32} {dedup!s:>5} {wire / 1e6:9.2f} {wire / off:6.3f} {hits:7d} {secs:6.2f} "
              f"{index_mb:9.2f}")
    print("load average:", os.getloadavg())


async def test_source_refuses_answers_to_pages_it_did_not_offer(tmp_path: Path) -> None:
    """The source checks every 'need': its batch awaits an answer, its pages were
    offered there and not answered yet, answers come in order; hits are what a
    final answer leaves."""
    from novacron.agent.channel.records import ProtocolError
    from novacron.agent.migration import protocol

    vm = MemSourceVM(tmp_path / "s", "vm", pages=64)
    try:
        o = MigrationOptions()
        mig = SourceMigration(vm, None, MigrationStatus(id="m", vm="vm", role="source"), o)  # type: ignore[arg-type]
        mig._outstanding = {0: (np.array([1, 2, 3], np.uint32), np.zeros(3, bool))}
        for bad in (protocol.need_message(1, 0, [1], False),  # no such batch
                    protocol.need_message(0, 1, [1], False),  # out of order
                    protocol.need_message(0, 0, [9], False)):  # not offered
            with pytest.raises(ProtocolError):
                mig._on_need(bad)
            mig._need_seq = 0
        mig._on_need(protocol.need_message(0, 0, [2], False))
        with pytest.raises(ProtocolError):  # page 2 was answered already
            mig._on_need(protocol.need_message(0, 1, [2], True))
        mig._need_seq = 1
        mig._on_need(protocol.need_message(0, 1, [], True))
        assert not mig._outstanding and mig.dd["hits"] == 2 and mig.dd["needed"] == 1
        assert [list(p) for _, p in mig._repairs] == [[2]]
    finally:
        vm.close()


async def test_indexing_reads_no_hole_of_a_ram_file() -> None:
    """A RAM file's holes are never read (on tmpfs a read would allocate the page, and
    with the file system full kill the agent with SIGBUS): 4 pages written of 256, 4
    pages indexed, the file still holding 4 pages."""
    path = Path(f"/dev/shm/novacron-test-holes-{os.getpid()}")
    try:
        with open(path, "wb") as f:
            f.truncate(256 * PAGE)
            f.seek(100 * PAGE)
            f.write(np.random.default_rng(5).integers(0, 256, 4 * PAGE, dtype=np.uint8).tobytes())
        assert os.stat(path).st_blocks * 512 == 4 * PAGE
        index = PageIndex(4, lambda: [path])
        stats = await index.warm()
        assert stats["entries"] == 4 and stats["pages_indexed"] == 256, stats
        assert os.stat(path).st_blocks * 512 == 4 * PAGE  # no hole was read
        st = os.stat(path)
        assert _data_runs(path, (st.st_dev, st.st_ino), 0, 256) == [(100, 4)]
        assert _data_runs(path, (st.st_dev, st.st_ino), 101, 102) == [(101, 1)]
        assert _data_runs(path, (st.st_dev, st.st_ino + 1), 0, 256) == []  # another file now
    finally:
        path.unlink(missing_ok=True)
