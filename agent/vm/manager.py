"""All VMs of one agent, kept under ``<state_dir>/vms/<name>/``."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from novacron.agent.vm.accel import AccelDetector, AccelUnavailable
from novacron.agent.vm.errors import VMConflict, VMError, VMNotFound
from novacron.agent.vm.machine import CRASHED, LIVE, STOPPED, VM, load_meta
from novacron.agent.vm.qemu_args import QEMU_BINARY, VMPaths
from novacron.agent.vm.spec import SpecError, VMSpec, parse_spec

log = logging.getLogger("novacron.agent.vm")


class ResumeFence(Protocol):
    """Who may forbid resuming a VM (the migration manager: an unsettled migration)."""

    def fence_reason(self, name: str) -> str | None: ...

    async def override(self, name: str) -> str | None: ...


class VMManager:
    def __init__(self, state_dir: Path, accel: AccelDetector, qemu: str = QEMU_BINARY) -> None:
        self.state_dir = state_dir
        self.vms_dir = state_dir / "vms"
        self.accel = accel
        self.qemu = qemu
        self.vms: dict[str, VM] = {}
        self._lock = asyncio.Lock()  # guards the name table (create/delete)
        self.resume_fence: ResumeFence | None = None  # set when migrations are attached

    def paths(self, name: str) -> VMPaths:
        return VMPaths(self.vms_dir / name)

    def get(self, name: str) -> VM:
        vm = self.vms.get(name)
        if vm is None:
            raise VMNotFound(f"no VM named {name!r}")
        return vm

    def list(self) -> list[VM]:
        return [self.vms[n] for n in sorted(self.vms)]

    async def load(self) -> None:
        """Find the VMs an earlier agent left in the state dir; re-adopt live QEMUs."""
        self.vms_dir.mkdir(parents=True, exist_ok=True)
        for meta in sorted(self.vms_dir.glob("*/vm.json")):
            try:
                doc = load_meta(meta)
                spec_doc = {k: v for k, v in doc["spec"].items() if v not in ("", None)}
                spec = VMSpec(**spec_doc)
            except (OSError, ValueError, TypeError) as exc:
                log.warning("skipping unreadable VM record", extra={"path": str(meta), "error": str(exc)})
                continue
            vm = VM(spec, str(doc.get("accel", "tcg")), self.paths(spec.name), qemu=self.qemu)
            was, pid = str(doc.get("state", STOPPED)), doc.get("pid")
            if was in LIVE and isinstance(pid, int) and await vm.adopt(pid, was):
                pass
            elif was in LIVE:
                vm.state = CRASHED
                vm.error = "QEMU was gone when the agent restarted"
                vm.save()
            else:
                vm.state = CRASHED if was == CRASHED else STOPPED
                vm.error = str(doc.get("error", ""))
            self.vms[spec.name] = vm
        if self.vms:
            log.info("vms loaded", extra={"count": len(self.vms), "names": sorted(self.vms)})

    async def create(self, doc: object, *, start: bool | None = None) -> VM:
        """Validate ``doc``, record the VM and (unless ``start`` is false) boot it.

        Raises SpecError/VMError with nothing changed on disk when it fails.
        """
        spec = parse_spec(doc)
        if start is None:
            start = bool(doc.get("start", True)) if isinstance(doc, dict) else True
        accel = "tcg"
        if spec.accel != "tcg":  # TCG always works: no need to wait for the KVM probe
            try:
                accel = (await self.accel.detect()).resolve(spec.accel)
            except AccelUnavailable as exc:
                raise SpecError(str(exc)) from None
        async with self._lock:
            if spec.name in self.vms:
                raise VMConflict(f"a VM named {spec.name!r} exists already")
            paths = self.paths(spec.name)
            if paths.dir.exists():
                raise VMConflict(f"{paths.dir} exists already (left by an earlier VM?)")
            vm = VM(spec, accel, paths, qemu=self.qemu)
            paths.dir.mkdir(parents=True)
            try:
                if start:
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

    async def start(self, name: str) -> VM:
        return await self._locked(name, VM.start)

    async def stop(self, name: str) -> VM:
        return await self._locked(name, VM.stop)

    async def pause(self, name: str) -> VM:
        return await self._locked(name, VM.pause)

    async def resume(self, name: str, *, force: bool = False) -> VM:
        """Resume a paused VM; refused (409) while a migration of it is unsettled
        unless ``force`` (an operator who knows the peer host is dead)."""
        self.get(name)
        why = self.resume_fence.fence_reason(name) if self.resume_fence is not None else None
        if why is not None:
            if not force:
                raise VMConflict(why)
            assert self.resume_fence is not None
            await self.resume_fence.override(name)
        return await self._locked(name, VM.resume)

    async def delete(self, name: str) -> None:
        """Stop the VM if it runs and remove everything it had under the state dir."""
        async with self._lock:
            vm = self.get(name)
            if vm.migrating:
                raise VMConflict(f"VM {name} is migrating; cancel the migration first")
            async with vm.lock:
                await vm.stop()
                shutil.rmtree(vm.paths.dir, ignore_errors=True)
            del self.vms[name]
        log.info("vm deleted", extra={"vm": name})

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
