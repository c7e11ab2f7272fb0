"""The migration manager runs another engine (libvirt's own) behind the same API:
chosen by the option ``engine``, granted like ours, tracked, cancelled, counted."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from novacron.agent.migration.manager import MigrationManager, MigrationRequestError
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.status import MigrationStatus
from novacron.grants import Grant, GrantVerifier
from tests.migration.grants import SIGNER


class FakeEngine:
    def __init__(self, mid: str, vm: str) -> None:
        self.status = MigrationStatus(id=mid, vm=vm, role="source", peer="b")
        self.status.native = {"engine": "libvirt"}
        self.release = asyncio.Event()
        self.cancelled = False

    def start(self) -> asyncio.Task[None]:
        async def run() -> None:
            self.status.set_phase("precopy")
            await self.release.wait()
            if self.cancelled:
                self.status.fail("cancelled", cancelled=True)
            else:
                self.status.set_phase("completed")

        return asyncio.create_task(run())

    async def cancel(self) -> MigrationStatus:
        self.cancelled = True
        self.release.set()
        return self.status


def grant(vm: str = "v1", mid: str = "m1") -> str:
    return SIGNER.issue(migration=mid, vm=vm, source="a", target="b", url="http://127.0.0.1:9",
                        data_host="127.0.0.1", data_port=9)


async def no_source(name: str) -> Any:
    raise AssertionError("our engine must not be asked for the VM")


def manager(engines: dict[str, Any] | None = None) -> MigrationManager:
    return MigrationManager(cluster_secret="s" * 32, source_vm=no_source, dest_factory=None,  # type: ignore[arg-type]
                            host_name="a", grants=GrantVerifier(SIGNER.public_key), engines=engines)


def test_engine_is_a_checked_option() -> None:
    assert MigrationOptions.from_dict({"engine": "libvirt"}).engine == "libvirt"
    assert MigrationOptions().engine == "novacron"
    for bad in ("qemu", "", 1):
        with pytest.raises(ValueError, match="engine"):
            MigrationOptions.from_dict({"engine": bad})


async def test_an_engine_this_host_lacks_is_refused_and_nothing_starts() -> None:
    m = manager()
    with pytest.raises(MigrationRequestError, match="'libvirt' does not run on this host") as err:
        await m.start_migration({"vm": "v1", "grant": grant(), "options": {"engine": "libvirt"}})
    assert err.value.status == 400 and m.list() == [] and not m.busy("v1")


async def test_another_engine_runs_behind_the_same_api() -> None:
    seen: list[tuple[str, str, str, MigrationOptions]] = []
    engines: list[FakeEngine] = []
    finished: list[str] = []

    async def start(vm: str, g: Grant, mid: str, opts: MigrationOptions) -> FakeEngine:
        seen.append((vm, g.target, mid, opts))
        engines.append(FakeEngine(mid, vm))
        return engines[-1]

    m = manager({"libvirt": start})
    m.on_finish = lambda st: finished.append(st.phase)
    st = await m.start_migration({"vm": "v1", "grant": grant(), "options": {"engine": "libvirt", "downtime_ms": 50}})
    assert st.id == "m1" and m.get("m1") is st and m.busy("v1")
    assert seen[0][:3] == ("v1", "b", "m1") and seen[0][3].downtime_ms == 50
    # the grant is used once; the VM cannot start a second migration meanwhile
    with pytest.raises(MigrationRequestError) as err:
        await m.start_migration({"vm": "v1", "grant": grant(mid="m2"), "options": {"engine": "libvirt"}})
    assert err.value.status == 409
    with pytest.raises(MigrationRequestError, match="cannot change"):
        m.change("m1", {"bandwidth_mbps": 5})
    assert m.cancel("m1") is st
    async with asyncio.timeout(5):
        while not st.done or m.busy("v1"):
            await asyncio.sleep(0.01)
    assert st.phase == "cancelled" and finished == ["cancelled"]
    # done: the same grant cannot start it again
    with pytest.raises(MigrationRequestError) as err:
        await m.start_migration({"vm": "v1", "grant": grant(), "options": {"engine": "libvirt"}})
    assert err.value.status == 409  # the id exists already
    await m.close()
