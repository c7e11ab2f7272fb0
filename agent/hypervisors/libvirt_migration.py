"""Live migration of libvirt domains by libvirt's own engine, run by the agent.

The source daemon migrates peer-to-peer (``VIR_MIGRATE_PEER2PEER | VIR_MIGRATE_LIVE``)
to a destination daemon named in the agent config (``libvirt_peers``: a caller
names a peer, never a URI). Options map onto libvirt's flags and parameters; the
progress comes from ``virDomainGetJobStats`` and lands in the same
``MigrationStatus`` our own engine reports (phase, bytes, remaining, downtime).
``cancel`` aborts the job (``virDomainAbortJob``): libvirt then resumes the
domain on the source, which this module checks and reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, fields
from typing import Any

from novacron.agent.hypervisors.libvirt import LibvirtHost
from novacron.agent.hypervisors.libvirt_port import QEMU_NS, clean_xml
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.vm.errors import VMConflict, VMError, VMNotFound

log = logging.getLogger("novacron.agent.libvirt")

COMPRESSION = ("none", "xbzrle", "mt")
INCOMING_MARK = QEMU_NS  # only our port adds QEMU arguments (clean_xml keeps any others)
POLL_S = 0.2  # job-stats sampling while a migration runs
MAX_SWITCH_TRIES = 5  # post-copy switch attempts (one per sample) before pre-copy is left to finish
CANCEL_WAIT_S = 30.0  # how long cancel() waits for the aborted job to end
# what a libvirt peer may look like: a qemu driver URI, and a plain TCP migration URI
DEST_URI = re.compile(r"^qemu(\+(unix|tls|ssh|tcp))?://[^\s]*/(system|session)(\?[^\s]*)?$")
# QEMU < 9.0 under TCG: the aligned fast path of its pre-copy's dirty-bitmap sync
# (cpu_physical_memory_sync_dirty_bitmap) clears the migration dirty bits without resetting
# the vCPU TLB's dirty state, so later guest stores through a TLB entry made writable earlier
# set no dirty bit and are never re-sent: the guest lands with stale pages (a busy one mostly
# crashes). libvirt's engine is that pre-copy; ours finds dirty pages itself. KVM keeps its
# dirty log in the kernel and is not affected.
TCG_DIRTY_FIX_VERSION = 9_000_000  # libvirt's encoding of QEMU 9.0.0 (major*1e6 + minor*1e3 + micro)
TCG_LOST_WRITES = ("QEMU < 9.0 under TCG: its pre-copy can lose guest writes (upstream fix 'system/physmem: "
                   "Fix migration dirty bitmap coherency with TCG memory access', QEMU 9.0)")
MIGRATE_URI = re.compile(r"^tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?$")


@dataclass(frozen=True)
class LibvirtPeer:
    name: str
    dest_uri: str  # the destination daemon, as the source daemon connects to it
    migrate_uri: str = ""  # where QEMU sends the memory (empty: the destination's host name)

    @classmethod
    def parse(cls, name: str, value: str) -> LibvirtPeer:
        """``"DEST_URI [MIGRATE_URI]"`` from the config's ``libvirt_peers`` table."""
        parts = value.split()
        if not 1 <= len(parts) <= 2 or not DEST_URI.match(parts[0]):
            raise ValueError(f"libvirt_peers.{name}: expected 'qemu[+transport]://host/system|session[?...]' "
                             f"optionally followed by 'tcp://host[:port]', got {value!r}")  # fmt: skip
        if len(parts) == 2 and not MIGRATE_URI.match(parts[1]):
            raise ValueError(f"libvirt_peers.{name}: migration URI must be tcp://host[:port], got {parts[1]!r}")
        return cls(name, parts[0], parts[1] if len(parts) == 2 else "")


