"""``novacron migration list|show|cancel``, ``vm delete --force`` and the CLI's wording, end to end.

A real coordinator subprocess with fake agents (tests/coordinator/fake_agent.py) behind it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from novacron.coordinator.client import ApiClientError, CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.fake_agent import FakeAgent, register_all, serving
from tests.coordinator.test_api import vm_spec
from tests.coordinator.test_cli import cli, cli_env

pytestmark = [pytest.mark.e2e]

Fleet = tuple[LocalCoordinator, dict[str, str], list[FakeAgent]]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    fakes = [FakeAgent("alpha-host-with-a-long-name", "tok-alpha-3-0123456789"),
             FakeAgent("beta", "tok-beta-3-0123456789", 4 << 30)]
    async with LocalCoordinator(tmp_path / "coord", settings={"poll_interval_s": "0.02"}) as coord, \
            serving(*fakes):
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            await register_all(client, fakes, coord.agent_token)
            await client.create_vm({**vm_spec("web"), "host": fakes[0].name})
        yield coord, cli_env(coord, tmp_path, COLUMNS="120"), fakes


async def test_no_wait_id_is_shown_listed_and_cancelled(fleet: Fleet) -> None:
    coord, env, fakes = fleet
    fakes[0].hold_migrations = True  # stays in pre-copy until cancelled
    code, out, err = await cli(env, "migrate", "web", "--to", "beta", "--no-wait")
    assert code == 0, err
    mig_id = out.strip()
    assert mig_id.startswith("m-") and len(out.splitlines()) == 1

    code, out, err = await cli(env, "migration", "show", mig_id, "--json")
    assert code == 0, err
    assert json.loads(out)["id"] == mig_id and json.loads(out)["vm"] == "web"
    code, out, err = await cli(env, "migration", "show", mig_id)
    assert code == 0 and mig_id in out and "beta" in out, err
    code, out, err = await cli(env, "migration", "list", "--json", "--vm", "web")
    assert code == 0 and [m["id"] for m in json.loads(out)] == [mig_id], err

    # deleting a migrating VM names the command that cancels its migration
    code, _out, err = await cli(env, "vm", "delete", "web")
    assert code == 1 and f"novacron migration cancel {mig_id}" in err, err
    code, out, err = await cli(env, "migration", "cancel", mig_id)
    assert code == 0 and out.startswith(f"cancelling {mig_id}: web stays on alpha"), err
    async with CoordinatorClient(coord.url, coord.admin_token) as client:
        phases = [event["phase"] async for event in client.migration_events(mig_id)]
    assert phases[-1] == "cancelled"
    code, out, err = await cli(env, "migration", "show", mig_id)
    assert code == 0 and out.splitlines()[0].startswith(f"migration {mig_id} cancelled"), out
    code, _out, err = await cli(env, "migration", "cancel", mig_id)
    assert code == 1 and "already cancelled" in err and len(err.strip().splitlines()) == 1
    code, _out, err = await cli(env, "migration", "show", "m-nope")
    assert code == 1 and "no migration 'm-nope'" in err


async def test_failed_migration_prints_its_error_first(fleet: Fleet) -> None:
    _coord, env, fakes = fleet
    fakes[0].fail_migrations = "target refused the memory layout"
    code, out, err = await cli(env, "migrate", "web", "--to", "beta")
    assert code == 1, out + err
    outcome = [line for line in out.splitlines() if line.startswith("migration m-")]
    assert outcome and "failed: target refused the memory layout" in outcome[0], out
    assert "web stays on alpha-host-with-a-long-name" in out
    assert out.index(outcome[0]) < out.index("bytes_wire")  # the error before the figures
    assert "dirty_rate" not in out and "pages_zero" not in out  # no rows of zeros


async def test_ids_stay_whole_in_narrow_tables(fleet: Fleet) -> None:
    _coord, env, _fakes = fleet
    narrow = {**env, "COLUMNS": "50"}
    code, out, err = await cli(narrow, "migrate", "web", "--to", "beta", "--no-wait")
    assert code == 0, err
    mig_id = out.strip()
    for argv, whole in ((["migrations"], mig_id), (["hosts"], "alpha-host-with-a-long-name"),
                        (["vms"], "web")):
        code, out, err = await cli(narrow, *argv)
        assert code == 0, err
        assert whole in out, out


async def test_api_errors_name_the_flag(fleet: Fleet) -> None:
    _coord, env, _fakes = fleet
    code, _out, err = await cli(env, "migrate", "web", "--to", "beta", "--downtime-ms", "0")
    assert code == 1 and "--downtime-ms:" in err and "body.options" not in err, err
    code, _out, err = await cli(env, "migration", "list", "--limit", "0")
    assert code == 1 and "--limit" in err and "query parameter" not in err, err
    code, _out, err = await cli(env, "vm", "create", "x", "--vcpus", "0", "--memory-mb", "64",
                                "--kernel", "/k")
    assert code == 1 and "--vcpus" in err and "body.vcpus" not in err, err


async def test_delete_force_forgets_a_vm_its_agent_cannot_delete(fleet: Fleet, tmp_path: Path) -> None:
    coord, env, fakes = fleet
    async with CoordinatorClient(coord.url, coord.admin_token) as client:
        await client.create_vm({**vm_spec("db"), "host": "beta"})
    fakes[1].token = "tok-beta-rotated-0123456789"  # the coordinator's calls to beta now fail (401)
    code, out, err = await cli(env, "vm", "show", "db")
    assert code == 0 and "bad token" in out and "unreachable" not in out, out + err  # it answered
    code, _out, err = await cli(env, "vm", "delete", "db")
    assert code == 1 and "novacron vm delete --force" in err, err
    code, out, err = await cli(env, "vm", "delete", "db", "--force")
    assert code == 0 and out.strip() == "db deleted", err
    code, _out, err = await cli(env, "vm", "show", "db")
    assert code == 1 and "no VM named 'db'" in err


async def test_rebalance_speaks_in_units(fleet: Fleet) -> None:
    coord, env, fakes = fleet
    async with CoordinatorClient(coord.url, coord.admin_token) as client:
        await client.create_vm({**vm_spec("db"), "host": "beta"})  # beta is busy: web can join it
        await client.request("PUT", f"/placements/hosts/{fakes[0].name}", {"cost_per_hour": 2.5})
    code, out, err = await cli(env, "rebalance")
    assert code == 0, err
    text = " ".join(out.split())
    assert f"frees {fakes[0].name}" in text, out
    assert "cost_per_hour sums to 2.50 per hour (in the unit of cost_per_hour)" in text, out
    assert "power them off" in text and "powering on" not in text and "/h" not in text
    code, out, err = await cli({**env, "COLUMNS": "50"}, "rebalance")
    assert code == 0 and fakes[0].name in out.split("Rebalancing plan")[1].split("frees")[0], out


async def test_set_changes_limits_live_and_is_audited(fleet: Fleet) -> None:
    coord, env, fakes = fleet
    fakes[0].hold_migrations = True  # stays in pre-copy
    code, out, err = await cli(env, "migrate", "web", "--to", "beta", "--no-wait",
                               "--bandwidth-mbps", "2")
    assert code == 0, err
    mig_id = out.strip()
    # the coordinator's default policy is explicit on the request
    assert fakes[0].migration_requests[-1]["options"] == {"bandwidth_mbps": 2, "on_no_converge": "abort"}
    code, out, err = await cli(env, "migration", "set", mig_id, "--bandwidth-mbps", "0",
                               "--downtime-ms", "150")
    assert code == 0, err
    assert "bandwidth unlimited, downtime budget 150 ms" in out, out
    assert fakes[0].changes == [{"bandwidth_mbps": 0, "downtime_ms": 150}]
    code, out, err = await cli(env, "migration", "show", mig_id, "--json")
    assert json.loads(out)["options"]["downtime_ms"] == 150
    # validated before any agent hears of it, errors name the flag
    code, _out, err = await cli(env, "migration", "set", mig_id, "--downtime-ms", "0")
    assert code == 1 and "--downtime-ms" in err, err
    code, _out, err = await cli(env, "migration", "set", mig_id)
    assert code == 2 and "--bandwidth-mbps" in err
    async with CoordinatorClient(coord.url, coord.admin_token) as client:
        for bad in ({"max_rounds": 3}, {}, {"bandwidth_mbps": "fast"}):
            with pytest.raises(ApiClientError) as refused:
                await client.request("PATCH", f"/migrations/{mig_id}", bad)
            assert refused.value.status == 400, (bad, refused.value)
    assert len(fakes[0].changes) == 1  # the refused ones never reached the agent
    audit = [json.loads(line) for line in (coord.data_dir / "audit.log").read_text().splitlines()]
    changes = [(e["result"], e["status"]) for e in audit if e["action"].startswith("PATCH")]
    assert changes[0] == ("ok", 200) and len(changes) >= 4, changes  # refusals recorded too
    code, out, err = await cli(env, "migration", "cancel", mig_id)
    assert code == 0, err
    code, _out, err = await cli(env, "migration", "set", mig_id, "--bandwidth-mbps", "1")
    assert code == 1 and "already" in err, err


async def test_postcopy_is_passed_on_and_budget_exceeded_exits_3(fleet: Fleet) -> None:
    coord, env, fakes = fleet
    fakes[0].fail_migrations = "stopped by the test"  # the VM stays where it is
    code, out, err = await cli(env, "migrate", "web", "--to", "beta", "--on-no-converge", "postcopy")
    assert code == 1 and "stopped by the test" in out + err, out + err
    assert fakes[0].migration_requests[-1]["options"] == {"on_no_converge": "postcopy"}
    fakes[0].fail_migrations = None
    fakes[0].exceed_budget = True
    code, out, err = await cli(env, "migrate", "web", "--to", "beta", "--on-no-converge", "force")
    assert code == 3, out + err
    assert fakes[0].migration_requests[-1]["options"] == {"on_no_converge": "force"}
    async with CoordinatorClient(coord.url, coord.admin_token) as client:
        mig = (await client.request("GET", "/migrations?vm=web"))["migrations"][0]
        assert mig["phase"] == "completed" and mig["budget_exceeded"] is True
        code, out, err = await cli(env, "migration", "show", mig["id"])
        assert code == 0 and "exceeded" in out, out
        async with client.session.get(coord.url + "/metrics",
                                      headers={"Authorization": f"Bearer {coord.admin_token}"}) as r:
            metrics = await r.text()
    assert 'novacron_migration_budget_exceeded_total{result="completed"} 1.0' in metrics, metrics[-2000:]
