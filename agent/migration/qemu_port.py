"""The migration engine's view of QEMU VMs run by ``novacron.agent.vm``.

Source: pause/resume through the VM, device state through QEMU's own
migration with ``x-ignore-shared`` (RAM is in the shared file we already
copied, so QEMU sends only device state). Destination: an identical machine
started with ``-incoming defer`` under ``<state_dir>/incoming/<name>/`` so the
runtime never mistakes a half-migrated VM for one of its own; on commit the
folder is renamed into ``vms/`` and the VM registered. A destination agent
that died mid-migration leaves an ``incoming/`` folder which
``clean_stale_incoming`` removes (killing its QEMU) at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from novacron.agent.migration.diskrelay import RELAY_PREFIX
from novacron.agent.migration.offline import OfflineFailed
from novacron.agent.migration.postcopy import FAULT_EVENTS, fault_latencies
from novacron.agent.migration.protocol import RELAY_SOCKET
from novacron.agent.migration.vmport import AdmissionError
from novacron.agent.qmp import QMPClient, QMPError, QMPTimeoutError
from novacron.agent.safefs import create_new
from novacron.agent.vm.accel import AccelUnavailable
from novacron.agent.vm.disks import node
from novacron.agent.vm.errors import VMConflict, VMError
from novacron.agent.vm.expanded import Expanded
from novacron.agent.vm.machine import VM
from novacron.agent.vm.manager import VMManager
from novacron.agent.vm.qemu_args import VMPaths
from novacron.agent.vm.ramfile import MIB
from novacron.agent.vm.recovery import kill_orphan, qemus_under
from novacron.agent.vm.spec import SpecError, VMSpec, parse_spec

log = logging.getLogger("novacron.agent.migration")

IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}
# ours, with QEMU's MIGRATION events on: the paused wait for the device state to be sent
# (source) and loaded (destination) wakes on them instead of at the next poll (_poll)
IGNORE_SHARED_EVENTS = {"capabilities": [*IGNORE_SHARED["capabilities"],
                                         {"capability": "events", "state": True}]}
# Post-copy (postcopy.py): QEMU moves RAM itself, so the shared block must not be skipped;
# postcopy-blocktime (destination) makes QEMU time the vCPUs' waits on missing pages.
POSTCOPY_CAPS = {"capabilities": [{"capability": "x-ignore-shared", "state": False},
                                  {"capability": "postcopy-ram", "state": True},
                                  {"capability": "postcopy-blocktime", "state": True}]}
RECOVER_SOCKET = "recover.sock"  # destination: QEMU's post-copy recovery listens here
DEVICE_SOCKET = "incoming.sock"
NBD_SOCKET = "nbd.sock"  # destination: its QEMU's NBD server for the local disks
QEMU_STORAGE_DAEMON = "qemu-storage-daemon"  # offline migration's destination export
EXPORT_START_S = 10.0
EXPORT_STOP_S = 30.0  # it flushes the disks first
PR_SET_PDEATHSIG = 1
JOB_POLL_S = 0.05
# The disk mirror's copy mode: write-blocking, so every guest write waits for its copy and
# the mirror converges however fast the guest writes (QEMU 7.2 cannot switch a running
# job's mode; block-job-change is 9.1+). QEMU 7.2 was seen to abort with heap corruption
# ("free(): corrupted unsorted chunks", "corrupted double-linked list", SIGSEGV) when a
# write-blocking mirror ended while the guest wrote: its NBD connection dropped, or the
# job was cancelled. So the connection never drops under a live job and the job never
# fails by itself: it ends in the source agent's relay, which on any failure answers
# QEMU's requests itself (diskrelay.SourceDiskRelay.fail_over), and the jobs are cancelled
# with the guest held paused (cancel_disk_mirrors); tests/disks/test_disk_migration.py::
# test_destination_killed_under_write_blocking_guest_writes.
MIRROR_COPY_MODE = "write-blocking"
POLL_S = 0.005  # query-migrate poll while the guest is paused: latency is downtime


def _qmp(vm: VM) -> QMPClient:
    if vm.qmp is None:
        raise VMConflict(f"VM {vm.name} has no QMP connection (state {vm.state})")
    return vm.qmp


async def _poll(vm: VM, command: str, done: Callable[[dict[str, Any]], bool], timeout: float,
                what: str, wake_on: str | None = None) -> None:
    """Ask QMP ``command`` until ``done(answer)`` (which raises on a dead end), every
    POLL_S, or at once on a ``wake_on`` event (subscribed before the first ask: none is
    missed; the answer, not the event, decides)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    qmp = _qmp(vm)
    events = qmp.subscribe([wake_on]) if wake_on else None
    try:
        while True:
            info = await qmp.execute(command, timeout=10) or {}
            if done(info):
                return
            if loop.time() > deadline:
                raise TimeoutError(f"{what} still {info.get('status')!r} after {timeout:g}s")
            if events is None:
                await asyncio.sleep(POLL_S)
            else:
                with contextlib.suppress(QMPTimeoutError):
                    await events.get(timeout=POLL_S)
    finally:
        if events is not None:
            qmp.unsubscribe(events)


