"""NovaCron's engine on libvirt domains, and both engines behind the fleet's
migration API (``/v1/migrations`` with a coordinator grant) of two agents with
``hypervisor = "libvirt"``, each on its own real libvirtd (own dirs, sockets and
host UUID): a cancelled migration leaves the domain running on its source; ours
moves it (RAM read from the domain's shared memory file, device state through QMP
reached by libvirt, both RAMs compared at switchover); libvirt's own brings it
back; the guest's page checks pass throughout. The destination already runs a
domain of the same kernel and initrd: destination-side dedup finds pages in its RAM
file."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.guest import ensure_guest
from novacron.agent.hypervisors.libvirt import LibvirtHost
from novacron.agent.hypervisors.libvirt_port import (
    DEVICE_SOCKET,
    QEMU_NS,
    LibvirtQMP,
    clean_stale_incoming,
    clean_xml,
    incoming_xml,
    qemu_pid,
    ram_file,
    running_rams,
)
from novacron.agent.local import LocalAgent
from novacron.agent.migration.vmport import AdmissionError
from novacron.bench.migrate import HeartbeatWatch
from tests.coordinator.test_cli import cli_env
from tests.coordinator.test_fleet_ops_e2e import call, cli, fleet, ok
from tests.libvirtd import LibvirtDaemon, SharedDir, have_libvirtd
from tests.migration.agents import Api
from tests.migration.test_libvirt_migration import free_port, wait_hb

MIB = 1 << 20
BACKED = "<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"


def _xml(name: str = "d1", memory: str = "<memory unit='KiB'>131072</memory>", extra: str = BACKED) -> str:
    return f"<domain type='qemu'><name>{name}</name>{memory}{extra}<vcpu>1</vcpu></domain>"


ALLOWED = [Path("/srv/vm")]


def test_incoming_xml_is_checked_and_marked() -> None:
    ok_xml = _xml(extra=BACKED + "<os><kernel>/srv/vm/k</kernel></os><devices><disk type='file'>"
                  "<source file='/srv/vm/d.qcow2'/></disk><serial type='pty'><source path='/dev/pts/3'/>"
                  "<log file='/srv/vm/s.log'/>"
                  "</serial></devices>")
    xml, final = incoming_xml({"name": "d1", "libvirt_xml": ok_xml, "persistent": True}, 128 * MIB, ALLOWED)
    root = ET.fromstring(xml)
    assert [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")] == ["-incoming", "defer"]
    assert QEMU_NS not in final and ET.fromstring(final).findtext("name") == "d1"
    # what goes to the next host loses our argument again, and only ours
    assert QEMU_NS not in clean_xml(xml)
    for spec, size, why in (
        ({"name": "d1", "libvirt_xml": _xml()}, 64 * MIB, "memory"),
        ({"name": "d2", "libvirt_xml": _xml()}, 128 * MIB, "not domain"),
        ({"name": "d1", "libvirt_xml": _xml(extra="")}, 128 * MIB, "memoryBacking"),
        ({"name": "d1", "libvirt_xml": _xml(extra="<memoryBacking><source type='file'/></memoryBacking>")},
         128 * MIB, "memoryBacking"),
        ({"name": "d1", "libvirt_xml": _xml().replace(
            "</domain>", f"<qemu:commandline xmlns:qemu='{QEMU_NS}'><qemu:arg value='-S'/></qemu:commandline>"
                         "</domain>")}, 128 * MIB, "qemu:commandline"),
        ({"name": "d1", "libvirt_xml": "<domain"}, 128 * MIB, "parse"),
        ({"name": "../x", "libvirt_xml": _xml()}, 128 * MIB, "name"),
        ({"name": "d1", "libvirt_xml": _xml(), "kernel": "/etc/passwd"}, 128 * MIB, "fields"),
        ({"name": "d1", "libvirt_xml": _xml().replace("type='qemu'", "type='xen'")}, 128 * MIB, "xen"),
        # a peer's XML names no host path outside libvirt_path_dirs, and no host device
        *(({"name": "d1", "libvirt_xml": _xml(extra=BACKED + extra)}, 128 * MIB, why) for extra, why in (
            ("<devices><disk type='file'><source file='/etc/shadow'/></disk></devices>", "/etc/shadow"),
            ("<devices><disk type='file'><source file='/srv/vm/../../etc/shadow'/></disk></devices>", "outside"),
            ("<devices><disk type='file'><source file='d.img'/></disk></devices>", "outside"),
            ("<devices><disk type='block'><source dev='/dev/sda'/></disk></devices>", "/dev/sda"),
            ("<os><kernel>/boot/vmlinuz</kernel></os>", "/boot/vmlinuz"),
            ("<devices><serial type='file'><source path='/etc/ld.so.preload'/></serial></devices>", "ld.so"),
            ("<devices><serial type='pty'><log file='/root/.bashrc'/></serial></devices>", "bashrc"),
            ("<devices><hostdev mode='subsystem' type='pci'/></devices>", "hostdev"),
            ("<devices><filesystem type='mount'><source dir='/'/></filesystem></devices>", "filesystem"),
        )),
    ):
        with pytest.raises(AdmissionError, match=why):
            incoming_xml(spec, size, ALLOWED)


def test_running_rams_lists_the_domains_ram_files(tmp_path: Path) -> None:
    """What destination-side dedup indexes on a libvirt host: the files in libvirt's
    per-domain folders (``<id>-<short name>``), not those of domains being moved."""
    def ram(folder: str, name: str = "pc.ram") -> Path:
        (tmp_path / folder).mkdir(exist_ok=True)
        path = tmp_path / folder / name
        path.write_bytes(b"\0" * 8192)
        return path

    kept = [ram("1-web"), ram("2-a-name-of-twenty-cha"), ram("5-numa", "ram-node0"), ram("5-numa", "ram-node1")]
    moving = ram("3-moving")  # our engine moves it (busy): an incoming RAM is still being written
    ram("4-incoming")
    (tmp_path / "4-incoming" / DEVICE_SOCKET).touch()
    ram("notadomain")
    (tmp_path / "6-link").mkdir()
    (tmp_path / "6-link" / "pc.ram").symlink_to(kept[0])
    (tmp_path / "7-hard").mkdir()
    os.link(tmp_path / "notadomain" / "pc.ram", tmp_path / "7-hard" / "pc.ram")  # two names: not its own
    (tmp_path / "8-dirlink").symlink_to(tmp_path / "1-web")
    assert running_rams(tmp_path, {"moving", "a-name-of-twenty-chars-and-more"}) == kept[:1] + kept[2:]
    assert running_rams(tmp_path, set()) == sorted([*kept, moving])
    assert running_rams(tmp_path / "nope", set()) == []


@pytest.fixture
def shared() -> Iterator[SharedDir]:
    s = SharedDir(ensure_guest())
    yield s
    s.remove()


@pytest.fixture
def daemons() -> Iterator[tuple[LibvirtDaemon, LibvirtDaemon]]:
    started: list[LibvirtDaemon] = []
    try:
        for name in ("a", "b"):
            started.append(LibvirtDaemon(name).start())
        yield started[0], started[1]
    finally:
        for d in started:
            d.stop()
        assert all(d.pids() == [] for d in started)


def agent_settings(mine: LibvirtDaemon, peer_host: str, peer: LibvirtDaemon, shared: SharedDir) -> dict[str, str]:
    return {"hypervisor": "libvirt", "libvirt_uri": mine.uri, "libvirt_memory_dir": str(mine.memory_dir),
            "libvirt_path_dirs": str(shared.path),  # the guest's kernel, initrd and console log
            "libvirt_peers": f"{peer_host}={peer.uri} tcp://127.0.0.1:{free_port()}"}


@pytest.fixture
async def agents(daemons: tuple[LibvirtDaemon, LibvirtDaemon],
                 shared: SharedDir) -> AsyncIterator[tuple[LocalAgent, LocalAgent]]:
    a, b = daemons
    secret = secrets.token_urlsafe(32)
    async with LocalAgent("lv-a", accel="tcg", cluster_secret=secret, settings=agent_settings(a, "lv-b", b, shared)) as x, \
            LocalAgent("lv-b", accel="tcg", cluster_secret=secret, settings=agent_settings(b, "lv-a", a, shared)) as y:
        yield x, y


def domains(d: LibvirtDaemon, *flags: str) -> list[str]:
    return d.virsh("list", "--name", *flags).stdout.split()


async def migrate(api: Api, vm: str, dest: LocalAgent, **options: Any) -> dict[str, Any]:
    doc = await api.migrate(vm, dest, **options)
    return await api.wait_migration(doc["id"], timeout=120)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not have_libvirtd(), reason="needs libvirtd, virsh and root")
async def test_both_engines_move_a_libvirt_domain_through_the_fleet_api(
        daemons: tuple[LibvirtDaemon, LibvirtDaemon], shared: SharedDir,
        agents: tuple[LocalAgent, LocalAgent]) -> None:
    a, b = daemons
    x, y = agents
    ax, ay = Api(x), Api(y)
    a.define(shared.domain_xml("eng1", memory_mb=128, mem_mb=24, rate_mb=2, shared_memory=True))
    # b already runs a domain of the same kernel and initrd (an operator's, not adopted):
    # destination-side dedup finds eng1's pages in its RAM file
    b.define(shared.domain_xml("res1", memory_mb=128, mem_mb=8, rate_mb=0, shared_memory=True))
    b.virsh("start", "res1")
    await ax.ok("POST", "/v1/vms/eng1/adopt")
    await ax.ok("POST", "/v1/vms/eng1/start")
    hb = await wait_hb(shared, "eng1", 0, timeout=90, min_passes=1)
    boot = hb.group(1)
    clock = HeartbeatWatch([shared.log("eng1")])  # the guest's clock against the host's
    clock.start()
    await wait_hb(shared, "res1", 0, timeout=60, min_passes=1)
    b.virsh("suspend", "res1")  # booted: its RAM stays as it is, its CPU is spared
    until = time.monotonic() + 20  # a few of eng1's heartbeats on a for the clock check (bounded)
    while len(clock.beats) < 5 and time.monotonic() < until:
        await asyncio.sleep(0.2)

    # bad requests: a clear error, nothing moves
    grant = x.grant_to(y, "eng1")
    for options, want in (({"engine": "qemu"}, 400), ({"engine": "libvirt", "nope": 1}, 400)):
        status, doc = await x.request("POST", "/v1/migrations", {"vm": "eng1", "grant": grant, "options": options})
        assert status == want, doc
    status, doc = await x.request("POST", "/v1/migrations", {"vm": "nope", "grant": x.grant_to(y, "nope"),
                                                            "options": {"engine": "novacron"}})
    assert status == 404, doc

    # our engine, cancelled in pre-copy (a 1 MB/s cap keeps it there): the domain runs on a
    doc = await ax.migrate("eng1", y, engine="novacron", bandwidth_mbps=1)
    await ax.wait_migration(doc["id"], timeout=60, until=lambda s: s["phase"] == "precopy" and s["round"] >= 1)
    assert (await ax.ok("GET", "/v1/vms/eng1"))["state"] == "migrating"
    await ax.ok("POST", f"/v1/migrations/{doc['id']}/cancel")
    st = await ax.wait_migration(doc["id"], timeout=60)
    assert st["phase"] == "cancelled", st
    assert domains(a) == ["eng1"]
    # the destination removes its paused incoming domain once it hears of the abort
    dest_st = await ay.wait_migration(doc["id"], timeout=30)
    assert dest_st["phase"] in ("failed", "cancelled"), dest_st
    assert domains(b, "--all") == ["res1"]
    assert (await ax.ok("GET", "/v1/vms/eng1"))["state"] == "running"
    offset = len(shared.read_log("eng1"))
    await wait_hb(shared, "eng1", offset, timeout=30)

    # our engine to b: guest RAM from the shared file, device state through libvirt's QMP
    offset = len(shared.read_log("eng1"))
    st = await migrate(ax, "eng1", y, engine="novacron", test_digest=True)
    assert st["phase"] == "completed", st
    assert st["digest"]["equal"] is True and st["digest"]["source"], st.get("digest")
    assert st["metrics"]["device_state_bytes"] > 0, st["metrics"]
    # b's dedup index holds res1's RAM (indexed since the first attempt arrived): pages
    # of the same kernel and initrd were copied there instead of sent
    dd = st["metrics"]["dest_dedup"]
    print("dest dedup", dd)
    assert dd["hits"] > 500 and dd["hits"] + dd["needed"] == dd["offered"], dd
    index = (await ay.ok("GET", "/v1/host"))["dedup_index"]
    assert index["files"] >= 1 and index["pages_indexed"] >= 128 * MIB // 4096, index
    assert domains(a, "--all") == [] and sorted(domains(b)) == ["eng1", "res1"]
    assert sorted(domains(b, "--persistent")) == ["eng1", "res1"]  # defined there, as it was on a
    doc = await ay.ok("GET", "/v1/vms/eng1")
    assert doc["state"] == "running" and doc["adopted"] is True
    hb = await wait_hb(shared, "eng1", offset, timeout=60, min_passes=int(hb.group(5)) + 1)
    assert hb.group(1) == boot and hb.group(4) == "0", hb.group(0)  # same boot, no bad page
    # the guest keeps host time between heartbeats (what the benchmark's pause column
    # rests on): a guest without ACPI counts TCG's lost ticks and runs a tenth slow
    await clock.stop()
    beats = sorted(clock.beats.values(), key=lambda b: b.seq)
    excess = sorted((b.arrived - a.arrived) - (b.uptime - a.uptime)
                    for a, b in itertools.pairwise(beats) if b.seq == a.seq + 1)
    assert len(excess) >= 3 and abs(excess[len(excess) // 2]) < 0.04, excess  # 3+: a slow clock is 60-340 ms a beat

    # an incoming domain a killed agent left waiting is removed at the next start; the
    # domain that arrived (its live XML still has "-incoming defer") is not
    async with LibvirtHost(b.uri) as host:
        # the domain's QEMU process, found through its vCPU thread (the pause scan reads its
        # page tables); a RAM file it does not map names no process
        dom = await host.domain("eng1")
        qmp = LibvirtQMP(host, dom)
        _path, st_ram, _size = await ram_file(qmp, b.memory_dir)
        [qemu] = [p for p in b.pids() if b"guest=eng1," in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert await qemu_pid(qmp, st_ram) == qemu
        assert await qemu_pid(qmp, os.stat(shared.kernel)) is None
        stale, _ = incoming_xml({"name": "stale1", "libvirt_xml": shared.domain_xml("stale1", shared_memory=True)},
                                128 * MIB, [shared.path])
        await host._call((await host._live()).createXML, stale, host.lv.VIR_DOMAIN_START_PAUSED)
        assert sorted(domains(b)) == ["eng1", "res1", "stale1"]
        assert await clean_stale_incoming(host) == ["stale1"]
        assert sorted(domains(b, "--all")) == ["eng1", "res1"] and (await host.get("eng1"))["state"] == "running"

    # libvirt's own engine back to a, through the same API (the peer named after host lv-a)
    offset = len(shared.read_log("eng1"))
    st = await migrate(ay, "eng1", x, engine="libvirt")
    assert st["phase"] == "completed", st["error"]
    assert st["metrics"]["native"]["engine"] == "libvirt"
    assert domains(b, "--all") == ["res1"] and domains(a) == ["eng1"]
    # our "-incoming defer" did not travel with it
    assert "qemu:commandline" not in a.virsh("dumpxml", "eng1").stdout
    hb2 = await wait_hb(shared, "eng1", offset, timeout=60, min_passes=1)
    assert hb2.group(1) == boot and hb2.group(4) == "0", hb2.group(0)
    listed = {s["id"]: s for s in (await ay.ok("GET", "/v1/migrations"))["migrations"]}
    assert listed[st["id"]]["phase"] == "completed"


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(not have_libvirtd(), reason="needs libvirtd, virsh and root")
async def test_coordinator_drains_a_libvirt_host(tmp_path: Path, daemons: tuple[LibvirtDaemon, LibvirtDaemon],
                                                 shared: SharedDir) -> None:
    """A real coordinator, two libvirt agents: an adopted domain is imported into the
    fleet, and draining its host moves it (our engine, the default) to the other one."""
    a, b = daemons
    a.define(shared.domain_xml("dr1", memory_mb=128, mem_mb=8, rate_mb=1, shared_memory=True))
    hosts = {"lv-a": agent_settings(a, "lv-b", b, shared), "lv-b": agent_settings(b, "lv-a", a, shared)}
    async with fleet(tmp_path, {}, hosts) as (coord, agents):
        x = Api(agents["lv-a"])
        # not adopted yet: the fleet may not take it
        assert (await call(coord, "POST", "/vms/dr1/import", {"host": "lv-a"}))[0] == 409
        await x.ok("POST", "/v1/vms/dr1/adopt")
        await x.ok("POST", "/v1/vms/dr1/start")
        hb = await wait_hb(shared, "dr1", 0, timeout=90, min_passes=1)
        for path, body, want in (("/vms/nope/import", {"host": "lv-a"}, 404),
                                 ("/vms/dr1/import", {"host": "elsewhere"}, 404),
                                 ("/vms/dr1/import", {"host": "lv-a", "spec": {}}, 400)):
            assert (await call(coord, "POST", path, body))[0] == want, path
        env = cli_env(coord, tmp_path, COLUMNS="160")
        code, out, err = await cli(env, "vm", "import", "dr1", "--host", "lv-a")
        assert code == 0 and "dr1: recorded on lv-a (running)" in out, (out, err)
        vm = await ok(coord, "GET", "/vms/dr1")
        assert vm["host"] == "lv-a" and vm["spec"]["memory_mb"] == 128 and vm["spec"]["cpu_model"] == "qemu64"
        assert (await call(coord, "POST", "/vms/dr1/import", {"host": "lv-a"}))[0] == 409  # once

        offset = len(shared.read_log("dr1"))
        code, out, err = await cli(env, "host", "drain", "lv-a")
        assert code == 0, (out, err)
        assert "1 of 1 VMs moved" in out, out
        doc = (await ok(coord, "GET", "/drains"))["drains"][0]
        assert doc["state"] == "done", doc
        [entry] = doc["vms"]
        assert entry["vm"] == "dr1" and entry["target"] == "lv-b" and entry["state"] == "moved", entry
        assert domains(a, "--all") == [] and domains(b) == ["dr1"]
        vm = await ok(coord, "GET", "/vms/dr1")
        assert vm["host"] == "lv-b", vm
        mig = (await Api(agents["lv-a"]).ok("GET", f"/v1/migrations/{entry['migration']}"))
        assert mig["phase"] == "completed" and mig["metrics"]["native"].get("engine") is None  # ours
        hb2 = await wait_hb(shared, "dr1", offset, timeout=60, min_passes=int(hb.group(5)) + 1)
        assert hb2.group(1) == hb.group(1) and hb2.group(4) == "0", hb2.group(0)
