"""Auto-converge: slow a guest that dirties memory faster than we can send it.

QEMU's own cpu-throttle only works inside QEMU's migration, so we throttle
from outside. Preferred: a CPU quota on the QEMU process's cgroup (v2
``cpu.max``, or v1 ``cpu.cfs_quota_us`` where only v1 is mounted, as on this
project's CI host): the kernel spreads the slowdown over every 100 ms period,
so the guest sees a slower CPU, never a freeze. Where no cgroup can be made
(no pid, no writable cpu controller), a duty cycle of QMP ``stop``/``cont``:
at level 0.6 the vCPUs are stopped for 60 ms of every 100 ms. ``method`` says
which one ran (the migration status shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from pathlib import Path

from novacron.agent.migration.vmport import SourceVM
from novacron.faults import crash_point

log = logging.getLogger("novacron.agent.migration")

PERIOD_S = 0.1
MAX_LEVEL = 0.9
CGROUP_ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000


class CpuQuota:
    """A process (here: a guest's QEMU) moved into a cgroup of its own with a CPU quota;
    ``close`` moves it back and removes the cgroup."""

    def __init__(self, pid: int, cpus: int, root: Path = CGROUP_ROOT,
                 prefix: str = "novacron-throttle", period_us: int = CPU_PERIOD_US) -> None:
        self.pid, self.cpus, self.period_us = pid, max(1, cpus), period_us
        self.v2 = (root / "cgroup.controllers").exists()
        base = root if self.v2 else root / "cpu"
        home = _cgroup_of(pid, self.v2)
        if home is None or not (base / "cgroup.procs").exists():
            raise OSError(f"no cpu cgroup controller for process {pid}")
        self.home = base / home.lstrip("/")
        if self.v2:
            if "cpu" not in (base / "cgroup.controllers").read_text().split():
                raise OSError("cgroup v2 without the cpu controller")
            (base / "cgroup.subtree_control").write_text("+cpu")
        self.dir = base / f"{prefix}-{pid}"
        self.dir.mkdir(exist_ok=True)
        try:
            self.set(0.0)
            (self.dir / "cgroup.procs").write_text(str(pid))
        except OSError:
            with contextlib.suppress(OSError):
                self.dir.rmdir()
            raise

    def set(self, level: float) -> None:
        quota = max(1000, int((1.0 - level) * self.period_us * self.cpus))
        if self.v2:
            (self.dir / "cpu.max").write_text(f"{quota} {self.period_us}")
        else:
            (self.dir / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.dir / "cpu.cfs_quota_us").write_text(str(quota))

    def close(self) -> None:
        _empty_and_remove(self.dir, self.home)


EMPTY_TRIES = 50  # moves of what is left in a quota's cgroup before giving up (10 ms apart)


def _empty_and_remove(group: Path, home: Path) -> None:
    """Move every process in ``group`` to ``home`` and remove ``group``. Not only the
    guest's QEMU: a child it forked while under the quota is there too, and a fork
    racing the move lands there after it (rmdir: EBUSY; seen with a shell script as
    the process, which forks at every step). Bounded: after ``EMPTY_TRIES`` the error
    stands."""
    for attempt in range(EMPTY_TRIES):
        with contextlib.suppress(FileNotFoundError):
            for pid in (group / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):  # it exited meanwhile
                    (home / "cgroup.procs").write_text(pid)
        try:
            group.rmdir()
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or attempt == EMPTY_TRIES - 1:
                raise
        time.sleep(0.01)  # a fork in progress: its child joins the group, then we move it


def lift_stale(pid: int, root: Path = CGROUP_ROOT) -> bool:
    """An agent killed while throttling left QEMU ``pid`` under a quota: move it to this
    agent's own cgroup (where it started its QEMUs) and remove the quota. True if it did."""
    v2 = (root / "cgroup.controllers").exists()
    base = root if v2 else root / "cpu"
    stale = base / f"novacron-throttle-{pid}"
    if not stale.is_dir():
        return False
    home = _cgroup_of(os.getpid(), v2) or "/"
    _empty_and_remove(stale, base / home.lstrip("/"))
    log.warning("lifted a CPU quota a previous agent left on a guest", extra={"pid": pid})
    return True


def _cgroup_of(pid: int, v2: bool) -> str | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and "cpu" in controllers.split(",")):
            return path
    return None


class Throttle:
    def __init__(self, vm: SourceVM, period_s: float = PERIOD_S) -> None:
        self.vm = vm
        self.period = period_s
        self.level = 0.0
        self.cycles = 0
        self.method = ""  # "cgroup-cpu" or "stop-cont", once engaged
        self.quota: CpuQuota | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped_by_us = False

    def raise_level(self, step: float = 0.2) -> float:
        """Throttle harder (up to MAX_LEVEL); engages on first use."""
        self.level = min(MAX_LEVEL, round(self.level + step, 3))
        if self.quota is None and self._task is None:
            self._engage()
        if self.quota is not None:
            self.quota.set(self.level)
        return self.level

    def _engage(self) -> None:
        # a VM port may refuse the cgroup (libvirt keeps QEMU's threads in cgroups of its own)
        pid = getattr(self.vm, "pid", None) if getattr(self.vm, "cgroup_throttle", True) else None
        # never our own process (a VM port backed by this process's memory): the agent would
        # throttle itself, and the migration with it
        if isinstance(pid, int) and pid > 0 and pid != os.getpid() and os.geteuid() == 0:
            try:
                cpus = int(self.vm.spec().get("vcpus", 1))
                self.quota = CpuQuota(pid, cpus)
                self.method = "cgroup-cpu"
                return
            except (OSError, ValueError) as exc:
                log.warning("no cgroup CPU quota for auto-converge; throttling by stop/cont",
                            extra={"vm": self.vm.name, "error": str(exc)})
        self.method = "stop-cont"
        self._task = asyncio.create_task(self._run(), name="auto-converge throttle")

    async def _run(self) -> None:
        while True:
            self._stopped_by_us = True
            await self.vm.pause()
            crash_point("migration.source.throttled")
            await asyncio.sleep(self.level * self.period)
            await self.vm.resume()
            self._stopped_by_us = False
            self.cycles += 1
            await asyncio.sleep((1.0 - self.level) * self.period)

    async def stop(self) -> None:
        """End throttling and leave the guest running (the caller may pause it next)."""
        quota, self.quota = self.quota, None
        if quota is not None:
            try:
                await asyncio.to_thread(quota.close)  # (it may retry, 10 ms apart: not on the loop)
            except OSError as exc:  # the guest runs, but slowed: say so loudly
                log.error("could not lift the CPU quota of the guest", extra={"error": str(exc)})
                raise
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if self._stopped_by_us:  # cancelled (or failed) with the vCPUs possibly stopped
            try:
                await self.vm.resume()
            except Exception as exc:
                log.error("could not resume the guest after throttling", extra={"error": str(exc)})
                raise
        self._stopped_by_us = False
