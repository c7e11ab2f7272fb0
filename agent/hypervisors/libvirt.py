"""The libvirt driver: the domains of one libvirt daemon, as NovaCron VMs.

``LibvirtHost(uri)`` lists domains (name, UUID, state, vCPUs, memory, disks,
NICs, CPU model, parsed from the domain XML), runs their lifecycle (start,
graceful shutdown, destroy, pause, resume), reads their stats and turns
libvirt's domain lifecycle events into an asyncio stream. Method names follow
``novacron.agent.vm.manager.VMManager`` where they mean the same.

Ownership: a domain defined outside NovaCron is listed with ``adopted: false``
and NovaCron changes nothing of it until an operator adopts it (``adopt``),
which writes one element into the domain's ``<metadata>`` under NovaCron's
namespace; that mark travels with the domain (migrations, agent restarts).
NovaCron never defines over a domain's XML.

libvirt calls block, so each runs in a worker thread; libvirt connections are
thread-safe. Events need libvirt's event loop registered before the first
connection is opened; it runs in one daemon thread per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from novacron.agent.vm.errors import VMConflict, VMError, VMNotFound

log = logging.getLogger("novacron.agent.libvirt")

METADATA_NS = "https://novacron.dev/xmlns/libvirt/1"
METADATA_KEY = "novacron"
CONSOLE_DRAIN_S = 1.0

# virDomainState, in libvirt's order
STATES = ("nostate", "running", "blocked", "paused", "shutting-down", "stopped", "crashed", "pmsuspended")
# virDomainEventType, in libvirt's order
EVENTS = ("defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown",
          "pmsuspended", "crashed")  # fmt: skip

T = TypeVar("T")


class LibvirtUnavailable(VMError):
    """The libvirt binding is missing or the daemon cannot be reached."""

    status = 503


def load_libvirt() -> ModuleType:
    """The ``libvirt`` binding, imported on first use (``pip install novacron[libvirt]``)."""
    try:
        import libvirt
    except ImportError as exc:
        raise LibvirtUnavailable(
            'hypervisor = "libvirt" needs the libvirt-python package (pip install novacron[libvirt])'
        ) from exc
    return libvirt


_event_lock = threading.Lock()
_event_thread: threading.Thread | None = None


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and run it in a daemon thread.

    Once per process: libvirt offers no way to unregister it, and connections
    opened before it exists get no events.
    """
    global _event_thread
    lv = load_libvirt()
    with _event_lock:
        if _event_thread is not None:
            return
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                if lv.virEventRunDefaultImpl() < 0:
                    log.error("libvirt event loop iteration failed")
                    time.sleep(0.5)  # not a busy loop when the impl keeps failing

        _event_thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _event_thread.start()


# ---- the domain XML -------------------------------------------------------------


def _mib(elem: ET.Element | None) -> int:
    if elem is None or not (elem.text or "").strip():
        return 0
    scale = {"b": 1 / 2**20, "bytes": 1 / 2**20, "k": 1 / 1024, "kib": 1 / 1024, "kb": 1000 / 2**20,
             "m": 1, "mib": 1, "mb": 1e6 / 2**20, "g": 1024, "gib": 1024, "gb": 1e9 / 2**20}  # fmt: skip
    unit = elem.get("unit", "KiB").lower()
    return int(int((elem.text or "0").strip()) * scale.get(unit, 1 / 1024))


