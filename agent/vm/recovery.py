"""QEMU processes found by the VM folder they run in (agent start-up recovery).

Every QEMU the agent starts runs with its VM folder as working directory and
``-name guest=<name>`` (see qemu_args). So a restarted agent finds all QEMUs
of its state dir by scanning ``/proc``, whatever its records say: a QEMU
spawned just before the agent died has no pid in its record yet, and one
whose folder was removed under it shows a ``(deleted)`` working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("novacron.agent.vm")

KILL_WAIT_S = 10.0
_DELETED = " (deleted)"


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    cwd: Path  # resolved; for a removed folder, the path it had
    argv: tuple[str, ...]

    def runs(self, folder: Path, name: str) -> bool:
        """True if this is the QEMU of VM ``name`` in ``folder`` (pids get reused)."""
        # "-name guest=NAME,debug-threads=on" (qemu_args; named threads, e.g. "CPU 0/TCG")
        return self.cwd == folder.resolve() and any(a.split(",", 1)[0] == f"guest={name}" for a in self.argv)


def process_cwd(pid: int) -> Path | None:
    """Where ``pid`` runs (for a removed folder, the path it had); None if unknown."""
    try:
        link = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    return Path(link.removesuffix(_DELETED))


def _argv(pid: int) -> tuple[str, ...]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)


def qemus_under(root: Path) -> dict[Path, list[QemuProcess]]:
    """QEMU processes whose working directory is a folder directly under ``root``, by folder."""
    root = root.resolve()
    found: dict[Path, list[QemuProcess]] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        cwd = process_cwd(pid)
        if cwd is None or cwd.parent != root:
            continue
        argv = _argv(pid)
        if "-name" not in argv or not any(a.startswith("guest=") for a in argv):
            continue  # not a QEMU we started (e.g. a shell someone left in the folder)
        found.setdefault(cwd, []).append(QemuProcess(pid, cwd, argv))
    return found


def qemu_of(folder: Path, name: str) -> list[QemuProcess]:
    """The QEMUs of VM ``name`` running in ``folder`` (normally none or one)."""
    return [p for p in qemus_under(folder.parent).get(folder.resolve(), []) if p.runs(folder, name)]


def _kill_and_wait(proc: QemuProcess, timeout: float) -> bool:
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        return True  # gone already
    try:
        if process_cwd(proc.pid) != proc.cwd:  # the pid was reused since the scan: not ours to kill
            return False
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        readable, _, _ = select.select([pidfd], [], [], timeout)
        return bool(readable)
    finally:
        os.close(pidfd)


async def kill_orphan(proc: QemuProcess, why: str) -> None:
    """SIGKILL a QEMU no valid record accounts for, and wait until it is gone."""
    log.warning("killing an orphan QEMU", extra={"pid": proc.pid, "folder": str(proc.cwd), "reason": why})
    if not await asyncio.to_thread(_kill_and_wait, proc, KILL_WAIT_S):
        log.error("orphan QEMU did not exit", extra={"pid": proc.pid, "folder": str(proc.cwd)})
