"""A migration's final status and its VM's slot go together: once the status is
final on an agent, a retry (or a migration back) of the VM is accepted there at
once, not refused with 409 "already migrating" while the channel still closes."""

from __future__ import annotations

import asyncio
from pathlib import Path

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
