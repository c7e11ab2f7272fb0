"""The migration journal and what a restarted agent does with it (no QEMU):
records survive and are read back, a source settles each step the right way
(resume before 'go', ask the destination past it, finish a cut-short release),
resume is fenced while a migration is unsettled and an operator can force it;
plus the engine-level liveness and pause-ceiling behaviour on file-backed VMs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.channel import Channel, ChannelServer, connect
from novacron.agent.migration.journal import Entry, Journal
from novacron.agent.migration.manager import MigrationManager
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.vm.errors import VMConflict
from tests.migration.memvm import MemDestFactory, MemSourceVM
from tests.migration.test_engine_memory import SECRET, Dest, dest  # noqa: F401 (fixture)


class FakeVMs:
    """The runtime's VM table as recovery sees it: states by name, calls recorded."""

    def __init__(self, **states: str) -> None:
        self.states: dict[str, str] = dict(states)
        self.migrating: dict[str, bool] = {}
        self.calls: list[tuple[str, str]] = []

    def state(self, name: str) -> str | None:
        return self.states.get(name)

    def set_migrating(self, name: str, flag: bool) -> None:
        self.migrating[name] = flag

    async def resume(self, name: str) -> None:
        self.calls.append(("resume", name))
        self.states[name] = "running"

    async def release(self, name: str) -> None:
        self.calls.append(("release", name))
        del self.states[name]


def manager(root: Path, vms: FakeVMs) -> MigrationManager:
    async def no_source(name: str) -> Any:
        raise AssertionError("no outgoing migration in these tests")

    return MigrationManager(cluster_secret=SECRET, source_vm=no_source, dest_factory=MemDestFactory(root / "in"),
                            journal=Journal(root / "migrations"), local_vms=vms)


def journal_with(root: Path, **kw: Any) -> Journal:
    j = Journal(root / "migrations")
    j.begin(Entry(**{"peer_host": "127.0.0.1", "peer_port": 1, **kw}))
    return j


def test_journal_records_survive_and_bad_ones_are_skipped(tmp_path: Path) -> None:
    j = journal_with(tmp_path, id="m1", vm="web", role="source", step="started")
    j.step("m1", "paused")
    j.step("m1", "go")
    (tmp_path / "migrations" / "junk.json").write_text("{not json")
    (tmp_path / "migrations" / "m2.json").write_text(json.dumps({"kind": "vm", "format": 1}))
    again = Journal(tmp_path / "migrations")
    [entry] = again.load()
    assert (entry.id, entry.step, entry.settled) == ("m1", "go", False)
    assert [h["step"] for h in entry.history] == ["started", "paused", "go"]
    assert again.unsettled("web") is entry and again.unsettled("db") is None
    again.step("m1", "committed")
    assert Journal(tmp_path / "migrations").load()[0].settled
    with pytest.raises(ValueError):
        again.step("m1", "prepared")  # a destination step on a source entry


def test_settled_records_are_pruned(tmp_path: Path) -> None:
    j = Journal(tmp_path / "migrations")
    for i in range(5):
        j.begin(Entry(id=f"m{i}", vm=f"v{i}", role="destination", step="prepared"))
        j.step(f"m{i}", "rolled_back")
    j.begin(Entry(id="live", vm="x", role="source", step="go"))
    j.prune(keep=2)
    assert sorted(j.entries) == ["live", "m3", "m4"]
    assert sorted(p.stem for p in (tmp_path / "migrations").glob("*.json")) == ["live", "m3", "m4"]


@pytest.mark.parametrize("step", ["started", "paused"])
async def test_restart_before_go_resumes_the_guest(tmp_path: Path, step: str) -> None:
    journal_with(tmp_path, id="m1", vm="web", role="source", step=step)
    vms = FakeVMs(web="paused")
    mgr = manager(tmp_path, vms)
    await mgr.start()
    try:
        assert vms.calls == [("resume", "web")]
        entry = mgr.journal.entries["m1"]  # type: ignore[union-attr]
        assert entry.step == "rolled_back" and "resumed here" in entry.reason
        assert mgr.fence_reason("web") is None
        doc = mgr.get("m1").to_dict()  # type: ignore[union-attr]
        assert doc["phase"] == "failed" and doc["journal"]["settled"] is True
    finally:
        await mgr.close()


async def test_restart_after_commit_finishes_the_release(tmp_path: Path) -> None:
    j = journal_with(tmp_path, id="m1", vm="web", role="source", step="go")
    j.step("m1", "committed")
    vms = FakeVMs(web="paused")
    mgr = manager(tmp_path, vms)
    await mgr.start()
    await mgr.close()
    assert vms.calls == [("release", "web")]


