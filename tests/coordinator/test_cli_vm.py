"""``novacron vm ...`` and ``novacron swarm ...`` against a real coordinator subprocess."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from novacron.coordinator.client import CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from novacron.coordinator.mcp.install import NotInstalled, default_command
from tests.coordinator.test_cli import cli, cli_env, fleet

pytestmark = [pytest.mark.e2e]
__all__ = ["fleet"]  # the fixture, re-used

Fleet = tuple[LocalCoordinator, dict[str, str]]
KERNEL = ["--kernel", "/boot/vmlinuz", "--initrd", "/boot/initrd", "--cmdline", "console=ttyS0"]


async def _vms(coord: LocalCoordinator) -> dict[str, tuple[str, str]]:
    async with CoordinatorClient(coord.url, coord.admin_token) as client:
        return {v["name"]: (v["host"], v["state"]) for v in await client.vms()}


async def test_vm_lifecycle(fleet: Fleet) -> None:
    coord, env = fleet  # "web" runs on alpha
    # placement preferences decide the host: beside web, then away from it
    code, out, err = await cli(env, "vm", "create", "db", "--vcpus", "1", "--memory-mb", "256",
                               *KERNEL, "--affinity", "web", "--priority", "high")
    assert code == 0, err
    assert out.strip() == "db created on alpha (running)"
    code, out, err = await cli(env, "vm", "create", "cache", "--vcpus", "1", "--memory-mb", "128",
                               "--disk", "/var/lib/cache.qcow2", "--disk-format", "qcow2",
                               "--anti-affinity", "web", "--anti-affinity", "db", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["host"] == "beta" and doc["state"] == "running"
    assert doc["spec"]["disk_format"] == "qcow2" and "placement" not in doc["spec"]
    code, out, err = await cli(env, "vm", "create", "pinned", "--vcpus", "1", "--memory-mb", "64",
                               *KERNEL, "--host", "beta", "--accel", "tcg", "--json")
    assert code == 0 and json.loads(out)["host"] == "beta", err

    code, out, err = await cli(env, "vm", "show", "db", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["host"] == "alpha" and shown["agent"]["state"] == "running"
    code, out, err = await cli(env, "vm", "show", "db")
    assert code == 0 and "alpha" in out and "256.0 MiB" in out and "running" in out, err

    code, out, err = await cli(env, "vm", "reboot", "db", "--force")
    assert code == 0 and out.strip() == "db on alpha: running (forced, 0.5 s)", err
    code, out, err = await cli(env, "vm", "stop", "db", "--timeout", "7.5")
    assert code == 0 and out.strip() == "db on alpha: stopped (guest powered off, 0.5 s)", err
    assert (await _vms(coord))["db"] == ("alpha", "stopped")
    code, out, err = await cli(env, "vm", "show", "db", "--json")
    assert json.loads(out)["agent"]["state"] == "stopped"
    code, out, err = await cli(env, "vm", "start", "db", "--json")
    assert code == 0 and json.loads(out)["state"] == "running", err
    assert (await _vms(coord))["db"] == ("alpha", "running")

    code, out, err = await cli(env, "vm", "delete", "db", "--json")
    assert code == 0 and json.loads(out) == {"deleted": "db"}, err
    code, out, err = await cli(env, "vm", "delete", "pinned")
    assert code == 0 and out.strip() == "pinned deleted", err
    assert set(await _vms(coord)) == {"web", "cache"}
    code, _out, err = await cli(env, "vm", "show", "db")
    assert code == 1 and "no VM named 'db'" in err
    assert coord.admin_token not in out + err


@pytest.mark.parametrize("argv, needle", [
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64"], "--kernel or --disk"),
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64", "--kernel", "/k", "--disk", "/d"],
     "exclude each other"),
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64", "--disk", "/d", "--cmdline", "c"],
     "go with --kernel"),
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64", "--kernel", "/k",
      "--disk-format", "raw"], "goes with --disk"),
    (["vm", "create", "web", "--vcpus", "1", "--memory-mb", "64", "--kernel", "/k"],
     "already exists"),
    (["vm", "create", "x", "--vcpus", "0", "--memory-mb", "64", "--kernel", "/k"], "vcpus"),
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64", "--kernel", "/k", "--host", "nope"],
     "no host named 'nope'"),
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64", "--kernel", "/k",
      "--affinity", "web", "--anti-affinity", "web"], "both affinity and anti_affinity"),
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", str(64 << 10), "--kernel", "/k"],
     "memory"),
    (["vm", "create", "x", "--vcpus", "1", "--memory-mb", "64", "--kernel", "/k", "--nic", "Prod"], "nics"),
    (["vm", "stop", "nope"], "no VM named 'nope'"),
    (["vm", "stop", "web", "--timeout", "0"], "timeout_s"),
    (["vm", "stop", "web", "--timeout", "nan"], "timeout_s"),
    (["vm", "reboot", "web", "--timeout", "4000"], "timeout_s"),
    (["vm", "start", "nope"], "no VM named 'nope'"),
    (["vm", "delete", "nope"], "no VM named 'nope'"),
    (["vm", "show", "a/b"], "not a valid name: 'a/b'"),  # quoted, not a sub-path
])
async def test_bad_input_is_one_line_and_changes_nothing(fleet: Fleet, argv: list[str],
                                                         needle: str) -> None:
    coord, env = fleet
    before = await _vms(coord)
    code, out, err = await cli(env, *argv)
    assert code != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and needle.lower() in err.lower(), err
    assert "Traceback" not in err
    assert await _vms(coord) == before


# The plan the swarm test runs, so it needs no classifier model.
PLAN = {"topology": "mesh", "max_agents": 2, "agents": [{"type": "coder"}],
        "tasks": [{"description": "write the CLI", "priority": "high"}]}


async def test_swarm_round_trip_through_claude_flow(tmp_path: Path) -> None:
    try:
        command = default_command()
    except NotInstalled as exc:
        pytest.fail(f"{exc} -- run `make claude-flow`")
    settings = {"mcp_command": ",".join(command), "mcp_ping_interval_s": "0",
                "mcp_call_timeout_s": "20"}
    async with LocalCoordinator(tmp_path / "coord", settings=settings) as coord:
        env = cli_env(coord, tmp_path, COLUMNS="160")
        code, out, err = await cli(env, "swarm", "list", "--json")
        assert code == 0 and json.loads(out) == [], err
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps(PLAN))
        code, out, err = await cli(env, "swarm", "create", "build the vm commands",
                                   "--plan", str(plan), "--json")
        assert code == 0, err
        swarm = json.loads(out)
        assert swarm["status"] == "running" and len(swarm["agents"]) == 1
        assert len(swarm["tasks"]) == 1 and swarm["topology"] == "mesh"
        sid = swarm["id"]
        code, out, err = await cli(env, "swarm", "list", "--json")
        assert code == 0 and [s["id"] for s in json.loads(out)] == [sid], err
        code, out, err = await cli(env, "swarm", "list")
        assert code == 0 and sid in out and "mesh" in out, err
        code, out, err = await cli(env, "swarm", "show", sid)
        assert code == 0 and sid in out and swarm["tasks"][0] in out, err
        code, out, err = await cli(env, "swarm", "show", sid, "--json")
        assert code == 0 and json.loads(out)["live"]["swarmId"] == sid, err
        code, out, err = await cli(env, "swarm", "delete", sid, "--json")
        assert code == 0 and json.loads(out)["status"] == "shutdown", err
        code, _out, err = await cli(env, "swarm", "show", "swarm-unknown")
        assert code == 1 and len(err.strip().splitlines()) == 1 and "no swarm" in err
        plan.write_text("{not json")
        code, _out, err = await cli(env, "swarm", "create", "x", "--plan", str(plan))
        assert code == 2 and "not JSON" in err
        code, out, err = await cli(env, "swarm", "list", "--json")
        assert [s["id"] for s in json.loads(out)] == [sid]  # the bad create added nothing


def test_nic_flag_becomes_a_spec_nic() -> None:
    from novacron.cli.vm import nic_arg

    assert nic_arg("prod") == {"net": "prod"}
    assert nic_arg("prod,model=e1000,mac=52:54:00:00:00:01") == {
        "net": "prod", "model": "e1000", "mac": "52:54:00:00:00:01"}
    for bad in ("prod,vlan=5", "prod,model", "prod,model=a,model=b"):
        with pytest.raises(argparse.ArgumentTypeError):
            nic_arg(bad)