def _migration_completed(info: dict[str, Any]) -> bool:
    state = info.get("status")
    if state in ("failed", "cancelled"):
        raise RuntimeError(f"QEMU migration {state}: {info.get('error-desc', 'no detail')}")
    return state == "completed"


CANCEL_WAIT_S = 10.0  # for QEMU's migration to end after migrate_cancel


def migration_ended(info: dict[str, Any]) -> bool:
    """QEMU's outgoing migration is over (or never began): a rollback may resume."""
    return info.get("status") in (None, "none", "completed", "failed", "cancelled")


def _incoming_loaded(info: dict[str, Any]) -> bool:
    state = info.get("status")
    if state not in ("paused", "inmigrate", "prelaunch"):
        raise RuntimeError(f"destination QEMU is {state!r} after loading device state")
    return state == "paused"


# RARP/GARP from each NIC at 0, 50, 150, 300 ms: switches and peers learn the new port
# at once, and again should the first frame be lost while the bridge learns the tap.
ANNOUNCE = {"initial": 0, "max": 300, "rounds": 4, "step": 50}


async def announce(vm: VM) -> None:
    """QMP ``announce-self`` after switchover; a failure is logged, not fatal
    (the guest runs, and its own traffic teaches the switches soon enough)."""
    try:
        await _qmp(vm).execute("announce-self", ANNOUNCE, timeout=10)
    except (QMPError, TimeoutError, VMConflict) as exc:
        log.warning("announce-self failed", extra={"vm": vm.name, "error": str(exc)})


