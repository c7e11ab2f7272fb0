"""Migrations from one agent to one destination share its link (a drain,
estimate.LinkShare): the pause is budgeted at the whole link's rate, and a
migration pauses only holding the turn, the others' pre-copy writes held."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from novacron.agent.channel import connect
from novacron.agent.migration import estimate
from novacron.agent.migration.estimate import LinkShare
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.source import SourceMigration
from novacron.agent.migration.status import MigrationStatus
from tests.migration.memvm import MemSourceVM
from tests.migration.test_dest_dedup import SECRET, Host, host  # noqa: F401  (fixture)


class Flow:
    """A migration as the share sees it: its acked rate and its unacked bytes."""

    def __init__(self, rate: float, queued: int = 0) -> None:
        self.rate, self.queued = rate, queued

    def share_figures(self, now: float) -> tuple[float, int]:
        return self.rate, self.queued


def test_a_migration_alone_budgets_with_its_own_measure() -> None:
    share, a = LinkShare(), Flow(5e6, 1000)
    share.join(a)
    assert share.others(a) == 0 and share.aggregate(a, 0.0) == 0.0
    assert share.queued_others(a, 0.0) == 0


def test_the_link_is_the_sum_of_the_flows_measured_together() -> None:
    share = LinkShare()
    flows = [Flow(3e6, 100), Flow(4e6, 200), Flow(5e6, 300)]
    for f in flows:
        share.join(f)
    assert share.aggregate(flows[0], 0.0) == pytest.approx(12e6)
    # each flow's own acks show a quarter to half of it: its pause would be budgeted
    # at that; the others' unacked bytes cross ahead of its last pages
    assert share.queued_others(flows[0], 0.0) == 500
    # while one holds the turn the others are held: their rates say nothing of the link
    share.holder = flows[1]
    flows[1].rate, flows[0].rate, flows[2].rate = 12e6, 0.0, 0.0
    assert share.aggregate(flows[0], 0.0) == pytest.approx(12e6)
    share.holder = None
    # a lone sender (the others not started or done sending) is no sample of the sum
    flows[0].rate, flows[1].rate, flows[2].rate = 2e6, 0.0, 0.0
    assert share.aggregate(flows[0], 0.0) == pytest.approx(12e6)
    share.leave(flows[1])
    share.leave(flows[2])
    assert share.aggregate(flows[0], 0.0) == 0.0  # alone again


async def test_the_turn_is_exclusive_and_holds_the_others() -> None:
    share = LinkShare()
    a, b, c = Flow(1.0), Flow(1.0), Flow(1.0)
    for f in (a, b, c):
        share.join(f)
    assert await share.wait_turn(b) == 0.0  # no one holds it: no wait
    await share.acquire(a)
    assert share.holds(a) and await share.wait_turn(a) == 0.0  # the holder is never held
    held = asyncio.create_task(share.wait_turn(b))
    second = asyncio.create_task(share.acquire(c))
    await asyncio.sleep(0.05)
    assert not held.done() and not second.done() and share.holds(a)
    share.release(a)
    async with asyncio.timeout(5):
        await second
    assert share.holds(c)
    # b was freed by a's release; c holding now does not hold back a write already let go
    async with asyncio.timeout(5):
        assert await held > 0
    # a migration that ends (committed or failed) while holding gives the turn back
    waiting = asyncio.create_task(share.wait_turn(b))
    share.leave(c)
    async with asyncio.timeout(5):
        await waiting
    assert share.holder is None
    share.release(b)  # releasing a turn one does not hold changes nothing
    assert share.holder is None


def test_one_share_per_destination_host() -> None:
    assert estimate.link_share("10.0.0.2:7000") is estimate.link_share("10.0.0.2:7001")
    assert estimate.link_share("10.0.0.2:7000") is not estimate.link_share("10.0.0.3:7000")


async def test_concurrent_migrations_pause_one_at_a_time(tmp_path: Path, host: Host) -> None:  # noqa: F811
    """Three migrations to one destination at once: each pauses holding the turn (or
    alone), so no two pauses overlap, and every RAM matches at switchover."""
    pausing: list[tuple[str, bool]] = []

    class Watched(MemSourceVM):
        mig: SourceMigration

        async def pause(self) -> None:
            share = self.mig.share  # one holder at a time: pauses holding it never overlap
            pausing.append((self.name, share.holds(self.mig) or not share.others(self.mig)))
            await super().pause()

    async def one(i: int) -> MigrationStatus:
        vm = Watched(tmp_path / f"s{i}", f"vm{i}", pages=2048, dirty_pages_per_s=300, seed=i)
        ch = await connect("127.0.0.1", host.server.port, SECRET)
        o = MigrationOptions.from_dict({"test_digest": True, "downtime_ms": 300})
        st = MigrationStatus(id=f"m{i}", vm=vm.name, role="source", peer=f"127.0.0.1:{host.server.port}",
                             options=o.as_dict())
        vm.mig = SourceMigration(vm, ch, st, o)
        try:
            await vm.mig.run()
        finally:
            await ch.close()
            vm.close()
        return st

    async with asyncio.timeout(120):
        sts = await asyncio.gather(*(one(i) for i in range(3)))
    for st in sts:
        assert st.phase == "completed", st.error
        assert st.digest_source == st.digest_destination
    assert len(pausing) == 3 and all(ok for _, ok in pausing), pausing
    assert sum(st.link_share["turns"] for st in sts) >= 1, [st.link_share for st in sts]
    assert estimate.link_share(f"127.0.0.1:{host.server.port}").members == set()


async def test_the_pause_is_budgeted_at_the_whole_link_in_a_drain(tmp_path: Path) -> None:
    """The failed 4-VM evacuation: each migration's acks showed its quarter of the link
    and its pause was budgeted at that. Beside others, the estimate takes the link's
    summed rate (the pause holds the turn); alone, its own measure."""
    vm = MemSourceVM(tmp_path / "s", "vm", pages=64)
    try:
        o = MigrationOptions.from_dict({})
        st = MigrationStatus(id="m", vm="vm", role="source", peer="https://10.9.0.2:7000", options=o.as_dict())
        mig = SourceMigration(vm, None, st, o)  # type: ignore[arg-type]  # no channel: only the estimate runs
        mig.link.busy_rate = 3e6  # its share of a 12 MB/s link
        alone = mig._switchover_estimate(dirty=2000)
        assert st.final_rate_bytes_s == pytest.approx(3e6)
        mig.share.join(mig)
        others = [Flow(4.5e6, 2_000_000), Flow(4.5e6, 1_000_000)]
        for f in others:
            mig.share.join(f)
        # our own acked rate over the window is 0 here (no acks): the others' 9 MB/s is the sample
        shared = mig._switchover_estimate(dirty=2000)
        assert st.final_rate_bytes_s == pytest.approx(9e6)
        assert shared.final_pages == pytest.approx(alone.final_pages / 3)
        assert shared.queued_others == 0.0  # their queues drain during the round we run alone
        await mig.share.acquire(mig)
        holding = mig._switchover_estimate(dirty=2000)
        assert holding.queued_others == pytest.approx(3_000_000 / 9e6)
        assert mig.status.link_share["peak_migrations"] == 3
        mig.share.leave(mig)
    finally:
        vm.close()
