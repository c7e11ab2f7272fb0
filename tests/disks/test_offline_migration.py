"""Offline (cold) migration of a stopped VM with its local qcow2 disk: a real coordinator, two agents.

The guest writes checksummed blocks to its 64 MiB local disk and is stopped gracefully;
the copy goes over the agents' migration channel (grant, mutual auth, encrypted DATA
records) into an NBD export at the target. Afterwards the target's disk holds exactly
the source's data (``qemu-img compare``), only allocated clusters crossed (the bytes on
the channel stay far below the disk's size), and the VM boots there and its disk
verifier passes. An overlay's copy sends only its own clusters. A copy that fails (the
target's disk full, the target killed mid-copy) leaves the VM stopped on the source with
its disk unchanged, and nothing at the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from novacron.agent.local import LocalAgent
from novacron.coordinator.client import ApiClientError, CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.disks.test_disk_migration import (
    BLOCKS,
    VM,
    agent,
    assert_nothing_left,
    spec,
    verified_after,
)
from tests.migration.agents import Api

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
DISK_BYTES = 64 << 20


@pytest.fixture(scope="module")
def images() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nc-oimg-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def disk_of(a: LocalAgent) -> Path:
    return a.state_dir / "vms" / VM / "disk0.qcow2"


def same(x: Path, y: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(x), str(y)],
                          capture_output=True, text=True, timeout=120)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(images: Path) -> AsyncIterator[tuple[CoordinatorClient, LocalAgent, LocalAgent]]:
    """A real coordinator and two agents (``oa``, ``ob``) registered with it."""
    coord = LocalCoordinator(images / "coord", settings={"heartbeat_interval_s": "1", "poll_interval_s": "0.1"})
    try:
        await coord.start()
        link = {"coordinator_url": coord.url, "coordinator_token": coord.agent_token}
        async with agent("oa", images, settings=link) as a, agent("ob", images, settings=link) as b, \
                CoordinatorClient(coord.url, coord.admin_token) as client:
            deadline = time.monotonic() + 60
            while {h["name"] for h in await client.hosts()} != {"oa", "ob"}:
                assert time.monotonic() < deadline, "agents did not register"
                await asyncio.sleep(0.1)
            yield client, a, b
    finally:
        coord.stop()


async def test_stopped_vm_moves_offline_with_its_disk(
        images: Path, fleet: tuple[CoordinatorClient, LocalAgent, LocalAgent]) -> None:
    client, a, b = fleet
    api_a, api_b = Api(a), Api(b)
    await client.create_vm({**spec(images, ref=False), "host": "oa"})
    await verified_after(api_a, 0, passes=1)
    stopped = await client.request("POST", f"/vms/{VM}/stop?timeout_s=60")
    assert stopped["state"] == "stopped" and stopped["outcome"]["graceful"] is True, stopped
    before = images / "before.qcow2"  # the source forgets the VM (and its disk) once moved
    shutil.copyfile(disk_of(a), before)

    mig = await client.migrate(VM, "ob")
    assert mig["phase"] == "completed" and mig["options"].get("offline") is True, mig
    st = await api_a.ok("GET", f"/v1/migrations/{mig['id']}")  # the copy, as the source ran it
    sent = st["metrics"]["disk_bytes"]
    # the guest wrote within its first BLOCKS blocks (8 MiB); the other 56 MiB never crossed
    assert 0 < sent < BLOCKS * 4096 + (4 << 20), sent
    print(f"offline copy: {sent} B over the channel for a {DISK_BYTES} B disk, "
          f"total {st['metrics']['total_s']} s")
    record = await client.vm(VM)
    assert record["host"] == "ob" and record["state"] == "stopped", record
    assert (await a.request("GET", f"/v1/vms/{VM}"))[0] == 404
    assert not (a.state_dir / "vms" / VM).exists()
    incoming = b.state_dir / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    done = same(before, disk_of(b))  # byte for byte what the guest left on the source
    assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)

    started = await client.request("POST", f"/vms/{VM}/start")
    assert started["state"] == "running" and started["host"] == "ob"
    await verified_after(api_b, 0, passes=1)
    await client.request("POST", f"/vms/{VM}/stop?force=true")
    await client.request("DELETE", f"/vms/{VM}")
    before.unlink()


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_seed(images: Path) -> Path:
    seed = images / "oseed.qcow2"
    if not seed.exists():
        raw = images / "oseed.raw"
        with raw.open("wb") as f:
            for _ in range(128):
                f.write(os.urandom(1 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(seed)], check=True)
        raw.unlink()
    return seed


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def seeded(images: Path) -> AsyncIterator[LocalAgent]:
    """A stopped VM whose local disk holds 128 MiB of incompressible data (a copy long
    enough for a fault to land in it). It never boots: the sha256 of its disk file shows
    it unchanged, and the guest's own check of a moved disk is the first test's."""
    seed = make_seed(images)
    async with agent("fsrc", images) as a:
        await Api(a).ok("POST", "/v1/vms", {**spec(images, ref=False, seed=seed.name), "start": False}, want=201)
        # a target holding the image would get its clusters as digests (diskdedup.py):
        # the copy would end before a fault could land in it
        seed.unlink()
        yield a


async def assert_source_whole(a: LocalAgent, before: str) -> None:
    vm = await Api(a).ok("GET", f"/v1/vms/{VM}")
    assert vm["state"] == "stopped", vm
    assert digest(disk_of(a)) == before
    assert not list((a.state_dir / "vms" / VM).glob("nbd-relay-*"))


async def test_target_disk_full_during_offline_copy(seeded: LocalAgent, images: Path) -> None:
    """The target's state dir is a 64 MiB tmpfs: the 128 MiB of data cannot fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting the small tmpfs needs root")
    api = Api(seeded)
    before = digest(disk_of(seeded))
    mnt = Path(tempfile.mkdtemp(prefix="nc-ofull-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "nc-test-ofull", str(mnt)], check=True)
    try:
        async with agent("ofull", images, state_dir=mnt) as dst:
            mig = await api.migrate(VM, dst, offline=True)
            st = await api.wait_migration(mig["id"], timeout=120)
            assert st["phase"] == "failed", st
            print("target disk full:", st["error"])
            assert "No space left on device" in st["error"] and "internal error" not in st["error"], st
            await assert_source_whole(seeded, before)
            for _ in range(100):  # the target removes its copy once it sees the failure
                if not (dst.state_dir / "incoming" / VM).exists():
                    break
                await asyncio.sleep(0.1)
            await assert_nothing_left(dst)
            assert (await dst.request("GET", f"/v1/vms/{VM}"))[0] == 404
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


async def test_target_killed_during_offline_copy(seeded: LocalAgent, images: Path) -> None:
    api = Api(seeded)
    before = digest(disk_of(seeded))
    dst = agent("fkill", images)
    await dst.start()
    try:
        mig = await api.migrate(VM, dst, offline=True)
        st = await api.wait_migration(mig["id"], until=lambda s: s["metrics"]["disk_bytes"] > (8 << 20))
        assert st["phase"] == "precopy", st
        dst.kill()
        st = await api.wait_migration(mig["id"], timeout=60)
        assert st["phase"] == "failed", st
        print("target killed:", st["error"])
        await assert_source_whole(seeded, before)
        await dst.start()  # the next agent removes the half-copied disk
        await assert_nothing_left(dst)
        assert (await dst.request("GET", f"/v1/vms/{VM}"))[0] == 404
    finally:
        await dst.stop()


async def test_overlay_moves_offline_without_its_backing_image(images: Path) -> None:
    """A stopped VM's qcow2 overlay on a 16 MiB backing image both hosts hold: only the
    overlay's clusters cross, among them a zeroed one that must keep hiding the backing
    data at the target. No guest runs: the host writes the overlay (qemu-io)."""
    base = images / "obase.qcow2"
    raw = images / "obase.raw"
    raw.write_bytes(os.urandom(16 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)], check=True)
    raw.unlink()
    doc = {**spec(images, ref=False), "disks": [{"backing": base.name}], "start": False}
    async with agent("ova", images) as a, agent("ovb", images) as b:
        await Api(a).ok("POST", "/v1/vms", doc, want=201)
        full = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(disk_of(a))},
                           "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": str(base)}}})
        subprocess.run(["qemu-io", "-c", "write -P 0x5a 1M 1M", "-c", "write -z 8M 1M", f"json:{full}"],
                       check=True, capture_output=True)
        mig = await Api(a).migrate(VM, b, offline=True)
        st = await Api(a).wait_migration(mig["id"], timeout=120)
        assert st["phase"] == "completed", st["error"]
        sent = st["metrics"]["disk_bytes"]
        assert (1 << 20) <= sent < (3 << 20), sent  # the 1 MiB written, not the 16 MiB base
        moved = disk_of(b)
        top = json.loads(subprocess.run(
            ["qemu-img", "map", "--output=json", "json:" + json.dumps(
                {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(moved)}})],
            capture_output=True, text=True, check=True).stdout)
        # allocated in the overlay itself: the written MiB as data, the zeroed MiB as zero
        # clusters; the rest reads through to the target's own backing image
        allocated = sorted((e["start"], e["length"], e["data"]) for e in top if e["present"])
        assert allocated == [(1 << 20, 1 << 20, True), (8 << 20, 1 << 20, False)], top
        mine = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(moved)},
                           "backing": {"driver": "qcow2", "file": {"driver": "file", "filename": str(base)}}})
        done = subprocess.run(["qemu-img", "compare", f"json:{full}", f"json:{mine}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)
        info = subprocess.run(["qemu-img", "info", "--output=json", str(moved)],
                              capture_output=True, text=True, check=True).stdout
        assert f'"backing-filename": "{base.name}"' in info


async def test_copy_of_an_image_both_hosts_hold_moves_offline_by_digest(images: Path) -> None:
    """A stopped VM's local disk is a copy of a 64 MiB image both hosts hold, rewritten
    here and there by the host (qemu-io): only what differs from the image crosses, the
    rest as digests (diskdedup.py), and the target's disk is byte for byte the source's."""
    tpl = images / "otpl.qcow2"
    raw = images / "otpl.raw"
    raw.write_bytes(os.urandom(64 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    raw.unlink()
    doc = {**spec(images, ref=False, seed=tpl.name), "start": False}
    async with agent("oda", images) as a, agent("odb", images) as b:
        await Api(a).ok("POST", "/v1/vms", doc, want=201)
        # 2 MiB rewritten, 1 MiB zeroed, and 100 bytes that leave one cluster partly the image's
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 3M 2M", "-c", "write -z 20M 1M",
                        "-c", "write -P 0x11 40000 100", str(disk_of(a))], check=True, capture_output=True)
        before = images / "obefore.qcow2"
        shutil.copyfile(disk_of(a), before)
        mig = await Api(a).migrate(VM, b, offline=True)
        st = await Api(a).wait_migration(mig["id"], timeout=120)
        assert st["phase"] == "completed", st["error"]
        m = st["metrics"]
        sent, named = m["disk_bytes"], m["disk_dedup"].get("clusters_named", 0)
        print(f"offline copy of an image both hold: {sent} B sent, {named} clusters named ({m['disk_dedup']})")
        # 1024 clusters: 32 rewritten, 16 zeroed, 1 partly rewritten; the rest named
        assert named == 1024 - 32 - 16 - 1, m["disk_dedup"]
        assert (2 << 20) <= sent < (3 << 20), sent
        done = same(before, disk_of(b))
        assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)
        # and back with the option off: every allocated cluster's bytes cross
        await Api(a).ok("DELETE", f"/v1/vms/{VM}")
        mig = await Api(b).migrate(VM, a, offline=True, disk_dedup=False)
        st = await Api(b).wait_migration(mig["id"], timeout=120)
        assert st["phase"] == "completed", st["error"]
        assert st["metrics"]["disk_dedup"] == {} and st["metrics"]["disk_bytes"] >= 60 << 20, st["metrics"]
        done = same(before, disk_of(a))
        assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)
        before.unlink()


