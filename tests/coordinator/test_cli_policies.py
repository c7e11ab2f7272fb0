"""Migration policies, labels and the CLI's tables and errors, against a real coordinator
subprocess (policies given as JSON in its environment) with fake agents behind it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from novacron.coordinator.client import CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.fake_agent import FakeAgent, register_all, serving
from tests.coordinator.test_api import vm_spec
from tests.coordinator.test_cli import cli, cli_env

pytestmark = [pytest.mark.e2e]

POLICIES = {"bulk": {"bandwidth_mbps": 50, "downtime_ms": 2000, "selector": {"tier": "batch"},
                     "description": "batch VMs: cap the link"},
            "latency": {"downtime_ms": 50, "max_rounds": 100}}
KERNEL = ["--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd", "--cmdline", "console=ttyS0"]
Fleet = tuple[LocalCoordinator, dict[str, str], list[FakeAgent]]


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    fakes = [FakeAgent("alpha", "tok-alpha-7-0123456789"), FakeAgent("beta", "tok-beta-7-0123456789")]
    settings = {"poll_interval_s": "0.02", "migration_policies": json.dumps(POLICIES)}
    async with LocalCoordinator(tmp_path / "coord", settings=settings) as coord, serving(*fakes):
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            await register_all(client, fakes, coord.agent_token)
        yield coord, cli_env(coord, tmp_path, COLUMNS="80"), fakes


async def test_policies_through_the_cli(fleet: Fleet) -> None:
    _coord, env, fakes = fleet
    code, out, err = await cli(env, "migration", "policies")
    assert code == 0, err
    assert "bulk" in out and "tier=batch" in out and "bandwidth_mbps=50" in out and "latency" in out
    assert "default: none" in out

    code, out, err = await cli(env, "vm", "create", "batch1", "--vcpus", "1", "--memory-mb", "64",
                               *KERNEL, "--host", "alpha", "--label", "tier=batch",
                               "--label", "team=ml")
    assert code == 0, err
    code, out, err = await cli(env, "vm", "show", "batch1")
    assert code == 0 and "team=ml, tier=batch" in out, out + err

    # labels select bulk; the flag overrides one of its options; said before the progress
    code, out, err = await cli(env, "migrate", "batch1", "--to", "beta", "--downtime-ms", "400")
    assert code == 0, out + err
    first = out.splitlines()[0]
    assert first == ("policy bulk (selected by the VM's labels); options: bandwidth_mbps=50, "
                     "downtime_ms=400, on_no_converge=abort; the rest: agent defaults"), out
    assert fakes[0].migration_requests[-1]["options"] == {"bandwidth_mbps": 50, "downtime_ms": 400,
                                                          "on_no_converge": "abort"}

    code, out, err = await cli(env, "migrate", "batch1", "--to", "alpha", "--policy", "latency",
                               "--no-throttle", "--no-wait")
    assert code == 0, err
    mig_id = out.strip()
    code, out, err = await cli(env, "migration", "show", mig_id)
    assert code == 0, err
    text = " ".join(out.replace("│", " ").split())  # the table's rows, wrapped cells joined
    assert "policy latency (named with the migration)" in text, out
    assert "downtime_ms=50, max_rounds=100, on_no_converge=abort, throttle=off" in text, out
    code, out, err = await cli(env, "migration", "show", mig_id, "--json")
    assert json.loads(out)["policy_source"] == "request"
    code, out, err = await cli(env, "migrations")
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().startswith("m-")}
    assert rows[mig_id][5] == "latency" and "bulk" in {r[5] for r in rows.values()}, out

    # the VM's own policy and labels, changed from the CLI
    code, out, err = await cli(env, "vm", "label", "batch1", "tier-", "zone=eu",
                               "--migration-policy", "latency")
    assert code == 0, err
    assert out.strip() == "batch1: labels team=ml, zone=eu; migration policy latency"
    code, out, err = await cli(env, "vm", "label", "batch1", "--migration-policy", "none")
    assert code == 0 and out.strip().endswith("migration policy none"), err


async def test_policy_errors_name_the_flag(fleet: Fleet) -> None:
    _coord, env, fakes = fleet
    code, _out, err = await cli(env, "vm", "create", "web", "--vcpus", "1", "--memory-mb", "64",
                               *KERNEL, "--host", "alpha")
    assert code == 0, err
    code, _out, err = await cli(env, "migrate", "web", "--to", "beta", "--policy", "nope")
    assert code == 1 and "no migration policy 'nope' (configured: bulk, latency)" in err, err
    assert len(err.strip().splitlines()) == 1
    code, _out, err = await cli(env, "migrate", "web", "--to", "beta", "--policy", "Bad Name")
    assert code == 1 and "--policy:" in err and "body.policy" not in err, err
    code, _out, err = await cli(env, "vm", "create", "x", "--vcpus", "1", "--memory-mb", "64",
                                *KERNEL, "--label", "Tier=x")
    assert code == 1 and "--label" in err and "body.labels" not in err, err
    code, _out, err = await cli(env, "vm", "label", "web", "oops")
    assert code == 2 and "expected KEY=VALUE" in err, err
    assert fakes[0].migration_requests == []  # nothing was started


async def test_tables_keep_ids_whole_and_vm_show_says_unreachable_once(fleet: Fleet) -> None:
    coord, env, _fakes = fleet
    long_name = "a-vm-with-a-name-long-enough-to-be-cut-at-80-columns-0123456789"
    gamma = FakeAgent("gamma-host-with-a-long-name", "tok-gamma-7-0123456789")
    async with serving(gamma), CoordinatorClient(coord.url, coord.admin_token) as client:
        await register_all(client, [gamma], coord.agent_token)
        await client.create_vm({**vm_spec(long_name), "host": gamma.name})
    # gamma's agent is gone now (its server closed)
    code, out, err = await cli(env, "vm", "show", long_name)
    assert code == 0, err
    assert out.count("unreachable") == 1, out
    for width in ("80", "60"):
        narrow = {**env, "COLUMNS": width}
        code, out, err = await cli(narrow, "vms")
        assert code == 0 and long_name in out and gamma.name in out, out
        code, out, err = await cli(narrow, "hosts")
        assert code == 0 and gamma.name in out, out
        code, out, err = await cli(narrow, "migration", "policies")
        assert code == 0 and all(len(line) <= int(width) for line in out.splitlines()), out


def test_coordinator_refuses_bad_policies_in_one_line(tmp_path: Path,
                                                      script_env: dict[str, str]) -> None:
    config = tmp_path / "coordinator.toml"
    for body, key in (
            ('[migration_policies.bulk]\nbandwith_mbps = 5\n', "migration_policies.bulk.bandwith_mbps"),
            ('[migration_policies.a]\nselector = {tier = "x"}\n[migration_policies.b]\n'
             'selector = {zone = "y"}\n', "migration_policies.b.selector"),
            ('default_migration_policy = "nope"\n', "default_migration_policy")):
        config.write_text(f'admin_token = "admin-0123456789abcdef"\n'
                          f'agent_token = "agent-0123456789abcdef"\n{body}')
        env = {**script_env, "NOVACRON_COORDINATOR_DATA_DIR": str(tmp_path / "data"),
               "HOME": str(tmp_path)}
        proc = subprocess.run(["novacron-coordinator", "--config", str(config), "--port", "0"],
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"key '{key}'" in proc.stderr and str(config) in proc.stderr, proc.stderr
        assert not (tmp_path / "data").exists()  # refused before anything was created
