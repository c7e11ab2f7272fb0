"""The ``novacron`` fleet commands against a real coordinator subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from novacron.coordinator.client import ApiClientError, CoordinatorClient
from novacron.coordinator.local import LocalCoordinator
from tests.coordinator.conftest import sigint_default
from tests.coordinator.fake_agent import FakeAgent, register_all, serving
from tests.coordinator.test_api import vm_spec

pytestmark = [pytest.mark.e2e]


async def cli(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "novacron.cli.main", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


def cli_env(coord: LocalCoordinator, home: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment: this coordinator, none of the caller's NOVACRON_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVACRON")}
    env.update(NOVACRON_SERVER=coord.url, NOVACRON_TOKEN=coord.admin_token, HOME=str(home), **extra)
    return env


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[LocalCoordinator, dict[str, str]]]:
    fakes = [FakeAgent("alpha", "tok-alpha-1-per-host-token"), FakeAgent("beta", "tok-beta-1-per-host-token", 4 << 30)]
    async with LocalCoordinator(tmp_path / "coord", settings={"poll_interval_s": "0.02"}) as coord, \
            serving(*fakes):
        async with CoordinatorClient(coord.url, coord.admin_token) as client:
            await register_all(client, fakes, coord.agent_token)
            await client.create_vm(vm_spec("web"))
        env = cli_env(coord, tmp_path, COLUMNS="120")
        yield coord, env


async def test_hosts_vms_and_migrate(fleet: tuple[LocalCoordinator, dict[str, str]]) -> None:
    coord, env = fleet
    code, out, err = await cli(env, "hosts", "--json")
    assert code == 0, err
    assert [h["name"] for h in json.loads(out)] == ["alpha", "beta"]
    code, out, _ = await cli(env, "hosts")
    assert code == 0 and "alpha" in out and "up" in out
    code, out, _ = await cli(env, "vms", "--json")
    assert code == 0 and json.loads(out)[0]["host"] == "alpha"
    code, out, err = await cli(env, "migrate", "web", "--to", "beta", "--downtime-ms", "30")
    assert code == 0, out + err
    assert "Migration" in out and "downtime_ms" in out and "completed" in out
    code, out, _ = await cli(env, "vms", "--json")
    assert json.loads(out)[0]["host"] == "beta"
    code, out, err = await cli(env, "migrate", "web", "--to", "alpha", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["phase"] == "completed" and doc["target"] == "alpha"
    code, out, _ = await cli(env, "migrations", "--json", "--vm", "web")
    assert [m["target"] for m in json.loads(out)] == ["alpha", "beta"]
    assert coord.admin_token not in out


async def test_errors_are_one_line_and_nonzero(
        fleet: tuple[LocalCoordinator, dict[str, str]]) -> None:
    coord, env = fleet
    code, _out, err = await cli({**env, "NOVACRON_TOKEN": "wrong"}, "hosts")
    assert code == 1 and "invalid token" in err and "Traceback" not in err
    code, _out, err = await cli(env, "migrate", "nope", "--to", "beta")
    assert code == 1 and "no VM named 'nope'" in err
    code, _out, err = await cli({**env, "NOVACRON_SERVER": "http://127.0.0.1:9"}, "vms")
    assert code == 1 and "cannot reach the coordinator" in err
    assert coord.admin_token not in err


@pytest.mark.parametrize("env, needle", [
    ({}, "admin_token is required"),
    ({"NOVACRON_COORDINATOR_ADMIN_TOKEN": "same-token-0123456789", "NOVACRON_COORDINATOR_AGENT_TOKEN":
      "same-token-0123456789"}, "must differ"),
    ({"NOVACRON_COORDINATOR_ADMIN_TOKEN": "a-token-0123456789", "NOVACRON_COORDINATOR_AGENT_TOKEN": "b-token-0123456789",
      "NOVACRON_COORDINATOR_HEARTBEAT_TIMEOUT_S": "1"}, "heartbeat_timeout_s"),
    ({"NOVACRON_COORDINATOR_PORT": "x"}, "expected an integer"),
])
def test_coordinator_refuses_bad_config(tmp_path: Path, script_env: dict[str, str],
                                        env: dict[str, str], needle: str) -> None:
    import subprocess

    full = {**script_env, "NOVACRON_COORDINATOR_DATA_DIR": str(tmp_path), "HOME": str(tmp_path),
            **env}
    proc = subprocess.run(["novacron-coordinator", "--port", "0"], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "coordinator.db").exists()  # nothing was created


async def test_ctrl_c_during_migrate_cancels_it(tmp_path: Path) -> None:
    import signal

    fakes = [FakeAgent("alpha", "tok-alpha-2-per-host-token"), FakeAgent("beta", "tok-beta-2-per-host-token", 4 << 30)]
    fakes[0].hold_migrations = True
    async with (LocalCoordinator(tmp_path / "coord", settings={"poll_interval_s": "0.02"}) as coord,
                serving(*fakes), CoordinatorClient(coord.url, coord.admin_token) as client):
        await register_all(client, fakes, coord.agent_token)
        await client.create_vm(vm_spec("web"))
        env = cli_env(coord, tmp_path)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "novacron.cli.main", "migrate", "web", "--to", "beta",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            preexec_fn=sigint_default)
        try:
            mig = None
            for _ in range(200):  # bounded: until the migration is underway
                migs = await client.request("GET", "/migrations")
                if migs["migrations"] and migs["migrations"][0]["phase"] == "precopy":
                    mig = migs["migrations"][0]
                    break
                await asyncio.sleep(0.05)
            assert mig is not None
            await asyncio.sleep(0.5)  # the CLI is following the stream by now
            proc.send_signal(signal.SIGINT)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 130, out.decode()
        assert "cancelling" in out.decode()
        for _ in range(100):
            final = await client.migration(mig["id"])
            if final["phase"] == "cancelled":
                break
            await asyncio.sleep(0.05)
        assert final["phase"] == "cancelled"
        assert (await client.vm("web"))["host"] == "alpha"


async def test_host_forget_retires_a_name(fleet: tuple[LocalCoordinator, dict[str, str]]) -> None:
    coord, env = fleet
    impostor = FakeAgent("beta", "another-beta-identity-token")
    impostor.url = "http://127.0.0.1:9"
    async with CoordinatorClient(coord.url, coord.admin_token) as client:
        with pytest.raises(ApiClientError) as refused:
            await client.register_host(impostor.registration(), coord.agent_token)
        assert refused.value.status == 403
        code, out, err = await cli(env, "host", "forget", "beta", "--keep-identity")
        assert code == 0 and "forgotten" in out, err
        with pytest.raises(ApiClientError):  # the name is still bound
            await client.register_host(impostor.registration(), coord.agent_token)
        code, out, err = await cli(env, "host", "forget", "beta")
        assert code == 0 and "host beta retired" in out, err
        await client.register_host(impostor.registration(), coord.agent_token)  # free now
        code, _, err = await cli(env, "host", "forget", "alpha")  # it runs a VM
        assert code == 1 and "still runs" in err
