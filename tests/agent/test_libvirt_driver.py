"""The libvirt driver against a real libvirtd the test starts (session mode, as
``nobody``, its own dirs and host UUID): inventory, adoption of a domain defined
outside NovaCron with virsh, lifecycle with its events, stats."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.hypervisors.libvirt import LibvirtHost, parse_domain_xml
from novacron.agent.vm.errors import VMConflict, VMNotFound
from tests.libvirtd import LibvirtDaemon, SharedDir, have_libvirtd

pytestmark = pytest.mark.skipif(not have_libvirtd(), reason="needs libvirtd, virsh and root (to run it as nobody)")

HB = re.compile(r"NOVACRON-HB boot=(\w+) seq=(\d+) uptime=[\d.]+ ok=(\d) bad=(\d+) passes=(\d+)")


def test_domain_xml_inventory_parsed_with_the_stdlib() -> None:
    xml = """<domain type='kvm'><name>web1</name><uuid>0b0c6c3e-6d2c-4a6a-9a0e-1d2f3a4b5c6d</uuid>
      <memory unit='GiB'>2</memory><vcpu placement='static'>4</vcpu>
      <cpu mode='host-passthrough'/>
      <metadata><nc:vm xmlns:nc='https://novacron.dev/xmlns/libvirt/1' adopted='true'/></metadata>
      <devices>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
          <source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda' bus='virtio'/></disk>
        <disk type='network' device='disk'><source protocol='rbd' name='pool/web1-data'/>
          <target dev='vdb' bus='virtio'/></disk>
        <interface type='bridge'><mac address='52:54:00:aa:bb:cc'/><source bridge='br0'/>
          <model type='virtio'/></interface>
        <interface type='network'><mac address='52:54:00:aa:bb:cd'/><source network='default'/></interface>
      </devices></domain>"""
    doc = parse_domain_xml(xml)
    assert doc["name"] == "web1" and doc["uuid"].startswith("0b0c6c3e") and doc["type"] == "kvm"
    assert doc["memory_mb"] == 2048 and doc["vcpus"] == 4 and doc["cpu_model"] == "host-passthrough"
    assert doc["adopted"] is True and doc["shared_memory"] is False
    assert [(d["target"], d["source"], d["format"]) for d in doc["disks"]] == [
        ("vda", "/var/lib/libvirt/images/web1.qcow2", "qcow2"), ("vdb", "pool/web1-data", "")]
    assert [(n["type"], n["source"], n["mac"], n["model"]) for n in doc["nics"]] == [
        ("bridge", "br0", "52:54:00:aa:bb:cc", "virtio"), ("network", "default", "52:54:00:aa:bb:cd", "")]
    # no NovaCron mark: not adopted; default unit KiB
    doc = parse_domain_xml("<domain type='qemu'><name>x</name><memory>131072</memory></domain>")
    assert doc["adopted"] is False and doc["memory_mb"] == 128 and doc["cpu_model"] == "default"


@pytest.fixture
def shared(guest: GuestImage) -> Iterator[SharedDir]:
    s = SharedDir(guest)
    yield s
    s.remove()


@pytest.fixture
def daemon() -> Iterator[LibvirtDaemon]:
    d = LibvirtDaemon("a").start()
    try:
        yield d
    finally:
        d.stop()
        assert d.pids() == [], "a QEMU or virtlogd of the test daemon outlived it"


@pytest.fixture
async def host(daemon: LibvirtDaemon) -> AsyncIterator[LibvirtHost]:
    async with LibvirtHost(daemon.uri, shutdown_timeout_s=3) as h:
        yield h


async def wait_log(shared: SharedDir, name: str, pattern: re.Pattern[str], timeout: float,
                   offset: int = 0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(pattern.finditer(shared.read_log(name, offset)))
        if found:
            return found[-1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"{pattern.pattern!r} not in {name}'s console within {timeout} s: "
                         f"{shared.read_log(name, offset)[-600:]!r}")


async def next_event(events: AsyncGenerator[Any, None], want: str, timeout: float = 30) -> object:
    async def find() -> object:
        async for ev in events:
            if getattr(ev, "event", None) == want:
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(find(), timeout)


@pytest.mark.slow
@pytest.mark.e2e
async def test_external_domain_listed_adopted_and_driven(daemon: LibvirtDaemon, host: LibvirtHost,
                                                          shared: SharedDir) -> None:
    assert await host.host_uuid() == daemon.host_uuid
    assert await host.list() == []
    # an operator's domain, defined with virsh; its guest ignores the power button (below)
    daemon.define(shared.domain_xml("ext1", power_button="ignore"))

    [doc] = await host.list()
    assert doc["name"] == "ext1" and doc["state"] == "stopped" and doc["adopted"] is False
    assert doc["vcpus"] == 1 and doc["memory_mb"] == 128 and doc["cpu_model"] == "qemu64"
    assert doc["persistent"] is True and doc["type"] == "qemu" and doc["hypervisor"] == "libvirt"
    assert [(d["device"], d["target"]) for d in doc["disks"]] == [("cdrom", "hdc")]
    assert [(n["type"], n["mac"], n["model"]) for n in doc["nics"]] == [("user", "52:54:00:12:34:56", "virtio")]
    xml_before = daemon.virsh("dumpxml", "--inactive", "ext1").stdout

    # not adopted: NovaCron refuses to touch it, and nothing changed
    for refused in (host.start, host.stop, host.destroy, host.pause, host.resume):
        with pytest.raises(VMConflict, match="adopt it first"):
            await refused("ext1")
    with pytest.raises(VMConflict, match="adopt it first"):
        await host.send_console("ext1", "x")
    assert (await host.get("ext1"))["state"] == "stopped"
    with pytest.raises(VMNotFound):
        await host.adopt("no-such-domain")

    adopted = await host.adopt("ext1")
    assert adopted["adopted"] is True and adopted["uuid"] == doc["uuid"]
    with pytest.raises(VMConflict, match="adopted already"):
        await host.adopt("ext1")
    # adoption adds NovaCron's metadata element and changes nothing else of the definition
    xml_after = daemon.virsh("dumpxml", "--inactive", "ext1").stdout
    assert "novacron.dev/xmlns/libvirt/1" in xml_after
    strip = re.compile(r"\s*<metadata>.*?</metadata>", re.S)
    assert strip.sub("", xml_after) == strip.sub("", xml_before)

    events = host.events()
    started = asyncio.ensure_future(next_event(events, "started"))
    await asyncio.sleep(0)  # subscribed before the start
    doc = await host.start("ext1")
    assert doc["state"] == "running"
    ev = await started
    assert getattr(ev, "vm", None) == "ext1"
    hb = await wait_log(shared, "ext1", HB, timeout=90)
    assert hb.group(3) == "1"  # the guest's own page checks are passing
    with pytest.raises(VMConflict):
        await host.start("ext1")  # running already: libvirt says no, a 409

    st = await host.stats("ext1")
    assert st["state"] == "running" and st["cpu_time_ns"] > 0 and st["memory_max_mb"] == 128

    await host.pause("ext1")
    assert (await host.get("ext1"))["state"] == "paused"
    assert getattr(await next_event(events, "suspended"), "vm", None) == "ext1"
    await host.resume("ext1")
    assert (await host.get("ext1"))["state"] == "running"
    assert getattr(await next_event(events, "resumed"), "vm", None) == "ext1"
    # the guest kept its boot and goes on checking its pages after the pause
    size = shared.log("ext1").stat().st_size
    after = await wait_log(shared, "ext1", HB, timeout=30, offset=size)
    assert after.group(1) == hb.group(1) and after.group(3) == "1"

    # this guest ignores the ACPI power button: a graceful shutdown times out and leaves it
    # running, stop() then destroys it and says so
    with pytest.raises(VMConflict, match="did not shut down"):
        await host.shutdown("ext1", timeout_s=2)
    assert (await host.get("ext1"))["state"] == "running"
    doc = await host.stop("ext1", timeout_s=2)
    assert doc["forced"] is True and doc["state"] == "stopped"
    assert getattr(await next_event(events, "stopped"), "vm", None) == "ext1"

    # libvirtd restarts (an upgrade): the driver reconnects, events flow again
    daemon.restart()
    assert (await host.get("ext1"))["adopted"] is True
    started = asyncio.ensure_future(next_event(events, "started"))
    await asyncio.sleep(0)
    await host.start("ext1")
    assert getattr(await started, "vm", None) == "ext1"
    await host.destroy("ext1")
    await events.aclose()
    # the definition stays (NovaCron never undefines what it did not create)
    assert [d["name"] for d in await host.list()] == ["ext1"]
