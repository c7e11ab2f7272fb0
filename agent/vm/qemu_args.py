"""The QEMU command line for a VM, built from its spec alone.

A migration destination must run the *identical* machine: same machine type,
CPU model, memory backend layout and devices; only the RAM file, the socket
and log paths and ``-incoming`` differ. Everything guest-visible here therefore
comes from the spec and the accelerator, never from the host.

QEMU is given no host path that a caller chose: images and the serial log are
descriptors the agent opened and checked (``images.py``), passed as
``/proc/self/fd/N`` (``-kernel``/``-initrd`` are read with plain ``open``) or
``/dev/fdset/N`` (block layer, chardev log); the RAM file and sockets are
names relative to the VM folder QEMU runs in. QEMU is sandboxed (``sandbox.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from novacron.agent.vm.disks import OpenedDisks, blockdev_args
from novacron.agent.vm.images import OpenedImages
from novacron.agent.vm.sandbox import SANDBOX_ARGS
from novacron.agent.vm.spec import VMSpec

QEMU_BINARY = "qemu-system-x86_64"
MACHINE_TYPE = "pc"
RAM_BACKEND_ID = "ram0"
SERIAL_ID = "serial0"
SERIAL_FDSET = 1
DISK_FDSET = 2


@dataclass(frozen=True)
class QemuFiles:
    """The descriptors a QEMU inherits instead of paths."""

    images: OpenedImages
    serial_log: int
    taps: tuple[int, ...] = ()  # one tap per NIC, in spec order (network.py)
    disks: OpenedDisks = field(default_factory=OpenedDisks)  # data disks, in spec order (disks.py)

    @property
    def fds(self) -> tuple[int, ...]:
        return (*self.images.fds, self.serial_log, *self.taps, *self.disks.fds)


@dataclass(frozen=True)
class VMPaths:
    """Where one VM's files live (``<state_dir>/vms/<name>/``)."""

    dir: Path

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial_sock(self) -> Path:
        return self.dir / "serial.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def serial_prev(self) -> Path:
        """The previous part of the serial history (see VM.trim_serial)."""
        return self.dir / "serial.log.1"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"

    @property
    def meta(self) -> Path:
        return self.dir / "vm.json"


def _fd(images: OpenedImages, key: str) -> int:
    fd = getattr(images, key)
    if fd is None:
        raise ValueError(f"{key}: no open image descriptor")
    return int(fd)


def nic_args(spec: VMSpec, taps: tuple[int, ...]) -> list[str]:
    """NICs in spec order (so PCI slots match on both ends of a migration), each on a
    tap the agent opened; ``romfile=``: no PXE option ROM, the guest boots from -kernel."""
    if len(taps) != len(spec.nics):
        raise ValueError(f"{len(spec.nics)} NICs but {len(taps)} tap descriptors")
    args: list[str] = []
    for i, (nic, fd) in enumerate(zip(spec.nics, taps, strict=True)):
        args += ["-netdev", f"tap,id=net{i},fd={fd}",
                 "-device", f"{nic.model},netdev=net{i},id=nic{i},mac={nic.mac},romfile="]
    return args


def machine_args(spec: VMSpec, accel: str, ram_path: Path, images: OpenedImages,
                 taps: tuple[int, ...] = (), disks: OpenedDisks | None = None) -> list[str]:
    """The guest-visible machine; identical on a migration's two ends but for
    ``ram_path`` and the numbers of the image and tap descriptors."""
    args = [
        "-machine", f"{MACHINE_TYPE},accel={accel},memory-backend={RAM_BACKEND_ID}",
        "-cpu", spec.effective_cpu_model(accel),  # from the spec: both ends of a migration agree
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mb}M",
        "-object",
        f"memory-backend-file,id={RAM_BACKEND_ID},size={spec.memory_mb}M,mem-path={ram_path},share=on",
    ]  # fmt: skip
    if spec.kernel:
        args += ["-kernel", f"/proc/self/fd/{_fd(images, 'kernel')}"]
        if spec.initrd:
            args += ["-initrd", f"/proc/self/fd/{_fd(images, 'initrd')}"]
        if spec.cmdline:
            args += ["-append", spec.cmdline]
    else:
        # both access modes: QEMU's block layer reopens read-only at times
        args += [
            "-add-fd", f"fd={_fd(images, 'disk_rw')},set={DISK_FDSET}",
            "-add-fd", f"fd={_fd(images, 'disk_ro')},set={DISK_FDSET}",
            "-drive", f"file=/dev/fdset/{DISK_FDSET},format={spec.disk_format},if=virtio",
        ]  # fmt: skip
    return args + nic_args(spec, taps) + blockdev_args(spec, disks or OpenedDisks())


def qemu_argv(
    spec: VMSpec,
    accel: str,
    paths: VMPaths,
    files: QemuFiles,
    *,
    incoming: bool = False,
    paused: bool = False,
    qemu: str = QEMU_BINARY,
) -> list[str]:
    """Full argv. ``incoming`` adds ``-incoming defer`` (a migration destination);
    ``paused`` adds ``-S`` (vCPUs wait for QMP ``cont``).

    Paths are relative: QEMU runs with ``cwd=paths.dir`` because unix socket
    paths are limited to 107 bytes and state dirs can be deep (and an
    unprivileged QEMU may not traverse the state dir's parents).
    """
    argv = [
        qemu, "-name", f"guest={spec.name},debug-threads=on", "-nodefaults", "-no-user-config", "-display", "none",
        *SANDBOX_ARGS,
        *machine_args(spec, accel, Path(paths.ram.name), files.images, files.taps, files.disks),
        "-add-fd", f"fd={files.serial_log},set={SERIAL_FDSET}",
        "-chardev",
        f"socket,id={SERIAL_ID},path={paths.serial_sock.name},server=on,wait=off,"
        f"logfile=/dev/fdset/{SERIAL_FDSET},logappend=on",
        "-serial", f"chardev:{SERIAL_ID}",
        "-qmp", f"unix:{paths.qmp.name},server=on,wait=off",
    ]  # fmt: skip
    if incoming:  # timestamped trace lines: the agent times post-copy's page faults (postcopy.py)
        argv += ["-msg", "timestamp=on"]
    if paused or incoming:
        argv.append("-S")
    if incoming:
        argv += ["-incoming", "defer"]
    return argv
