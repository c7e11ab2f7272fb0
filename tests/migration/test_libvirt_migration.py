"""libvirt's own live migration, run by the agent's driver between two real
libvirtd instances the test starts (own dirs, sockets and host UUIDs): a
cancelled migration leaves the domain running where it was; a completed one
moves it, and the guest's own page checks go on passing at the destination."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.agent.guest import ensure_guest
from novacron.agent.hypervisors.libvirt import LibvirtHost
from novacron.agent.hypervisors.libvirt_migration import (
    TCG_DIRTY_FIX_VERSION,
    LibvirtMigrationOptions,
    LibvirtMigrations,
    LibvirtPeer,
)
from novacron.agent.vm.errors import VMConflict, VMError, VMNotFound
from tests.libvirtd import LibvirtDaemon, SharedDir, have_libvirtd

VERIFY = re.compile(r"NOVACRON-VERIFY boot=(\w+) pages=\d+ bad=(\d+) result=(\w+)")
HB = re.compile(r"NOVACRON-HB boot=(\w+) seq=(\d+) uptime=[\d.]+ ok=(\d) bad=(\d+) passes=(\d+)")


def test_options_are_validated_and_mapped() -> None:
    for bad in ({"bandwidth_mbps": -1}, {"compression": "lz4"}, {"parallel_connections": 1},
                {"downtime_ms": "300"}, {"auto_converge": 1}, {"nope": 1}, [1],
                {"postcopy_after_s": 2}):
        with pytest.raises(ValueError):
            LibvirtMigrationOptions.from_dict(bad)
    import libvirt as lv

    peer = LibvirtPeer.parse("b", "qemu+tls://b.example/system tcp://10.0.0.2:49152")
    opts = LibvirtMigrationOptions.from_dict({"bandwidth_mbps": 50, "compression": "xbzrle",
                                              "parallel_connections": 4, "postcopy": True,
                                              "tls": True})
    flags, params = opts.flags_and_params(lv, peer)
    for f in (lv.VIR_MIGRATE_LIVE, lv.VIR_MIGRATE_PEER2PEER, lv.VIR_MIGRATE_AUTO_CONVERGE,
              lv.VIR_MIGRATE_COMPRESSED, lv.VIR_MIGRATE_PARALLEL, lv.VIR_MIGRATE_POSTCOPY,
              lv.VIR_MIGRATE_PERSIST_DEST, lv.VIR_MIGRATE_TLS):
        assert flags & f
    plain, _ = LibvirtMigrationOptions.from_dict({"auto_converge": False, "persist": False}).flags_and_params(lv, peer)
    assert plain == lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER
    assert params == {lv.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2:49152", lv.VIR_MIGRATE_PARAM_BANDWIDTH: 50,
                      lv.VIR_MIGRATE_PARAM_COMPRESSION: "xbzrle", lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 4}
    # peers come from the config only, and only in these shapes
    for bad_peer in ("file:///etc/passwd", "qemu:///system tcp://x;rm", "qemu:///system tcp://a b c", ""):
        with pytest.raises(ValueError):
            LibvirtPeer.parse("x", bad_peer)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def shared() -> Iterator[SharedDir]:
    s = SharedDir(ensure_guest())
    yield s
    s.remove()


@pytest.fixture
def daemons() -> Iterator[tuple[LibvirtDaemon, LibvirtDaemon]]:
    started: list[LibvirtDaemon] = []
    try:
        for name in ("a", "b"):
            started.append(LibvirtDaemon(name).start())
        yield started[0], started[1]
    finally:
        for d in started:
            d.stop()
        assert all(d.pids() == [] for d in started)


async def wait_hb(shared: SharedDir, name: str, offset: int, timeout: float,
                  min_passes: int = 0) -> re.Match[str]:
    """The last heartbeat after ``offset`` whose page-check pass count reached ``min_passes``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in HB.finditer(shared.read_log(name, offset)) if int(m.group(5)) >= min_passes]
        if found:
            return found[-1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"no heartbeat with passes>={min_passes} from {name} within {timeout} s: "
                         f"{shared.read_log(name, offset)[-600:]!r}")