def parse_domain_xml(xml: str) -> dict[str, Any]:
    """The inventory facts of one domain from its XML (``virsh dumpxml``)."""
    root = ET.fromstring(xml)
    disks = []
    for disk in root.findall("./devices/disk"):
        source = disk.find("source")
        target = disk.find("target")
        driver = disk.find("driver")
        src = ""
        if source is not None:
            src = source.get("file") or source.get("dev") or source.get("name") or source.get("volume") or ""
        disks.append({
            "device": disk.get("device", "disk"), "type": disk.get("type", ""), "source": src,
            "target": target.get("dev", "") if target is not None else "",
            "bus": target.get("bus", "") if target is not None else "",
            "format": driver.get("type", "") if driver is not None else "",
        })  # fmt: skip
    nics = []
    for nic in root.findall("./devices/interface"):
        mac, source, model = nic.find("mac"), nic.find("source"), nic.find("model")
        src = ""
        if source is not None:
            src = source.get("network") or source.get("bridge") or source.get("dev") or ""
        nics.append({
            "type": nic.get("type", ""), "mac": mac.get("address", "") if mac is not None else "",
            "source": src, "model": model.get("type", "") if model is not None else "",
        })  # fmt: skip
    cpu = root.find("cpu")
    model = cpu.find("model") if cpu is not None else None
    if model is not None and (model.text or "").strip():
        cpu_model = (model.text or "").strip()
    elif cpu is not None and cpu.get("mode") in ("host-passthrough", "host-model", "maximum"):
        cpu_model = str(cpu.get("mode"))
    else:
        cpu_model = "default"  # the hypervisor's default CPU (qemu64 under TCG)
    vcpu = root.find("vcpu")
    mark = root.find(f"./metadata/{{{METADATA_NS}}}vm")
    return {
        "name": root.findtext("name", ""),
        "uuid": root.findtext("uuid", ""),
        "type": root.get("type", ""),
        "vcpus": int((vcpu.text or "1").strip()) if vcpu is not None else 1,
        "memory_mb": _mib(root.find("memory")),
        "cpu_model": cpu_model,
        "disks": disks,
        "nics": nics,
        "adopted": mark is not None and mark.get("adopted") == "true",
        "shared_memory": root.find("./memoryBacking/access[@mode='shared']") is not None,
    }


# ---- the daemon -----------------------------------------------------------------


@dataclass(frozen=True)
class DomainEvent:
    vm: str
    uuid: str
    event: str  # one of EVENTS
    detail: int  # libvirt's detail code for that event
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "uuid": self.uuid, "event": self.event, "detail": self.detail, "at": self.at}