@pytest.mark.parametrize(("state", "step", "calls"), [
    ("running", "committed", []),  # it resumed here before the agent died
    ("paused", "rolled_back", [("release", "web")]),  # adopted, never resumed: removed
    (None, "rolled_back", []),  # still in incoming/ (removed at start) or never built
])
async def test_restarted_destination_settles_from_its_vm_table(tmp_path: Path, state: str | None,
                                                               step: str, calls: list) -> None:
    journal_with(tmp_path, id="m1", vm="web", role="destination", step="go")
    vms = FakeVMs(**({"web": state} if state else {}))
    mgr = manager(tmp_path, vms)
    await mgr.start()
    try:
        assert mgr.journal.entries["m1"].step == step  # type: ignore[union-attr]
        assert mgr.answer("m1", "web") == step
        assert vms.calls == calls
    finally:
        await mgr.close()


@pytest.mark.parametrize("state", ["running", "paused"])
async def test_restarted_destination_mid_postcopy_stays_in_doubt(tmp_path: Path, state: str) -> None:
    """Post-copy: the guest runs here but pages may be only at the source; a restarted
    destination neither commits (the source would drop those pages) nor removes it."""
    journal_with(tmp_path, id="m1", vm="web", role="destination", step="go", reason="post-copy")
    vms = FakeVMs(web=state)
    mgr = manager(tmp_path, vms)
    await mgr.start()
    try:
        entry = mgr.journal.entries["m1"]  # type: ignore[union-attr]
        assert entry.step == "go" and not entry.settled and "post-copy" in entry.reason
        assert mgr.answer("m1", "web") == "pending" and vms.calls == [] and vms.migrating == {"web": True}
        assert mgr.statuses["m1"].phase == "postcopy"
    finally:
        await mgr.close()


async def test_past_go_the_source_asks_the_destination_and_follows_it(tmp_path: Path) -> None:
    """The destination (another manager, answering on its data port) committed: the
    restarted source keeps its copy fenced until it hears that, then releases it."""
    there = manager(tmp_path / "there", FakeVMs(web="running"))
    port = await there.start()
    here_vms = FakeVMs(web="paused")
    journal_with(tmp_path / "here", id="m1", vm="web", role="source", step="go", peer_port=port)
    here = manager(tmp_path / "here", here_vms)
    try:
        await here.start()
        for _ in range(200):
            if here_vms.calls:
                break
            await asyncio.sleep(0.02)
        assert here_vms.calls == [("release", "web")]
        assert here.journal.entries["m1"].step == "committed"  # type: ignore[union-attr]
        assert here.get("m1").phase == "completed"  # type: ignore[union-attr]
    finally:
        await here.close()
        await there.close()


async def test_unreachable_destination_keeps_the_fence_until_forced(tmp_path: Path) -> None:
    journal_with(tmp_path, id="m1", vm="web", role="source", step="go", peer_port=1)
    vms = FakeVMs(web="paused")
    mgr = manager(tmp_path, vms)
    await mgr.start()
    try:
        why = mgr.fence_reason("web")
        assert why is not None and "m1" in why and "unsettled" in why
        assert vms.migrating == {"web": True} and vms.calls == []
        assert await mgr.override("web") == "m1"
        entry = Journal(tmp_path / "migrations").load()[0]
        assert entry.step == "rolled_back" and "forced" in entry.reason
        assert mgr.fence_reason("web") is None and vms.migrating == {"web": False}
        assert not mgr._settling  # the asking stopped
    finally:
        await mgr.close()


async def test_override_refused_while_the_engine_runs_the_migration(tmp_path: Path) -> None:
    mgr = manager(tmp_path, FakeVMs(web="running"))
    mgr._claim("web", "m1")
    assert "in progress" in (mgr.fence_reason("web") or "")
    with pytest.raises(VMConflict):
        await mgr.override("web")


# -- engine: liveness, pause ceiling, budget -------------------------------------------------

async def run_source(src: MemSourceVM, port: int, journal: Journal | None = None,
                     **opts: object) -> tuple[SourceMigration, MigrationStatus]:
    ch = await connect("127.0.0.1", port, SECRET)
    o = MigrationOptions.from_dict(opts)
    st = MigrationStatus(id="e1", vm=src.name, role="source", options=o.as_dict())
    if journal is not None:
        st.journal = journal.begin(Entry(id="e1", vm=src.name, role="source", step="started"))
    mig = SourceMigration(src, ch, st, o, journal=journal)
    try:
        await mig.run()
    finally:
        await ch.close()
    return mig, st


async def test_pause_over_budget_is_flagged_and_journalled(tmp_path: Path, dest: Dest) -> None:  # noqa: F811
    src = MemSourceVM(tmp_path / "src", "slow", pages=4096, dirty_pages_per_s=20000)
    j = Journal(tmp_path / "migrations")
    try:
        _, st = await run_source(src, dest.server.port, j, downtime_ms=1, pause_factor=10_000, max_rounds=2,
                                 on_no_converge="force")
    finally:
        src.close()
    assert st.phase == "completed" and st.downtime_ms is not None and st.downtime_ms > 1
    assert st.budget_exceeded is True and st.to_dict()["budget_exceeded"] is True
    entry = Journal(tmp_path / "migrations").load()[0]
    assert entry.step == "committed" and entry.budget_exceeded
    assert [h["step"] for h in entry.history] == ["started", "paused", "go", "committed"]


