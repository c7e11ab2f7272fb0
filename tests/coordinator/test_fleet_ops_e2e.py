"""Fleet operations end to end: a real coordinator, real agents, real TCG guests (64 MiB).

- ``novacron host drain`` empties a host of three VMs within the migration limits
  (checked on the migration records, not on timing) and reports the fourth VM, which
  joins a network no other host has: it stays running where it was.
- Over a fleet limit of 3 a fourth migration is queued (shown so by the API and the
  CLI), starts when a slot frees and completes; ``novacron rebalance --apply --yes``
  then moves exactly what the plan said.

The first test runs everything inside a network namespace of its own (the agent
with the network needs a real bridge for the VM's tap); processes started from
this thread while it is inside the namespace live there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from novacron.agent.local import LocalAgent
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.test_cli import cli_env
from tests.coordinator.test_drain import overlaps, until
from tests.migration.qemu_helpers import guest_spec
from tests.netns import inside, ip

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

GUEST_MB = 64


def small_guest(name: str, **kw: Any) -> dict[str, Any]:
    return {**guest_spec(name, memory_mb=GUEST_MB, mem_mb=8, rate_mb=1), **kw}


async def call(coord: LocalCoordinator, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session,
        session.request(method, f"{coord.url}/api/v1{path}", json=body,
                        headers={"Authorization": f"Bearer {coord.admin_token}"}) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def ok(coord: LocalCoordinator, method: str, path: str, body: Any = None,
             want: int = 200) -> Any:
    status, doc = await call(coord, method, path, body)
    assert status == want, (method, path, status, doc)
    return doc


async def cli(env: dict[str, str], *argv: str, timeout: float = 300) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "novacron.cli.main", *argv, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


@contextlib.contextmanager
def namespace_with_bridge(bridge: str) -> Iterator[str]:
    """A fresh network namespace (loopback up, ``bridge`` up), removed afterwards."""
    ns = f"nc-fl-{os.getpid()}{secrets.token_hex(2)}"
    ip("netns", "add", ns)
    try:
        ip("link", "set", "lo", "up", ns=ns)
        ip("link", "add", bridge, "type", "bridge", ns=ns)
        ip("link", "set", bridge, "up", ns=ns)
        yield ns
    finally:
        ip("netns", "del", ns)


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, limits: dict[str, str], agents: dict[str, dict[str, str]],
                ) -> AsyncIterator[tuple[LocalCoordinator, dict[str, LocalAgent]]]:
    """A coordinator with ``limits`` and one real agent per entry of ``agents``
    (name -> extra agent settings), all registered and up."""
    secret = secrets.token_urlsafe(32)
    coord = LocalCoordinator(tmp_path / "coord", settings={
        "heartbeat_interval_s": "0.5", "poll_interval_s": "0.1", **limits})
    started: dict[str, LocalAgent] = {}
    try:
        await coord.start()
        for name, settings in agents.items():
            agent = LocalAgent(name, cluster_secret=secret, accel="tcg", settings={
                "coordinator_url": coord.url, "coordinator_token": coord.agent_token, **settings})
            started[name] = agent
            await agent.start()

        async def all_up() -> bool:
            hosts = (await ok(coord, "GET", "/hosts"))["hosts"]
            return sorted(h["name"] for h in hosts if h["state"] == "up") == sorted(agents)

        await until("agents registered", all_up, timeout=60)
        yield coord, started
    finally:
        for agent in started.values():
            await agent.stop()
        coord.stop()


async def agent_vm(agent: LocalAgent, name: str) -> dict[str, Any] | None:
    status, doc = await agent.request("GET", f"/v1/vms/{name}")
    return doc if status == 200 else None


async def test_drain_moves_three_vms_within_limits_and_reports_the_one_that_cannot(
        tmp_path: Path) -> None:
    limits = {"migration_limit_outbound": "2", "migration_limit_inbound": "1",
              "migration_limit_fleet": "8"}
    with namespace_with_bridge("br-prod") as ns, inside(ns):
        async with fleet(tmp_path, limits, {"fl-a": {"networks": "prod=br-prod"}, "fl-b": {},
                                            "fl-c": {}}) as (coord, agents):
            for name in ("v1", "v2", "v3"):
                await ok(coord, "POST", "/vms", {**small_guest(name), "host": "fl-a"}, want=201)
            # only fl-a has the fleet network 'prod': this VM can go nowhere else
            await ok(coord, "POST", "/vms", {**small_guest("pinned", nics=[{"net": "prod"}]),
                                             "host": "fl-a"}, want=201)
            env = cli_env(coord, tmp_path, COLUMNS="160")
            code, out, err = await cli(env, "host", "drain", "fl-a", "--max-parallel", "2")
            assert code == 1, (out, err)  # one VM stayed
            assert "pinned did not move" in out and "no other up host has the network(s) prod" in out, out
            assert "3 of 4 VMs moved" in out and "fl-a stays in maintenance" in out, out

            drain = (await ok(coord, "GET", "/drains"))["drains"][0]
            assert drain["host"] == "fl-a" and drain["state"] == "failed", drain
            assert drain["max_parallel"] == 2
            by_vm = {v["vm"]: v for v in drain["vms"]}
            for name in ("v1", "v2", "v3"):
                entry = by_vm[name]
                assert entry["state"] == "moved" and entry["target"] in ("fl-b", "fl-c"), entry
                vm = await ok(coord, "GET", f"/vms/{name}")
                assert vm["host"] == entry["target"] and vm["state"] == "running", vm
                assert (await agent_vm(agents[entry["target"]], name) or {}).get("state") == "running"
                assert await agent_vm(agents["fl-a"], name) is None
            # the VM that could not move runs where it was, its QEMU untouched
            assert by_vm["pinned"]["state"] == "failed" and by_vm["pinned"]["migration"] is None
            assert (await ok(coord, "GET", "/vms/pinned"))["host"] == "fl-a"
            assert (await agent_vm(agents["fl-a"], "pinned") or {}).get("state") == "running"

            # the limits, from the records: <= 2 out of fl-a, <= 1 into each host at a time
            migs = (await ok(coord, "GET", "/migrations"))["migrations"]
            assert sorted(m["vm"] for m in migs) == ["v1", "v2", "v3"]
            assert all(m["phase"] == "completed" for m in migs), migs
            assert overlaps(migs, lambda m: m["source"])["fl-a"] <= 2
            assert max(overlaps(migs, lambda m: m["target"]).values()) <= 1

            # the host shows maintenance everywhere once the drain is over
            host = await ok(coord, "GET", "/hosts/fl-a")
            assert host["lifecycle"] == "maintenance" and host["drain"] is None
            code, out, err = await cli(env, "hosts")
            row = next(line for line in out.splitlines() if "fl-a" in line)
            assert code == 0 and "maintenance" in row, out
            code, out, err = await cli(env, "host", "show", "fl-a")
            assert code == 0 and "maintenance" in out and "pinned" in out, out + err
            code, out, err = await cli(env, "drain", "show", drain["id"])
            assert code == 1 and "pinned did not move" in out, out + err


async def test_fourth_migration_queues_then_rebalance_apply_moves_what_the_plan_said(
        tmp_path: Path) -> None:
    limits = {"migration_limit_outbound": "4", "migration_limit_inbound": "4",
              "migration_limit_fleet": "3"}
    async with fleet(tmp_path, limits, {"fq-a": {}, "fq-b": {}}) as (coord, agents):
        names = ["w1", "w2", "w3", "w4"]
        for name in names:
            await ok(coord, "POST", "/vms", {**small_guest(name), "host": "fq-a"}, want=201)
        # three slow ones take the fleet's three slots (page data capped at 1 MB/s: the
        # guest's kernel and initramfs alone keep each busy for seconds) ...
        # (force: under a 1 MB/s cap the estimate takes the cap for the link, and a busy guest
        # would be aborted as not converging; this test is about the queue)
        first = [await ok(coord, "POST", "/migrations", {
            "vm": n, "target": "fq-b", "options": {"bandwidth_mbps": 1, "on_no_converge": "force"}},
            want=202)
            for n in names[:3]]
        assert all(m["phase"] != "queued" for m in first), first
        # ... so the fourth is queued, not failed
        fourth = await ok(coord, "POST", "/migrations", {"vm": "w4", "target": "fq-b"}, want=202)
        assert fourth["phase"] == "queued" and fourth["error"] is None, fourth
        assert fourth["queue_reason"] == "the fleet runs 3 migrations (limit 3)"
        env = cli_env(coord, tmp_path, COLUMNS="160")
        code, out, err = await cli(env, "migration", "show", fourth["id"])
        assert code == 0, out + err
        if (await ok(coord, "GET", f"/migrations/{fourth['id']}"))["phase"] == "queued":
            # queued before and after the CLI ran (phases never go back): it showed it so
            assert "queued" in out and "the fleet runs 3 migrations (limit 3)" in out, out

        async def all_done() -> list[dict[str, Any]] | None:
            docs = [await ok(coord, "GET", f"/migrations/{m['id']}") for m in [*first, fourth]]
            return docs if all(d["phase"] in ("completed", "failed", "cancelled") for d in docs) \
                else None

        done = await until("the four migrations ended", all_done, timeout=400)
        assert [d["phase"] for d in done] == ["completed"] * 4, [(d["phase"], d["error"]) for d in done]
        assert done[3]["started_at"] >= min(d["finished_at"] for d in done[:3])
        assert overlaps(done, lambda m: "fleet")["fleet"] <= 3
        for name in names:
            assert (await ok(coord, "GET", f"/vms/{name}"))["host"] == "fq-b"
            assert (await agent_vm(agents["fq-b"], name) or {}).get("state") == "running"

        # rebalance: one VM back on fq-a makes it nearly idle beside fq-b; memory counted
        # with a generous overcommit so the machine's own use does not make the hosts look busy
        await ok(coord, "POST", "/migrations", {"vm": "w4", "target": "fq-a"}, want=202)

        async def w4_home() -> bool:
            vm = await ok(coord, "GET", "/vms/w4")
            return bool(vm["host"] == "fq-a" and vm["state"] == "running")

        await until("w4 back on fq-a", w4_home, timeout=200)
        for host in ("fq-a", "fq-b"):
            await ok(coord, "PUT", f"/placements/hosts/{host}", {"mem_overcommit": 16})
        plan = await ok(coord, "POST", "/rebalance/plan", {})
        assert [(m["vm"], m["source"], m["target"]) for m in plan["moves"]] == \
            [("w4", "fq-a", "fq-b")], plan
        code, out, err = await cli(env, "rebalance", "--apply", "--yes")
        assert code == 0, out + err
        assert "Rebalancing plan" in out and "w4" in out and "1 of 1 VMs moved" in out, out
        assert "powering on" not in out and "/h" not in out
        assert (await ok(coord, "GET", "/vms/w4"))["host"] == "fq-b"
        assert (await agent_vm(agents["fq-b"], "w4") or {}).get("state") == "running"
        assert await agent_vm(agents["fq-a"], "w4") is None
        runs = (await ok(coord, "GET", "/drains"))["drains"]
        assert runs[0]["kind"] == "rebalance" and runs[0]["state"] == "done"
        assert [(v["vm"], v["source"], v["target"]) for v in runs[0]["vms"]] == \
            [("w4", "fq-a", "fq-b")]
