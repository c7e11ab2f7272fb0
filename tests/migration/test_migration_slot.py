"""A migration's final status and its VM's slot go together: once the status is
final on an agent, a retry (or a migration back) of the VM is accepted there at
once, not refused with 409 "already migrating" while the channel still closes;
and a source's failed migration turns final once the destination has cleared
its copy, so the retry finds the destination clear."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from novacron.agent.migration.manager import MigrationManager
from novacron.agent.migration.status import MigrationStatus
from novacron.grants import GrantVerifier
from tests.migration.grants import DEST, SIGNER
from tests.migration.memvm import MemDestFactory, MemSourceVM
from tests.migration.test_in_doubt import SECRET, DestAgent, dest  # noqa: F401 (fixture)


def grant(mid: str, vm: str, dest: DestAgent) -> str:  # noqa: F811
    return SIGNER.issue(migration=mid, vm=vm, source="src", target=DEST, url=dest.url,
                        data_host="127.0.0.1", data_port=dest.manager.data_port)


async def final(mgr: MigrationManager, mid: str, timeout: float = 60.0) -> MigrationStatus:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        st = mgr.get(mid)
        if st is not None and st.done:
            return st
        assert asyncio.get_running_loop().time() < deadline, f"{mid} not final in {timeout:g} s"
        await asyncio.sleep(0.005)


async def test_final_status_frees_the_vm_for_a_retry(tmp_path: Path, dest: DestAgent) -> None:  # noqa: F811
    vm = MemSourceVM(tmp_path / "src", "s", pages=4096, dirty_pages_per_s=2000)

    async def source_vm(name: str) -> MemSourceVM:
        assert name == vm.name
        return vm

    src = MigrationManager(cluster_secret=SECRET, source_vm=source_vm,  # type: ignore[arg-type]
                           dest_factory=MemDestFactory(tmp_path / "unused"), host_name="src",
                           grants=GrantVerifier(SIGNER.public_key))
    busy_when_final: list[tuple[str, str, bool]] = []
    src.on_finish = lambda s: busy_when_final.append(("src", s.id, src.busy(s.vm)))
    dest.manager.on_finish = lambda s: busy_when_final.append(("dst", s.id, dest.manager.busy(s.vm)))
    try:
        await src.start_migration({"vm": "s", "grant": grant("r1", "s", dest),
                                   "options": {"bandwidth_mbps": 4}})
        deadline = asyncio.get_running_loop().time() + 30
        while (st := src.get("r1")) is not None and not (st.phase == "precopy" and st.pages_sent > 0):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        src.cancel("r1")
        assert (await final(src, "r1")).phase == "cancelled"
        # final at the source once the destination hung up, its copy destroyed
        theirs = dest.manager.get("r1")
        assert theirs is not None and theirs.done and dest.factory.vms["s"].destroyed, theirs
        # at once: the first migration's channel may still be closing
        again = await src.start_migration({"vm": "s", "grant": grant("r2", "s", dest),
                                           "options": {"downtime_ms": 1000}})
        assert again.id == "r2"
        assert (await final(src, "r2")).phase == "completed", src.get("r2")
        assert (await final(dest.manager, "r2")).phase == "completed"
    finally:
        await src.close()
        vm.close()
    assert ("src", "r1", False) in busy_when_final and ("src", "r2", False) in busy_when_final
    assert all(not busy for _side, _mid, busy in busy_when_final), busy_when_final
    assert not dest.manager.busy("s") and not src.busy("s")


async def test_retry_waits_for_the_destination_to_clear_a_failed_copy(tmp_path: Path,
                                                                      dest: DestAgent) -> None:  # noqa: F811
    """The destination's copy fails (its "QEMU" dies): it tells the source at once, then
    destroys its copy, slowly here. The retry the source may send meanwhile is served
    once that copy is gone, not refused because the VM still exists there."""
    vm = MemSourceVM(tmp_path / "src", "s", pages=4096, dirty_pages_per_s=2000)

    async def source_vm(name: str) -> MemSourceVM:
        return vm

    src = MigrationManager(cluster_secret=SECRET, source_vm=source_vm,  # type: ignore[arg-type]
                           dest_factory=MemDestFactory(tmp_path / "unused"), host_name="src",
                           grants=GrantVerifier(SIGNER.public_key))
    prepare = dest.factory.prepare

    async def slow_destroy_first(spec: dict[str, Any], ram_size: int, mid: str, *a: Any) -> Any:
        made = await prepare(spec, ram_size, mid, *a)
        if mid == "r1":
            destroy = made.destroy

            async def slow() -> None:  # longer than the source's liveness_s (keepalives meanwhile)
                await asyncio.sleep(3.0)
                await destroy()

            made.destroy = slow  # type: ignore[method-assign]
        return made

    dest.factory.prepare = slow_destroy_first  # type: ignore[method-assign]
    try:
        await src.start_migration({"vm": "s", "grant": grant("r1", "s", dest),
                                   "options": {"bandwidth_mbps": 4}})
        deadline = asyncio.get_running_loop().time() + 30
        while (st := src.get("r1")) is not None and not (st.phase == "precopy" and st.pages_sent > 0):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        dest.factory.vms["s"].exited.set()
        assert "QEMU exited" in ((await final(src, "r1")).error or "")
        theirs = dest.manager.get("r1")
        assert theirs is not None and not theirs.done  # still destroying its copy
        await src.start_migration({"vm": "s", "grant": grant("r2", "s", dest), "options": {"downtime_ms": 1000}})
        st = await final(src, "r2")
        assert st.phase == "completed", st.error
    finally:
        await src.close()
        vm.close()