async def test_pause_ceiling_resumes_the_source(tmp_path: Path, dest: Dest) -> None:  # noqa: F811
    """The destination takes 2 s to load device state; the ceiling is 100 ms."""
    src = MemSourceVM(tmp_path / "src", "cap", pages=1024)
    j = Journal(tmp_path / "migrations")

    async def prepare(spec: dict[str, Any], ram_size: int, mid: str) -> Any:
        vm = await MemDestFactory.prepare(dest.factory, spec, ram_size, mid)
        loaded = vm.wait_device_state_loaded

        async def slow(timeout: float) -> None:
            await loaded(timeout)
            await asyncio.sleep(2)

        vm.wait_device_state_loaded = slow  # type: ignore[method-assign]
        return vm

    dest.factory.prepare = prepare  # type: ignore[method-assign]
    t0 = time.monotonic()
    try:
        _, st = await run_source(src, dest.server.port, j, downtime_ms=10, pause_factor=10,
                                 on_no_converge="force")
    finally:
        src.close()
    assert st.phase == "failed" and "ceiling of 100 ms" in (st.error or ""), st.error
    assert src.paused_count == src.resumed_count == 1
    assert st.downtime_ms is not None and st.downtime_ms < 600, st.downtime_ms
    assert time.monotonic() - t0 < 10
    assert Journal(tmp_path / "migrations").load()[0].step == "rolled_back"
    await asyncio.wait_for(dest.done.wait(), 20)
    assert dest.statuses[0].phase in ("failed", "cancelled")


async def test_silent_destination_ends_the_migration_soon_after_liveness(tmp_path: Path) -> None:
    """A destination that stops reading and sending (a SIGSTOPped agent): the source
    fails once it was silent for liveness_s, without then waiting on a full socket
    to tell it 'abort' (its own liveness ends its side)."""
    hold = asyncio.Event()

    async def silent(ch: Channel) -> None:
        await ch.recv(timeout=10)  # 'prepare'
        await ch.send_ctrl({"op": "prepared"})
        await hold.wait()

    server = ChannelServer(SECRET, silent)
    await server.start()
    src = MemSourceVM(tmp_path / "src", "quiet", pages=16384)
    o = MigrationOptions.from_dict({"liveness_s": 0.5, "adaptive_compression": False})
    st = MigrationStatus(id="q1", vm=src.name, role="source", options=o.as_dict())
    ch = await connect("127.0.0.1", server.port, SECRET)
    task = asyncio.create_task(SourceMigration(src, ch, st, o).run())
    try:
        deadline = time.monotonic() + 30
        while st.phase != "precopy":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        while not st.done:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        took = time.monotonic() - t0
    finally:
        hold.set()
        await asyncio.wait_for(task, 30)
        await ch.close()
        await server.close()
        src.close()
    assert st.phase == "failed" and "sent nothing for 0.5s" in (st.error or ""), st.error
    assert took < 0.5 + 1.0, f"final {took:.2f} s after pre-copy began"
    assert src.running


async def test_destination_vm_exit_fails_the_migration_at_once(tmp_path: Path, dest: Dest) -> None:  # noqa: F811
    src = MemSourceVM(tmp_path / "src", "die", pages=8192, dirty_pages_per_s=2000)
    task = asyncio.create_task(run_source(src, dest.server.port, bandwidth_mbps=4, batch_pages=256))
    try:
        for _ in range(500):
            if "die" in dest.factory.vms and dest.statuses and dest.statuses[0].phase == "precopy":
                break
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        dest.factory.vms["die"].exited.set()
        _, st = await asyncio.wait_for(task, 10)
        took = time.monotonic() - t0
    finally:
        src.close()
    assert st.phase == "failed" and "QEMU exited" in (st.error or ""), st.error
    assert took < 1.0, took
    assert src.running


async def test_destination_that_cannot_record_the_vm_fails_before_it_runs(
        tmp_path: Path, dest: Dest) -> None:  # noqa: F811
    """The destination's state dir fills after admission: adopting the VM fails, so the
    guest never runs there, the destination destroys it and the source resumes."""
    src = MemSourceVM(tmp_path / "src", "full", pages=1024)
    factory_prepare = dest.factory.prepare

    async def prepare(spec: dict[str, Any], ram_size: int, mid: str) -> Any:
        vm = await factory_prepare(spec, ram_size, mid)
        vm.adopt_error = OSError(28, "No space left on device")
        return vm

    dest.factory.prepare = prepare  # type: ignore[method-assign]
    try:
        _, st = await run_source(src, dest.server.port)
    finally:
        src.close()
    assert st.phase == "failed" and "No space left" in (st.error or ""), st.error
    assert src.paused_count == src.resumed_count == 1 and not src.released
    vm = dest.factory.vms["full"]
    assert vm.destroyed and not vm.running
    await asyncio.wait_for(dest.done.wait(), 20)
    assert dest.statuses[0].phase == "failed"