async def test_copy_of_a_compressed_image_moves_offline_by_digest(images: Path) -> None:
    """Cloud images ship as compressed qcow2, whose clusters have no file offset to index
    or read back: the target makes an uncompressed copy of its image once
    (vm/expanded.py) and names every cluster of the disk from it."""
    tpl = images / "ocmp.qcow2"
    raw = images / "ocmp.raw"
    with raw.open("wb") as f:  # 256 clusters zlib shrinks, no two alike, no 4 KiB of zeroes
        for _ in range(256):
            f.write(os.urandom(8192) + b"novacron" * ((65536 - 8192) // 8))
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    raw.unlink()
    assert '"offset"' not in subprocess.run(["qemu-img", "map", "--output=json", str(tpl)], capture_output=True,
                                            text=True, check=True).stdout  # all compressed
    doc = {**spec(images, ref=False, seed=tpl.name), "start": False}
    index_dir = images / "oxb-index"  # on disk
    in_memory = Path("/dev/shm") / f"nc-oxa-index-{os.getpid()}"  # tmpfs, where guest RAM lives
    async with agent("oxa", images, settings={"disk_index_dir": str(in_memory)}) as a, \
            agent("oxb", images, settings={"disk_index_dir": str(index_dir)}) as b:
        await Api(a).ok("POST", "/v1/vms", doc, want=201)
        before = images / "ocmp-before.qcow2"
        shutil.copyfile(disk_of(a), before)
        mig = await Api(a).migrate(VM, b, offline=True)
        st = await Api(a).wait_migration(mig["id"], timeout=120)
        assert st["phase"] == "completed", st["error"]
        m = st["metrics"]
        print(f"offline copy of a compressed image: {m['disk_bytes']} B sent ({m['disk_dedup']})")
        assert m["disk_dedup"].get("clusters_named") == 256, m["disk_dedup"]
        assert m["disk_bytes"] < 1 << 20, m["disk_bytes"]  # of 16 MiB
        theirs = next(x for x in (await Api(b).ok("GET", "/v1/migrations"))["migrations"] if x["id"] == mig["id"])
        assert theirs["metrics"]["disk_dedup"]["expanded_copies_used"] == 1, theirs["metrics"]["disk_dedup"]
        assert (await Api(b).ok("GET", "/v1/host"))["disk_index_copies"]["copies"] == 1
        copies = list(index_dir.glob("*.raw"))
        assert len(copies) == 1 and copies[0].stat().st_blocks * 512 <= 17 << 20, copies
        done = same(before, disk_of(b))
        assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)
        # and back to oxa, whose disk_index_dir is on tmpfs: no copy there (it would take
        # the host's memory), so every cluster of the image crosses
        await Api(a).ok("DELETE", f"/v1/vms/{VM}")
        mig = await Api(b).migrate(VM, a, offline=True)
        st = await Api(b).wait_migration(mig["id"], timeout=120)
        assert st["phase"] == "completed", st["error"]
        assert st["metrics"]["disk_dedup"] == {} and st["metrics"]["disk_bytes"] >= 16 << 20, st["metrics"]
        assert (await Api(a).ok("GET", "/v1/host"))["disk_index_copies"]["copies"] == 0
        assert not in_memory.exists()
        done = same(before, disk_of(a))
        assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)
        before.unlink()


