"""What the migration engine needs from a VM, on each side.

The engine moves guest RAM itself (it maps the RAM file) and asks the
hypervisor only to pause, resume and hand over device state. These protocols
are the seam between the engine and the VM runtime (QEMU via QMP in
``qemu_port``; plain files in the memory-only tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from novacron.agent.vm.expanded import Expanded


class SourceVM(Protocol):
    name: str
    ram_path: Path
    # the RAM file's inode when the agent created it (None: unknown, e.g. an adopted
    # VM); the engine reopens ram_path only if it is still that file
    ram_stat: os.stat_result | None
    ram_size: int
    # The VM's own folder: the engine puts its device-state relay socket here, so
    # nothing outlives the VM (the hypervisor must reach it by this path too).
    work_dir: Path

    @property
    def pid(self) -> int | None:
        """The process that writes guest RAM (QEMU), None if unknown: the engine reads its
        page tables to bound the scan while the guest is paused (see ``RamWatch``)."""
        ...

    def spec(self) -> dict[str, Any]:
        """The VM spec the destination needs to start an identical machine."""
        ...

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def send_device_state(self, socket_path: Path) -> None:
        """Start the hypervisor's own migration of device state (RAM excluded) to the
        unix socket ``socket_path`` (inside ``work_dir``)."""
        ...

    async def wait_device_state_sent(self, timeout: float) -> None:
        """Return when the device-state migration completed; raise if it failed."""
        ...

    async def cancel_device_state(self) -> None: ...

    async def release(self) -> None:
        """After commit: stop the source machine and remove its files."""
        ...

    async def stay(self) -> None:
        """The migration failed or never started: the VM is ordinary here again."""
        ...


class DestVM(Protocol):
    name: str
    ram_path: Path
    ram_stat: os.stat_result | None

    async def listen_device_state(self) -> str:
        """Make the paused destination accept device state on a unix socket inside
        its own folder (so a crash leaves nothing elsewhere); returns its path."""
        ...

    async def wait_device_state_loaded(self, timeout: float) -> None: ...

    async def wait_exited(self) -> str:
        """Return (with a short reason) when the destination machine's process ends."""
        ...

    async def resume(self) -> None:
        """Start the guest and return once it is confirmed running."""
        ...

    async def destroy(self) -> None:
        """Kill the destination machine and remove its RAM file and VM directory."""
        ...

    async def adopt(self) -> None:
        """After commit: the VM is ours now (register with the runtime)."""
        ...


@runtime_checkable
class MirrorSource(Protocol):
    """A source whose local disks move with it (``diskrelay.py``): a VM that has none
    answers an empty plan."""

    async def disk_plan(self) -> list[dict[str, Any]]:
        """Per local disk: ``index``, ``size`` (guest-visible bytes), ``format`` and,
        for an overlay, ``backing_digest`` (the destination must hold the same image)."""
        ...

    async def start_disk_mirror(self, index: int, socket_path: Path) -> None:
        """Mirror disk ``index`` (write-blocking, so it converges) to an NBD client on
        ``socket_path`` (inside ``work_dir``)."""
        ...

    async def disk_mirror_jobs(self) -> dict[int, dict[str, Any]]:
        """Per mirrored disk: ``status`` (QEMU job status), ``done``, ``total`` bytes, ``error``."""
        ...

    async def finish_disk_mirrors(self, timeout: float) -> None:
        """With the guest paused: complete every (ready) mirror without switching the
        source to the copy, and drop the NBD clients; raise if a copy is not complete."""
        ...

    async def cancel_disk_mirrors(self) -> None:
        """Stop every mirror at once; the source disks stay the VM's disks."""
        ...


@runtime_checkable
class NetworkDest(Protocol):
    def announce_early(self) -> None:
        """The source paused the guest: tell the network the VM's NICs are here now
        (frames for it wait at this host until it resumes; network.TapAnnouncer)."""


