"""Which accelerator works here: KVM when it really runs a guest, else TCG.

``/dev/kvm`` existing is not enough: on nested hosts it opens, QEMU starts and
SeaBIOS even runs, but a Linux kernel hangs once it leaves real mode. So the
probe boots a kernel under ``-accel kvm`` with ``earlyprintk`` and waits a few
seconds for its first message; the answer is cached per host boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import signal
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from novacron.agent.vm.qemu_args import QEMU_BINARY
from novacron.agent.vm.sandbox import SANDBOX_ARGS

log = logging.getLogger("novacron.agent.accel")

KVM_DEVICE = Path("/dev/kvm")
PROBE_TIMEOUT_S = 6.0
PROBE_CACHE_VERSION = 1


@dataclass(frozen=True)
class AccelInfo:
    kvm_present: bool
    kvm_usable: bool
    reason: str  # why KVM is (not) usable, for operators

    @property
    def default(self) -> str:
        return "kvm" if self.kvm_usable else "tcg"

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "default": self.default}

    def resolve(self, requested: str) -> str:
        """The accelerator to use for a VM asking for ``requested`` (kvm|tcg|auto)."""
        if requested == "auto":
            return self.default
        if requested == "kvm" and not self.kvm_usable:
            raise AccelUnavailable(f"accel: kvm requested but not usable here ({self.reason})")
        return requested


class AccelUnavailable(RuntimeError):
    pass


def _host_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def default_probe_kernels() -> list[Path]:
    """Kernels worth booting for the probe: the test guest's, then the host's."""
    from novacron.agent.guest import cache_root

    found = sorted(cache_root().glob("*/vmlinuz"), key=lambda p: p.stat().st_mtime, reverse=True)
    found.append(Path(f"/boot/vmlinuz-{platform.release()}"))
    return [p for p in found if p.is_file() and os.access(p, os.R_OK)]


async def probe_kvm_boot(
    kernel: Path, timeout: float = PROBE_TIMEOUT_S, qemu: str = QEMU_BINARY, accel: str = "kvm"
) -> tuple[bool, str]:
    """Boot ``kernel`` under ``accel``; usable if it prints its banner within ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="nc-kvmprobe-") as tmp:
        log_path = Path(tmp) / "serial.log"
        argv = [
            qemu, "-accel", accel, "-machine", "pc", "-nodefaults", "-no-user-config",
            "-display", "none", "-m", "128", "-no-reboot", *SANDBOX_ARGS, "-kernel", str(kernel),
            "-append", "earlyprintk=ttyS0 console=ttyS0 panic=-1 rdinit=/none root=/dev/none",
            "-serial", f"file:{log_path}",
        ]  # fmt: skip
        err_path = Path(tmp) / "stderr"
        try:
            # stderr to a file, not a pipe: a pipe inherited by a grandchild would
            # keep wait() from returning after the kill
            with err_path.open("wb") as err_file:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                    stderr=err_file, start_new_session=True,
                )  # fmt: skip
        except OSError as exc:
            return False, f"cannot run {qemu}: {exc}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while loop.time() < deadline:
                with contextlib.suppress(OSError):
                    if b"Linux version" in log_path.read_bytes():
                        return True, f"a kernel booted under {accel}"
                if proc.returncode is not None:
                    err = err_path.read_text(errors="replace").strip()
                    return False, f"qemu -accel {accel} exited ({proc.returncode}): {err[-200:]}"
                await asyncio.sleep(0.1)
            return False, f"a kernel booted under {accel} printed nothing in {timeout:.0f}s (nested KVM hang?)"
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group, should it have forked
            await proc.wait()


class AccelDetector:
    """Probes once and remembers the answer (in memory and in ``cache_file``)."""

    def __init__(
        self,
        cache_file: Path | None = None,
        probe_kernels: list[Path] | None = None,
        *,
        device: Path = KVM_DEVICE,
        qemu: str = QEMU_BINARY,
        probe_timeout: float = PROBE_TIMEOUT_S,
    ) -> None:
        self.cache_file = cache_file
        self.probe_kernels = probe_kernels
        self.device = device
        self.qemu = qemu
        self.probe_timeout = probe_timeout
        self._info: AccelInfo | None = None
        self._lock = asyncio.Lock()

    def _cache_key(self, kernel: Path) -> dict[str, object]:
        return {"v": PROBE_CACHE_VERSION, "boot_id": _host_boot_id(), "kernel": str(kernel)}

    def _load(self, key: dict[str, object]) -> AccelInfo | None:
        if self.cache_file is None:
            return None
        try:
            doc = json.loads(self.cache_file.read_text())
            if doc.get("key") == key:
                return AccelInfo(True, bool(doc["kvm_usable"]), str(doc["reason"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _store(self, key: dict[str, object], info: AccelInfo) -> None:
        if self.cache_file is None:
            return
        with contextlib.suppress(OSError):
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"key": key, "kvm_usable": info.kvm_usable, "reason": info.reason}))
            os.replace(tmp, self.cache_file)

    async def detect(self) -> AccelInfo:
        async with self._lock:
            if self._info is None:
                self._info = await self._detect()
                log.info("accelerator detected", extra=self._info.to_dict())
            return self._info

    @property
    def info(self) -> AccelInfo | None:
        return self._info

    async def _detect(self) -> AccelInfo:
        if not self.device.exists():
            return AccelInfo(False, False, f"{self.device} does not exist")
        if not os.access(self.device, os.R_OK | os.W_OK):
            return AccelInfo(True, False, f"{self.device} is not readable and writable by this user")
        kernels = self.probe_kernels if self.probe_kernels is not None else default_probe_kernels()
        if not kernels:
            return AccelInfo(True, False, "no kernel to probe KVM with (build the test guest)")
        key = self._cache_key(kernels[0])
        cached = self._load(key)
        if cached is not None:
            return cached
        usable, reason = await probe_kvm_boot(kernels[0], self.probe_timeout, self.qemu)
        info = AccelInfo(True, usable, reason)
        self._store(key, info)
        return info