async def wait_done(migs: LibvirtMigrations, mig_id: str, timeout: float) -> dict[str, object]:
    task = migs.get(mig_id).task
    assert task is not None
    await asyncio.wait_for(asyncio.shield(task), timeout)
    return migs.get(mig_id).status.to_dict()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not have_libvirtd(), reason="needs libvirtd, virsh and root (to run it as nobody)")
async def test_cancelled_then_completed_live_migration(daemons: tuple[LibvirtDaemon, LibvirtDaemon],
                                                       shared: SharedDir) -> None:
    a, b = daemons
    assert a.host_uuid != b.host_uuid
    a.define(shared.domain_xml("mig1", mem_mb=24, rate_mb=2))
    peer = f"{b.uri} tcp://127.0.0.1:{free_port()}"
    async with LibvirtHost(a.uri) as src, LibvirtHost(b.uri) as dst:
        migs = LibvirtMigrations(src, {"b": peer})
        # bad requests: a clear error, nothing started
        for bad, err in (({"vm": "mig1", "peer": "elsewhere"}, "libvirt_peers"),
                         ({"vm": "mig1", "peer": "b", "options": {"downtime_ms": 0}}, "downtime_ms"),
                         ({"vm": "mig1", "peer": b.uri}, "libvirt_peers")):
            with pytest.raises(VMError, match=err):
                migs.start(bad)
        assert migs.jobs == {}
        # not adopted: libvirt's engine is not asked to move it
        mig = migs.start({"vm": "mig1", "peer": "b"})
        st = await wait_done(migs, mig.status.id, 30)
        assert st["phase"] == "failed" and "adopt it first" in str(st["error"])

        await src.adopt("mig1")
        await src.start("mig1")
        first = await wait_hb(shared, "mig1", 0, timeout=120, min_passes=1)
        boot = first.group(1)

        # 1) cancelled: a 1 MiB/s cap keeps it in pre-copy until we abort it
        mig = migs.start({"vm": "mig1", "peer": "b", "options": {"bandwidth_mbps": 1, "auto_converge": False}})
        deadline = time.monotonic() + 60
        while not (mig.status.phase == "precopy" and mig.status.bytes_wire > 0):
            assert time.monotonic() < deadline and not mig.status.done, mig.status.to_dict()
            await asyncio.sleep(0.1)
        assert mig.status.pages_total > 0 and mig.status.native["bytes_remaining"] > 0
        with pytest.raises(VMConflict, match="migrating already"):
            migs.start({"vm": "mig1", "peer": "b"})
        st_obj = await mig.cancel()
        assert st_obj.phase == "cancelled", st_obj.to_dict()
        assert st_obj.native["source_state_after"] == "running"
        assert (await src.get("mig1"))["state"] == "running"
        with pytest.raises(VMNotFound):
            await dst.get("mig1")  # nothing left at the destination
        with pytest.raises(VMConflict):
            await mig.cancel()
        size = shared.log("mig1").stat().st_size
        still = await wait_hb(shared, "mig1", size, timeout=30)
        assert still.group(1) == boot and still.group(3) == "1"

        # 2) failed: post-copy needs userfaultfd at the destination, which an unprivileged
        # QEMU lacks here (vm.unprivileged_userfaultfd = 0); the domain stays at the source
        if Path("/proc/sys/vm/unprivileged_userfaultfd").read_text().strip() == "0":
            mig = migs.start({"vm": "mig1", "peer": "b", "options": {"postcopy": True, "postcopy_after_s": 0.5}})
            st = await wait_done(migs, mig.status.id, 60)
            assert st["phase"] == "failed" and mig.status.native["source_state_after"] == "running", st
            print(f"post-copy refused: {st['error']}")
            assert (await src.get("mig1"))["state"] == "running"
            with pytest.raises(VMNotFound):
                await dst.get("mig1")
            size = shared.log("mig1").stat().st_size
            still = await wait_hb(shared, "mig1", size, timeout=30)
            assert still.group(1) == boot and still.group(3) == "1"

        # 3) completed: the domain moves, its guest checks all its pages again there
        mig = migs.start({"vm": "mig1", "peer": "b", "id": "move-1",
                          "options": {"downtime_ms": 500, "bandwidth_mbps": 200,
                                      "compression": "xbzrle"}})
        st = await wait_done(migs, "move-1", 120)
        assert st["phase"] == "completed", st
        m = st["metrics"]
        assert isinstance(m, dict)
        print(f"libvirt live migration: total_s={m['total_s']} downtime_ms={m['downtime_ms']} "
              f"bytes_wire={m['bytes_wire']} pages={m['pages']} rounds={st['round']}")  # -s shows it
        assert m["bytes_wire"] > 0 and m["pages"] > 0 and m["downtime_ms"] is not None and m["downtime_ms"] > 0
        assert mig.status.native["engine"] == "libvirt" and mig.status.native["bytes_remaining"] == 0
        # a TCG domain on a QEMU whose pre-copy loses guest writes is flagged (see TCG_LOST_WRITES)
        qemu = await src._call(src.conn.getVersion)
        assert ("tcg_lost_writes" in mig.status.native) == (qemu < TCG_DIRTY_FIX_VERSION), (qemu, mig.status.native)
        moved = await dst.get("mig1")
        assert moved["state"] == "running" and moved["adopted"] is True and moved["persistent"] is True
        with pytest.raises(VMNotFound):
            await src.get("mig1")  # persisted at the destination, undefined at the source
        size = shared.log("mig1").stat().st_size
        # the same boot, page checks ok, and two full passes over all pages after landing
        landed = await wait_hb(shared, "mig1", size, timeout=30)
        after = await wait_hb(shared, "mig1", size, timeout=60, min_passes=int(landed.group(5)) + 2)
        assert after.group(1) == boot and after.group(3) == "1" and after.group(4) == "0"
        # and a full check on demand, typed on its console through the destination's libvirt
        size = shared.log("mig1").stat().st_size
        v = None
        for _attempt in range(3):  # a console keystroke can be lost under load: type it again
            assert await dst.send_console("mig1", "verify\n") == 7
            deadline = time.monotonic() + 10
            while not (v := VERIFY.search(shared.read_log("mig1", size))) and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if v:
                break
        assert v is not None, shared.read_log("mig1", size)[-600:]
        assert v.group(1) == boot and v.group(2) == "0" and v.group(3) == "ok"
        await migs.close()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not have_libvirtd(), reason="needs libvirtd, virsh and root (to run it as nobody)")
