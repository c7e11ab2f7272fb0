"""A switchover whose answer is lost with the channel is settled out of band.

The destination is a real MigrationManager (memory-only VMs) behind the real
``GET /v1/migrations/{id}`` route; the source asks it through HttpOutcomeProbe.
The channel is cut at exact protocol points by wrapping ``send_ctrl`` (the
records are encrypted, so a byte proxy could not find the ``go`` message), and
every wait is on state, bounded.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from novacron.agent.api.migrations import MANAGER_KEY, add_routes
from novacron.agent.channel import Channel, ChannelClosed, connect
from novacron.agent.migration.doubt import HttpOutcomeProbe, Outcome, settle
from novacron.agent.migration.manager import MigrationManager
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.migration.vmport import SourceVM
from tests.migration.grants import dest_grants, present_grant
from tests.migration.memvm import MemDestFactory, MemSourceVM

SECRET = "in-doubt-test-secret"
TOKEN = "dest-api-token"


def cut_on(ch: Channel, op: str) -> None:
    """Make ``ch`` reset the connection instead of sending control message ``op``."""
    send = ch.send_ctrl

    async def send_ctrl(msg: dict[str, Any], timeout: float = 60.0) -> None:
        if msg.get("op") == op:
            ch.writer.transport.abort()
            raise ChannelClosed(f"cut by the test instead of sending {op!r}")
        await send(msg, timeout)

    ch.send_ctrl = send_ctrl  # type: ignore[method-assign]


class DestAgent:
    """Destination: migration manager + the agent's migration routes, and a
    ``/v1/vms/{name}`` route reading the memory VMs; checks the bearer token."""

    def __init__(self, root: Path) -> None:
        self.factory = MemDestFactory(root)

        async def no_source(name: str) -> SourceVM:
            raise AssertionError("not a source")

        self.manager = MigrationManager(cluster_secret=SECRET, source_vm=no_source,
                                        dest_factory=self.factory, **dest_grants())  # type: ignore[arg-type]
        self.cut_dest_on: str | None = None
        self.handled = asyncio.Event()
        incoming = self.manager.server._handler

        async def handler(ch: Channel) -> None:
            if self.cut_dest_on:
                cut_on(ch, self.cut_dest_on)
            try:
                await incoming(ch)
            finally:
                self.handled.set()

        self.manager.server._handler = handler
        self.vm_answer: dict[str, Any] | None = None  # override for /v1/vms/{name}
        self.migration_status = 0  # non-zero: /v1/migrations/{id} answers only that
        self.calls = 0

        @web.middleware
        async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
            self.calls += 1
            if request.headers.get("Authorization") != f"Bearer {TOKEN}":
                return web.json_response({"error": "unauthorized"}, status=401)
            if self.migration_status and request.path.startswith("/v1/migrations/"):
                return web.json_response({"error": "forced"}, status=self.migration_status)
            return await handler(request)

        app = web.Application(middlewares=[auth])
        app[MANAGER_KEY] = self.manager
        add_routes(app)
        app.router.add_get("/v1/vms/{name}", self.get_vm)
        self.http = TestServer(app, host="127.0.0.1", port=0)

    async def get_vm(self, request: web.Request) -> web.Response:
        if self.vm_answer is not None:
            return web.json_response(self.vm_answer)
        vm = self.factory.vms.get(request.match_info["name"])
        if vm is None or vm.destroyed:
            return web.json_response({"error": "no such VM"}, status=404)
        return web.json_response({"name": vm.name, "state": "running" if vm.running else "paused"})

    @property
    def url(self) -> str:
        return str(self.http.make_url("")).rstrip("/")

    def status(self, mid: str) -> MigrationStatus | None:
        return self.manager.get(mid)


@pytest.fixture
async def dest(tmp_path: Path) -> AsyncIterator[DestAgent]:
    d = DestAgent(tmp_path / "dst")
    await d.manager.start()
    await d.http.start_server()
    try:
        yield d
    finally:
        await d.http.close()
        await d.manager.close()


async def run_source(src: MemSourceVM, dest: DestAgent, mid: str, *, cut_source_on: str | None = None,
                     url: str | None = None, token: str = TOKEN, **opts: Any
                     ) -> tuple[SourceMigration, MigrationStatus]:
    ch = await connect("127.0.0.1", dest.manager.data_port, SECRET)
    await present_grant(ch, src.name, mid)
    if cut_source_on:
        cut_on(ch, cut_source_on)
    o = MigrationOptions.from_dict({"test_digest": True, "in_doubt_timeout_s": 20, **opts})
    st = MigrationStatus(id=mid, vm=src.name, role="source", options=o.as_dict())
    probe = HttpOutcomeProbe(url or dest.url, token, mid, src.name)
    mig = SourceMigration(src, ch, st, o, probe=probe)
    try:
        await asyncio.wait_for(mig.run(), 60)
    finally:
        await ch.close()
    return mig, st


async def test_resumed_lost_source_commits_after_asking(tmp_path: Path, dest: DestAgent) -> None:
    """The destination resumed the guest but 'resumed' never arrives: the source
    learns from the API that the guest runs there and releases its copy."""
    dest.cut_dest_on = "resumed"
    src = MemSourceVM(tmp_path / "src", "c1", pages=2048, dirty_pages_per_s=1000)
    try:
        _, st = await run_source(src, dest, "doubt-commit")
    finally:
        src.close()
    assert st.phase == "completed", st.to_dict()
    assert st.resolution and "committed" in st.resolution
    assert st.to_dict()["resolution"] == st.resolution
    assert src.released and src.paused_count == src.resumed_count + 1  # never resumed here
    dvm = dest.factory.vms["c1"]
    assert dvm.running and dvm.adopted and not dvm.destroyed
    await asyncio.wait_for(dest.handled.wait(), 10)
    d = dest.status("doubt-commit")
    assert d is not None and d.phase == "completed"
    assert st.digest_source == d.digest_destination


async def test_go_lost_source_resumes_after_asking(tmp_path: Path, dest: DestAgent) -> None:
    """'go' never reaches the destination: it destroys its half-built VM and
    says 'failed'; the source, having asked, resumes the guest."""
    src = MemSourceVM(tmp_path / "src", "r1", pages=2048, dirty_pages_per_s=1000)
    try:
        _, st = await run_source(src, dest, "doubt-back", cut_source_on="go")
        assert st.phase == "failed", st.to_dict()
        assert "rolled_back" in (st.error or "") and st.resolution
        assert src.running and not src.released and src.stayed
        assert src.paused_count == src.resumed_count == 1
    finally:
        src.close()
    d = dest.status("doubt-back")
    assert d is not None and d.phase == "failed"
    assert dest.factory.vms["r1"].destroyed and os.listdir(tmp_path / "dst") == []


async def test_unreachable_destination_keeps_source_paused(tmp_path: Path, dest: DestAgent) -> None:
    """No definite answer within the bound: stay paused, report it in doubt."""
    dest.migration_status = 503
    src = MemSourceVM(tmp_path / "src", "u1", pages=1024, dirty_pages_per_s=1000)
    try:
        _, st = await run_source(src, dest, "doubt-unknown", cut_source_on="go",
                                 in_doubt_timeout_s=1)
        assert st.phase == "failed", st.to_dict()
        assert "in doubt" in (st.error or "") and "paused at the source" in (st.error or "")
        assert "unreachable" in (st.resolution or "")
        assert src.paused and not src.released and src.resumed_count == src.paused_count - 1
        assert dest.calls >= 2  # it kept asking until the bound
    finally:
        src.close()


async def test_wrong_token_is_no_answer(tmp_path: Path, dest: DestAgent) -> None:
    src = MemSourceVM(tmp_path / "src", "t1", pages=1024)
    try:
        _, st = await run_source(src, dest, "doubt-token", cut_source_on="go", token="wrong",
                                 in_doubt_timeout_s=0.6)
        assert st.phase == "failed" and "in doubt" in (st.error or "")
        assert src.paused and not src.released
    finally:
        src.close()


async def test_probe_reads_vm_when_migration_unknown(dest: DestAgent) -> None:
    probe = HttpOutcomeProbe(dest.url, TOKEN, "never-seen", "vmx")
    assert await probe() is Outcome.ROLLED_BACK  # neither migration nor VM known
    for state, want in [("running", Outcome.COMMITTED), ("stopped", Outcome.ROLLED_BACK),
                        ("crashed", Outcome.ROLLED_BACK), ("paused", Outcome.PENDING)]:
        dest.vm_answer = {"name": "vmx", "state": state}
        assert await probe() is want, state
    dest.migration_status = 500
    assert await probe() is Outcome.UNREACHABLE


async def test_settle_waits_for_a_definite_answer() -> None:
    answers = iter([Outcome.UNREACHABLE, Outcome.PENDING, Outcome.PENDING, Outcome.COMMITTED])

    async def probe() -> Outcome:
        return next(answers)

    outcome, note = await settle(probe, timeout_s=10, poll_s=0.01)
    assert outcome is Outcome.COMMITTED and "committed" in note

    async def failing() -> Outcome:
        raise OSError("connection refused")

    outcome, note = await settle(failing, timeout_s=0.1, poll_s=0.02)
    assert outcome is Outcome.UNREACHABLE and "unreachable" in note

    async def undecided() -> Outcome:
        return Outcome.PENDING

    outcome, note = await settle(undecided, timeout_s=0.1, poll_s=0.02)
    assert outcome is Outcome.PENDING and "undecided" in note
    assert (await settle(None, 1))[0] is Outcome.UNREACHABLE


async def test_cancel_is_refused_once_go_was_sent(tmp_path: Path, dest: DestAgent) -> None:
    """Past 'go' a cancel cannot undo the switchover: the API says so (409)."""
    dest.cut_dest_on = "resumed"
    src = MemSourceVM(tmp_path / "src", "k1", pages=1024)
    ch = await connect("127.0.0.1", dest.manager.data_port, SECRET)
    await present_grant(ch, "k1", "doubt-cancel")
    o = MigrationOptions.from_dict({"in_doubt_timeout_s": 20})
    st = MigrationStatus(id="doubt-cancel", vm="k1", role="source")
    mig = SourceMigration(src, ch, st, o, probe=HttpOutcomeProbe(dest.url, TOKEN, st.id, "k1"))
    mgr = MigrationManager(cluster_secret=SECRET, source_vm=None,  # type: ignore[arg-type]
                           dest_factory=dest.factory)
    mgr.statuses[st.id] = st
    mgr._running[st.id] = mig
    real_switchover = mig._switchover
    refused: list[str] = []

    async def switchover() -> None:
        task = asyncio.create_task(real_switchover())
        for _ in range(500):  # bounded: until 'go' is on its way
            if mig.switching_over:
                break
            await asyncio.sleep(0.01)
        try:
            mgr.cancel(st.id)
        except ValueError as exc:
            refused.append(str(exc))
        mig.cancel()  # even a direct cancel must not break the wait for the answer
        await task

    mig._switchover = switchover  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(mig.run(), 60)
    finally:
        await ch.close()
        src.close()
    assert refused and "too late" in refused[0]
    assert st.phase == "completed", st.to_dict()
    assert src.released


async def test_failed_resume_that_cannot_be_cleaned_up_stays_open(tmp_path: Path, dest: DestAgent) -> None:
    """The destination's resume failed and so did destroying its VM: the guest
    may run there, so neither side may say 'failed' and the source stays paused."""
    dest.factory.fail_resume = True
    dest.factory.destroy_error = RuntimeError("kill failed")
    src = MemSourceVM(tmp_path / "src", "x1", pages=512)
    try:
        _, st = await run_source(src, dest, "doubt-open", in_doubt_timeout_s=1)
        assert st.phase == "failed" and "in doubt" in (st.error or ""), st.to_dict()
        assert "undecided" in (st.resolution or "")
        assert src.paused and not src.released
    finally:
        src.close()
    await asyncio.wait_for(dest.handled.wait(), 10)
    d = dest.status("doubt-open")
    assert d is not None and d.phase == "commit" and "outcome in doubt" in (d.error or "")
