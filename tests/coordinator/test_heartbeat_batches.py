"""Heartbeats are answered once queued for the database (HeartbeatBatcher): what the
database made of one comes back with the host's next heartbeat, the coordinator's own
reads see what it queued, and a database pause never reaches the agents as latency."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from novacron.coordinator.api.hosts import INTAKE
from novacron.coordinator.api.keys import STORE
from novacron.coordinator.store import HeartbeatBatcher
from tests.coordinator.conftest import BACKENDS, Coordinator
from tests.coordinator.fake_agent import FakeAgent

Items = list[tuple[str, dict[str, Any], float]]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Database:
    """A stand-in write function: knows some hosts, can be held or made to fail."""

    def __init__(self, known: set[str]) -> None:
        self.known = known
        self.batches: list[Items] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def write(self, items: Items) -> set[str]:
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.batches.append(items)
        return {n for n, _, _ in items} & self.known


async def test_posted_heartbeats_are_written_in_batches_and_news_comes_with_the_next() -> None:
    db = Database({"a", "b"})
    hb = HeartbeatBatcher(db.write)
    db.gate.clear()  # the first batch is held: everything posted meanwhile waits behind it
    assert hb.post("a", {"load": 1.0}, 1.0) == "queued"
    await asyncio.sleep(0)  # the flusher takes the first heartbeat
    assert [hb.post(n, {"load": 2.0}, 2.0) for n in ("a", "b", "ghost")] == ["queued"] * 3
    assert hb.backlog == 4
    db.gate.set()
    await hb.settled()
    assert hb.backlog == 0
    assert [len(b) for b in db.batches] == [1, 3]  # one write for all that arrived meanwhile
    assert hb.post("ghost", {}, 3.0) == "unknown"  # told once, nothing queued
    assert hb.backlog == 0
    assert hb.post("ghost", {}, 3.0) == "queued"  # and then asked again
    await hb.settled()
    hb.registered("ghost")  # it registered in the meantime: the old news is dropped
    assert hb.post("ghost", {}, 4.0) == "queued"
    await hb.close()


async def test_a_host_that_registers_while_its_old_heartbeats_are_written_is_not_told_404() -> None:
    """A heartbeat of a host the store did not know is being written when the host
    registers: that batch's "not known" is old news, not a 404 for the next heartbeat.
    One queued after the registration that finds it unknown still is."""
    db = Database(set())
    hb = HeartbeatBatcher(db.write)
    db.gate.clear()
    assert hb.post("late", {}, 1.0) == "queued"
    await asyncio.sleep(0)  # being written
    hb.registered("late")  # the database will know it from now on ...
    db.gate.set()
    await hb.settled()  # ... but that write began before
    assert hb.post("late", {}, 2.0) == "queued"
    await hb.settled()  # queued after the registration, and still unknown (deleted since)
    assert hb.post("late", {}, 3.0) == "unknown"
    assert not hb._registered_at and not hb._registrations  # nothing kept once written


async def test_a_failed_batch_is_reported_and_the_next_one_recovers() -> None:
    db = Database({"a"})
    hb = HeartbeatBatcher(db.write)
    db.fail = OSError("database connection lost")
    assert hb.post("a", {}, 1.0) == "queued"
    await hb.settled()  # failed batches count as done: no reader waits forever
    assert hb.error is not None and "database connection lost" in hb.error
    assert hb.post("a", {}, 2.0) == "failing"  # still queued, so the database catches up
    db.fail = None
    await hb.settled()
    assert hb.error is None and hb.post("a", {}, 3.0) == "queued"
    with pytest.raises(OSError):  # a caller that waits gets the failure itself
        db.fail = OSError("down again")
        await hb.commit("a", {}, 4.0)
    db.fail = None
    assert await hb.commit("a", {}, 5.0) is True and await hb.commit("zz", {}, 5.0) is False
    await hb.close()


async def test_settled_returns_under_a_steady_stream_of_heartbeats() -> None:
    db = Database({f"h{i}" for i in range(50)})
    hb = HeartbeatBatcher(db.write)
    stop = asyncio.Event()

    async def fleet() -> None:
        i = 0
        while not stop.is_set():  # bounded by the test's own deadline below
            hb.post(f"h{i % 50}", {"load": float(i)}, float(i))
            i += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(fleet())
    await asyncio.sleep(0.05)
    # only what was queued before the call is waited for, not the stream after it
    await asyncio.wait_for(hb.settled(), 5)
    stop.set()
    await task
    await hb.close()
    assert hb.backlog == 0


async def test_heartbeats_are_read_back_and_forgotten_hosts_hear_404(
        coordinator: Coordinator, agents: list[FakeAgent]) -> None:
    alpha = agents[0]
    status, _ = await coordinator.call("POST", "/hosts/alpha/heartbeat", token=alpha.token,
                                       json={"memory_available_bytes": 12345})
    assert status == 200
    # this coordinator's own read waits for the heartbeat it queued
    assert (await coordinator.call("GET", "/hosts/alpha"))[1]["memory_available_bytes"] == 12345
    assert (await coordinator.call("DELETE", "/hosts/alpha"))[0] == 200  # binding kept
    beat = {"memory_available_bytes": 1}
    first = (await coordinator.call("POST", "/hosts/alpha/heartbeat", token=alpha.token, json=beat))[0]
    await coordinator.server.app[STORE].heartbeats.settled()
    second = (await coordinator.call("POST", "/hosts/alpha/heartbeat", token=alpha.token, json=beat))[0]
    assert (first, second) == (200, 404)  # the database's answer, with the next heartbeat
    assert (await coordinator.call("GET", "/hosts/alpha"))[0] == 404  # nothing recreated it
    await alpha.register_with(coordinator.session, coordinator.url, coordinator.cfg.agent_token)
    assert (await coordinator.call("POST", "/hosts/alpha/heartbeat", token=alpha.token,
                                   json=beat))[0] == 200


async def test_a_database_failure_is_503_and_a_slow_database_is_not_waited_for(
        coordinator: Coordinator, agents: list[FakeAgent], monkeypatch: pytest.MonkeyPatch) -> None:
    alpha, store = agents[0], coordinator.server.app[STORE]
    write = store._write_heartbeats
    gate, failing = asyncio.Event(), [True]

    async def flaky(items: Items) -> set[str]:
        await gate.wait()
        if failing[0]:
            raise ConnectionError("the database went away")
        return await write(items)

    monkeypatch.setattr(store.heartbeats, "_write", flaky)
    beat = {"memory_available_bytes": 777}
    # the database does not answer at all: the agent is answered anyway, at once
    status, _ = await asyncio.wait_for(coordinator.call(
        "POST", "/hosts/alpha/heartbeat", token=alpha.token, json=beat), 5)
    assert status == 200 and store.heartbeats.backlog == 1
    gate.set()
    await store.heartbeats.settled()
    async with coordinator.session.post(coordinator.url + "/api/v1/hosts/alpha/heartbeat",
                                        json=beat, headers=coordinator.headers(alpha.token)) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"]
        assert "database failed" in (await resp.json())["error"]
    # the agent backs off on that 503: down-detection holds as for a shed heartbeat
    assert coordinator.server.app[INTAKE].last_shed > 0
    await store.heartbeats.settled()  # that one was queued too, and failed as well
    failing[0] = False  # the database comes back: the next heartbeat still hears of the
    # last failure, but is written, and the one after it is taken as usual
    status, _ = await coordinator.call("POST", "/hosts/alpha/heartbeat", token=alpha.token, json=beat)
    assert status == 503
    assert (await coordinator.call("GET", "/hosts/alpha"))[1]["memory_available_bytes"] == 777
    assert (await coordinator.call("POST", "/hosts/alpha/heartbeat", token=alpha.token,
                                   json=beat))[0] == 200
