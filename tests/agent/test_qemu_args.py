"""The QEMU command line: reproducible machine arguments, RAM in a shared file."""

from __future__ import annotations

from pathlib import Path

from novacron.agent.vm.qemu_args import VMPaths, machine_args, qemu_argv
from novacron.agent.vm.spec import VMSpec


def test_kernel_vm_argv(tmp_path: Path) -> None:
    spec = VMSpec("web", 2, 256, kernel="/k", initrd="/i", cmdline="console=ttyS0 quiet")
    paths = VMPaths(tmp_path / "vms" / "web")
    argv = qemu_argv(spec, "tcg", paths)
    assert argv[0] == "qemu-system-x86_64"
    joined = " ".join(argv)
    assert "-machine pc,accel=tcg,memory-backend=ram0" in joined
    assert f"memory-backend-file,id=ram0,size=256M,mem-path={paths.ram},share=on" in joined
    assert "-smp 2 -m 256M" in joined and "-cpu qemu64" in joined
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"  # one argument, spaces intact
    assert "-qmp unix:qmp.sock,server=on,wait=off" in joined
    assert f"logfile={paths.serial_log}" in joined
    assert "-S" not in argv and "-incoming" not in argv


def test_destination_differs_only_in_ram_path_and_incoming(tmp_path: Path) -> None:
    spec = VMSpec("web", 1, 128, kernel="/k")
    src, dst = VMPaths(tmp_path / "a"), VMPaths(tmp_path / "b")
    src_args = machine_args(spec, "kvm", src.ram)
    dst_args = machine_args(spec, "kvm", dst.ram)
    differing = [(a, b) for a, b in zip(src_args, dst_args, strict=True) if a != b]
    assert len(differing) == 1 and str(src.ram) in differing[0][0] and str(dst.ram) in differing[0][1]
    assert "-cpu" in src_args and src_args[src_args.index("-cpu") + 1] == "host"
    incoming = qemu_argv(spec, "kvm", dst, incoming=True)
    assert incoming[-3:] == ["-S", "-incoming", "defer"]


def test_disk_vm_argv(tmp_path: Path) -> None:
    spec = VMSpec("db", 1, 512, disk="/images/db.qcow2", disk_format="qcow2")
    argv = qemu_argv(spec, "tcg", VMPaths(tmp_path), paused=True)
    assert "file=/images/db.qcow2,format=qcow2,if=virtio" in argv and "-kernel" not in argv
    assert argv[-1] == "-S"