@dataclass
class LibvirtMigrationOptions:
    bandwidth_mbps: float = 0.0  # MiB/s cap (0 = unlimited); libvirt's bandwidth parameter
    downtime_ms: float = 300.0  # max downtime allowed at switchover
    auto_converge: bool = True  # throttle the vCPUs when pre-copy cannot keep up
    compression: str = "none"  # none, xbzrle (delta of re-sent pages) or mt (multithreaded zlib)
    parallel_connections: int = 0  # 0: one stream; 2..64: multifd streams
    postcopy: bool = False  # allow a switch to post-copy (VIR_MIGRATE_POSTCOPY)
    postcopy_after_s: float = 0.0  # switch to post-copy after this long in pre-copy (0: never)
    persist: bool = True  # the destination keeps the definition; the source's is removed after
    tls: bool = False  # QEMU's migration stream over TLS (the daemons' migrate_tls_* set-up)
    timeout_s: float = 600.0  # whole migration; past it the job is aborted

    @classmethod
    def from_dict(cls, raw: Any) -> LibvirtMigrationOptions:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError("options must be an object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(unknown)}")
        opts = cls()
        for key, value in raw.items():
            default = getattr(opts, key)
            if isinstance(default, bool):
                ok = isinstance(value, bool)
            elif isinstance(default, str):
                ok = isinstance(value, str)
            elif isinstance(default, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"option {key!r} must be a {type(default).__name__}")
            setattr(opts, key, value)
        if not 0 <= opts.bandwidth_mbps <= 1e6:
            raise ValueError("option 'bandwidth_mbps' must be between 0 (unlimited) and 1e6")
        if not 1 <= opts.downtime_ms <= 60_000:
            raise ValueError("option 'downtime_ms' must be between 1 and 60000")
        if opts.compression not in COMPRESSION:
            raise ValueError(f"option 'compression' must be one of {', '.join(COMPRESSION)}")
        if opts.parallel_connections not in (0, *range(2, 65)):
            raise ValueError("option 'parallel_connections' must be 0 or between 2 and 64")
        if not 0 <= opts.postcopy_after_s <= 86_400:
            raise ValueError("option 'postcopy_after_s' must be between 0 (never) and 86400")
        if opts.postcopy_after_s and not opts.postcopy:
            raise ValueError("option 'postcopy_after_s' needs 'postcopy': true")
        if not 1 <= opts.timeout_s <= 86_400:
            raise ValueError("option 'timeout_s' must be between 1 and 86400")
        return opts

    def flags_and_params(self, lv: Any, peer: LibvirtPeer) -> tuple[int, dict[str, Any]]:
        flags = lv.VIR_MIGRATE_LIVE | lv.VIR_MIGRATE_PEER2PEER
        params: dict[str, Any] = {}
        if peer.migrate_uri:
            params[lv.VIR_MIGRATE_PARAM_URI] = peer.migrate_uri
        if self.bandwidth_mbps:
            params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, round(self.bandwidth_mbps))
        if self.auto_converge:
            flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
        if self.compression != "none":
            flags |= lv.VIR_MIGRATE_COMPRESSED
            params[lv.VIR_MIGRATE_PARAM_COMPRESSION] = self.compression
        if self.parallel_connections:
            flags |= lv.VIR_MIGRATE_PARALLEL
            params[lv.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = self.parallel_connections
        if self.postcopy:
            flags |= lv.VIR_MIGRATE_POSTCOPY
        if self.persist:
            flags |= lv.VIR_MIGRATE_PERSIST_DEST
        if self.tls:
            flags |= lv.VIR_MIGRATE_TLS
        return flags, params


class LibvirtMigration:
    """One outgoing migration of a domain of ``host`` to ``peer``."""

    def __init__(self, host: LibvirtHost, name: str, peer: LibvirtPeer, opts: LibvirtMigrationOptions,
                 mig_id: str | None = None) -> None:
        self.host, self.name, self.peer, self.opts = host, name, peer, opts
        self.status = MigrationStatus(id=mig_id or secrets.token_hex(8), vm=name, role="source", peer=peer.name,
                                      options=asdict(opts))  # fmt: skip
        self.status.native = {"engine": "libvirt", "dest_uri": peer.dest_uri, "migrate_uri": peer.migrate_uri,
                              "bytes_remaining": None, "memory_remaining": None}  # fmt: skip
        self._cancel_asked = False
        self._job_seen = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self.run(), name=f"libvirt migration {self.status.id}")
        return self.task

    async def cancel(self) -> MigrationStatus:
        """Abort the job; the domain goes on running on the source (checked by ``run``)."""
        if self.status.done:
            raise VMConflict(f"migration {self.status.id} is {self.status.phase} already")
        self._cancel_asked = True
        if self._job_seen:
            dom = await self.host.domain(self.name)
            with contextlib.suppress(VMConflict):  # no job any more: it ended meanwhile
                await self.host._call(dom.abortJob)
        log.info("libvirt migration cancel requested", extra={"migration": self.status.id, "vm": self.name})
        if self.task is not None:
            # libvirt ends an aborted job within seconds; past this the caller gets the
            # status as it is (still running) rather than a hung request
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self.task), CANCEL_WAIT_S)
        return self.status

    async def run(self) -> None:
        st, lv = self.status, self.host.lv
        try:
            dom = await self.host._owned(self.name)
            if not await self.host._call(dom.isActive):
                raise VMConflict(f"domain {self.name} is not running")
            persistent = await self.host._call(dom.isPersistent)
            flags, params = self.opts.flags_and_params(lv, self.peer)
            xml = await self.host._call(dom.XMLDesc, lv.VIR_DOMAIN_XML_MIGRATABLE)
            if INCOMING_MARK in xml:
                # it came here by NovaCron's engine: the live XML still carries the
                # "-incoming defer" QEMU argument, which must not start the next copy
                params[lv.VIR_MIGRATE_PARAM_DEST_XML] = clean_xml(xml)
            if not persistent:
                flags &= ~lv.VIR_MIGRATE_PERSIST_DEST
            if ET.fromstring(xml).get("type") == "qemu":  # TCG
                qemu = int(await self.host._call(self.host.conn.getVersion))
                if qemu < TCG_DIRTY_FIX_VERSION:
                    st.native["tcg_lost_writes"] = TCG_LOST_WRITES
                    log.warning("libvirt migration of a TCG domain on a QEMU with lossy dirty tracking",
                                extra={"migration": st.id, "vm": self.name, "qemu_version": qemu,
                                       "error": TCG_LOST_WRITES})  # fmt: skip
            # QEMU's downtime limit is a migration parameter: set before the job starts
            await self.host._call(dom.migrateSetMaxDowntime, int(self.opts.downtime_ms), 0)
        except VMError as exc:
            st.fail(str(exc))
            log.warning("libvirt migration refused", extra={"migration": st.id, "vm": self.name, "error": str(exc)})
            return
        if self._cancel_asked:
            st.fail("cancelled before it started", cancelled=True)
            return
        log.info("libvirt migration started", extra={"migration": st.id, "vm": self.name, "peer": self.peer.name,
                                                     "flags": flags, "options": st.options})  # fmt: skip
        job = asyncio.create_task(asyncio.to_thread(dom.migrateToURI3, self.peer.dest_uri, params, flags))
        begun = time.monotonic()
        deadline = begun + self.opts.timeout_s
        timed_out = switched = False
        switch_refusals = 0
        while not job.done():
            await asyncio.wait({job}, timeout=POLL_S)
            if job.done():
                break
            await self._sample(dom)
            if self._cancel_asked and self._job_seen:
                with contextlib.suppress(lv.libvirtError):
                    await asyncio.to_thread(dom.abortJob)
            if (self.opts.postcopy_after_s and not switched and self._job_seen and not self._cancel_asked
                    and time.monotonic() - begun >= self.opts.postcopy_after_s
                    and self.status.phase == "precopy" and self.status.bytes_wire > 0):
                # only once QEMU sends memory: before that libvirt is still preparing the
                # destination and QEMU refuses ("enable postcopy ... before the start")
                try:
                    await asyncio.to_thread(dom.migrateStartPostCopy, 0)
                    switched = True  # once: past this the guest runs at the destination
                    self.status.native["postcopy"] = True
                    log.info("libvirt migration switched to post-copy", extra={"migration": st.id, "vm": self.name})
                except lv.libvirtError as exc:
                    switch_refusals += 1
                    if switch_refusals >= MAX_SWITCH_TRIES:
                        switched = True  # stop asking; pre-copy goes on
                    log.warning("post-copy switch refused", extra={"migration": st.id, "error": exc.get_error_message(),
                                                                   "attempt": switch_refusals})
            if time.monotonic() > deadline and not timed_out:
                timed_out = True
                with contextlib.suppress(lv.libvirtError):
                    await asyncio.to_thread(dom.abortJob)
        failure = job.exception()
        if failure is None:
            await self._completed(dom, persistent)
            return
        msg = failure.get_error_message() if isinstance(failure, lv.libvirtError) else str(failure)
        state = await self._source_state(dom)
        st.native["source_state_after"] = state
        if self._cancel_asked:
            st.fail(f"cancelled: {msg}; domain {state} on the source", cancelled=True)
        elif timed_out:
            st.fail(f"timed out after {self.opts.timeout_s:g} s: {msg}; domain {state} on the source")
        else:
            st.fail(f"{msg}; domain {state} on the source")
        log.warning("libvirt migration ended without moving the domain",
                    extra={"migration": st.id, "vm": self.name, "phase": st.phase, "error": st.error,
                           "source_state": state})  # fmt: skip

    async def _sample(self, dom: Any) -> None:
        """One job-stats reading into the status (a failed read is skipped)."""
        try:
            stats = await asyncio.to_thread(dom.jobStats, 0)
            state, reason = await asyncio.to_thread(dom.state)
        except self.host.lv.libvirtError:
            return  # the domain just left this host, or the job ended
        if stats.get("type", 0) == self.host.lv.VIR_DOMAIN_JOB_NONE:
            return
        self._job_seen = True
        self._apply(stats)
        lv = self.host.lv
        if state == lv.VIR_DOMAIN_PAUSED and reason in (lv.VIR_DOMAIN_PAUSED_MIGRATION,
                                                        lv.VIR_DOMAIN_PAUSED_POSTCOPY):  # fmt: skip
            phase = "stopcopy"
        else:
            phase = "precopy"
        if self.status.phase != phase and not self.status.done and self.status.phase != "stopcopy":
            self.status.set_phase(phase)

    def _apply(self, stats: dict[str, Any]) -> None:
        st = self.status
        page = int(stats.get("memory_page_size", 4096)) or 4096
        st.round = int(stats.get("memory_iteration", st.round))
        st.pages_total = int(stats.get("memory_total", 0)) // page
        st.pages_sent = int(stats.get("memory_normal", st.pages_sent))
        st.pages_zero = int(stats.get("memory_constant", st.pages_zero))
        st.bytes_raw = int(stats.get("memory_processed", st.bytes_raw))
        st.bytes_wire = int(stats.get("data_processed", st.bytes_wire))
        st.dirty_rate_pages_s = float(stats.get("memory_dirty_rate", 0))
        st.bandwidth_bytes_s = float(stats.get("memory_bps", 0))
        st.throttle_pct = float(stats.get("auto_converge_throttle", 0))
        st.native["bytes_remaining"] = int(stats.get("data_remaining", 0))
        st.native["memory_remaining"] = int(stats.get("memory_remaining", 0))
        if "downtime" in stats:
            st.downtime_ms = float(stats["downtime"])
        st.native["job"] = {k: v for k, v in stats.items() if isinstance(v, int | float | str)}

    async def _completed(self, dom: Any, persistent: bool) -> None:
        st, lv = self.status, self.host.lv
        st.set_phase("commit")
        with contextlib.suppress(lv.libvirtError):
            # libvirt keeps the finished job's figures on the source domain (downtime included)
            self._apply(await asyncio.to_thread(dom.jobStats, lv.VIR_DOMAIN_JOB_STATS_COMPLETED))
        if persistent and self.opts.persist:
            # the destination holds the definition now; drop the stale copy here
            with contextlib.suppress(lv.libvirtError):
                await asyncio.to_thread(dom.undefineFlags, 0)
        st.set_phase("completed")
        log.info("libvirt migration completed", extra={"migration": st.id, "vm": self.name, **st.metrics()})

    async def _source_state(self, dom: Any) -> str:
        try:
            doc = await self.host.get(self.name)
        except VMNotFound:
            return "gone"
        return str(doc["state"])