@runtime_checkable
class MirrorDest(Protocol):
    async def export_disks(self, indices: list[int]) -> str:
        """Export the (empty, paused) local disks ``indices`` writable over NBD on a unix
        socket in the VM's folder; returns its path."""
        ...

    async def stop_disk_export(self) -> None:
        """Stop the NBD server (before the guest may run here)."""
        ...

    def disk_template(self, index: int) -> tuple[int, str] | None:
        """A read-only descriptor (the caller closes it) of the image here that local disk
        ``index`` was copied from, and its format; None if there is none."""
        ...

    def disk_expanded(self) -> Expanded | None:
        """Where compressed images get their uncompressed copies (vm/expanded.py); None: nowhere."""
        ...


class DestFactory(Protocol):
    async def prepare(self, spec: dict[str, Any], ram_size: int, migration_id: str,
                      disks: list[dict[str, Any]] | None = None) -> DestVM:
        """Admit the VM: check capacity, create and preallocate its RAM file, create its
        local ``disks`` (the source's plan, see MirrorSource) empty, start the machine
        paused waiting for incoming device state. Raises ``AdmissionError``."""
        ...


class LocalVMs(Protocol):
    """What a restarted agent needs to settle the migrations its journal names."""

    def state(self, name: str) -> str | None:
        """The VM's state here ("running", "paused", ...), None if there is no such VM."""
        ...

    def set_migrating(self, name: str, flag: bool) -> None:
        """Show the VM as migrating (and refuse deleting it) while its migration is unsettled."""
        ...

    async def resume(self, name: str) -> None:
        """Resume a paused VM (the engine's own call: not fenced)."""
        ...

    async def release(self, name: str) -> None:
        """The destination runs the VM: stop the copy here and remove its files."""
        ...


class AdmissionError(Exception):
    """The destination cannot take the VM (name taken, no space, bad spec)."""


@runtime_checkable
class PostcopySource(Protocol):
    """A source whose hypervisor migrates RAM itself with post-copy (``postcopy.py``)."""

    async def start_ram_migration(self, socket_path: Path, *, bandwidth_bytes_s: float,
                                  downtime_ms: float, resume: bool = False) -> None:
        """Start (or, ``resume``, reconnect) the hypervisor's migration of RAM and devices,
        post-copy enabled, to the unix socket ``socket_path`` (inside ``work_dir``)."""
        ...

    async def set_ram_limits(self, bandwidth_bytes_s: float, downtime_ms: float) -> None: ...

    async def query_migration(self) -> dict[str, Any]:
        """The hypervisor's migration status (QEMU's ``query-migrate``)."""
        ...

    async def start_postcopy(self) -> None:
        """Switch the running migration to post-copy: the guest stops here for good."""
        ...

    async def mark_paused(self) -> None:
        """The hypervisor stopped the guest itself (completion or post-copy)."""
        ...


@runtime_checkable
class PostcopyDest(Protocol):
    # While post-copy runs, the destination's main loop may wait on a missing page (and
    # for as long as the stream is down): in-band queries may take that long to answer.
    async def listen_device_state(self, postcopy: bool = False) -> str:
        """As DestVM's, and with ``postcopy`` ready for QEMU's RAM and a post-copy switch."""
        ...

    def hold(self, flag: bool) -> None:
        """Keep the (adopted, running) VM marked as migrating: post-copy still fills it."""
        ...

    async def query_migration(self, timeout: float = 10) -> dict[str, Any]: ...

    async def run_state(self) -> str:
        """The machine's run state ("paused", "running", "inmigrate", ...)."""
        ...

    async def trace_faults(self, on: bool) -> int:
        """Start/stop timing the guest's faults on missing pages; returns a log mark."""
        ...

    def log_size(self) -> int:
        """Where the machine's log is now (the fault trace grows it)."""
        ...

    def fault_latencies(self, since: int) -> list[float]:
        """Milliseconds each fault since ``mark`` waited for its page."""
        ...

    async def recover_postcopy(self) -> str:
        """Listen again for a post-copy stream that broke (out of band: it must work while
        the main loop is blocked); returns the socket's path. Raises while the machine
        has not noticed the break yet."""
        ...
