"""The QEMU command line: reproducible machine arguments, RAM in a shared file,
images as inherited descriptors, the seccomp sandbox on."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.agent.vm.images import OpenedImages
from novacron.agent.vm.qemu_args import QemuFiles, VMPaths, machine_args, qemu_argv
from novacron.agent.vm.spec import NIC, VMSpec

KERNEL_FILES = QemuFiles(OpenedImages(kernel=7, initrd=8), serial_log=9)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


def test_kernel_vm_argv(tmp_path: Path) -> None:
    spec = VMSpec("web", 2, 256, kernel="/k", initrd="/i", cmdline="console=ttyS0 quiet")
    paths = VMPaths(tmp_path / "vms" / "web")
    argv = qemu_argv(spec, "tcg", paths, KERNEL_FILES)
    assert argv[0] == "qemu-system-x86_64"
    joined = " ".join(argv)
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert "-machine pc,accel=tcg,memory-backend=ram0" in joined
    assert "memory-backend-file,id=ram0,size=256M,mem-path=ram,share=on" in joined  # relative to cwd
    assert "-smp 2 -m 256M" in joined and "-cpu qemu64" in joined
    # QEMU gets the descriptors the agent checked, never the names a caller sent
    assert "-kernel /proc/self/fd/7 -initrd /proc/self/fd/8" in joined and "/k" not in argv and "/i" not in argv
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"  # one argument, spaces intact
    assert "-qmp unix:qmp.sock,server=on,wait=off" in joined
    assert "-add-fd fd=9,set=1" in joined and "logfile=/dev/fdset/1" in joined
    assert str(tmp_path) not in joined  # no host path at all
    assert "-S" not in argv and "-incoming" not in argv


def test_destination_differs_only_in_ram_path_and_incoming(tmp_path: Path) -> None:
    spec = VMSpec("web", 1, 128, kernel="/k")
    src, dst = VMPaths(tmp_path / "a"), VMPaths(tmp_path / "b")
    images = OpenedImages(kernel=5)
    src_args = machine_args(spec, "kvm", src.ram, images)
    dst_args = machine_args(spec, "kvm", dst.ram, images)
    differing = [(a, b) for a, b in zip(src_args, dst_args, strict=True) if a != b]
    assert len(differing) == 1 and str(src.ram) in differing[0][0] and str(dst.ram) in differing[0][1]
    assert "-cpu" in src_args and src_args[src_args.index("-cpu") + 1] == "host"
    incoming = qemu_argv(spec, "kvm", dst, QemuFiles(images, 6), incoming=True)
    assert incoming[-3:] == ["-S", "-incoming", "defer"]


def test_disk_vm_argv(tmp_path: Path) -> None:
    spec = VMSpec("db", 1, 512, disk="/images/db.qcow2", disk_format="qcow2")
    files = QemuFiles(OpenedImages(disk_rw=11, disk_ro=12), serial_log=13)
    argv = qemu_argv(spec, "tcg", VMPaths(tmp_path), files, paused=True)
    joined = " ".join(argv)
    assert "-add-fd fd=11,set=2 -add-fd fd=12,set=2" in joined
    assert "file=/dev/fdset/2,format=qcow2,if=virtio" in argv and "-kernel" not in argv
    assert "/images/db.qcow2" not in joined
    assert files.fds == (11, 12, 13)
    assert argv[-1] == "-S"


def test_nics_are_taps_by_descriptor_with_their_macs(tmp_path: Path) -> None:
    nics = (NIC("prod", "virtio-net-pci", "52:54:00:00:00:01"), NIC("dev", "e1000", "02:00:00:00:00:02"))
    spec = VMSpec("web", 1, 128, kernel="/k", nics=nics)
    files = QemuFiles(OpenedImages(kernel=7), serial_log=9, taps=(20, 21))
    argv = qemu_argv(spec, "tcg", VMPaths(tmp_path), files)
    joined = " ".join(argv)
    assert "-netdev tap,id=net0,fd=20 -device virtio-net-pci,netdev=net0,id=nic0,mac=52:54:00:00:00:01" in joined
    assert "-netdev tap,id=net1,fd=21 -device e1000,netdev=net1,id=nic1,mac=02:00:00:00:00:02" in joined
    assert files.fds == (7, 9, 20, 21)
    # a migration's destination: same devices and MACs, only the descriptor numbers differ
    other = machine_args(spec, "tcg", Path("ram"), OpenedImages(kernel=7), (30, 31))
    mine = machine_args(spec, "tcg", Path("ram"), OpenedImages(kernel=7), (20, 21))
    assert [(a, b) for a, b in zip(mine, other, strict=True) if a != b] == [
        ("tap,id=net0,fd=20", "tap,id=net0,fd=30"), ("tap,id=net1,fd=21", "tap,id=net1,fd=31")]
    with pytest.raises(ValueError):
        machine_args(spec, "tcg", Path("ram"), OpenedImages(kernel=7), (20,))


def test_qemu_names_its_threads_and_is_still_found_by_its_name(tmp_path: Path) -> None:
    """``debug-threads=on``: vCPU threads are "CPU <n>/TCG" (bench wan leaves them out of
    migration CPU); a restarted agent still recognises its QEMU by ``guest=NAME``."""
    from novacron.agent.vm.recovery import QemuProcess

    spec = VMSpec("web", 1, 128, kernel="/k", initrd="/i", cmdline="")
    paths = VMPaths(tmp_path / "vms" / "web")
    argv = qemu_argv(spec, "tcg", paths, KERNEL_FILES)
    assert argv[argv.index("-name") + 1] == "guest=web,debug-threads=on"
    proc = QemuProcess(1, paths.dir.resolve(), tuple(argv))
    assert proc.runs(paths.dir, "web")
    assert not proc.runs(paths.dir, "we") and not proc.runs(tmp_path / "vms" / "other", "web")
    assert QemuProcess(1, paths.dir.resolve(), ("qemu", "-name", "guest=web")).runs(paths.dir, "web")  # older argv