class LibvirtHost:
    """One libvirt daemon (``uri``, e.g. ``qemu:///system``) and its domains."""

    def __init__(self, uri: str, *, shutdown_timeout_s: float = 30.0) -> None:
        self.uri = uri
        self.shutdown_timeout_s = shutdown_timeout_s
        self.lv = load_libvirt()
        self.conn: Any = None
        self._callback_id: int | None = None
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[DomainEvent]]] = []
        self._sub_lock = threading.Lock()
        self._waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._wanted = False  # connected once and not closed: reconnect when the link dies
        self._reconnecting = asyncio.Lock()

    # -- connection

    async def connect(self) -> None:
        self._wanted = True
        ensure_event_loop()
        try:
            self.conn = await asyncio.to_thread(self.lv.open, self.uri)
        except self.lv.libvirtError as exc:
            raise LibvirtUnavailable(f"cannot connect to libvirt at {self.uri}: {exc.get_error_message()}") from None
        # keepalives notice a daemon that went away (needs the event loop above)
        await asyncio.to_thread(self.conn.setKeepAlive, 5, 3)
        self._callback_id = await asyncio.to_thread(
            self.conn.domainEventRegisterAny, None, self.lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
        log.info("libvirt connected", extra={"uri": self.uri, "libvirt_version": self.lv.getVersion()})

    async def close(self) -> None:
        self._wanted = False
        if self.conn is None:
            return
        conn, self.conn = self.conn, None
        with contextlib.suppress(self.lv.libvirtError):
            if self._callback_id is not None:
                await asyncio.to_thread(conn.domainEventDeregisterAny, self._callback_id)
            await asyncio.to_thread(conn.close)

    async def __aenter__(self) -> LibvirtHost:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _live(self) -> Any:
        """The connection, opened again when the daemon went away (a libvirtd restart
        does not stop its domains); a 503 while it cannot be reached."""
        async with self._reconnecting:
            conn = self.conn
            if conn is not None:
                try:
                    if await asyncio.to_thread(conn.isAlive):
                        return conn
                except self.lv.libvirtError:
                    pass
                log.warning("libvirt connection lost; reconnecting", extra={"uri": self.uri})
                self.conn = None
                with contextlib.suppress(self.lv.libvirtError):
                    await asyncio.to_thread(conn.close)
            if not self._wanted:
                raise LibvirtUnavailable("not connected to libvirt")
            await self.connect()
            return self.conn

    async def host_uuid(self) -> str:
        conn = await self._live()
        caps = await self._call(conn.getCapabilities)
        return ET.fromstring(caps).findtext("./host/uuid", "")

    # -- events

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        """libvirt's event thread: hand the event to every asyncio subscriber."""
        ev = DomainEvent(dom.name(), dom.UUIDString(), EVENTS[event] if 0 <= event < len(EVENTS) else str(event),
                         detail, time.time())  # fmt: skip
        log.info("domain event", extra=ev.to_dict())
        with self._sub_lock:
            targets = list(self._subscribers)
            waiters = self._waiters.get(ev.vm, [])
            self._waiters[ev.vm] = []
        for loop, queue in targets:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens there
                loop.call_soon_threadsafe(queue.put_nowait, ev)
        for loop, flag in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(flag.set)

    async def events(self) -> AsyncGenerator[DomainEvent, None]:
        """Every domain lifecycle event from now on, as libvirt reports it."""
        queue: asyncio.Queue[DomainEvent] = asyncio.Queue(maxsize=10_000)
        entry = (asyncio.get_running_loop(), queue)
        with self._sub_lock:
            self._subscribers.append(entry)
        try:
            while True:
                yield await queue.get()
        finally:
            with self._sub_lock:
                self._subscribers.remove(entry)

    async def _next_event_or(self, name: str, timeout: float) -> None:
        """Wait until ``name`` gets an event or ``timeout`` s pass (state waits re-check after)."""
        flag = asyncio.Event()
        with self._sub_lock:
            self._waiters.setdefault(name, []).append((asyncio.get_running_loop(), flag))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(flag.wait(), timeout)

    # -- inventory

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self.conn is None:
            raise LibvirtUnavailable("not connected to libvirt")
        try:
            return await asyncio.to_thread(fn, *args)
        except self.lv.libvirtError as exc:
            raise self._error(exc) from None

    def _error(self, exc: Any) -> VMError:
        code, msg = exc.get_error_code(), exc.get_error_message()
        if code == self.lv.VIR_ERR_NO_DOMAIN:
            return VMNotFound(msg)
        if code in (self.lv.VIR_ERR_OPERATION_INVALID, self.lv.VIR_ERR_OPERATION_FAILED):
            return VMConflict(msg)
        err = VMError(f"libvirt: {msg}")
        err.status = 502  # the daemon refused; nothing wrong with the request as such
        return err

    async def domain(self, name: str) -> Any:
        conn = await self._live()
        return await self._call(conn.lookupByName, name)

    def _describe(self, dom: Any) -> dict[str, Any]:
        """Worker thread: one domain's inventory document."""
        doc = parse_domain_xml(dom.XMLDesc(0))
        state, reason = dom.state()
        doc["state"] = STATES[state] if 0 <= state < len(STATES) else str(state)
        doc["state_reason"] = reason
        doc["persistent"] = bool(dom.isPersistent())
        doc["active"] = bool(dom.isActive())
        doc["hypervisor"] = "libvirt"
        return doc

    async def list(self) -> list[dict[str, Any]]:
        conn = await self._live()

        def all_domains() -> list[dict[str, Any]]:
            out = []
            for dom in conn.listAllDomains(0):
                try:
                    out.append(self._describe(dom))
                except self.lv.libvirtError as exc:
                    if exc.get_error_code() != self.lv.VIR_ERR_NO_DOMAIN:  # undefined meanwhile
                        raise
            return sorted(out, key=lambda d: d["name"])

        return await self._call(all_domains)

    async def get(self, name: str) -> dict[str, Any]:
        dom = await self.domain(name)
        return await self._call(self._describe, dom)

    async def stats(self, name: str) -> dict[str, Any]:
        """CPU time, memory and balloon figures of a running domain."""
        dom = await self.domain(name)

        def read() -> dict[str, Any]:
            state, max_kib, mem_kib, vcpus, cpu_ns = dom.info()
            doc: dict[str, Any] = {"vm": name, "state": STATES[state] if 0 <= state < len(STATES) else str(state),
                                   "vcpus": vcpus, "cpu_time_ns": cpu_ns, "memory_max_mb": max_kib // 1024,
                                   "memory_mb": mem_kib // 1024}  # fmt: skip
            if dom.isActive():
                doc["memory_stats_kib"] = dict(dom.memoryStats())
            return doc

        return await self._call(read)

    # -- ownership

    async def adopt(self, name: str) -> dict[str, Any]:
        """Mark a domain defined outside NovaCron as managed by it (only the metadata changes)."""
        dom = await self.domain(name)
        lv = self.lv

        def mark() -> None:
            flags = 0
            if dom.isPersistent():
                flags |= lv.VIR_DOMAIN_AFFECT_CONFIG
            if dom.isActive():
                flags |= lv.VIR_DOMAIN_AFFECT_LIVE
            dom.setMetadata(lv.VIR_DOMAIN_METADATA_ELEMENT, '<vm adopted="true"/>', METADATA_KEY, METADATA_NS, flags)

        if (await self.get(name))["adopted"]:
            raise VMConflict(f"domain {name} is adopted already")
        await self._call(mark)
        log.info("domain adopted", extra={"vm": name, "uri": self.uri})
        return await self.get(name)

    async def _owned(self, name: str) -> Any:
        """The domain, if NovaCron may act on it (adopted); else a 409 saying how."""
        dom = await self.domain(name)
        doc = await self._call(self._describe, dom)
        if not doc["adopted"]:
            raise VMConflict(f"domain {name} was defined outside NovaCron; adopt it first "
                             f"(POST /v1/vms/{name}/adopt)")  # fmt: skip
        return dom

    async def send_console(self, name: str, text: str) -> int:
        """Type ``text`` on the domain's console (its first serial port, a pty) through
        libvirt; the output is wherever the domain's XML logs it."""
        dom = await self._owned(name)
        data = text.encode()

        conn = dom.connect()

        def send() -> None:
            stream = conn.newStream(0)
            try:
                dom.openConsole(None, stream, 0)
                sent = 0
                while sent < len(data):
                    sent += stream.send(data[sent:])
                # libvirtd drops console bytes it has not yet written to the pty when the
                # stream ends (seen with libvirt 9.0): let it drain first
                time.sleep(CONSOLE_DRAIN_S)
                stream.finish()
            except BaseException:
                with contextlib.suppress(self.lv.libvirtError):
                    stream.abort()
                raise

        await self._call(send)
        return len(data)

    # -- lifecycle

    async def start(self, name: str) -> dict[str, Any]:
        dom = await self._owned(name)
        await self._call(dom.create)
        log.info("domain started", extra={"vm": name})
        return await self.get(name)

    async def pause(self, name: str) -> dict[str, Any]:
        dom = await self._owned(name)
        await self._call(dom.suspend)
        return await self.get(name)

    async def resume(self, name: str) -> dict[str, Any]:
        dom = await self._owned(name)
        await self._call(dom.resume)
        return await self.get(name)

    async def destroy(self, name: str) -> dict[str, Any]:
        """Power off at once (the guest is not asked)."""
        dom = await self._owned(name)
        await self._call(dom.destroy)
        log.info("domain destroyed", extra={"vm": name})
        return await self.get(name)

    async def shutdown(self, name: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Ask the guest to power off (ACPI) and wait until it has; a 409 when it
        has not within ``timeout_s`` (the domain is left running)."""
        dom = await self._owned(name)
        await self._call(dom.shutdown)
        if await self._wait_off(name, dom, self.shutdown_timeout_s if timeout_s is None else timeout_s):
            log.info("domain shut down", extra={"vm": name})
            return await self.get(name)
        raise VMConflict(f"domain {name} did not shut down within {timeout_s or self.shutdown_timeout_s:g} s")

    async def stop(self, name: str, timeout_s: float | None = None) -> dict[str, Any]:
        """Graceful shutdown, then destroy if the guest ignores it (like VMManager.stop)."""
        await self._owned(name)  # not adopted: refused before anything is asked of the guest
        try:
            doc = await self.shutdown(name, timeout_s)
            doc["forced"] = False
            return doc
        except VMConflict:
            dom = await self.domain(name)
            if not await self._call(dom.isActive):
                raise
        log.warning("guest ignored the shutdown request; destroying it", extra={"vm": name})
        doc = await self.destroy(name)
        doc["forced"] = True
        return doc

    async def _wait_off(self, name: str, dom: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if not await self._call(dom.isActive):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await self._next_event_or(name, min(left, 1.0))  # an event, or re-check each second
