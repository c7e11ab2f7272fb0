"""NovaCron's migration engine on libvirt domains: the engine's VM port (``vmport``)
for domains whose RAM is a shared file.

A domain qualifies when its XML says
``<memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>``
(and it has no NUMA cells: one RAM backend). libvirt then runs QEMU with a
``memory-backend-file,share=on`` under its memory backing dir (``memory_backing_dir``
in qemu.conf; session daemons: ``$XDG_CONFIG_HOME/libvirt/qemu/ram``), one
folder per domain. The engine maps that file, exactly as for the QEMUs the agent
runs itself; the path comes from QEMU (``qom-get mem-path``), never from a caller,
and must lie under the configured ``libvirt_memory_dir``.

Everything else goes through libvirt:

- pause/resume: ``virDomainSuspend``/``virDomainResume`` (libvirt's view stays right);
- device state: QMP through libvirt (``virDomainQemuMonitorCommand``, i.e. ``virsh
  qemu-monitor-command``): ``migrate-set-capabilities x-ignore-shared``, ``migrate``
  to the engine's relay socket, ``query-migrate``, ``migrate_cancel``;
- the destination: ``virDomainCreateXML(VIR_DOMAIN_START_PAUSED)`` of the source's
  migratable XML plus ``<qemu:commandline>-incoming defer</qemu:commandline>``, then
  QMP ``migrate-incoming`` on a socket in its RAM folder. libvirt has no public way to
  start a domain waiting for an incoming migration outside its own migration
  protocol (the Prepare step is a private driver entry point that expects libvirt's
  cookies and opens its own transport), so the QEMU argument is passed through; the
  domain is marked tainted ("custom-argv", "custom-monitor") in libvirt's log, and
  the live XML keeps the argument until the domain next restarts (the XML sent on a
  later migration, by either engine, has it removed);
- commit: ``virDomainDefineXML`` of the source's XML (without the argument) makes the
  destination persistent when the source was; the source is destroyed and undefined.

Local disks are not carried (libvirt's own engine copies them with
``VIR_MIGRATE_NON_SHARED_*``): a domain's disks must be the same files on both hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from novacron.agent.hypervisors.libvirt import STATES, LibvirtHost, LibvirtUnavailable, _mib
from novacron.agent.migration.protocol import NAME_RE
from novacron.agent.migration.qemu_port import (
    CANCEL_WAIT_S,
    IGNORE_SHARED,
    _incoming_loaded,
    _migration_completed,
    migration_ended,
)
from novacron.agent.migration.vmport import AdmissionError
from novacron.agent.qmp import QMPError
from novacron.agent.vm.errors import VMConflict, VMError, VMNotFound
from novacron.agent.vm.ramfile import MIB

log = logging.getLogger("novacron.agent.libvirt")

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
INCOMING_ARGS = ("-incoming", "defer")
DEVICE_SOCKET = "nc-incoming.sock"  # destination: QEMU's migrate-incoming socket, in its RAM folder
POLL_S = 0.005  # query-migrate / query-status while the guest is paused: latency is downtime
SUN_PATH_MAX = 107
# QEMU keeps migration capabilities for its lifetime and sends them in the stream: libvirt's
# own next migration of this QEMU would then be refused by a destination without it
# ("Capability x-ignore-shared is off, but received capability is on")
SHARED_OFF = {"capabilities": [{"capability": "x-ignore-shared", "state": False}]}


def load_libvirt_qemu() -> Any:
    try:
        import libvirt_qemu
    except ImportError as exc:  # shipped with libvirt-python
        raise LibvirtUnavailable("QMP through libvirt needs libvirt-python's libvirt_qemu module") from exc
    return libvirt_qemu


class LibvirtQMP:
    """QMP commands to one domain's QEMU, through libvirt (``qemu-monitor-command``)."""

    def __init__(self, host: LibvirtHost, dom: Any) -> None:
        self.host, self.dom = host, dom
        self.lvq = load_libvirt_qemu()

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 10) -> Any:
        doc: dict[str, Any] = {"execute": command}
        if arguments:
            doc["arguments"] = arguments
        raw = await asyncio.wait_for(
            self.host._call(self.lvq.qemuMonitorCommand, self.dom, json.dumps(doc), 0), timeout)
        reply = json.loads(raw)
        if "error" in reply:
            err = reply["error"]
            raise QMPError(command, str(err.get("class", "")), str(err.get("desc", "")))
        return reply.get("return")

    async def poll(self, command: str, done: Any, timeout: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            info = await self.execute(command) or {}
            if done(info):
                return
            if loop.time() > deadline:
                raise TimeoutError(f"{what} still {info.get('status')!r} after {timeout:g}s")
            await asyncio.sleep(POLL_S)


# ---- the domain XML -------------------------------------------------------------


def shared_file_memory(root: ET.Element) -> bool:
    backing = root.find("memoryBacking")
    return (backing is not None and backing.find("source[@type='file']") is not None
            and backing.find("access[@mode='shared']") is not None
            and root.find("./cpu/numa") is None)  # fmt: skip


def strip_incoming(root: ET.Element) -> None:
    """Remove the ``-incoming defer`` pair this module added (the rest of a
    ``<qemu:commandline>`` stays); drop the element when it is left empty."""
    for cmd in root.findall(f"{{{QEMU_NS}}}commandline"):
        args = cmd.findall(f"{{{QEMU_NS}}}arg")
        values = [a.get("value") for a in args]
        for i in range(len(values) - 1):
            if (values[i], values[i + 1]) == INCOMING_ARGS:
                cmd.remove(args[i])
                cmd.remove(args[i + 1])
                break
        if len(cmd) == 0:
            root.remove(cmd)


def clean_xml(xml: str) -> str:
    """A domain's XML for another host: without our ``-incoming defer``."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.fromstring(xml)
    strip_incoming(root)
    return ET.tostring(root, encoding="unicode")


# host devices and pass-through a peer's XML may not bring here
FORBIDDEN_DEVICES = ("hostdev", "filesystem", "smartcard", "redirdev", "shmem")
PATH_TEXT = ("./os/kernel", "./os/initrd", "./os/loader", "./os/nvram", "./os/dtb")


def host_paths(root: ET.Element) -> list[str]:
    """Every host path the domain XML names (files, devices, sockets, logs)."""
    found = [e.text.strip() for q in PATH_TEXT for e in root.findall(q) if e.text and e.text.strip()]
    for parent in root.iter():
        for elem in parent:
            if elem.tag == "source" and parent.get("type") == "pty":
                continue  # a pty's path is the one libvirt allocated on the source: not opened by name
            if elem.tag in ("source", "log", "nvram", "backingStore") or elem.tag.endswith("}source"):
                found += [v for k, v in elem.attrib.items() if k in ("file", "dev", "path", "dir")]
    return found


def check_paths(root: ET.Element, allowed: list[Path]) -> None:
    """A peer's domain XML may name host paths only under ``allowed`` (``libvirt_path_dirs``):
    libvirt would otherwise open (and, with dynamic_ownership, chown) any file a caller names."""
    for tag in FORBIDDEN_DEVICES:
        if root.find(f"./devices/{tag}") is not None:
            raise AdmissionError(f"domains with <{tag}> devices are not migrated by NovaCron's engine")
    roots = [Path(os.path.realpath(d)) for d in allowed]
    for raw in host_paths(root):
        path = Path(os.path.normpath(raw))
        if not raw.startswith("/") or ".." in Path(raw).parts or not any(_under(path, r) for r in roots):
            raise AdmissionError(f"the domain names host path {raw!r}, outside libvirt_path_dirs "
                                 f"({', '.join(map(str, roots)) or 'none'})")


def incoming_xml(spec: dict[str, Any], ram_size: int, allowed: list[Path]) -> tuple[str, str]:
    """The destination's (checked) XML to create paused with ``-incoming defer``, and the
    XML to define once the guest runs here. AdmissionError for anything off."""
    xml, name = spec.get("libvirt_xml"), spec.get("name")
    if set(spec) - {"name", "libvirt_xml", "persistent", "memory_mb"}:
        raise AdmissionError("a libvirt domain's spec has fields name, libvirt_xml, persistent, memory_mb")
    if not isinstance(xml, str) or not isinstance(name, str) or not NAME_RE.match(name) or len(xml) > 1 << 20:
        raise AdmissionError("a libvirt domain's spec needs its name and its XML (at most 1 MiB)")
    ET.register_namespace("qemu", QEMU_NS)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise AdmissionError(f"the domain XML does not parse: {exc}") from None
    if root.tag != "domain" or root.findtext("name") != name:
        raise AdmissionError(f"the XML is not domain {name!r}")
    if root.get("type") not in ("qemu", "kvm"):
        raise AdmissionError(f"domain type {root.get('type')!r}: only qemu and kvm domains")
    if not shared_file_memory(root):
        raise AdmissionError("NovaCron's engine needs <memoryBacking> with <source type='file'/> and "
                             "<access mode='shared'/> and no NUMA cells")  # fmt: skip
    if _mib(root.find("memory")) * MIB != ram_size:
        raise AdmissionError("the domain's memory does not match the RAM size sent")
    if root.find(f"{{{QEMU_NS}}}commandline") is not None:
        # QEMU arguments from another host are not run here (only ours, below)
        raise AdmissionError("domains with <qemu:commandline> are not migrated by NovaCron's engine")
    check_paths(root, allowed)
    final = ET.tostring(root, encoding="unicode")
    cmd = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for value in INCOMING_ARGS:
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": value})
    return ET.tostring(root, encoding="unicode"), final


def _under(path: Path, root: Path) -> bool:
    return path.is_relative_to(root) and path != root


async def ram_file(qmp: LibvirtQMP, memory_dir: Path) -> tuple[Path, os.stat_result, int]:
    """The domain's RAM file (as QEMU reports it), its inode and size; only a plain
    file under ``memory_dir`` reached without symlinks qualifies (else VMConflict)."""
    objs = await qmp.execute("qom-list", {"path": "/objects"}) or []
    backends = [str(o["name"]) for o in objs if o.get("type") == "child<memory-backend-file>"]
    if len(backends) != 1:
        raise VMConflict(f"expected one file memory backend in QEMU, found {len(backends)}")
    obj = f"/objects/{backends[0]}"
    raw_path = await qmp.execute("qom-get", {"path": obj, "property": "mem-path"})
    share = await qmp.execute("qom-get", {"path": obj, "property": "share"})
    size = await qmp.execute("qom-get", {"path": obj, "property": "size"})
    if not isinstance(raw_path, str) or not raw_path.startswith("/") or share is not True:
        raise VMConflict(f"the memory backend is not a shared file ({raw_path!r}, share={share!r})")
    root = Path(os.path.realpath(memory_dir))
    path = Path(os.path.normpath(raw_path))
    # realpath equal to the path: no symlink on the way (QEMU's user owns the folder)
    if not _under(path, root) or os.path.realpath(path) != str(path):
        raise VMConflict(f"the RAM file {path} is not under libvirt_memory_dir {root}")
    st = os.lstat(path)
    if not isinstance(size, int) or size <= 0 or st.st_size != size:
        raise VMConflict(f"the RAM file {path} is {st.st_size} bytes, QEMU says {size!r}")
    return path, st, size


def _share_with(path: Path, uid: int) -> None:
    """Let QEMU (running as ``uid``) connect to the agent's socket ``path``; never by a
    symlink (QEMU's user owns the folder)."""
    if os.geteuid() == 0 and uid != 0:
        os.chown(path, uid, -1, follow_symlinks=False)


# ---- the source -----------------------------------------------------------------


class LibvirtSource:
    def __init__(self, host: LibvirtHost, dom: Any, qmp: LibvirtQMP, ram: tuple[Path, os.stat_result, int],
                 xml: str, persistent: bool, busy: set[str], pid: int | None = None) -> None:
        self.host, self.dom, self.qmp, self.busy = host, dom, qmp, busy
        self.name = str(dom.name())
        self.ram_path, st, self.ram_size = ram
        self.ram_stat: os.stat_result | None = st
        self.qemu_uid = st.st_uid  # QEMU's user owns its RAM file
        # the relay socket goes next to the RAM file: a folder the domain's QEMU can reach
        # (it is its own), which libvirt removes with the domain
        self.work_dir = self.ram_path.parent
        self.xml, self.persistent = xml, persistent
        self._pid = pid

    # libvirt places QEMU's threads in cgroups of its own (vCPU, emulator): the engine's
    # auto-converge must not move the process into its throttle cgroup and back (that
    # would merge them); it throttles by pause/resume through libvirt instead
    cgroup_throttle = False

    @property
    def pid(self) -> int | None:
        """The domain's QEMU (``qemu_pid``): the pause scan reads its page tables."""
        return self._pid

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "libvirt_xml": self.xml, "persistent": self.persistent,
                "memory_mb": self.ram_size // MIB}  # fmt: skip

    async def pause(self) -> None:
        await self.host._call(self.dom.suspend)

    async def resume(self) -> None:
        await self.host._call(self.dom.resume)

    async def send_device_state(self, socket_path: Path) -> None:
        if socket_path.parent != self.work_dir or len(str(socket_path)) > SUN_PATH_MAX:
            raise ValueError(f"device-state socket {socket_path} is outside the domain's RAM folder or too long")
        _share_with(socket_path, self.qemu_uid)
        await self.qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
        await self.qmp.execute("migrate", {"uri": f"unix:{socket_path}"})

    async def wait_device_state_sent(self, timeout: float) -> None:
        await self.qmp.poll("query-migrate", _migration_completed, timeout, "QEMU migration")

    async def cancel_device_state(self) -> None:
        with contextlib.suppress(QMPError, VMError):
            await self.qmp.execute("migrate_cancel")
        # then the rollback resumes the guest and stay() turns x-ignore-shared off, which
        # QEMU refuses while a migration runs: wait (bounded) for it to end
        with contextlib.suppress(QMPError, VMError, TimeoutError):
            await self.qmp.poll("query-migrate", migration_ended, CANCEL_WAIT_S, "QEMU migration")

    async def release(self) -> None:
        """The destination runs the guest: destroy the copy here, drop its definition."""
        self.busy.discard(self.name)
        lv = self.host.lv
        with contextlib.suppress(VMNotFound, VMConflict):
            await self.host._call(self.dom.destroy)
        if self.persistent:
            with contextlib.suppress(VMNotFound, VMConflict):
                await self.host._call(self.dom.undefineFlags, lv.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
        log.info("source domain released after migration", extra={"vm": self.name})

    async def stay(self) -> None:
        self.busy.discard(self.name)
        with contextlib.suppress(QMPError, VMError, TimeoutError):
            await self.qmp.execute("migrate-set-capabilities", SHARED_OFF)  # see SHARED_OFF


async def libvirt_source(host: LibvirtHost, name: str, memory_dir: Path, busy: set[str]) -> LibvirtSource:
    """Domain ``name`` (adopted, running, RAM in a shared file) as a migration source."""
    if not NAME_RE.match(name):
        raise VMError(f"{name!r} is not a domain name NovaCron migrates")
    dom = await host._owned(name)
    doc = await host._call(host._describe, dom)
    if doc["state"] != "running" or name in busy:
        raise VMConflict(f"domain {name} is {'migrating' if name in busy else doc['state']}; "
                         "only a running domain can migrate")
    lv = host.lv
    # not VIR_DOMAIN_XML_SECURE: no passwords in what travels (graphics passwords stay behind)
    xml = await host._call(dom.XMLDesc, lv.VIR_DOMAIN_XML_MIGRATABLE)
    if not shared_file_memory(ET.fromstring(xml)):
        raise VMConflict(f"domain {name}: NovaCron's engine needs <memoryBacking><source type='file'/>"
                         "<access mode='shared'/></memoryBacking> (or use engine 'libvirt')")
    qmp = LibvirtQMP(host, dom)
    ram = await ram_file(qmp, memory_dir)
    pid = await qemu_pid(qmp, ram[1])
    busy.add(name)
    return LibvirtSource(host, dom, qmp, ram, clean_xml(xml), bool(doc["persistent"]), busy, pid)


async def qemu_pid(qmp: LibvirtQMP, ram_stat: os.stat_result) -> int | None:
    """The domain's QEMU process, which libvirt's API does not name: the thread group of
    its first vCPU thread (QMP ``query-cpus-fast``), if that process maps the domain's RAM
    file (its device and inode). None when it cannot be told (QEMU in another PID
    namespace, /proc unreadable): the pause then scans all RAM, as before."""
    try:
        cpus = await qmp.execute("query-cpus-fast") or []
        tid = int(cpus[0]["thread-id"])
        status = Path(f"/proc/{tid}/status").read_text()
        pid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Tgid:")))
        maps = Path(f"/proc/{pid}/maps").read_text()
    except (QMPError, VMError, TimeoutError, OSError, LookupError, ValueError, StopIteration, TypeError) as exc:
        log.info("the domain's QEMU process is unknown", extra={"error": str(exc)})
        return None
    dev = f"{os.major(ram_stat.st_dev):02x}:{os.minor(ram_stat.st_dev):02x}"
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) >= 5 and fields[3] == dev and fields[4] == str(ram_stat.st_ino):
            return pid
    log.info("the vCPU thread's process does not map the domain's RAM file", extra={"pid": pid})
    return None


# ---- the destination ------------------------------------------------------------


class LibvirtDest:
    def __init__(self, host: LibvirtHost, dom: Any, qmp: LibvirtQMP, ram: tuple[Path, os.stat_result, int],
                 final_xml: str, persistent: bool, busy: set[str]) -> None:
        self.host, self.dom, self.qmp, self.busy = host, dom, qmp, busy
        self.name = str(dom.name())
        self.ram_path, st, _size = ram
        self.ram_stat: os.stat_result | None = st
        self.final_xml, self.persistent = final_xml, persistent
        self.defined = False

    async def listen_device_state(self) -> str:
        path = self.ram_path.parent / DEVICE_SOCKET  # QEMU's own folder: it can create the socket
        if len(str(path)) > SUN_PATH_MAX:
            raise AdmissionError(f"the incoming socket path {path} is too long for a unix socket")
        await self.qmp.execute("migrate-incoming", {"uri": f"unix:{path}"})
        return str(path)

    async def wait_device_state_loaded(self, timeout: float) -> None:
        await self.qmp.poll("query-status", _incoming_loaded, timeout, "destination QEMU")

    async def wait_exited(self) -> str:
        while True:
            try:
                if not await self.host._call(self.dom.isActive):
                    return "the domain stopped"
            except VMNotFound:
                return "the domain is gone"
            await self.host._next_event_or(self.name, 1.0)  # an event, or re-check each second

    async def resume(self) -> None:
        await self.host._call(self.dom.resume)
        state, _reason = await self.host._call(self.dom.state)
        if state != self.host.lv.VIR_DOMAIN_RUNNING:
            raise RuntimeError(f"destination domain not running after resume (state {state})")
        self.busy.discard(self.name)
        with contextlib.suppress(FileNotFoundError):
            (self.ram_path.parent / DEVICE_SOCKET).unlink()
        try:
            await self.qmp.execute("migrate-set-capabilities", SHARED_OFF)  # see SHARED_OFF
        except (QMPError, VMError, TimeoutError) as exc:  # the guest runs: not a failed migration
            log.warning("x-ignore-shared stays on; libvirt's own migration of this domain will be refused "
                        "until it restarts", extra={"vm": self.name, "error": str(exc)})

    async def destroy(self) -> None:
        self.busy.discard(self.name)
        with contextlib.suppress(VMNotFound, VMConflict):
            await self.host._call(self.dom.destroy)  # transient: gone with it
        if self.defined:
            with contextlib.suppress(VMNotFound, VMConflict):
                await self.host._call(self.dom.undefine)
        log.info("destination domain destroyed", extra={"vm": self.name})

    async def adopt(self) -> None:
        """Still paused: keep the definition here (when the source had one), without our
        ``-incoming`` argument; a refusal fails the migration before the guest runs here."""
        if self.persistent:
            conn = await self.host._live()
            await self.host._call(conn.defineXML, self.final_xml)
            self.defined = True
        log.info("migrated domain adopted", extra={"vm": self.name, "persistent": self.persistent})


class LibvirtDestFactory:
    def __init__(self, host: LibvirtHost, memory_dir: Path, busy: set[str], path_dirs: list[Path]) -> None:
        self.host, self.memory_dir, self.busy, self.path_dirs = host, memory_dir, busy, path_dirs

    async def prepare(self, spec: dict[str, Any], ram_size: int, migration_id: str,
                      disks: list[dict[str, Any]] | None = None) -> LibvirtDest:
        if disks:
            raise AdmissionError("local disks of libvirt domains move with engine 'libvirt' only")
        xml, final = incoming_xml(spec, ram_size, self.path_dirs)
        name = str(spec["name"])
        conn = await self.host._live()
        with contextlib.suppress(VMNotFound):
            await self.host._call(conn.lookupByName, name)
            raise AdmissionError(f"a domain named {name!r} exists here already")
        if name in self.busy:
            raise AdmissionError(f"domain {name!r} is already being migrated here")
        self.busy.add(name)
        lv = self.host.lv
        try:
            dom = await self.host._call(conn.createXML, xml, lv.VIR_DOMAIN_START_PAUSED)
        except VMError as exc:
            self.busy.discard(name)
            raise AdmissionError(f"libvirt refused the incoming domain: {exc}") from None
        qmp = LibvirtQMP(self.host, dom)
        try:
            ram = await ram_file(qmp, self.memory_dir)
            if ram[2] != ram_size:
                raise VMConflict(f"the destination's RAM file is {ram[2]} bytes, the source's {ram_size}")
            status = await qmp.execute("query-status")
            if status.get("status") != "inmigrate":
                raise VMConflict(f"the incoming domain's QEMU is {status.get('status')!r}, not waiting "
                                 "for a migration")
            await qmp.execute("migrate-set-capabilities", IGNORE_SHARED)
        except (VMError, QMPError, OSError) as exc:
            self.busy.discard(name)
            with contextlib.suppress(VMError):
                await self.host._call(dom.destroy)
            raise AdmissionError(f"the incoming domain is not usable: {exc}") from None
        log.info("incoming domain created paused", extra={"vm": name, "migration": migration_id,
                                                          "ram_file": str(ram[0])})
        return LibvirtDest(self.host, dom, qmp, ram, final, bool(spec.get("persistent")), self.busy)


async def clean_stale_incoming(host: LibvirtHost) -> list[str]:
    """Destroy the incoming domains an earlier (killed) agent left waiting: running domains
    with our ``-incoming defer`` whose QEMU still waits for the migration ("inmigrate": its
    guest never ran here). Run at agent start, before the journal is settled."""
    conn = await host._live()
    removed: list[str] = []
    for dom in await host._call(conn.listAllDomains, host.lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            root = ET.fromstring(await host._call(dom.XMLDesc, 0))
            args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
            if not any(tuple(args[i:i + 2]) == INCOMING_ARGS for i in range(len(args) - 1)):
                continue
            status = await LibvirtQMP(host, dom).execute("query-status")
            if status.get("status") != "inmigrate":
                continue  # it received its guest: the journal decides (it may run here)
            await host._call(dom.destroy)
        except (VMError, QMPError, ET.ParseError) as exc:
            log.warning("cannot check a domain for a stale incoming migration", extra={"error": str(exc)})
            continue
        removed.append(str(dom.name()))
        log.warning("removed an incoming domain left by an earlier agent", extra={"vm": removed[-1]})
    return removed


def running_rams(memory_dir: Path, busy: set[str]) -> list[Path]:
    """The RAM files of the domains running on this daemon with file-backed memory, for
    destination-side dedup's index (``PageIndex``, which asks at each incoming migration,
    in the event loop: a directory listing, no libvirt or QMP call, so no domain is
    tainted by a monitor command just to be indexed).

    libvirt gives each running domain one folder under ``memory_backing_dir``,
    ``<id>-<name, 20 characters at most>``, holding its memory backends' files
    (``pc.ram``, or one per NUMA cell) and removes it when the domain stops. Left out:
    domains our engine is moving (``busy``; an incoming one's RAM is still being written)
    and folders holding our incoming socket; only regular files owned by the folder's
    owner (QEMU's user), reached without symlinks. The index re-hashes every page it
    copies, so a domain that changed since is a miss, never wrong data."""
    root = Path(os.path.realpath(memory_dir))
    moving = {n[:20] for n in busy}
    found: list[Path] = []
    try:
        folders = list(os.scandir(root))
    except OSError:
        return found  # no domain with file-backed memory has run here yet
    for folder in folders:
        dom_id, sep, short = folder.name.partition("-")
        if not (sep and dom_id.isdigit()) or short in moving or not folder.is_dir(follow_symlinks=False):
            continue
        try:
            owner = folder.stat(follow_symlinks=False).st_uid
            entries = list(os.scandir(folder.path))
            if any(e.name == DEVICE_SOCKET for e in entries):
                continue
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False) and st.st_uid == owner and st.st_nlink == 1:
                    found.append(Path(entry.path))
        except OSError:
            continue  # the domain stopped meanwhile
    return sorted(found)


class LibvirtLocalVMs:
    """The daemon's domains as the migration manager's recovery sees them."""

    def __init__(self, host: LibvirtHost, busy: set[str]) -> None:
        self.host, self.busy = host, busy

    def state(self, name: str) -> str | None:
        conn = self.host.conn
        if conn is None:
            return None
        try:
            state, _reason = conn.lookupByName(name).state()
        except self.host.lv.libvirtError:
            return None
        return STATES[state] if 0 <= state < len(STATES) else str(state)

    def set_migrating(self, name: str, flag: bool) -> None:
        (self.busy.add if flag else self.busy.discard)(name)

    async def resume(self, name: str) -> None:
        dom = await self.host.domain(name)
        await self.host._call(dom.resume)

    async def release(self, name: str) -> None:
        dom = await self.host.domain(name)
        persistent = await self.host._call(dom.isPersistent)
        with contextlib.suppress(VMConflict):
            await self.host._call(dom.destroy)
        if persistent:
            with contextlib.suppress(VMNotFound, VMConflict):
                await self.host._call(dom.undefine)
