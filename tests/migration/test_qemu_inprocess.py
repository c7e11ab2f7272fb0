"""The engine with real QEMU guests, two VM managers in one process (no daemons):
busy guest A -> B -> A; heartbeat carries on without reboot, its checksums
pass, RAM digests match at switchover, the source QEMU is gone after commit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from novacron.agent.migration.manager import MigrationManager
from novacron.agent.migration.qemu_port import QemuDestFactory, source_vm
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.vm.accel import AccelDetector
from novacron.agent.vm.manager import VMManager
from tests.migration.qemu_helpers import VERIFY, guest_spec, heartbeats, qemu_processes_using

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
SECRET = "inprocess-cluster-secret"


class Host:
    def __init__(self, root: Path, name: str, secret: str = SECRET) -> None:
        self.vms = VMManager(root / name, AccelDetector(probe_kernels=[]))

        async def get_source(vm: str):  # type: ignore[no-untyped-def]
            return await source_vm(self.vms, vm)

        self.mig = MigrationManager(cluster_secret=secret, source_vm=get_source,
                                    dest_factory=QemuDestFactory(self.vms))

    async def start(self) -> None:
        await self.vms.load()
        await self.mig.start()

    async def close(self) -> None:
        await self.mig.close()
        await self.vms.shutdown(stop_vms=True)


async def wait_done(host: Host, mid: str, timeout: float = 180) -> MigrationStatus:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        st = host.mig.get(mid)
        assert st is not None
        if st.done:
            return st
        await asyncio.sleep(0.1)
    raise AssertionError(f"migration {mid} did not finish in {timeout}s")


async def migrate(src: Host, dst: Host, vm: str, **opts: object) -> MigrationStatus:
    st = await src.mig.start_migration({
        "vm": vm, "target": {"url": "http://127.0.0.1:1", "data_port": dst.mig.data_port},
        "options": {"test_digest": True, **opts},
    })
    return await wait_done(src, st.id)


async def test_busy_guest_round_trip(tmp_path: Path) -> None:
    a, b = Host(tmp_path, "a"), Host(tmp_path, "b")
    await a.start()
    await b.start()
    try:
        vm = await a.vms.create(guest_spec("busy", rate_mb=8))
        await vm.wait_serial(r"NOVACRON-HB .* ok=1", timeout=120)
        before = heartbeats(vm.read_serial().decode(errors="replace"))
        boot = before[-1][0]
        ram_a = vm.ram_path

        st = await migrate(a, b, "busy", downtime_ms=300)
        assert st.phase == "completed", st.error
        assert st.digest_source and st.digest_source == st.digest_destination
        m = st.metrics()
        print("A->B", m, st.rounds)
        assert m["downtime_ms"] > 0 and m["bytes_wire"] > 0 and m["device_state_bytes"] > 0
        # the source QEMU is gone and its files removed; the VM now lives on B only
        assert "busy" not in a.vms.vms and not ram_a.exists()
        assert qemu_processes_using(ram_a) == []
        vm_b = b.vms.get("busy")
        assert vm_b.state == "running"
        # heartbeat carries on (same boot, later uptime) and the workload's own check passes
        seen = len(vm_b.read_serial())
        await vm_b.wait_serial(r"NOVACRON-HB", timeout=30, offset=seen)
        after = heartbeats(vm_b.read_serial().decode(errors="replace"))
        assert after[-1][0] == boot and after[-1][2] > before[-1][2] and after[-1][3] == 1
        await vm_b.send_serial("verify\n")
        match = await vm_b.wait_serial(VERIFY.pattern, timeout=30, offset=seen)
        assert match.group(1) == boot and match.group(3) == "ok"

        back = await migrate(b, a, "busy", downtime_ms=300)
        assert back.phase == "completed", back.error
        assert back.digest_source == back.digest_destination
        vm_a = a.vms.get("busy")
        seen = len(vm_a.read_serial())
        await vm_a.wait_serial(r"NOVACRON-HB .* ok=1", timeout=30, offset=seen)
        assert heartbeats(vm_a.read_serial().decode(errors="replace"))[-1][0] == boot
        assert "busy" not in b.vms.vms and not (tmp_path / "b" / "vms" / "busy").exists()
        assert list((tmp_path / "b" / "incoming").iterdir()) == []
    finally:
        await a.close()
        await b.close()