async def test_a_compressed_image_is_expanded_on_request_before_a_drain(images: Path) -> None:
    """``POST /v1/host/disk-index``: an operator has a host make its copy of a compressed
    image before migrations arrive; bad requests change nothing."""
    tpl = images / "owarm.qcow2"
    raw = images / "owarm.raw"
    with raw.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(8192) + b"novacron" * ((65536 - 8192) // 8))
    subprocess.run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    raw.write_bytes(os.urandom(1 << 20))  # a plain image: nothing to copy
    index_dir = images / "owarm-index"
    async with agent("owa", images, settings={"disk_index_dir": str(index_dir)}) as a:
        for bad in ({}, {"image": 7}, {"image": tpl.name, "more": 1}, {"image": "../owarm.qcow2"},
                    {"image": "/etc/passwd"}, {"image": "absent.qcow2"}):
            status, doc = await a.request("POST", "/v1/host/disk-index", bad)
            assert status == 400 and doc["error"], (bad, status, doc)
        assert not index_dir.exists()
        status, doc = await a.request("POST", "/v1/host/disk-index", {"image": tpl.name})
        assert status == 202 and doc["copy"] == "making" and doc["compressed_bytes"] == 4 << 20, doc
        for _ in range(300):
            copies = (await Api(a).ok("GET", "/v1/host"))["disk_index_copies"]
            if copies["copies"] == 1 and copies["making"] is None:
                break
            await asyncio.sleep(0.1)
        assert copies["copies"] == 1 and copies["making"] is None, copies
        status, doc = await a.request("POST", "/v1/host/disk-index", {"image": tpl.name})
        assert (status, doc["copy"]) == (200, "ready"), doc
        status, doc = await a.request("POST", "/v1/host/disk-index", {"image": raw.name})
        assert (status, doc["copy"], doc["clusters_indexed"]) == (200, "not needed", 16), doc
    in_memory = Path("/dev/shm") / f"nc-owb-index-{os.getpid()}"
    async with agent("owb", images, settings={"disk_index_dir": str(in_memory)}) as b:
        status, doc = await b.request("POST", "/v1/host/disk-index", {"image": tpl.name})
        assert status == 409 and "tmpfs" in doc["error"], doc
    assert not in_memory.exists()


async def test_clusters_of_an_image_changed_since_it_was_indexed_are_repaired(images: Path) -> None:
    """The target indexed the image on a first copy and keeps that index (by the file's
    inode, size and mtime). The image is then rewritten in place with its mtime put back,
    so the next copy is offered keys whose clusters the target no longer holds: each is
    asked for and sent (``disk_need``), and the target's disk is still the source's."""
    tpl = images / "ochg.qcow2"
    raw = images / "ochg.raw"
    raw.write_bytes(os.urandom(16 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    raw.unlink()
    doc = {**spec(images, ref=False, seed=tpl.name), "start": False}
    async with agent("oca", images) as a, agent("ocb", images) as b:
        await Api(a).ok("POST", "/v1/vms", doc, want=201)
        before = images / "ochg-before.qcow2"
        shutil.copyfile(disk_of(a), before)

        async def move(src: LocalAgent, dst: LocalAgent) -> dict[str, Any]:
            mig = await Api(src).migrate(VM, dst, offline=True)
            st = await Api(src).wait_migration(mig["id"], timeout=120)
            assert st["phase"] == "completed", st["error"]
            done = same(before, disk_of(dst))
            assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)
            await Api(src).ok("DELETE", f"/v1/vms/{VM}")  # the coordinator's part after a copy
            return dict(st["metrics"]["disk_dedup"])

        first = await move(a, b)  # ocb indexes the image
        assert first.get("clusters_named") == 256 and "repairs" not in first, first
        await move(b, a)
        st = tpl.stat()
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 4M 4M", str(tpl)],
                       check=True, capture_output=True)
        os.utime(tpl, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert tpl.stat().st_size == st.st_size
        third = await move(a, b)
        print(f"copy against a stale index: {third}")
        assert third.get("clusters_named") == 256 and third.get("repairs") == 64, third
        before.unlink()


async def test_failed_copy_through_the_coordinator_changes_nothing(
        images: Path, fleet: tuple[CoordinatorClient, LocalAgent, LocalAgent]) -> None:
    """The target agent killed while the coordinator's offline migration copies a 128 MiB
    disk: the migration fails, the VM stays (stopped, disk unchanged) on the source, and
    the target's next agent removes the partial copy. No guest boots."""
    client, a, b = fleet
    seed = make_seed(images)
    await client.create_vm({**spec(images, ref=False, seed=seed.name), "name": "cold",
                            "host": "oa", "start": False})
    seed.unlink()  # as in ``seeded``: the copy must last
    disk = a.state_dir / "vms" / "cold" / "disk0.qcow2"
    before = digest(disk)
    move = asyncio.create_task(client.migrate("cold", "ob"))
    api_a = Api(a)
    deadline = time.monotonic() + 60
    while True:  # the copy is under way: the source agent has sent 8 MiB of it
        copying = [m for m in (await api_a.ok("GET", "/v1/migrations"))["migrations"]
                   if m["vm"] == "cold" and m["metrics"]["disk_bytes"] > (8 << 20)]
        if copying:
            break
        assert time.monotonic() < deadline and not move.done(), "the copy did not start"
        await asyncio.sleep(0.05)
    b.kill()
    with pytest.raises(ApiClientError) as err:
        await move
    print("coordinator, target killed:", err.value)
    assert "stays on oa" in err.value.message, err.value
    record = await client.vm("cold")
    assert record["host"] == "oa" and record["state"] == "stopped", record
    assert (await api_a.ok("GET", "/v1/vms/cold"))["state"] == "stopped"
    assert digest(disk) == before
    await b.start()  # the next agent removes the half-copied disk
    assert not (b.state_dir / "vms" / "cold").exists()
    incoming = b.state_dir / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    assert (await b.request("GET", "/v1/vms/cold"))[0] == 404
    await client.request("DELETE", "/vms/cold")
