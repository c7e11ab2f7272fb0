"""The agent daemon's HTTP API through a real ``novacron-agent`` (LocalAgent):
auth, bad input (a 4xx and nothing changed), the VM lifecycle on a real guest,
and an agent restart that finds its running VM again."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from novacron.agent.guest import GuestImage
from novacron.agent.local import LocalAgent, state_parent
from novacron.agent.vm.ramfile import MIB, free_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def agent() -> AsyncIterator[LocalAgent]:
    async with LocalAgent("api-test", accel="tcg") as a:
        yield a


@pytest.fixture
def spec(guest: GuestImage) -> dict[str, Any]:
    return {"name": "vm1", "vcpus": 1, "memory_mb": 64, "kernel": str(guest.kernel),
            "initrd": str(guest.initrd), "cmdline": guest.cmdline, "start": False}  # fmt: skip


async def raw(agent: LocalAgent, method: str, path: str, *, data: bytes | None = None,
              token: str | None = None) -> tuple[int, Any]:  # fmt: skip
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(method, agent.url + path, data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def assert_nothing_there(agent: LocalAgent) -> None:
    assert await agent.request("GET", "/v1/vms") == (200, {"vms": []})
    assert list((agent.state_dir / "vms").iterdir()) == []


async def test_health_needs_no_token(agent: LocalAgent) -> None:
    assert await raw(agent, "GET", "/v1/health") == (200, {"status": "ok", "name": "api-test"})


@pytest.mark.parametrize("token", [None, "", "wrong", "Bearer"])
async def test_bad_token_refused_and_nothing_changes(agent: LocalAgent, spec: dict[str, Any], token: str | None) -> None:
    body = json.dumps(spec).encode()
    for method, path, data in [("GET", "/v1/vms", None), ("GET", "/v1/host", None), ("POST", "/v1/vms", body),
                               ("DELETE", "/v1/vms/vm1", None), ("POST", "/v1/migrations", b"{}"),
                               ("POST", "/v1/host/dedup-index", None),
                               ("POST", "/v1/host/disk-index", b'{"image": "KERNEL"}')]:  # fmt: skip
        status, doc = await raw(agent, method, path, data=data, token=token)
        assert status == 401 and doc == {"error": "missing or invalid bearer token"}, (method, path)
    await assert_nothing_there(agent)


async def test_host_info(agent: LocalAgent) -> None:
    status, host = await agent.request("GET", "/v1/host")
    assert status == 200
    assert host["name"] == "api-test" and host["cpus"] == os.cpu_count()
    assert host["memory_bytes"] >= host["memory_available_bytes"] > 0
    assert host["accel"]["default"] == "tcg" and host["accel"]["kvm_usable"] is False
    assert host["vms"] == [] and host["data_port"] == agent.data_port > 0 and host["version"]
    # the dedup index is warmed on request (before a drain); nothing runs here: empty
    status, index = await agent.request("POST", "/v1/host/dedup-index")
    assert status == 200 and index["entries"] == 0 and index["files"] == 0, index


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b"", "expected a JSON object"),
        (b'{"name": "x y", "vcpus": 1, "memory_mb": 64}', "name:"),
        (b'{"name": "ok", "vcpus": 0, "memory_mb": 64}', "vcpus:"),
        (b'{"name": "ok", "vcpus": 1, "memory_mb": 64, "kernel": "/nope"}',
         "kernel: '/nope' is not a file inside an image directory"),
        (b'{"name": "ok", "vcpus": 1, "memory_mb": 64, "kernel": "KERNEL", "accel": "hvf"}', "accel:"),
        (b'{"name": "ok", "vcpus": 1, "memory_mb": 64, "kernel": "KERNEL", "accel": "kvm"}',
         "kvm requested but not usable"),
    ],
)
async def test_bad_create_is_400_and_changes_nothing(agent: LocalAgent, guest: GuestImage, body: bytes,
                                                      message: str) -> None:
    body = body.replace(b"KERNEL", str(guest.kernel).encode())  # an image the agent accepts
    status, doc = await raw(agent, "POST", "/v1/vms", data=body, token=agent.token)
    assert status == 400 and message in doc["error"], doc
    await assert_nothing_there(agent)


async def test_no_space_for_ram_is_reported(agent: LocalAgent, spec: dict[str, Any]) -> None:
    too_big = free_bytes(agent.state_dir) // MIB + 1024
    if too_big > 1024 * 1024:
        pytest.skip("more than 1 TiB free")
    status, doc = await agent.request("POST", "/v1/vms", dict(spec, memory_mb=too_big, start=True))
    assert status == 507 and "not enough space for the RAM file" in doc["error"]
    await assert_nothing_there(agent)


async def test_unknown_vm_and_action(agent: LocalAgent, spec: dict[str, Any]) -> None:
    for method, path in [("GET", "/v1/vms/ghost"), ("POST", "/v1/vms/ghost/start"), ("DELETE", "/v1/vms/ghost"),
                         ("GET", "/v1/vms/ghost/console")]:  # fmt: skip
        status, doc = await agent.request(method, path)
        assert status == 404 and "ghost" in doc["error"], (method, path)
    assert (await agent.request("POST", "/v1/vms", spec))[0] == 201
    status, doc = await agent.request("POST", "/v1/vms/vm1/hibernate")
    assert status == 404 and "unknown action" in doc["error"]
    status, doc = await agent.request("POST", "/v1/vms/vm1/reboot")  # a stopped VM
    assert status == 409 and "only a running VM can reboot" in doc["error"], doc
    for bad in ("force=maybe", "timeout_s=0", "timeout_s=nan", "timeout_s=x", "timeout_s=3601"):
        status, doc = await agent.request("POST", f"/v1/vms/vm1/stop?{bad}")
        assert status == 400 and bad.split("=")[0] in doc["error"], (bad, doc)
    assert (await agent.request("GET", "/v1/nowhere"))[0] == 404
    assert (await agent.request("DELETE", "/v1/vms/vm1")) == (200, {"deleted": "vm1"})
    await assert_nothing_there(agent)


async def test_stopped_vm_conflicts(agent: LocalAgent, spec: dict[str, Any]) -> None:
    status, vm = await agent.request("POST", "/v1/vms", spec)
    assert status == 201 and vm["state"] == "stopped" and vm["pid"] is None
    before = (agent.state_dir / "vms" / "vm1" / "vm.json").read_text()
    status, doc = await agent.request("POST", "/v1/vms", dict(spec, memory_mb=128))
    assert status == 409 and "exists already" in doc["error"]
    for action in ("pause", "resume"):
        status, doc = await agent.request("POST", f"/v1/vms/vm1/{action}")
        assert status == 409 and "stopped" in doc["error"]
    status, doc = await agent.request("POST", "/v1/vms/vm1/console", {"text": "verify\n"})
    assert status == 409
    status, doc = await agent.request("GET", "/v1/vms/vm1/console?offset=-1")
    assert status == 400 and "offset" in doc["error"]
    assert (agent.state_dir / "vms" / "vm1" / "vm.json").read_text() == before
    assert (await agent.request("GET", "/v1/vms/vm1"))[1]["memory_mb"] == 64
    assert (await agent.request("DELETE", "/v1/vms/vm1"))[0] == 200


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def console_wait(agent: LocalAgent, name: str, pattern: str, offset: int = 0, timeout: float = 60) -> re.Match[str]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        status, doc = await agent.request("GET", f"/v1/vms/{name}/console?offset={offset}")
        assert status == 200
        m = re.search(pattern, doc["text"])
        if m:
            return m
        await asyncio.sleep(0.3)
    raise AssertionError(f"{pattern!r} not on the console of {name}: {doc['text'][-600:]!r}")


async def test_secrets_stay_out_of_the_log(agent: LocalAgent) -> None:
    await agent.request("GET", "/v1/host")
    text = agent.log_path.read_text()
    assert "agent listening" in text and "request refused" in text  # it does log
    assert agent.token not in text and agent.cluster_secret not in text


@pytest.mark.slow
async def test_real_guest_and_agent_restart(guest: GuestImage, spec: dict[str, Any]) -> None:
    """Boot through the API, use the console, then restart the agent: the new
    agent finds the VM still running (vms_on_exit = keep) and can stop it."""
    state_dir = Path(tempfile.mkdtemp(prefix="nc-api-", dir=state_parent()))  # RAM files in /dev/shm, as elsewhere
    first = LocalAgent("keeper", accel="tcg", state_dir=state_dir, settings={"vms_on_exit": "keep"})
    second = LocalAgent("keeper", accel="tcg", state_dir=state_dir, token=first.token)
    try:
        await first.start()
        status, vm = await first.request("POST", "/v1/vms", dict(spec, start=True, memory_mb=128))
        # on failure: the agent's answer and its log (a 500 here once in CI, not reproduced)
        assert status == 201, (status, vm, first.log_path.read_text()[-4000:])
        assert vm["state"] == "running" and vm["accel"] == "tcg"
        await console_wait(first, "vm1", r"NOVACRON-HB boot=\w+ seq=2 ")
        status, doc = await first.request("GET", "/v1/vms/vm1/console")
        offset = doc["next_offset"]
        assert (await first.request("POST", "/v1/vms/vm1/console", {"text": "verify\n"}))[0] == 200
        await console_wait(first, "vm1", r"NOVACRON-VERIFY boot=\w+ pages=\d+ bad=0 result=ok", offset, 15)
        assert (await first.request("POST", "/v1/vms/vm1/pause"))[1]["state"] == "paused"
        assert (await first.request("POST", "/v1/vms/vm1/resume"))[1]["state"] == "running"

        pid = vm["pid"]
        first.proc.terminate()  # type: ignore[union-attr]
        await asyncio.to_thread(first.proc.wait, 20)  # type: ignore[union-attr]
        assert alive(pid), "keep: QEMU must outlive the agent"
        await second.start()
        status, listed = await second.request("GET", "/v1/vms")
        assert [(v["name"], v["state"], v["pid"]) for v in listed["vms"]] == [("vm1", "running", pid)]
        status, vm = await second.request("POST", "/v1/vms/vm1/stop")
        assert status == 200 and vm["state"] == "stopped"
        assert not alive(pid)
    finally:
        await first.stop()
        await second.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
