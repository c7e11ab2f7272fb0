"""Faults with real QEMU guests (two VM managers in one process): channel cut
mid-pre-copy, wrong cluster secret, destination out of space for the RAM file.
Each must leave the guest running on the source, report failed with a reason
and leave nothing at the destination."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest

from novacron.agent.migration.status import MigrationStatus
from tests.migration.qemu_helpers import CuttableProxy, guest_spec, qemu_processes_using
from tests.migration.test_qemu_inprocess import Host, wait_done

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


async def wait_for(pred, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def assert_source_runs(host: Host, name: str) -> None:
    vm = host.vms.get(name)
    assert vm.state == "running" and not vm.migrating
    status = await vm.qmp.execute("query-status")  # type: ignore[union-attr]
    assert status["running"] is True
    seen = len(vm.read_serial())
    await vm.wait_serial(r"NOVACRON-HB .* ok=1", timeout=30, offset=seen)


def assert_nothing_at(root: Path, name: str) -> None:
    assert not (root / "vms" / name).exists()
    incoming = root / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    assert qemu_processes_using(root) == []


@pytest.fixture
async def hosts(tmp_path: Path):
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    await a.start()
    await b.start()
    vm = await a.vms.create(guest_spec("g1"))
    await vm.wait_serial(r"NOVACRON-HB .* ok=1", timeout=120)
    yield a, b
    await a.close()
    await b.close()


async def test_channel_cut_mid_precopy(hosts, tmp_path: Path) -> None:
    a, b = hosts
    proxy = CuttableProxy(b.mig.data_port)
    await proxy.start()
    try:
        st = await a.mig.start_migration({
            "vm": "g1", "target": {"url": "http://127.0.0.1:1", "data_port": proxy.port},
            "options": {"bandwidth_mbps": 20},
        })
        await wait_for(lambda: st.phase == "precopy" and st.pages_sent > 0)
        proxy.cut()
        st = await wait_done(a, st.id, 60)
    finally:
        await proxy.close()
    assert st.phase == "failed" and "lost" in (st.error or ""), st.error
    await assert_source_runs(a, "g1")
    dst: list[MigrationStatus] = b.mig.list()
    await wait_for(lambda: all(s.done for s in dst), 30)
    assert dst[0].phase == "failed"
    assert_nothing_at(tmp_path / "b", "g1")


async def test_wrong_secret(hosts, tmp_path: Path) -> None:
    a, _ = hosts
    other = Host(tmp_path, "c", secret="a-different-cluster-secret")
    await other.start()
    try:
        st = await a.mig.start_migration({
            "vm": "g1", "target": {"url": "http://127.0.0.1:1", "data_port": other.mig.data_port},
        })
        st = await wait_done(a, st.id, 30)
        assert st.phase == "failed" and "authentication" in (st.error or ""), st.error
        assert other.mig.server.refused == 1 and other.mig.list() == []
        assert_nothing_at(tmp_path / "c", "g1")
    finally:
        await other.close()
    await assert_source_runs(a, "g1")


async def test_destination_out_of_space(tmp_path: Path) -> None:
    """B's state dir is a 48 MiB tmpfs; the guest has 128 MiB of RAM."""
    root_b = tmp_path / "b"
    root_b.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "nc-test-small", str(root_b)], check=True)
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    try:
        await a.start()
        await b.start()
        vm = await a.vms.create(guest_spec("g1"))
        await vm.wait_serial(r"NOVACRON-HB .* ok=1", timeout=120)
        st = await a.mig.start_migration({
            "vm": "g1", "target": {"url": "http://127.0.0.1:1", "data_port": b.mig.data_port},
        })
        st = await wait_done(a, st.id, 60)
        assert st.phase == "failed" and "space" in (st.error or ""), st.error
        await assert_source_runs(a, "g1")
        assert_nothing_at(root_b, "g1")
    finally:
        await a.close()
        await b.close()
        subprocess.run(["umount", "-l", str(root_b)], check=False)
