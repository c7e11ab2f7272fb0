"""Real libvirt daemons, each an isolated "host" (for tests and the libvirt benchmark).

``LibvirtDaemon`` runs Debian's ``libvirtd`` in session mode as the unprivileged
user ``nobody``, with HOME and every XDG dir under its own temp folder: its own
socket, run, config, cache and state dirs, domains and QEMU logs, and its own
``host_uuid`` (libvirt refuses a migration between daemons that report the same
host UUID). Guests are TCG domains booting the test guest's kernel and initrd
(copied where ``nobody`` can read them). ``stop`` destroys what the daemon
still runs, kills the daemon, its virtlogd and any QEMU left under its folder,
and removes the folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from novacron.agent.guest import GuestImage

LIBVIRTD = "/usr/sbin/libvirtd"
NOBODY = 65534
START_TIMEOUT_S = 30.0


def have_libvirtd() -> bool:
    return os.path.exists(LIBVIRTD) and os.geteuid() == 0 and shutil.which("virsh") is not None


class SharedDir:
    """A folder ``nobody`` can use, shared by every daemon of a test (guest images, serial logs).

    A migrated domain keeps its XML, so its kernel and serial log paths must be
    valid on both "hosts": here they are the same files.
    """

    def __init__(self, guest: GuestImage) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="nc-lv-"))
        os.chmod(self.path, 0o755)
        for src in (guest.kernel, guest.initrd):
            shutil.copy(src, self.path / src.name)
            os.chmod(self.path / src.name, 0o644)
        self.kernel, self.initrd = self.path / guest.kernel.name, self.path / guest.initrd.name
        self.logs = self.path / "logs"
        self.logs.mkdir()
        os.chown(self.logs, NOBODY, NOBODY)
        self.guest = guest

    def domain_xml(self, name: str, *, memory_mb: int = 128, mem_mb: int = 16, rate_mb: int = 2,
                   verify_s: int = 2, shared_memory: bool = False, power_button: str = "handle") -> str:
        """A TCG domain booting the test guest; its serial console is a pty (input through
        libvirt's console stream) logged to ``log(name)``. ``shared_memory``: its RAM is a
        shared file in the daemon's memory backing dir (what NovaCron's engine needs).

        ACPI on, as in the QEMUs the agent runs: without ``<acpi/>`` libvirt passes
        ``-no-acpi``, the guest kernel then has no HPET or PM timer to calibrate its TSC
        against and keeps time by counting timer ticks (``refined-jiffies``), which TCG
        loses under load: the guest's clock drifts by a tenth, and the heartbeat gap that
        measures the migration's pause with it. The guest powers off cleanly on the ACPI
        power button (a graceful shutdown) unless ``power_button="ignore"``."""
        if power_button not in ("handle", "ignore"):
            raise ValueError(f"power_button: 'handle' or 'ignore', not {power_button!r}")
        cmdline = self.guest.workload_cmdline(mem_mb=mem_mb, rate_mb=rate_mb, verify_s=verify_s)
        if power_button == "ignore":
            cmdline += " novacron.power_button=ignore"
        log = escape(str(self.log(name)))
        backing = ("\n  <memoryBacking><source type='file'/><access mode='shared'/></memoryBacking>"
                   if shared_memory else "")
        return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mb}</memory>{backing}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(self.kernel))}</kernel>
    <initrd>{escape(str(self.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model fallback='allow'>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='cdrom'><target dev='hdc' bus='ide'/><readonly/></disk>
    <interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>
    <serial type='pty'><log file='{log}' append='on'/></serial>
  </devices>
</domain>
"""

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def read_log(self, name: str, offset: int = 0) -> str:
        try:
            with open(self.log(name), "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class LibvirtDaemon:
    """``userfaultfd``: its QEMUs may use userfaultfd (post-copy's destination needs it):
    the daemon runs with the ambient capability CAP_SYS_PTRACE, which the kernel asks of
    a userfaultfd that handles kernel faults when vm.unprivileged_userfaultfd is 0, and
    its qemu.conf keeps it for QEMU (``clear_emulator_capabilities = 0``). QEMU 7.2
    does not use /dev/userfaultfd (QEMU >= 8.1 does), so that device does not help."""

    def __init__(self, name: str, *, userfaultfd: bool = False) -> None:
        self.name = name
        self.userfaultfd = userfaultfd
        self.host_uuid = str(uuid.uuid4())
        self.dir = Path(tempfile.mkdtemp(prefix=f"nc-lvd-{name}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "run" / "libvirt" / "libvirt-sock"

    @property
    def memory_dir(self) -> Path:
        """libvirt's memory_backing_dir of a session daemon: $XDG_CONFIG_HOME/libvirt/qemu/ram."""
        return self.dir / "config" / "libvirt" / "qemu" / "ram"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///session?socket={self.socket}"

    def env(self) -> dict[str, str]:
        d = self.dir
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(d / "home"),
                "XDG_CONFIG_HOME": str(d / "config"), "XDG_RUNTIME_DIR": str(d / "run"),
                "XDG_CACHE_HOME": str(d / "cache"), "XDG_DATA_HOME": str(d / "data"),
                "LANG": "C.UTF-8"}  # fmt: skip

    def start(self) -> LibvirtDaemon:
        for sub in ("home", "config/libvirt", "run", "cache", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        if self.userfaultfd:
            (self.dir / "config" / "libvirt" / "qemu.conf").write_text("clear_emulator_capabilities = 0\n")
        (self.dir / "config" / "libvirt" / "libvirtd.conf").write_text(
            f'host_uuid = "{self.host_uuid}"\nlog_outputs = "3:file:{self.dir}/libvirtd.log"\n')
        os.chmod(self.dir / "run", 0o700)
        for root, dirs, files in os.walk(self.dir):
            for p in (root, *(os.path.join(root, x) for x in dirs + files)):
                os.chown(p, NOBODY, NOBODY)
        return self._spawn()

    def restart(self) -> LibvirtDaemon:
        """Stop the daemon alone (its domains' QEMUs go on) and start it again."""
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(20)
        return self._spawn()

    def _spawn(self) -> LibvirtDaemon:
        with open(self.dir / "stderr.log", "ab") as err:  # the child keeps its own copy
            if self.userfaultfd:  # setpriv: drop to nobody keeping one capability (ambient)
                argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        "--inh-caps", "+sys_ptrace", "--ambient-caps", "+sys_ptrace", LIBVIRTD]
                who: dict[str, Any] = {}
            else:
                argv, who = [LIBVIRTD], {"user": NOBODY, "group": NOBODY, "extra_groups": []}
            self.proc = subprocess.Popen(
                argv, env=self.env(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err, start_new_session=True, **who)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd {self.name} exited: {self.stderr()}")
            if self.socket.exists() and self.virsh("uri", check=False).returncode == 0:
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"libvirtd {self.name} did not answer within {START_TIMEOUT_S:g} s: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return (self.dir / "stderr.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def virsh(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True,
                              check=check, timeout=timeout)  # fmt: skip

    def define(self, xml: str) -> None:
        """Define a domain the way an operator would, with virsh (outside NovaCron)."""
        path = self.dir / "define.xml"
        path.write_text(xml)
        self.virsh("define", str(path))

    def pids(self) -> list[int]:
        """Every process left from this daemon: QEMUs and virtlogd run with our dirs
        in their command line or environment."""
        marker = str(self.dir).encode()
        found = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if p.stat().st_uid != NOBODY:
                    continue
                if marker in (p / "cmdline").read_bytes() or marker in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for name in self.virsh("list", "--name", check=False, timeout=20).stdout.split():
                self.virsh("destroy", name, check=False, timeout=20)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)