class LibvirtMigrations:
    """The agent's libvirt migrations, by id (what ``/v1/libvirt/migrations`` shows)."""

    def __init__(self, host: LibvirtHost, peers: dict[str, str]) -> None:
        self.host = host
        self.peers = {name: LibvirtPeer.parse(name, value) for name, value in peers.items()}
        self.jobs: dict[str, LibvirtMigration] = {}

    def start(self, doc: Any) -> LibvirtMigration:
        if not isinstance(doc, dict):
            raise VMError("expected a JSON object")
        unknown = sorted(set(doc) - {"vm", "peer", "options", "id"})
        if unknown:
            raise VMError(f"unknown field(s): {', '.join(unknown)}")
        name, peer, mig_id = doc.get("vm"), doc.get("peer"), doc.get("id")
        if not isinstance(name, str) or not name:
            raise VMError("vm: expected the domain's name")
        if not isinstance(peer, str) or peer not in self.peers:
            raise VMError(f"peer: expected one of the configured libvirt_peers ({', '.join(sorted(self.peers)) or 'none'})")
        if mig_id is not None and (not isinstance(mig_id, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", mig_id)):
            raise VMError("id: expected 1-64 letters, digits, '_', '.' or '-'")
        if mig_id in self.jobs:
            raise VMConflict(f"a migration {mig_id!r} exists already")
        if self.migrating(name):
            raise VMConflict(f"domain {name} is migrating already")
        try:
            opts = LibvirtMigrationOptions.from_dict(doc.get("options"))
        except ValueError as exc:
            raise VMError(str(exc)) from None
        mig = LibvirtMigration(self.host, name, self.peers[peer], opts, mig_id)
        self.jobs[mig.status.id] = mig
        mig.start()
        return mig

    async def for_grant(self, name: str, target: str, mig_id: str, opts: MigrationOptions) -> LibvirtMigration:
        """A migration the coordinator granted (``/v1/migrations`` with ``engine: "libvirt"``),
        checked, not started: the peer is the ``libvirt_peers`` entry named after the
        destination host; our engine's options map onto libvirt's where they mean the same."""
        peer = self.peers.get(target)
        if peer is None:
            raise VMConflict(f"engine 'libvirt': no libvirt_peers entry for host {target!r} in this agent's config")
        if self.migrating(name):
            raise VMConflict(f"domain {name} is migrating already")
        dom = await self.host._owned(name)
        if not await self.host._call(dom.isActive):
            raise VMConflict(f"domain {name} is not running")
        lopts = LibvirtMigrationOptions(bandwidth_mbps=opts.bandwidth_mbps, downtime_ms=opts.downtime_ms,
                                        auto_converge=opts.throttle, timeout_s=opts.timeout_s)
        mig = LibvirtMigration(self.host, name, peer, lopts, mig_id)
        self.jobs[mig.status.id] = mig
        return mig

    def migrating(self, name: str) -> bool:
        return any(j.name == name and not j.status.done for j in self.jobs.values())

    def get(self, mig_id: str) -> LibvirtMigration:
        mig = self.jobs.get(mig_id)
        if mig is None:
            raise VMNotFound(f"no libvirt migration {mig_id!r}")
        return mig

    async def close(self) -> None:
        """Agent exit: abort what still runs (each domain stays on its source)."""
        for mig in self.jobs.values():
            if not mig.status.done:
                with contextlib.suppress(Exception):
                    await mig.cancel()
