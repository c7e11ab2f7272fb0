"""Offline (cold) migration of a stopped VM with its local qcow2 disk, two real agents.

The guest writes checksummed blocks to its 64 MiB local disk and is stopped gracefully;
the copy goes over the agents' migration channel (grant, mutual auth, encrypted DATA
records) into an NBD export at the target. Afterwards the target's disk holds exactly
the source's data (``qemu-img compare``), only allocated clusters crossed (the bytes on
the channel stay far below the disk's size), and the VM boots there and its disk
verifier passes. A copy that fails (the target killed mid-copy) leaves the VM stopped on
the source with its disk unchanged, and nothing at the target.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from novacron.agent.local import LocalAgent
from tests.disks.test_disk_migration import (
    BLOCKS,
    VM,
    agent,
    assert_nothing_left,
    images,  # noqa: F401 (module fixture)
    spec,
    verified_after,
)
from tests.migration.agents import Api

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
DISK_BYTES = 64 << 20


def disk_of(a: LocalAgent) -> Path:
    return a.state_dir / "vms" / VM / "disk0.qcow2"


def same(x: Path, y: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(x), str(y)],
                          capture_output=True, text=True, timeout=120)


async def stopped_with_data(api: Api, images: Path) -> None:
    """A VM that wrote its disk and was shut down by ACPI (the guest flushed it)."""
    await api.ok("POST", "/v1/vms", spec(images, ref=False), want=201)
    await verified_after(api, 0, passes=1)
    vm = await api.ok("POST", f"/v1/vms/{VM}/stop?timeout_s=60")
    assert vm["state"] == "stopped", vm


async def test_stopped_vm_moves_offline_with_its_disk(images: Path) -> None:  # noqa: F811
    async with agent("fa", images) as a, agent("fb", images) as b:
        api_a, api_b = Api(a), Api(b)
        await stopped_with_data(api_a, images)
        mig = await api_a.migrate(VM, b, offline=True)
        st = await api_a.wait_migration(mig["id"], timeout=120)
        assert st["phase"] == "completed", st["error"]
        sent = st["metrics"]["disk_bytes"]
        # the guest wrote its first BLOCKS blocks (8 MiB); the other 56 MiB never crossed
        assert 0 < sent < BLOCKS * 4096 + (4 << 20), sent
        print(f"offline copy: {sent} B over the channel for a {DISK_BYTES} B disk, "
              f"total {st['metrics']['total_s']} s")
        # the target defined it stopped; the source still has it (the coordinator then
        # makes the source forget it): byte for byte the same disk
        assert (await api_b.ok("GET", f"/v1/vms/{VM}"))["state"] == "stopped"
        assert (await api_a.ok("GET", f"/v1/vms/{VM}"))["state"] == "stopped"
        done = same(disk_of(a), disk_of(b))
        assert done.returncode == 0 and "identical" in done.stdout, (done.stdout, done.stderr)
        incoming = b.state_dir / "incoming"
        assert not incoming.exists() or list(incoming.iterdir()) == []
        assert not list((a.state_dir / "vms" / VM).glob("nbd-relay-*"))
        await api_a.ok("DELETE", f"/v1/vms/{VM}")
        await api_b.ok("POST", f"/v1/vms/{VM}/start")
        await verified_after(api_b, 0, passes=1)
        await api_b.ok("POST", f"/v1/vms/{VM}/stop?force=true")
        await api_b.ok("DELETE", f"/v1/vms/{VM}")


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


async def test_target_killed_during_offline_copy(images: Path) -> None:  # noqa: F811
    """The source's disk is seeded with 128 MiB of incompressible data so the copy runs
    long enough for the kill to land in it."""
    seed = images / "oseed.qcow2"
    raw = images / "oseed.raw"
    with raw.open("wb") as f:
        for _ in range(128):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(seed)], check=True)
    raw.unlink()
    doc = spec(images, ref=False, seed=seed.name)
    async with agent("fka", images) as a:
        api = Api(a)
        await api.ok("POST", "/v1/vms", doc, want=201)
        await verified_after(api, 0, passes=1)
        assert (await api.ok("POST", f"/v1/vms/{VM}/stop?force=true"))["state"] == "stopped"
        before = digest(disk_of(a))
        dst = agent("fkb", images)
        await dst.start()
        try:
            mig = await api.migrate(VM, dst, offline=True, bandwidth_mbps=0)
            st = await api.wait_migration(mig["id"], until=lambda s: s["metrics"]["disk_bytes"] > (8 << 20))
            assert st["phase"] == "precopy", st
            dst.kill()
            st = await api.wait_migration(mig["id"], timeout=60)
            assert st["phase"] == "failed", st
            print("target killed:", st["error"])
            vm = await api.ok("GET", f"/v1/vms/{VM}")
            assert vm["state"] == "stopped", vm
            assert digest(disk_of(a)) == before
            assert not list((a.state_dir / "vms" / VM).glob("nbd-relay-*"))
            await dst.start()  # the next agent removes the half-copied disk
            await assert_nothing_left(dst)
            assert (await dst.request("GET", f"/v1/vms/{VM}"))[0] == 404
        finally:
            await dst.stop()
        # the source's VM is whole: it boots and its disk verifier passes
        _, offset = await api.console(VM)
        await api.ok("POST", f"/v1/vms/{VM}/start")
        await verified_after(api, offset, passes=1)
        await api.ok("DELETE", f"/v1/vms/{VM}")
    seed.unlink()
