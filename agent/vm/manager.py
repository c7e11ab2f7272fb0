"""All VMs of one agent, kept under ``<state_dir>/vms/<name>/``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from novacron.agent.records import NewerRecord
from novacron.agent.vm.accel import AccelDetector, AccelUnavailable
from novacron.agent.vm.cpumodels import CpuCatalog
from novacron.agent.vm.disks import DiskStore
from novacron.agent.vm.errors import VMConflict, VMError, VMNotFound
from novacron.agent.vm.expanded import Expanded
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.machine import CRASHED, LIVE, STOPPED, VM, load_meta
from novacron.agent.vm.network import HostNetworks
from novacron.agent.vm.qemu_args import QEMU_BINARY, VMPaths
from novacron.agent.vm.ramfile import remove_ram_file
from novacron.agent.vm.recovery import QemuProcess, kill_orphan, qemus_under
from novacron.agent.vm.spec import SpecError, VMSpec, parse_spec

log = logging.getLogger("novacron.agent.vm")


class ResumeFence(Protocol):
    """Who may forbid resuming a VM (the migration manager: an unsettled migration)."""

    def fence_reason(self, name: str) -> str | None: ...

    async def override(self, name: str) -> str | None: ...


class VMManager:
    def __init__(self, state_dir: Path, accel: AccelDetector, qemu: str = QEMU_BINARY,
                 images: ImageDirs | None = None, networks: HostNetworks | None = None,
                 cpus: CpuCatalog | None = None, disk_index_dir: Path | None = None) -> None:
        self.state_dir = state_dir
        self.vms_dir = state_dir / "vms"
        self.accel = accel
        self.qemu = qemu
        self.images = images or ImageDirs.of([state_dir / "images"])
        self.networks = networks or HostNetworks()
        self.cpus = cpus or CpuCatalog(qemu)  # the CPU models QEMU can run here
        self.disks = DiskStore(self.images, Expanded(disk_index_dir or state_dir / "disk-index"))
        self.vms: dict[str, VM] = {}
        self._lock = asyncio.Lock()  # guards the name table (create/delete)
        self.resume_fence: ResumeFence | None = None  # set when migrations are attached

    def paths(self, name: str) -> VMPaths:
        return VMPaths(self.vms_dir / name)

    def new_vm(self, spec: VMSpec, accel: str, paths: VMPaths) -> VM:
        return VM(spec, accel, paths, self.images, qemu=self.qemu, networks=self.networks)

    def get(self, name: str) -> VM:
        vm = self.vms.get(name)
        if vm is None:
            raise VMNotFound(f"no VM named {name!r}")
        return vm

    def list(self) -> list[VM]:
        return [self.vms[n] for n in sorted(self.vms)]

    async def load(self) -> None:
        """Recover what an earlier agent left in the state dir (run once, at start).

        Each VM folder is settled from its record and the QEMUs found running in
        it: a QEMU that really is the VM's (its folder, its name, answering on its
        QMP socket) is adopted; a create that never finished is rolled back (the
        name is free again), an unfinished start ends stopped, an unfinished
        delete is finished; a live VM whose QEMU is gone is marked crashed; any
        other QEMU in the state dir is an orphan and is killed. Stray RAM files
        and sockets of VMs without QEMU are removed.
        """
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        found = await asyncio.to_thread(qemus_under, self.vms_dir)
        for folder in sorted(p for p in self.vms_dir.iterdir() if p.is_dir()):
            vm = await self._recover(folder, found.pop(folder.resolve(), []))
            if vm is not None:
                self.vms[vm.name] = vm
        for procs in found.values():  # QEMUs whose folder is gone
            for proc in procs:
                await kill_orphan(proc, "its VM folder no longer exists")
        if self.vms:
            log.info("vms loaded", extra={"count": len(self.vms), "names": sorted(self.vms)})

    async def _recover(self, folder: Path, procs: Sequence[QemuProcess]) -> VM | None:
        try:
            doc = load_meta(folder / "vm.json")
            spec = VMSpec.from_record(doc["spec"])
            if spec.name != folder.name:
                raise ValueError(f"record names VM {spec.name!r}")
        except (NewerRecord, TypeError) as exc:
            # intact but beyond this agent (a downgrade): neither run nor destroy it
            log.error("VM record this agent cannot use; folder and QEMU left as they are",
                      extra={"path": str(folder), "error": str(exc)})  # fmt: skip
            return None
        except (OSError, ValueError) as exc:
            for proc in procs:
                await kill_orphan(proc, f"no valid VM record: {exc}")
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("removed a VM folder without a valid record", extra={"path": str(folder), "error": str(exc)})
            return None
        vm = self.new_vm(spec, str(doc.get("accel", "tcg")), self.paths(spec.name))
        base = doc.get("serial_base", 0)
        vm.serial_base = base if isinstance(base, int) and base >= 0 else 0
        was, pending = str(doc.get("state", STOPPED)), str(doc.get("pending") or "")
        vm.pending = pending
        mine = [p for p in procs if p.runs(folder, spec.name)]
        # the recorded pid first: it is the QEMU the record speaks of
        mine.sort(key=lambda p: p.pid != doc.get("pid"))
        adopted = None
        if pending != "delete" and (was in LIVE or pending) and mine and await vm.adopt(mine[0], pending or was):
            adopted = mine[0]
        for proc in procs:
            if proc is not adopted:
                await kill_orphan(proc, f"VM {spec.name} is {pending or was} in its record")
        if adopted is not None:
            return vm
        if pending in ("create", "delete"):
            shutil.rmtree(folder, ignore_errors=True)
            log.warning("finished an interrupted operation: VM removed",
                        extra={"vm": spec.name, "pending": pending})  # fmt: skip
            return None
        vm.pending = ""
        if was in LIVE and pending != "start":
            vm.state = CRASHED
            vm.error = "QEMU was gone when the agent restarted"
        else:
            vm.state = CRASHED if was == CRASHED else STOPPED
            vm.error = str(doc.get("error", "")) if vm.state == CRASHED else ""
        remove_ram_file(vm.ram_path)  # no QEMU maps it any more
        for sock in (vm.paths.qmp, vm.paths.serial_sock):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        if vm.state != was or pending:
            vm.save()
        return vm

    async def create(self, doc: object, *, start: bool | None = None) -> VM:
        """Validate ``doc``, record the VM and (unless ``start`` is false) boot it.

        Raises SpecError/VMError with nothing changed on disk when it fails.
        """
        spec = parse_spec(doc)
        self.images.check(spec)  # refused images: a 400 before anything exists
        self.disks.check(spec, creating=True)  # ... the same for the images disks name
        self.networks.check(spec)  # ... and networks this host lacks
        if start is None:
            start = bool(doc.get("start", True)) if isinstance(doc, dict) else True
        accel = "tcg"
        if spec.accel != "tcg":  # TCG always works: no need to wait for the KVM probe
            try:
                accel = (await self.accel.detect()).resolve(spec.accel)
            except AccelUnavailable as exc:
                raise SpecError(str(exc)) from None
        await self.cpus.check(spec, accel)  # a model this host cannot run: a 400, nothing made
        async with self._lock:
            if spec.name in self.vms:
                raise VMConflict(f"a VM named {spec.name!r} exists already")
            paths = self.paths(spec.name)
            if paths.dir.exists():
                raise VMConflict(f"{paths.dir} exists already (left by an earlier VM?)")
            vm = self.new_vm(spec, accel, paths)
            paths.dir.mkdir(parents=True)
            try:
                await self.disks.create_local(spec, paths.dir)  # before any QEMU can write the folder
                if start:
                    vm.pending = "create"  # a restart rolls back a create it finds unfinished
                    await vm.start()
                else:
                    vm.save()
            except BaseException:
                shutil.rmtree(paths.dir, ignore_errors=True)
                raise
            self.vms[spec.name] = vm
        log.info("vm created", extra={"vm": spec.name, "accel": accel, "started": start})
        return vm

    async def _locked(self, name: str, op: Callable[[VM], Awaitable[None]]) -> VM:
        vm = self.get(name)
        async with vm.lock:
            await op(vm)
        return vm

    async def start(self, name: str, *, force: bool = False) -> VM:
        """Boot a stopped VM; fenced like ``resume`` (a fresh boot here while a peer
        may run the guest would be a second copy)."""
        await self._unfenced(name, force)
        return await self._locked(name, VM.start)

    async def stop(self, name: str) -> VM:
        """Power off at once (``stop --force``), also while a graceful stop still waits
        for the guest (it holds the VM's lock; an operator must not wait behind it)."""
        vm = self.get(name)
        if vm.powering_down:
            vm.force_power_off()
            await vm.stop()
            return vm
        return await self._locked(name, VM.stop)

    async def power_down(self, name: str, timeout: float) -> tuple[VM, dict[str, Any]]:
        """Graceful stop: the ACPI power button, then power-off after ``timeout`` s."""
        vm = self.get(name)
        async with vm.lock:
            return vm, await vm.shutdown(timeout)

    async def reboot(self, name: str, *, force: bool, timeout: float) -> tuple[VM, dict[str, Any]]:
        vm = self.get(name)
        async with vm.lock:
            return vm, await vm.reboot(force=force, timeout=timeout)

    async def pause(self, name: str) -> VM:
        return await self._locked(name, VM.pause)

    async def resume(self, name: str, *, force: bool = False) -> VM:
        """Resume a paused VM; refused (409) while a migration of it is unsettled
        unless ``force`` (an operator who knows the peer host is dead)."""
        await self._unfenced(name, force)
        return await self._locked(name, VM.resume)

    async def _unfenced(self, name: str, force: bool) -> None:
        self.get(name)
        why = self.resume_fence.fence_reason(name) if self.resume_fence is not None else None
        if why is not None:
            if not force:
                raise VMConflict(why)
            assert self.resume_fence is not None
            await self.resume_fence.override(name)

    async def delete(self, name: str) -> None:
        """Stop the VM if it runs and remove everything it had under the state dir."""
        async with self._lock:
            vm = self.get(name)
            if vm.migrating:
                raise VMConflict(f"VM {name} is migrating; cancel the migration first")
            async with vm.lock:
                vm.pending = "delete"  # a restart finishes a delete it finds unfinished
                vm.save()
                await vm.stop()
                shutil.rmtree(vm.paths.dir, ignore_errors=True)
            del self.vms[name]
        log.info("vm deleted", extra={"vm": name})

    async def keep_serial_logs(self, cap: int, interval: float) -> None:
        """Trim every VM's serial history to about ``cap`` bytes, every ``interval`` s
        (runs for the agent's life)."""
        while True:
            for vm in list(self.vms.values()):
                try:
                    if await asyncio.to_thread(vm.trim_serial, cap) and self.vms.get(vm.name) is vm:
                        vm.save()  # here, not in the thread: records are written from one thread
                        log.debug("serial log trimmed", extra={"vm": vm.name, "base": vm.serial_base})
                except OSError as exc:  # UnsafeFile too: a planted log is left alone
                    log.warning("cannot trim serial log", extra={"vm": vm.name, "error": str(exc)})
            await asyncio.sleep(interval)

    def forget(self, name: str) -> None:
        """Drop a VM from the table without touching QEMU (after a migration hand-off)."""
        self.vms.pop(name, None)

    def register(self, vm: VM) -> None:
        """Add a VM built elsewhere (the migration receiver's destination VM)."""
        if vm.name in self.vms and self.vms[vm.name] is not vm:
            raise VMConflict(f"a VM named {vm.name!r} exists already")
        self.vms[vm.name] = vm

    async def shutdown(self, stop_vms: bool) -> None:
        """Agent exit: either stop every VM or leave them running for the next agent."""
        if not stop_vms:
            for vm in self.vms.values():
                await vm.detach()
            return
        results = await asyncio.gather(*(vm.stop() for vm in self.vms.values()), return_exceptions=True)
        for vm, res in zip(self.vms.values(), results, strict=True):
            if isinstance(res, BaseException):
                log.error("vm stop failed at shutdown", extra={"vm": vm.name, "error": str(res)})


__all__ = ["VMError", "VMManager"]
