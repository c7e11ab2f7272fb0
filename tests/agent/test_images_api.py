"""The file-read chain from issue 11 against a real agent: every path field of
a VM spec (kernel, initrd, disk) pointed at host secrets, the agent's own
files and another VM's RAM file and serial log, directly, through a symlink
in an image dir or through ``..``. Each is a 400 naming the field, and
nothing is started or left behind."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from novacron.agent.guest import GuestImage, ensure_guest
from novacron.agent.local import LocalAgent
from tests.migration.agents import Api

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]
SECRET = secrets.token_urlsafe(32)


class Host:
    def __init__(self, agent: LocalAgent, images: Path, guest: GuestImage, victim: dict[str, Any]) -> None:
        self.agent, self.images, self.guest, self.victim = agent, images, guest, victim

    def spec(self, name: str, **over: Any) -> dict[str, Any]:
        doc = {"name": name, "vcpus": 1, "memory_mb": 64, "kernel": str(self.guest.kernel),
               "initrd": str(self.guest.initrd), "cmdline": self.guest.cmdline, "accel": "tcg"}  # fmt: skip
        doc.update(over)
        return {k: v for k, v in doc.items() if v is not None}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def host() -> AsyncIterator[Host]:
    guest = ensure_guest()
    images = Path(tempfile.mkdtemp(prefix="nc-img-"))
    agent = LocalAgent("images", cluster_secret=SECRET, accel="tcg", image_dirs=[guest.kernel.parent, images])
    try:
        await agent.start()
        h = Host(agent, images, guest, {})
        status, victim = await agent.request("POST", "/v1/vms", h.spec("victim"))
        assert status == 201, victim
        h.victim = victim
        # planted inside an image dir: links leading out, a fifo, a copy of the kernel
        (images / "escape").symlink_to("/etc/shadow")
        (images / "victim-ram").symlink_to(victim["ram_path"])
        (images / "victim-log").symlink_to(victim["serial_log"])
        os.mkfifo(images / "fifo")
        shutil.copy(guest.kernel, images / "k")
        yield h
    finally:
        await agent.stop()
        shutil.rmtree(images, ignore_errors=True)


def attacks(h: Host) -> list[str]:
    v = h.victim
    return [
        "/etc/shadow", str(h.agent.state_dir / "agent.toml"), f"/proc/{h.agent.pid}/environ",
        "/proc/self/environ", "/dev/zero", v["ram_path"], v["serial_log"], str(Path(v["ram_path"]).parent),
        "escape", "victim-ram", "victim-log", "fifo",
        "../../../../../../etc/shadow", f"{h.images}/../../../../etc/shadow",
    ]  # fmt: skip


async def assert_only_the_victim(h: Host) -> None:
    status, listed = await h.agent.request("GET", "/v1/vms")
    assert status == 200 and [vm["name"] for vm in listed["vms"]] == ["victim"]
    assert sorted(p.name for p in (h.agent.state_dir / "vms").iterdir()) == ["victim"]
    assert h.agent.qemu_pids() == [h.victim["pid"]]


@pytest.mark.parametrize("field", ["kernel", "initrd", "disk"])
async def test_every_path_field_refuses_files_outside_the_image_dirs(host: Host, field: str) -> None:
    for i, target in enumerate(attacks(host)):
        over: dict[str, Any] = {field: target}
        if field == "disk":
            over.update(kernel=None, initrd=None, cmdline=None, disk_format="raw")
        for start in (True, False):
            status, body = await host.agent.request("POST", "/v1/vms", host.spec(f"evil{i}", start=start, **over))
            assert status == 400 and body["error"].startswith(f"{field}: "), (target, body)
    await assert_only_the_victim(host)


async def test_an_image_swapped_for_a_link_out_is_refused_at_start(host: Host) -> None:
    status, body = await host.agent.request("POST", "/v1/vms", host.spec("later", kernel="k", start=False))
    assert status == 201 and body["state"] == "stopped", body
    try:
        (host.images / "k").rename(host.images / "k.real")
        (host.images / "k").symlink_to("/etc/shadow")
        status, body = await host.agent.request("POST", "/v1/vms/later/start")
        assert status == 400 and body["error"].startswith("kernel: "), body
        status, body = await host.agent.request("GET", "/v1/vms/later")
        assert body["state"] == "stopped" and body["pid"] is None
        assert not (host.agent.state_dir / "vms" / "later" / "ram").exists()
        assert host.agent.qemu_pids() == [host.victim["pid"]]
    finally:
        (host.images / "k").unlink()
        (host.images / "k.real").rename(host.images / "k")
        assert (await host.agent.request("DELETE", "/v1/vms/later"))[0] == 200


async def test_images_are_listed(host: Host) -> None:
    status, body = await host.agent.request("GET", "/v1/images")
    assert status == 200 and body["dirs"] == [str(host.guest.kernel.parent), str(host.images)]
    names = {(i["dir"], i["name"]) for i in body["images"]}
    assert (str(host.guest.kernel.parent), "vmlinuz") in names and (str(host.images), "k") in names
    assert not {n for _, n in names} & {"escape", "victim-ram", "victim-log", "fifo"}


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
async def test_a_disk_reaches_qemu_as_a_descriptor(host: Host, fmt: str) -> None:
    image = host.images / f"blank.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "1M"], check=True)
    os.chmod(image, 0o600)  # root's: QEMU (maybe unprivileged) gets the agent's descriptor
    name = f"disk-{fmt}"
    spec = host.spec(name, kernel=None, initrd=None, cmdline=None, disk=image.name)
    status, body = await host.agent.request("POST", "/v1/vms", spec)
    try:
        assert status == 201 and body["state"] == "running", body
        assert body["spec"]["disk_format"] == fmt  # inferred from the name
        cmdline = Path(f"/proc/{body['pid']}/cmdline").read_bytes().split(b"\0")
        assert b"file=/dev/fdset/2,format=" + fmt.encode() + b",if=virtio" in cmdline
        assert not any(str(host.images).encode() in a for a in cmdline)
        # QEMU holds the very file the agent checked, read-write
        held = {os.path.realpath(f"/proc/{body['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{body['pid']}/fd")}
        assert str(image) in held
    finally:
        await host.agent.request("DELETE", f"/v1/vms/{name}")
        image.unlink()


async def test_a_destination_without_the_image_refuses_the_migration(host: Host, tmp_path: Path) -> None:
    # images are per host: the destination looks the names up in its own image dirs
    async with LocalAgent("no-images", cluster_secret=SECRET, accel="tcg", image_dirs=[tmp_path]) as dst:
        api = Api(host.agent)
        mig = await api.migrate("victim", dst)
        st = await api.wait_migration(mig["id"], timeout=60)
        assert st["phase"] == "failed" and "kernel: " in st["error"] and "image director" in st["error"], st
        assert dst.qemu_pids() == [] and await dst.request("GET", "/v1/vms") == (200, {"vms": []})
    status, victim = await host.agent.request("GET", "/v1/vms/victim")
    assert status == 200 and victim["state"] == "running" and victim["pid"] == host.victim["pid"]