class QemuSource:
    def __init__(self, vms: VMManager, vm: VM) -> None:
        self.vms = vms
        self.vm = vm
        self.name = vm.name
        self.ram_path = vm.ram_path
        self.ram_stat = vm.ram_stat
        self.ram_size = vm.spec.memory_mb * MIB
        self.work_dir = vm.paths.dir
        self._caps_set = False  # the device-state migration's capabilities (set before the pause)

    @property
    def pid(self) -> int | None:
        """QEMU's process: auto-converge puts a CPU quota on it (throttle.py)."""
        return self.vm.pid

    def spec(self) -> dict[str, Any]:
        return _spec_doc(self.vm)

    async def pause(self) -> None:
        qmp = _qmp(self.vm)
        if not self._caps_set:  # with the guest still running: one round trip less paused
            with contextlib.suppress(QMPError, QMPTimeoutError):  # send_device_state asks again, and says why
                await qmp.execute("migrate-set-capabilities", IGNORE_SHARED_EVENTS, timeout=10)
                self._caps_set = True
        await qmp.execute("stop", timeout=10)
        self.vm.state = "paused"

    async def resume(self) -> None:
        await _qmp(self.vm).execute("cont", timeout=10)
        self.vm.state = "running"
        if self.vm.spec.nics:  # the destination may have announced the VM already: take it back
            await announce(self.vm)

    async def send_device_state(self, socket_path: Path) -> None:
        qmp = _qmp(self.vm)
        # relative to QEMU's cwd, the VM folder (it follows the folder through an
        # adopt's rename): the absolute path may be too long for sun_path
        if socket_path.parent != self.vm.paths.dir:
            raise ValueError(f"device-state socket {socket_path} is outside the VM folder")
        self.vm.images.qemu.share_file(socket_path)  # an unprivileged QEMU must connect to it
        if not self._caps_set:
            await qmp.execute("migrate-set-capabilities", IGNORE_SHARED_EVENTS, timeout=10)
            self._caps_set = True
        await qmp.execute("migrate", {"uri": f"unix:{socket_path.name}"}, timeout=10)

    async def wait_device_state_sent(self, timeout: float) -> None:
        await _poll(self.vm, "query-migrate", _migration_completed, timeout, "QEMU migration", "MIGRATION")

    async def cancel_device_state(self) -> None:
        with contextlib.suppress(QMPError):
            await _qmp(self.vm).execute("migrate_cancel", timeout=10)
        # the rollback resumes the guest next: not while QEMU's migration still runs (its
        # device state is asked for at the pause, so it may be mid-stream or completed)
        with contextlib.suppress(QMPError, QMPTimeoutError, TimeoutError):
            await _poll(self.vm, "query-migrate", migration_ended, CANCEL_WAIT_S, "QEMU migration", "MIGRATION")

    async def stay(self) -> None:
        self.vm.migrating = False

    # ----- post-copy (PostcopySource, see postcopy.py) -----------------------
    async def start_ram_migration(self, socket_path: Path, *, bandwidth_bytes_s: float,
                                  downtime_ms: float, resume: bool = False) -> None:
        """QEMU's own migration of RAM and devices, post-copy enabled, to ``socket_path``
        (``resume``: reconnect a paused post-copy instead)."""
        if socket_path.parent != self.vm.paths.dir:
            raise ValueError(f"migration socket {socket_path} is outside the VM folder")
        qmp = _qmp(self.vm)
        self.vm.images.qemu.share_file(socket_path)  # an unprivileged QEMU must connect to it
        self._caps_set = True  # QEMU moves RAM itself: a pause must not touch its capabilities
        if not resume:
            await qmp.execute("migrate-set-capabilities", POSTCOPY_CAPS, timeout=10)
            await self.set_ram_limits(bandwidth_bytes_s, downtime_ms)
        await qmp.execute("migrate", {"uri": f"unix:{socket_path.name}", "resume": resume}, timeout=10)

    async def set_ram_limits(self, bandwidth_bytes_s: float, downtime_ms: float) -> None:
        # 0 = no cap for us; QEMU's own default is 32 MiB/s, so "none" is asked explicitly
        cap = int(bandwidth_bytes_s) if bandwidth_bytes_s > 0 else 1 << 40
        await _qmp(self.vm).execute("migrate-set-parameters", {
            "max-bandwidth": cap, "max-postcopy-bandwidth": int(bandwidth_bytes_s),
            "downtime-limit": max(1, int(downtime_ms))}, timeout=10)

    async def query_migration(self) -> dict[str, Any]:
        return await _qmp(self.vm).execute("query-migrate", timeout=10) or {}

    async def start_postcopy(self) -> None:
        await _qmp(self.vm).execute("migrate-start-postcopy", timeout=10)

    async def mark_paused(self) -> None:
        """QEMU stopped the guest itself (completion or post-copy): record it."""
        self.vm.state = "paused"

    # ----- local disks (MirrorSource) -------------------------------------
    # Job and node names: "nc-mirror<i>" mirrors node "disk<i>" to NBD client node "nc-target<i>".
    async def disk_plan(self) -> list[dict[str, Any]]:
        return await self.vms.disks.migration_plan(self.vm.spec, self.vm.paths.dir)

    async def start_disk_mirror(self, index: int, socket_path: Path) -> None:
        if socket_path.parent != self.vm.paths.dir:
            raise ValueError(f"disk relay socket {socket_path} is outside the VM folder")
        qmp = _qmp(self.vm)
        # a job or NBD node an earlier migration left (its agent was killed mid-mirror)
        stale = await self.disk_mirror_jobs()
        if index in stale and stale[index]["status"] not in ("concluded", "null"):
            with contextlib.suppress(QMPError):
                await qmp.execute("block-job-cancel", {"device": f"nc-mirror{index}", "force": True}, timeout=10)
            await self._wait_concluded({index}, 10)
        await self._drop_mirrors({index})
        self.vm.images.qemu.share_file(socket_path)  # an unprivileged QEMU must connect to it
        # QEMU connects (and shakes hands through the relay) before this returns
        await qmp.execute("blockdev-add", {
            "driver": "nbd", "node-name": f"nc-target{index}", "export": node(index),
            "server": {"type": "unix", "path": socket_path.name}}, timeout=60)
        # sync=top: the destination's file is fresh (reads as zero) or an overlay on the
        # same backing image, so only what this layer holds is copied; zero runs go as
        # NBD write-zeroes, not data. Copy mode: see MIRROR_COPY_MODE.
        await qmp.execute("blockdev-mirror", {
            "job-id": f"nc-mirror{index}", "device": node(index), "target": f"nc-target{index}",
            "sync": "top", "copy-mode": MIRROR_COPY_MODE, "auto-dismiss": False}, timeout=10)

    async def disk_mirror_jobs(self) -> dict[int, dict[str, Any]]:
        jobs = await _qmp(self.vm).execute("query-jobs", timeout=10) or []
        out: dict[int, dict[str, Any]] = {}
        for job in jobs:
            jid = str(job.get("id", ""))
            if jid.startswith("nc-mirror") and jid[9:].isdigit():
                out[int(jid[9:])] = {"status": job.get("status"), "done": job.get("current-progress", 0),
                                     "total": job.get("total-progress", 0), "error": job.get("error")}
        return out

    async def finish_disk_mirrors(self, timeout: float) -> None:
        qmp = _qmp(self.vm)
        jobs = await self.disk_mirror_jobs()
        for i, job in jobs.items():
            if job["status"] != "ready":
                raise RuntimeError(f"disk {i} mirror is {job['status']}, not ready: {job.get('error')}")
            # cancel on a READY mirror completes the copy (in-flight writes drained) and
            # leaves the guest on its own disk: the source stays able to resume until 'go'
            await qmp.execute("block-job-cancel", {"device": f"nc-mirror{i}"}, timeout=10)
        await self._wait_concluded(set(jobs), timeout)
        errors = []
        for i, job in (await self.disk_mirror_jobs()).items():
            if job.get("error"):
                errors.append(f"disk {i}: {job['error']}")
        await self._drop_mirrors(set(jobs))
        if errors:
            raise RuntimeError(f"disk mirror failed at completion: {'; '.join(errors)}")

    async def _wait_concluded(self, indices: set[int], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            jobs = await self.disk_mirror_jobs()
            if all(jobs.get(i, {}).get("status") in (None, "concluded", "null") for i in indices):
                return
            if loop.time() > deadline:
                raise TimeoutError(f"disk mirrors not concluded after {timeout:g}s: {jobs}")
            await asyncio.sleep(JOB_POLL_S / 5)

    async def _drop_mirrors(self, indices: set[int]) -> None:
        qmp = _qmp(self.vm)
        for i in sorted(indices):
            with contextlib.suppress(QMPError):
                await qmp.execute("job-dismiss", {"id": f"nc-mirror{i}"}, timeout=10)
            with contextlib.suppress(QMPError):
                await qmp.execute("blockdev-del", {"node-name": f"nc-target{i}"}, timeout=30)

    async def cancel_disk_mirrors(self) -> None:
        """The failure path: end the jobs, the source keeps its disks. Call it only while
        nothing can leave QEMU's NBD requests unanswered (the relay answers them itself:
        ``SourceDiskRelay.fail_over``), for the guest is held paused meanwhile and a pause
        waits for in-flight I/O."""
        if self.vm.qmp is None:
            return
        qmp = self.vm.qmp
        jobs = await self.disk_mirror_jobs()
        live = [i for i, job in jobs.items() if job["status"] not in ("concluded", "null")]
        # QEMU 7.2 corrupts its heap when a write-blocking mirror ends while guest writes are
        # in flight through it: cancelled (seen in test_destination_killed_under_write_blocking_guest_writes
        # with the relay already answering) or failed by its target (a dropped connection).
        # A paused guest has none (QEMU drains its I/O first; completion pauses it too), so
        # it is held paused until the jobs ended.
        hold = False
        t0 = time.monotonic()
        if live and (await qmp.execute("query-status", timeout=10)).get("running"):
            await qmp.execute("stop", timeout=10)
            hold = True
        try:
            for i in live:
                with contextlib.suppress(QMPError):
                    await qmp.execute("block-job-cancel", {"device": f"nc-mirror{i}", "force": True}, timeout=10)
            with contextlib.suppress(TimeoutError):
                await self._wait_concluded(set(jobs), 10)
        finally:
            if hold:
                await qmp.execute("cont", timeout=10)
                log.info("guest held paused while its disk mirrors were cancelled",
                         extra={"vm": self.vm.name, "ms": round((time.monotonic() - t0) * 1000, 1)})
        # NBD nodes a failed blockdev-add or mirror left behind go too
        await self._drop_mirrors(set(jobs) | set(range(len(self.vm.spec.disks))))

    async def release(self) -> None:
        vm = self.vm
        vm.migrating = False
        await vm.stop()
        shutil.rmtree(vm.paths.dir, ignore_errors=True)
        self.vms.forget(vm.name)
        log.info("source VM released after migration", extra={"vm": vm.name})


async def source_vm(vms: VMManager, name: str) -> QemuSource:
    """The VM ``name`` as a migration source (it must be running)."""
    vm = vms.get(name)
    if vm.state != "running" or vm.migrating:
        raise VMConflict(f"VM {name} is {vm.status()['state']}; only a running VM can migrate")
    vm.migrating = True
    return QemuSource(vms, vm)


class QemuDest:
    """``starting``: the VM's ``start`` still running (QEMU launched, its QMP not up yet):
    the engine may write the RAM file meanwhile; whatever needs QEMU awaits ``ready``."""

    def __init__(self, vms: VMManager, vm: VM, starting: asyncio.Task[None] | None = None,
                 migration_id: str = "") -> None:
        self.vms = vms
        self.vm = vm
        self.start_parts = dict(vm.start_parts)  # the destination's prepare_parts show them
        # the RAM file's space, still being reserved: the engine gates on it (dest.py)
        self.reservation, vm.reservation = vm.reservation, None
        self.name = vm.name
        self.ram_path = vm.ram_path
        self.ram_stat = vm.ram_stat
        self.migration_id = migration_id
        self._starting = starting
        self._ready: asyncio.Task[None] | None = None

    @property
    def early(self) -> bool:
        """Pages may arrive before QEMU is up (see ``ready``)."""
        return self._starting is not None

    async def ready(self) -> None:
        """QEMU started, answers QMP, shares its RAM file with us (``x-ignore-shared``)
        and is recorded in its folder; raises why not (the VM is then gone)."""
        if self._starting is None:
            return
        if self._ready is None:
            self._ready = asyncio.create_task(self._get_ready())
        await asyncio.shield(self._ready)

    async def _get_ready(self) -> None:
        assert self._starting is not None
        await self._starting
        self.start_parts = dict(self.vm.start_parts)
        await _qmp(self.vm).execute("migrate-set-capabilities", IGNORE_SHARED_EVENTS, timeout=10)
        try:
            _record_incoming(self.vm, self.migration_id)
        except OSError as exc:
            raise RuntimeError(f"cannot record the incoming VM: {exc}") from None

    async def listen_device_state(self, postcopy: bool = False) -> str:
        await self.ready()
        qmp = _qmp(self.vm)
        if postcopy:  # QEMU moves RAM too, and may be switched to post-copy
            await qmp.execute("migrate-set-capabilities", POSTCOPY_CAPS, timeout=10)
        # relative: QEMU runs in the VM folder, whose path may be too long for sun_path
        await qmp.execute("migrate-incoming", {"uri": f"unix:{DEVICE_SOCKET}"}, timeout=10)
        return str(self.vm.paths.dir / DEVICE_SOCKET)

    async def query_migration(self, timeout: float = 10) -> dict[str, Any]:
        return await _qmp(self.vm).execute("query-migrate", timeout=timeout) or {}

    def hold(self, flag: bool) -> None:
        self.vm.migrating = flag

    async def trace_faults(self, on: bool) -> int:
        """Turn QEMU's page-fault trace events on/off; returns where its log is now."""
        for name in FAULT_EVENTS:
            await _qmp(self.vm).execute("trace-event-set-state", {"name": name, "enable": on}, timeout=10)
        return self.log_size()

    def log_size(self) -> int:
        try:
            return self.vm.paths.qemu_log.stat().st_size
        except OSError:
            return 0

    def fault_latencies(self, since: int) -> list[float]:
        """The faults' service times (ms) QEMU logged after offset ``since`` (blocking I/O)."""
        try:
            with open(self.vm.paths.qemu_log, "rb") as f:  # the agent's own file (QEMU's stderr)
                f.seek(since)
                return fault_latencies(f.read(32 << 20))
        except OSError:
            return []

    async def run_state(self) -> str:
        return str((await _qmp(self.vm).execute("query-status", timeout=10) or {}).get("status"))

    async def recover_postcopy(self) -> str:
        """A post-copy whose stream broke: listen for the source's QEMU again."""
        path = self.vm.paths.dir / RECOVER_SOCKET
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # the previous attempt's
        # out of band: in post-copy QEMU's main loop may be waiting on a missing page
        await _qmp(self.vm).execute("migrate-recover", {"uri": f"unix:{RECOVER_SOCKET}"}, timeout=10, oob=True)
        return str(path)

    async def wait_device_state_loaded(self, timeout: float) -> None:
        await _poll(self.vm, "query-status", _incoming_loaded, timeout, "destination QEMU", "MIGRATION")

    async def export_disks(self, indices: list[int]) -> str:
        qmp = _qmp(self.vm)
        # relative: QEMU runs in the VM folder (sun_path is short)
        await qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": NBD_SOCKET}}}, timeout=10)
        for i in indices:
            await qmp.execute("block-export-add", {"type": "nbd", "id": f"nc-export{i}", "node-name": node(i),
                                                   "name": node(i), "writable": True}, timeout=10)
        return str(self.vm.paths.dir / NBD_SOCKET)

    def disk_template(self, index: int) -> tuple[int, str] | None:
        return self.vms.disks.open_template(self.vm.spec, index)

    def disk_expanded(self) -> Expanded | None:
        return self.vms.disks.expanded

    async def stop_disk_export(self) -> None:
        await _qmp(self.vm).execute("nbd-server-stop", timeout=30)  # drops its exports and clients
        with contextlib.suppress(FileNotFoundError):
            (self.vm.paths.dir / NBD_SOCKET).unlink()

    async def wait_exited(self) -> str:
        await self.vm.wait_exit()  # the pidfd supervisor notices within milliseconds
        return self.vm.error or f"exit code {self.vm.exit_code}"

    def announce_early(self) -> None:
        if self.vm.tap_announcer is not None:
            self.vm.tap_announcer.announce()

    async def resume(self) -> None:
        qmp = _qmp(self.vm)
        await qmp.execute("cont", timeout=10)
        self.vm.drop_tap_announcer()  # QEMU's own taps from here on
        status = await qmp.execute("query-status", timeout=10)
        if not status.get("running"):
            raise RuntimeError(f"destination guest not running after cont ({status.get('status')})")
        self.vm.state = "running"
        self.vm.incoming = False
        if self.vm.spec.nics:
            await announce(self.vm)

    async def destroy(self) -> None:
        vm = self.vm
        starting = self._starting
        if starting is not None and not starting.done():
            # QEMU still starting: killed, its start fails and removes the RAM file
            # (stop() would find a VM that is not running yet and leave QEMU be)
            vm.kill_starting()
            await asyncio.wait({starting})
        if self._ready is not None and not self._ready.done():
            await asyncio.wait({self._ready})
        if self.reservation is not None:
            await self.reservation.close()  # the file goes: stop allocating its pages
        await vm.stop()
        shutil.rmtree(vm.paths.dir, ignore_errors=True)
        if self.vms.vms.get(vm.name) is vm:  # adopted, then resuming it failed
            self.vms.forget(vm.name)
        log.info("destination VM destroyed", extra={"vm": vm.name})

    async def adopt(self) -> None:
        vm = self.vm
        final = self.vms.paths(vm.name)
        if final.dir.exists():
            raise VMConflict(f"{final.dir} appeared during the migration")
        # QEMU keeps its mapped RAM, open logs and bound sockets across the rename
        os.rename(vm.paths.dir, final.dir)
        with contextlib.suppress(FileNotFoundError):
            (final.dir / DEVICE_SOCKET).unlink()
        vm.paths = final
        vm.migrating = False
        vm.save()
        self.vms.register(vm)
        log.info("migrated VM adopted", extra={"vm": vm.name, "pid": vm.pid})


class QemuLocalVMs:
    """The runtime's VMs as the migration manager's recovery sees them."""

    def __init__(self, vms: VMManager) -> None:
        self.vms = vms

    def state(self, name: str) -> str | None:
        vm = self.vms.vms.get(name)
        return vm.state if vm is not None else None

    def set_migrating(self, name: str, flag: bool) -> None:
        vm = self.vms.vms.get(name)
        if vm is not None:
            vm.migrating = flag

    async def resume(self, name: str) -> None:
        vm = self.vms.get(name)
        async with vm.lock:
            await vm.resume()

    async def release(self, name: str) -> None:
        vm = self.vms.vms.get(name)
        if vm is not None:
            await QemuSource(self.vms, vm).release()


class QemuDestFactory:
    def __init__(self, vms: VMManager) -> None:
        self.vms = vms
        self.incoming_dir = vms.state_dir / "incoming"

    async def _admit(self, spec_doc: dict[str, Any], plan: list[dict[str, Any]]) -> tuple[VMSpec, str]:
        """The spec, checked as this host would check a new VM's, and its accelerator here."""
        try:
            spec = parse_spec({k: v for k, v in spec_doc.items() if k != "start"})
            self.vms.images.check(spec)  # named images must be in this host's image dirs
            self.vms.disks.check(spec, creating=False)  # ... shared disks and backing images too
            self.vms.networks.check(spec)  # ... and its NICs' networks mapped to bridges here
        except SpecError as exc:
            raise AdmissionError(f"bad VM spec: {exc}") from None
        local = [i for i, d in enumerate(spec.disks) if d.storage == "local"]
        if sorted(int(p["index"]) for p in plan) != local or any(
                p["format"] != spec.disks[int(p["index"])].format for p in plan):
            raise AdmissionError("the disk plan does not match the VM spec's local disks")
        if spec.name in self.vms.vms or self.vms.paths(spec.name).dir.exists():
            raise AdmissionError(f"a VM named {spec.name!r} exists here already")
        info = await self.vms.accel.detect()
        try:
            accel = info.resolve(spec.accel)
            await self.vms.cpus.check(spec, accel)  # a CPU model this host cannot run: refused
        except AccelUnavailable as exc:
            raise AdmissionError(str(exc)) from None
        except SpecError as exc:
            raise AdmissionError(str(exc)) from None
        return spec, accel

    async def prepare(self, spec_doc: dict[str, Any], ram_size: int, migration_id: str,
                      disks: list[dict[str, Any]] | None = None) -> QemuDest:
        plan = disks or []
        spec, accel = await self._admit(spec_doc, plan)
        if spec.memory_mb * MIB != ram_size:
            raise AdmissionError("VM spec memory does not match the RAM size sent")
        paths = VMPaths(self.incoming_dir / spec.name)
        try:
            paths.dir.mkdir(parents=True)
        except FileExistsError:
            raise AdmissionError(f"VM {spec.name!r} is already being migrated here") from None
        vm = self.vms.new_vm(spec, accel, paths)
        vm.migrating = True
        starting: asyncio.Task[None] | None = None
        try:
            # before QEMU runs in the folder; the mirror fills them
            await self.vms.disks.create_for_migration(spec, paths.dir, plan)
            # the RAM file's space is reserved while the first pages arrive (ramfile.Reservation)
            if plan:  # the disks are exported first: QEMU must be up
                await vm.start(incoming=True, reserve_later=True)
                await _qmp(vm).execute("migrate-set-capabilities", IGNORE_SHARED_EVENTS, timeout=10)
                try:
                    _record_incoming(vm, migration_id)
                except OSError as exc:
                    raise AdmissionError(f"cannot record the incoming VM: {exc}") from None
            else:
                # pages may arrive while QEMU starts (0.1-0.2 s here): returned once it is
                # launched, its start going on (QemuDest.ready)
                spawned = asyncio.Event()
                starting = asyncio.create_task(vm.start(incoming=True, reserve_later=True, spawned=spawned))
                waiting = asyncio.create_task(spawned.wait())
                try:
                    await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiting.cancel()
                if starting.done():
                    starting.result()  # failed before QEMU was launched (or already up)
        except (VMError, SpecError) as exc:
            await _discard(vm, starting)
            raise AdmissionError(str(exc)) from None
        except BaseException:
            await _discard(vm, starting)
            raise
        return QemuDest(self.vms, vm, starting, migration_id)


    async def prepare_offline(self, spec_doc: dict[str, Any], migration_id: str,
                              disks: list[dict[str, Any]]) -> QemuOfflineDest:
        """A stopped VM's offline migration (offline.py): its local disks created empty in
        an incoming folder; no QEMU runs until the VM is defined and started here."""
        spec, accel = await self._admit(spec_doc, disks)
        paths = VMPaths(self.incoming_dir / spec.name)
        try:
            paths.dir.mkdir(parents=True)
        except FileExistsError:
            raise AdmissionError(f"VM {spec.name!r} is already being migrated here") from None
        try:
            await self.vms.disks.create_for_migration(spec, paths.dir, disks)
            fd = create_new(paths.dir / "incoming.json", os.O_WRONLY)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"migration": migration_id, "offline": True}))
        except (SpecError, OSError) as exc:
            shutil.rmtree(paths.dir, ignore_errors=True)
            raise AdmissionError(str(exc)) from None
        except BaseException:
            shutil.rmtree(paths.dir, ignore_errors=True)
            raise
        return QemuOfflineDest(self.vms, self.vms.new_vm(spec, accel, paths),
                               [int(d["index"]) for d in disks])


