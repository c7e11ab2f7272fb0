"""One VM: its QEMU process, QMP connection, state and supervisor.

States: ``stopped`` -> ``running`` <-> ``paused``; any live state -> ``crashed``
when QEMU exits without being asked to. ``migrating`` is reported while a
migration engine holds the VM (``vm.migrating = True``).

The record (``vm.json``, see novacron.agent.records) is written before each
side effect: ``pending`` names an operation begun but not finished (``create``,
``start``, ``delete``) so a restarted agent knows whether to adopt, roll back
or finish it (VMManager.load).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from novacron.agent.qmp import QMPClient, QMPClosedError, QMPError, QMPTimeoutError, open_unix
from novacron.agent.records import read_record, write_record
from novacron.agent.safefs import create_new, open_regular, read_regular
from novacron.agent.vm.disks import DiskStore, OpenedDisks
from novacron.agent.vm.errors import InsufficientSpace, VMConflict, VMStartError
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.network import HostNetworks, TapAnnouncer
from novacron.agent.vm.qemu_args import QEMU_BINARY, QemuFiles, VMPaths, qemu_argv
from novacron.agent.vm.ramfile import (
    MIB,
    Reservation,
    create_ram_file,
    prepare_ram_file,
    remove_ram_file,
)
from novacron.agent.vm.recovery import QemuProcess, process_cwd
from novacron.agent.vm.spec import VMSpec
from novacron.faults import crash_point

log = logging.getLogger("novacron.agent.vm")

STOPPED, RUNNING, PAUSED, CRASHED = "stopped", "running", "paused", "crashed"
LIVE = (RUNNING, PAUSED)
QMP_CONNECT_TIMEOUT_S = 15.0
STOP_GRACE_S = 5.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 60.0  # the agent's stop_timeout_s setting overrides it
RESET_WAIT_S = 10.0  # QEMU acknowledges a system_reset with a RESET event well within this
SERIAL_POLL_S = 0.2
SERIAL_READ_CHUNK = 1 * MIB  # bytes per read of the serial log
SERIAL_MAX_CHUNKS_PER_POLL = 64  # a flood is caught up over several polls

ExitListener = Callable[["VM"], None]
VM_RECORD, VM_RECORD_FORMAT = "vm", 1
PENDING = ("create", "start", "delete")
ADOPT_QMP_TIMEOUT_S = 10.0


class VM:
    def __init__(self, spec: VMSpec, accel: str, paths: VMPaths, images: ImageDirs,
                 qemu: str = QEMU_BINARY, networks: HostNetworks | None = None) -> None:
        self.spec = spec
        self.images = images  # where its images may come from, and who QEMU runs as
        self.networks = networks or HostNetworks()  # the bridges its NICs' taps join
        self.accel = accel
        self.paths = paths
        self.qemu = qemu
        self.state = STOPPED
        self.migrating = False  # set by the migration engine while it owns the VM
        self.pid: int | None = None
        self.qmp: QMPClient | None = None
        self.exit_code: int | None = None
        self.error = ""
        self.pending = ""  # an operation begun and not finished (one of PENDING), in the record
        self.started_at: float | None = None
        self.incoming = False
        self.ram_stat: os.stat_result | None = None  # the RAM file this agent created (None: adopted)
        # Serial history offsets are logical (bytes the guest printed since the VM was
        # defined here): serial.log starts at serial_base, serial.log.1 ends there.
        self.serial_base = 0
        self.console_writer: asyncio.StreamWriter | None = None  # an attached console session
        self.powering_down = False  # a graceful stop waits for the guest (a forced stop may cut in)
        self._forced = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._event_task: asyncio.Task[None] | None = None
        self._expect_exit = False
        self._starting = False
        self._reserving: Reservation | None = None  # the RAM file's space (ramfile.py)
        # an incoming VM started with reserve_later: its RAM file's space still being
        # reserved; whoever takes it (the migration engine) gates writes on it
        self.reservation: Reservation | None = None
        self.start_parts: dict[str, float] = {}  # seconds of the last start's steps (a migration's prepare_parts)
        self._exited = asyncio.Event()
        self._exited.set()
        self._listeners: list[ExitListener] = []
        self.tap_announcer: TapAnnouncer | None = None  # an incoming VM's taps (network.py)
        self.lock = asyncio.Lock()  # serialises lifecycle operations

    # ----- facts -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ram_path(self) -> Path:
        return self.paths.ram

    @property
    def serial_log(self) -> Path:
        return self.paths.serial_log

    @property
    def alive(self) -> bool:
        return self.state in LIVE

    def argv(self, files: QemuFiles, *, incoming: bool = False, paused: bool = False) -> list[str]:
        return qemu_argv(self.spec, self.accel, self.paths, files, incoming=incoming, paused=paused,
                         qemu=self.qemu)

    def _open_files(self) -> QemuFiles:
        """The images (checked again: they may have changed since the VM was
        created), the serial log and one tap per NIC, opened by the agent for QEMU
        to inherit."""
        images = self.images.open(self.spec)
        log_fd = -1
        disks = OpenedDisks()
        try:
            disks = DiskStore(self.images).open(self.spec, self.paths.dir)
            log_fd = open_regular(self.serial_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.fchmod(log_fd, 0o600)  # the agent's: other VMs' QEMUs cannot open it by name
            taps = self.networks.open_taps(self.spec)
        except BaseException:
            images.close()
            disks.close()
            if log_fd >= 0:
                os.close(log_fd)
            raise
        return QemuFiles(images, log_fd, taps, disks)

    def status(self) -> dict[str, Any]:
        state = "migrating" if self.migrating and self.alive else self.state
        return {
            "name": self.name,
            "state": state,
            "pid": self.pid,
            "accel": self.accel,
            "memory_mb": self.spec.memory_mb,
            "vcpus": self.spec.vcpus,
            "ram_path": str(self.ram_path),
            "serial_log": str(self.serial_log),
            "qmp_socket": str(self.paths.qmp),
            "started_at": self.started_at,
            "exit_code": self.exit_code,
            "error": self.error,
            "spec": self.spec.to_dict(),
        }

    # ----- persistence -----------------------------------------------------
    def save(self) -> None:
        """Record spec and state so a restarted agent finds this VM."""
        doc = {"spec": self.spec.to_dict(), "accel": self.accel, "state": self.state, "pid": self.pid,
               "pending": self.pending, "started_at": self.started_at, "error": self.error,
               "serial_base": self.serial_base,
               "paths": {"ram": str(self.ram_path), "qmp": str(self.paths.qmp)}}  # fmt: skip
        write_record(self.paths.meta, VM_RECORD, VM_RECORD_FORMAT, doc)

    def add_exit_listener(self, fn: ExitListener) -> None:
        self._listeners.append(fn)

    def remove_exit_listener(self, fn: ExitListener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(fn)

    # ----- lifecycle -------------------------------------------------------
    async def start(self, *, paused: bool = False, incoming: bool = False, reserve_later: bool = False,
                    spawned: asyncio.Event | None = None) -> None:
        """Create the RAM file and launch QEMU; ``incoming`` waits for a migration
        (``-incoming defer``), ``paused`` leaves the vCPUs stopped. An incoming VM's
        RAM file is reserved while QEMU starts; with ``reserve_later`` start does not
        wait for that but leaves it in ``self.reservation``, for a caller that writes
        no page of the file unreserved (``Reservation.ensure``) and awaits it before
        QEMU may touch guest RAM (set from the spawn on). ``spawned`` is set once QEMU
        was launched (its pid known): an incoming migration may write the RAM file
        while QEMU starts."""
        if self.alive:
            raise VMConflict(f"VM {self.name} is already {self.state}")
        t0 = time.monotonic()
        self.start_parts = parts = {}
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        files = self._open_files()  # a refused image stops here: no RAM file, no QEMU
        try:
            # intent first: an agent killed from here on finds a record saying what it was doing
            self.pending = self.pending or "start"
            self.save()
            crash_point(f"vm.{self.pending}.recorded")
            self.images.qemu.share_dir(self.paths.dir)  # QEMU creates its sockets here
            try:
                proc = await self._spawn(files, incoming=incoming, paused=paused)
            except (OSError, VMStartError):
                if self._reserving is not None:  # QEMU never ran: let the reservation end
                    await self._reserving.close()
                    self._reserving = None
                self.pending = ""
                with contextlib.suppress(OSError):
                    self.save()
                raise
            if incoming and files.taps:  # announced from here when the source pauses
                self.tap_announcer = TapAnnouncer(files.taps, [n.mac for n in self.spec.nics])
        finally:
            # QEMU holds its copies now; a tap lives as long as QEMU keeps it open
            for fd in (files.serial_log, *files.taps):
                os.close(fd)
            files.images.close()
            files.disks.close()
        self._proc, self.pid = proc, proc.pid
        parts["spawn_s"] = round(time.monotonic() - t0, 4)  # RAM file created, QEMU launched
        if reserve_later:
            self.reservation = self._reserving
        with contextlib.suppress(OSError):
            self.save()  # the pid, for the next agent (which also finds QEMU by its folder)
        crash_point(f"vm.{self.pending}.spawned")
        self._expect_exit = False
        self._exited.clear()
        self.exit_code, self.error = None, ""
        self.incoming = incoming
        pidfd = os.pidfd_open(proc.pid)
        self._supervisor = asyncio.create_task(self._supervise_pidfd(pidfd, proc), name=f"vm {self.name} supervisor")
        self._starting = True
        if spawned is not None:
            spawned.set()
        try:
            qmp = await self._connect_qmp()
            parts["qmp_s"] = round(time.monotonic() - t0, 4)  # QEMU up and its QMP negotiated
            if self._reserving is not None and not reserve_later:
                await self._reserving.wait()  # the RAM file's space (incoming: reserved while QEMU started)
                parts["reserved_s"] = round(time.monotonic() - t0, 4)
        except Exception as exc:
            await self._kill_and_wait()
            detail = self._qemu_log_tail()
            if self._reserving is not None:  # ended before the file goes
                await self._reserving.close()
            remove_ram_file(self.ram_path)
            self.state, self.pending = STOPPED, ""
            with contextlib.suppress(OSError):
                self.save()
            log.warning("vm failed to start", extra={"vm": self.name, "error": detail or str(exc)})
            if isinstance(exc, InsufficientSpace):
                raise
            raise VMStartError(f"QEMU for {self.name} did not start: {detail or exc}") from None
        finally:
            self._starting = False
            self._reserving = None
        self._attach(qmp)
        self.state = PAUSED if (paused or incoming) else RUNNING
        self.started_at = time.time()
        self.pending = ""
        self.save()
        log.info("vm started", extra={"vm": self.name, "pid": self.pid, "accel": self.accel, "incoming": incoming})

    async def _spawn(self, files: QemuFiles, *, incoming: bool, paused: bool) -> subprocess.Popen[bytes]:
        qemu_user = self.images.qemu
        # QEMU maps it; the agent reads it for migration
        size = self.spec.memory_mb * MIB
        if incoming:
            # nothing writes an incoming VM's memory before start() returns (the migration
            # is admitted after): its space is reserved while QEMU starts, not before
            self.ram_stat, self._reserving = await create_ram_file(
                self.ram_path, size, qemu_user.share_fd)
        else:
            self.ram_stat = await prepare_ram_file(self.ram_path, size, qemu_user.share_fd)
        crash_point(f"vm.{self.pending}.ram_file")
        for sock in (self.paths.qmp, self.paths.serial_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        argv = self.argv(files, incoming=incoming, paused=paused)
        drop: dict[str, Any] = {}
        if qemu_user.drops:
            drop = {"user": qemu_user.uid, "group": qemu_user.gid, "extra_groups": list(qemu_user.groups)}
        # its descriptor becomes QEMU's stdout/stderr: never through a name QEMU planted
        try:
            log_fd = open_regular(self.paths.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            remove_ram_file(self.ram_path)
            raise VMStartError(f"cannot open {self.paths.qemu_log}: {exc.strerror}") from None
        with os.fdopen(log_fd, "ab") as qemu_log:
            qemu_log.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
            qemu_log.flush()
            try:
                # Popen, not asyncio's subprocess: its transport kills the child when
                # the loop closes, and VMs must outlive an agent restart. Popen changes
                # to cwd before it drops to the QEMU user, so QEMU needs no access to
                # the state dir's parents. umask 077: QEMU's sockets are its own.
                return subprocess.Popen(
                    argv, cwd=self.paths.dir, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log,
                    start_new_session=True, pass_fds=files.fds, umask=0o077, **drop,
                )  # fmt: skip
            except OSError as exc:
                remove_ram_file(self.ram_path)
                raise VMStartError(f"cannot run {self.qemu}: {exc}") from None

    async def _connect_qmp(self) -> QMPClient:
        # a migration destination may run post-copy: its recovery needs out-of-band QMP
        connect = asyncio.create_task(QMPClient.connect(str(self.paths.qmp), timeout=QMP_CONNECT_TIMEOUT_S,
                                                        oob=self.incoming))
        exited = asyncio.create_task(self._exited.wait())
        try:
            await asyncio.wait({connect, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exited.cancel()
        if not connect.done():
            connect.cancel()
            with contextlib.suppress(BaseException):
                await connect
            raise VMStartError("QEMU exited during start-up")
        return connect.result()

    def _attach(self, qmp: QMPClient) -> None:
        self.qmp = qmp
        self._event_task = asyncio.create_task(self._follow_events(qmp), name=f"vm {self.name} events")

    async def adopt(self, proc: QemuProcess, state: str) -> bool:
        """Take over a QEMU left running by an earlier agent; False if it is gone
        or is not this VM's QEMU answering on this VM's QMP socket."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:
            return False
        # pids get reused: checked after the pidfd pins the process
        if not proc.runs(self.paths.dir, self.name) or process_cwd(proc.pid) != proc.cwd:
            os.close(pidfd)
            return False
        try:
            qmp = await QMPClient.connect(str(self.paths.qmp), timeout=ADOPT_QMP_TIMEOUT_S)
            status = await qmp.execute("query-status", timeout=5.0)
        except (OSError, TimeoutError, QMPError):
            os.close(pidfd)
            return False
        if status.get("status") == "inmigrate":  # waiting for an incoming migration that died
            await qmp.close()
            os.close(pidfd)
            return False
        self.pid = pid = proc.pid
        self._expect_exit = False
        self._exited.clear()
        self._attach(qmp)
        self.state = RUNNING if status.get("running") else PAUSED
        self._supervisor = asyncio.create_task(self._supervise_pidfd(pidfd), name=f"vm {self.name} supervisor")
        self.pending = ""
        with contextlib.suppress(OSError):
            self.save()
        log.info("vm adopted", extra={"vm": self.name, "pid": pid, "state": self.state, "was": state})
        return True

    async def _follow_events(self, qmp: QMPClient) -> None:
        sub = qmp.subscribe(["STOP", "RESUME", "SHUTDOWN"])
        try:
            while True:
                event = await sub.get()
                name = event.get("event")
                if name == "STOP" and self.state == RUNNING:
                    self.state = PAUSED
                elif name == "RESUME" and self.state == PAUSED:
                    self.state = RUNNING
                    self.incoming = False
                elif name == "SHUTDOWN":
                    # a guest power-off or a requested quit is an orderly exit
                    self._expect_exit = True
                    continue
                else:
                    continue
                with contextlib.suppress(OSError):
                    self.save()
        except QMPClosedError:
            pass
        finally:
            qmp.unsubscribe(sub)

    async def _supervise_pidfd(self, pidfd: int, child: subprocess.Popen[bytes] | None = None) -> None:
        """Wait for QEMU to exit (a pidfd turns readable), then record how it went.
        For an adopted QEMU (not our child) the exit code is unknown."""
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(pidfd, on_readable)
        try:
            await gone
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        await self._on_exit(child.wait() if child is not None else None)

    async def _on_exit(self, code: int | None) -> None:
        self.exit_code = code
        self.drop_tap_announcer()
        was = self.state
        if self.qmp is not None:
            await self.qmp.close()
        if self._event_task is not None:
            self._event_task.cancel()
        if self._expect_exit or self._starting:  # start() reports a failed start itself
            self.state = STOPPED
            log.info("vm stopped", extra={"vm": self.name, "exit_code": code})
        else:
            self.state = CRASHED
            if code is None:
                how = ""
            elif code < 0:
                how = f" (killed by signal {-code})"
            else:
                how = f" (exit code {code})"
            self.error = f"QEMU exited unexpectedly{how} while {was}"
            tail = self._qemu_log_tail()
            if tail:
                self.error += f": {tail}"
            log.error("vm crashed", extra={"vm": self.name, "pid": self.pid, "exit_code": code, "error": self.error})
        self.pid = None
        self.qmp = None
        self.migrating = False
        if self.state == STOPPED:
            remove_ram_file(self.ram_path)  # crashed VMs keep theirs for inspection
        with contextlib.suppress(OSError):
            self.save()
        self._exited.set()
        for fn in list(self._listeners):
            try:
                fn(self)
            except Exception:
                log.exception("vm exit listener failed", extra={"vm": self.name})

    def drop_tap_announcer(self) -> None:
        if self.tap_announcer is not None:
            self.tap_announcer.close()
            self.tap_announcer = None

    def _qemu_log_tail(self, limit: int = 400) -> str:
        try:
            text = read_regular(self.paths.qemu_log).decode(errors="replace")
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("--- ")]
        return " | ".join(lines[-3:])[-limit:]

    async def detach(self) -> None:
        """Stop supervising and drop QMP, leaving QEMU running (agent exit with
        ``vms_on_exit = keep``; the next agent adopts it)."""
        for task in (self._supervisor, self._event_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.qmp is not None:
            await self.qmp.close()
            self.qmp = None

    async def wait_exit(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def _kill_and_wait(self) -> None:
        self._expect_exit = True
        self._signal(signal.SIGKILL)
        await self.wait_exit(10.0)

    def kill_starting(self) -> None:
        """SIGKILL a QEMU whose ``start`` is still waiting for its QMP: that start then
        fails and cleans up (its RAM file removed, the VM stopped)."""
        if self._starting:
            self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    async def stop(self) -> None:
        """Power off: QMP quit, then SIGTERM, then SIGKILL. The RAM file is removed."""
        if not self.alive:
            if self.state == CRASHED:
                remove_ram_file(self.ram_path)
                self.state = STOPPED
                self.save()
            return
        self._expect_exit = True
        if self.qmp is not None:
            with contextlib.suppress(QMPError, QMPClosedError, TimeoutError):
                await self.qmp.execute("quit", timeout=STOP_GRACE_S)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if await self.wait_exit(STOP_GRACE_S):
                return
            log.warning("vm did not exit, signalling", extra={"vm": self.name, "signal": sig.name})
            self._signal(sig)
        await self.wait_exit(STOP_GRACE_S)

    async def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> dict[str, Any]:
        """Graceful stop: press the ACPI power button (QMP ``system_powerdown``) and wait
        up to ``timeout`` s for the guest to power itself off; a guest that does not is
        powered off (``stop``). A paused guest cannot react to the button and is powered
        off at once. Returns how it went: ``graceful``, ``seconds``, ``reason``."""
        began = time.monotonic()
        if not self.alive:
            was = self.state
            await self.stop()
            return {"graceful": False, "seconds": 0.0, "reason": f"VM was {was}"}
        if self.migrating or self.incoming:
            raise VMConflict(f"VM {self.name} is migrating; cancel the migration first")
        reason = "paused: cannot react to the power button"
        if self.state == RUNNING and self.qmp is not None:
            self.powering_down, self._forced = True, False
            try:
                with contextlib.suppress(QMPError, QMPClosedError, TimeoutError):
                    await self.qmp.execute("system_powerdown", timeout=STOP_GRACE_S)
                log.info("vm power button pressed", extra={"vm": self.name, "timeout_s": timeout})
                exited = await self.wait_exit(timeout)
            finally:
                self.powering_down = False
            seconds = round(time.monotonic() - began, 3)
            if exited and self._forced:
                return {"graceful": False, "seconds": seconds, "reason": "forced power-off during the graceful stop"}
            if exited:
                log.info("vm shut down by its guest", extra={"vm": self.name, "seconds": seconds})
                return {"graceful": True, "seconds": seconds, "reason": "guest powered off"}
            reason = f"guest did not power off within {timeout:g} s"
            log.warning("vm ignored the power button; powering off", extra={"vm": self.name, "timeout_s": timeout})
        await self.stop()
        return {"graceful": False, "seconds": round(time.monotonic() - began, 3), "reason": reason}

    def force_power_off(self) -> None:
        """Mark a graceful stop in progress as cut short by a forced one."""
        self._forced = True

    async def reboot(self, *, force: bool = False, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT_S) -> dict[str, Any]:
        """Reboot. ``force``: QMP ``system_reset`` at once (a reset button). Otherwise the
        guest shuts down cleanly first: QEMU is told to pause rather than exit on the
        guest's power-off (``set-action``, so the command line, which a migration copies,
        stays as it is), the power button is pressed, and once the guest is down (or
        after ``timeout`` s) the machine is reset and resumed. Returns ``graceful``,
        ``seconds`` and ``reason``."""
        if self.state != RUNNING or self.qmp is None:
            raise VMConflict(f"VM {self.name} is {self.state}; only a running VM can reboot")
        if self.migrating or self.incoming:
            raise VMConflict(f"VM {self.name} is migrating; cancel the migration first")
        qmp, began = self.qmp, time.monotonic()
        if force:
            async with qmp.listen("RESET") as resets:
                await qmp.execute("system_reset", timeout=STOP_GRACE_S)
                await resets.get(RESET_WAIT_S)
            log.info("vm reset", extra={"vm": self.name})
            return {"graceful": False, "seconds": round(time.monotonic() - began, 3), "reason": "forced reset"}
        graceful = False
        async with qmp.listen("SHUTDOWN", "RESET") as events:
            await qmp.execute("set-action", {"shutdown": "pause"}, timeout=STOP_GRACE_S)
            try:
                await qmp.execute("system_powerdown", timeout=STOP_GRACE_S)
                try:
                    await events.get(timeout, lambda e: e.get("event") == "SHUTDOWN")
                    graceful = True
                except QMPTimeoutError:
                    log.warning("vm ignored the power button; resetting", extra={"vm": self.name})
                await qmp.execute("system_reset", timeout=STOP_GRACE_S)
                # cont is refused until the reset has happened (runstate "shutdown")
                await events.get(RESET_WAIT_S, lambda e: e.get("event") == "RESET")
            finally:
                # the guest powering off later must stop the VM again, not pause it
                self._expect_exit = False  # our SHUTDOWN handler took the paused guest for an exit
                await qmp.execute("set-action", {"shutdown": "poweroff"}, timeout=STOP_GRACE_S)
            status = await qmp.execute("query-status", timeout=STOP_GRACE_S)
            if not status.get("running"):  # it paused at its power-off (however late)
                await qmp.execute("cont", timeout=STOP_GRACE_S)
        self.state = RUNNING
        with contextlib.suppress(OSError):
            self.save()
        seconds = round(time.monotonic() - began, 3)
        log.info("vm rebooted", extra={"vm": self.name, "graceful": graceful, "seconds": seconds})
        return {"graceful": graceful, "seconds": seconds,
                "reason": "guest shut down, then reset" if graceful
                else f"guest did not shut down within {timeout:g} s: reset"}

    async def kill(self) -> None:
        """SIGKILL QEMU without marking it expected (fault injection; shows as crashed)."""
        self._signal(signal.SIGKILL)
        await self.wait_exit(10.0)

    async def pause(self) -> None:
        await self._qmp_op("stop", {RUNNING}, PAUSED)

    async def resume(self) -> None:
        await self._qmp_op("cont", {PAUSED}, RUNNING)

    async def _qmp_op(self, command: str, allowed: set[str], result: str) -> None:
        if self.state == result:
            return
        if self.state not in allowed or self.qmp is None:
            raise VMConflict(f"VM {self.name} is {self.state}; cannot {command}")
        if self.incoming:
            raise VMConflict(f"VM {self.name} is waiting for an incoming migration")
        await self.qmp.execute(command, timeout=10.0)
        self.state = result
        self.save()

    # ----- serial console --------------------------------------------------
    async def send_serial(self, text: str, timeout: float = 5.0) -> None:
        """Type ``text`` on the guest's serial console (e.g. ``"verify\\n"``)."""
        if not self.alive:
            raise VMConflict(f"VM {self.name} is {self.state}")
        if self.console_writer is not None:  # QEMU serves one connection: share the session's
            self.console_writer.write(text.encode())
            await self.console_writer.drain()
            return
        _reader, writer = await asyncio.wait_for(open_unix(str(self.paths.serial_sock)), timeout)
        try:
            writer.write(text.encode())
            await writer.drain()
            await asyncio.sleep(0.05)  # let QEMU drain the socket before we hang up
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def read_serial(self, offset: int = 0, limit: int = -1) -> bytes:
        """The serial history from logical byte ``offset`` (or the oldest kept after it):
        at most ``limit`` bytes (-1: to the end of the part it starts in)."""
        return self.read_serial_at(offset, limit)[1]

    def read_serial_at(self, offset: int, limit: int = -1) -> tuple[int, bytes]:
        """(logical start, bytes) of the serial history from ``offset``; the start is later
        than ``offset`` when those bytes were trimmed away. Refuses planted symlinks/fifos."""
        base = self.serial_base
        try:
            if offset >= base:
                return offset, read_regular(self.serial_log, offset - base, limit)
            prev = read_regular(self.paths.serial_prev)
        except FileNotFoundError:
            return max(offset, base), b""
        start = max(offset, base - len(prev))
        data = prev[start - (base - len(prev)):]
        return start, data if limit < 0 else data[:limit]

    def serial_end(self) -> int:
        """The logical offset just past the serial history written so far."""
        try:
            return self.serial_base + os.stat(self.serial_log, follow_symlinks=False).st_size
        except FileNotFoundError:
            return self.serial_base

    def trim_serial(self, cap: int) -> bool:
        """Keep the serial history near ``cap`` bytes: once serial.log passes cap/2, its last
        cap/2 bytes become serial.log.1 and serial.log is emptied (QEMU appends with
        O_APPEND, so it writes on at the new end). Like logrotate's copytruncate, what the
        guest prints between the copy and the truncate is lost (microseconds)."""
        half = max(1, cap // 2)
        try:
            if os.stat(self.serial_log, follow_symlinks=False).st_size <= half:
                return False
            fd = open_regular(self.serial_log, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, half, max(0, size - half))
            tmp = self.paths.dir / "serial.log.1.new"
            out = create_new(tmp, os.O_WRONLY)
            try:
                os.write(out, tail)
            finally:
                os.close(out)
            os.replace(tmp, self.paths.serial_prev)
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        self.serial_base += size  # the caller records it (save() from the event loop's thread)
        return True

    async def wait_serial(self, pattern: str, timeout: float, offset: int = 0) -> re.Match[str]:
        """Wait until the serial log (from ``offset``) matches ``pattern``.

        The log is read incrementally in bounded chunks and each poll searches
        only the lines it had not seen whole, so a chatty guest costs linear,
        not quadratic, time. Serial console messages are lines: a match is
        searched within the unscanned lines, so its positions are relative to
        ``match.string`` (the groups are what callers use).
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        parts: list[str] = []
        text = ""
        pos = offset
        while True:
            for _ in range(SERIAL_MAX_CHUNKS_PER_POLL):
                start, chunk = self.read_serial_at(pos, SERIAL_READ_CHUNK)
                if not chunk:
                    break
                pos = start + len(chunk)
                parts.append(decoder.decode(chunk))
            if parts:
                text += "".join(parts)
                parts.clear()
                match = rx.search(text)
                if match:
                    return match
                # whole lines did not match: keep only the line still being written
                text = text[text.rfind("\n") + 1 :]
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{pattern!r} not on {self.name}'s serial console within {timeout}s")
            await asyncio.sleep(SERIAL_POLL_S)


def load_meta(path: Path) -> dict[str, Any]:
    """A VM record; RecordError (a ValueError) if it is absent, damaged or not a VM's."""
    doc = read_record(path, VM_RECORD, VM_RECORD_FORMAT)
    if not isinstance(doc.get("spec"), dict):
        raise ValueError(f"{path}: not a VM record")
    return doc