async def test_postcopy_switch_through_libvirt(shared: SharedDir) -> None:
    """With userfaultfd allowed to the daemons' QEMUs (see LibvirtDaemon's ``userfaultfd``),
    libvirt switches a slow pre-copy to post-copy and the guest carries on at the destination.
    Its RAM is anonymous: userfaultfd's missing-page mode covers anonymous memory, tmpfs and
    hugetlbfs only, so a shared RAM file on a disk file system fails there ("userfault
    register: Invalid argument")."""
    started: list[LibvirtDaemon] = []
    try:
        for name in ("a", "b"):
            started.append(LibvirtDaemon(name, userfaultfd=True).start())
        a, b = started
        a.define(shared.domain_xml("pc1", mem_mb=24, rate_mb=2))
        async with LibvirtHost(a.uri) as src, LibvirtHost(b.uri) as dst:
            migs = LibvirtMigrations(src, {"b": f"{b.uri} tcp://127.0.0.1:{free_port()}"})
            await src.adopt("pc1")
            await src.start("pc1")
            first = await wait_hb(shared, "pc1", 0, timeout=120, min_passes=1)
            # 2 MiB/s keeps 128 MiB in pre-copy for a minute: only the switch ends it soon
            mig = migs.start({"vm": "pc1", "peer": "b", "options": {
                "postcopy": True, "postcopy_after_s": 1, "bandwidth_mbps": 2, "auto_converge": False}})
            st = await wait_done(migs, mig.status.id, 60)
            assert st["phase"] == "completed", st
            assert mig.status.native.get("postcopy") is True, mig.status.native
            assert (await dst.get("pc1"))["state"] == "running"
            with pytest.raises(VMNotFound):
                await src.get("pc1")
            size = shared.log("pc1").stat().st_size
            after = await wait_hb(shared, "pc1", size, timeout=60, min_passes=int(first.group(5)) + 1)
            assert after.group(1) == first.group(1) and after.group(3) == "1" and after.group(4) == "0"
            await migs.close()
    finally:
        for d in started:
            d.stop()
        assert all(d.pids() == [] for d in started)