def _die_with_parent() -> None:
    """In the child: SIGKILL when the agent dies, so an export never outlives it (the next
    agent removes the incoming folder, clean_stale_incoming)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuOfflineDest:
    """The destination of an offline migration: the new disks exported over NBD by a
    ``qemu-storage-daemon`` (package qemu-system-common, which qemu-system-x86 pulls in)
    running in the incoming folder, then the VM defined (stopped) with them."""

    def __init__(self, vms: VMManager, vm: VM, indices: list[int]) -> None:
        self.vms = vms
        self.vm = vm
        self.indices = indices
        self.proc: asyncio.subprocess.Process | None = None
        self.adopted = False

    def disk_template(self, index: int) -> tuple[int, str] | None:
        return self.vms.disks.open_template(self.vm.spec, index)

    def disk_expanded(self) -> Expanded | None:
        return self.vms.disks.expanded

    async def export_disks(self) -> str:
        folder = self.vm.paths.dir
        sock = folder / NBD_SOCKET
        with contextlib.ExitStack() as stack:  # the backing images' descriptors: ours closed once it runs
            args, fds = self.vms.disks.export_args(self.vm.spec, folder, self.indices, NBD_SOCKET, stack)
            self.proc = await asyncio.create_subprocess_exec(
                QEMU_STORAGE_DAEMON, *args, cwd=folder, pass_fds=fds, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                preexec_fn=_die_with_parent)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EXPORT_START_S
        while not sock.exists():  # listening (it binds before it serves)
            if self.proc.returncode is not None or loop.time() > deadline:
                raise AdmissionError(f"the disk export did not start: {await self._stderr()}")
            await asyncio.sleep(0.02)
        return str(sock)

    async def _stderr(self) -> str:
        proc = self.proc
        if proc is None or proc.stderr is None:
            return "not started"
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        err = await proc.stderr.read()
        await proc.wait()
        lines = err.decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"exit code {proc.returncode}"

    async def stop_disk_export(self) -> None:
        """SIGTERM: the daemon flushes every node and exits 0; anything else failed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            rc = await asyncio.wait_for(proc.wait(), EXPORT_STOP_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("the disk export did not stop") from None
        with contextlib.suppress(FileNotFoundError):
            (self.vm.paths.dir / NBD_SOCKET).unlink()
        if rc != 0:
            err = (await proc.stderr.read()).decode(errors="replace").strip() if proc.stderr else ""
            raise RuntimeError(f"the disk export failed (exit code {rc}): {err[-300:]}")

    async def adopt(self) -> None:
        vm = self.vm
        final = self.vms.paths(vm.name)
        if final.dir.exists() or vm.name in self.vms.vms:
            raise VMConflict(f"a VM named {vm.name!r} appeared here during the migration")
        (vm.paths.dir / "incoming.json").unlink()
        os.rename(vm.paths.dir, final.dir)
        vm.paths = final
        vm.save()
        self.vms.register(vm)
        self.adopted = True
        log.info("offline-migrated VM defined", extra={"vm": vm.name})

    async def destroy(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
            self.proc = None
        if self.adopted and self.vms.vms.get(self.vm.name) is self.vm:
            self.vms.forget(self.vm.name)
        shutil.rmtree(self.vm.paths.dir, ignore_errors=True)
        log.info("offline migration's copy removed", extra={"vm": self.vm.name})


class QemuOfflineSource:
    """A stopped VM as an offline migration's source (offline.py)."""

    def __init__(self, vms: VMManager, vm: VM) -> None:
        self.vms = vms
        self.vm = vm
        self.name = vm.name
        self.work_dir = vm.paths.dir
        self.ram_size = vm.spec.memory_mb * MIB

    def spec(self) -> dict[str, Any]:
        return _spec_doc(self.vm)

    async def disk_plan(self) -> list[dict[str, Any]]:
        try:
            return await self.vms.disks.migration_plan(self.vm.spec, self.vm.paths.dir)
        except SpecError as exc:  # DiskError: a disk missing or refused
            raise OfflineFailed(str(exc)) from None

    async def copy_disk(self, index: int, socket_path: Path) -> None:
        if socket_path.parent != self.work_dir:
            raise ValueError(f"disk relay socket {socket_path} is outside the VM folder")
        try:
            await self.vms.disks.copy_to_nbd(self.vm.spec, self.work_dir, index, socket_path.name)
        except SpecError as exc:  # DiskError: qemu-img failed (the target full, the relay cut)
            raise OfflineFailed(f"disk {index}: {exc}") from None

    async def stay(self) -> None:
        self.vm.migrating = False


async def offline_source(vms: VMManager, name: str) -> QemuOfflineSource:
    """The VM ``name`` as an offline migration's source (it must be stopped)."""
    vm = vms.get(name)
    if vm.state != "stopped" or vm.migrating:
        raise VMConflict(f"VM {name} is {vm.status()['state']}; only a stopped VM can migrate offline")
    vm.migrating = True  # no start or delete while its disks are read
    return QemuOfflineSource(vms, vm)


def _spec_doc(vm: VM) -> dict[str, Any]:
    """The VM spec the destination needs to define an identical machine."""
    doc = {k: v for k, v in vm.spec.to_dict().items() if v not in ("", None)}
    doc["accel"] = vm.accel  # the destination must run the same accelerator
    doc["cpu_model"] = vm.spec.effective_cpu_model(vm.accel)  # ... and CPU model
    return doc


def _record_incoming(vm: VM, migration_id: str) -> None:
    """QEMU runs and can write its folder now: a fresh file, never a name it planted."""
    fd = create_new(vm.paths.dir / "incoming.json", os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps({"migration": migration_id, "pid": vm.pid}))


async def _discard(vm: VM, starting: asyncio.Task[None] | None = None) -> None:
    if starting is not None and not starting.done():
        vm.kill_starting()
        await asyncio.wait({starting})
    reservation, vm.reservation = vm.reservation, None
    if reservation is not None:
        await reservation.close()
    with contextlib.suppress(Exception):
        await vm.stop()
    shutil.rmtree(vm.paths.dir, ignore_errors=True)


async def clean_stale_incoming(state_dir: Path) -> list[str]:
    """Remove half-received VMs an earlier (killed) agent left, killing their
    QEMUs (found by folder: the record may predate the spawn); returns their names."""
    root = state_dir / "incoming"
    removed: list[str] = []
    if not root.is_dir():
        return removed
    found = await asyncio.to_thread(qemus_under, root)
    for d in sorted(root.iterdir()):
        for proc in found.pop(d.resolve(), []):
            await kill_orphan(proc, "half-received VM left by an earlier agent")
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
        log.warning("removed a half-received VM left by an earlier agent", extra={"vm": d.name})
    for procs in found.values():
        for proc in procs:
            await kill_orphan(proc, "its incoming folder no longer exists")
    return removed


def clean_stale_relay_sockets(state_dir: Path) -> list[str]:
    """Remove device-state relay sockets an earlier (killed) agent left in VM
    folders; returns the VM names. Run at agent start, before any migration."""
    removed: list[str] = []
    socks = [*(state_dir / "vms").glob(f"*/{RELAY_SOCKET}"), *(state_dir / "vms").glob(f"*/{RELAY_PREFIX}*.sock")]
    for sock in sorted(socks):
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
            removed.append(sock.parent.name)
    return removed
