"""Issue 11: a VM folder is writable by QEMU's group, so a compromised QEMU can
plant symlinks and fifos in it. The agent (root) must refuse them and never
touch what a symlink points at. No QEMU is booted: names are planted by hand."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.records import RecordError, read_record, write_record
from novacron.agent.safefs import UnsafeFile, create_new, open_regular, read_regular
from novacron.agent.vm import VM, VMStartError
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.qemu_args import VMPaths
from novacron.agent.vm.ramfile import MIB, prepare_ram_file
from novacron.agent.vm.sandbox import QemuIdentity
from novacron.agent.vm.spec import parse_spec

SECRET = b"root:secret-hash:19000::::::\n"
NOBODY = 65534  # an unprivileged group for share_fd's fchown


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-only file that stands for /etc/shadow or /etc/ld.so.preload."""
    path = tmp_path / "victim"
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def untouched(victim: Path) -> bool:
    st = victim.stat()
    return victim.read_bytes() == SECRET and stat.S_IMODE(st.st_mode) == 0o600 and st.st_gid == os.getgid()


def plant_symlink(name: Path, victim: Path) -> None:
    name.parent.mkdir(parents=True, exist_ok=True)
    name.symlink_to(victim)


def plant_fifo(name: Path) -> None:
    name.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(name)


def test_safe_open_refuses_symlinks_and_fifos(tmp_path: Path, victim: Path) -> None:
    link, fifo = tmp_path / "vm" / "link", tmp_path / "vm" / "fifo"
    plant_symlink(link, victim)
    plant_fifo(fifo)
    for flags in (os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_CREAT | os.O_APPEND):
        with pytest.raises(UnsafeFile):
            open_regular(link, flags)
        with pytest.raises(UnsafeFile):  # O_NONBLOCK: refused at once, never hangs
            open_regular(fifo, flags)
    with pytest.raises(UnsafeFile):
        read_regular(link)
    hardlink = tmp_path / "vm" / "hardlink"
    os.link(victim, hardlink)  # QEMU cannot read the victim, but could link it (protected_hardlinks=0)
    with pytest.raises(UnsafeFile):
        open_regular(hardlink, os.O_WRONLY | os.O_APPEND)
    hardlink.unlink()
    assert untouched(victim)
    # a regular file opens, in blocking mode again; another inode under its name is refused
    regular, other = tmp_path / "vm" / "file", tmp_path / "vm" / "other"
    regular.write_bytes(b"x")
    other.write_bytes(b"y")
    fd = open_regular(regular, os.O_RDONLY, same_as=regular.stat())
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)
    original = regular.stat()
    other.replace(regular)
    with pytest.raises(UnsafeFile):
        open_regular(regular, os.O_RDONLY, same_as=original)


def test_create_new_replaces_a_planted_symlink(tmp_path: Path, victim: Path) -> None:
    name = tmp_path / "vm" / "new"
    plant_symlink(name, victim)
    fd = create_new(name, os.O_WRONLY)
    try:
        os.write(fd, b"mine")
    finally:
        os.close(fd)
    assert not name.is_symlink() and name.read_bytes() == b"mine"
    assert untouched(victim)


def test_records_refuse_planted_names(tmp_path: Path, victim: Path) -> None:
    folder = tmp_path / "vms" / "g1"
    record = folder / "vm.json"
    plant_symlink(folder / ".vm.json.tmp", victim)  # the temp file write_record creates
    write_record(record, "vm", 1, {"state": "stopped"})
    assert untouched(victim)
    assert read_record(record, "vm", 1)["state"] == "stopped"
    assert not record.is_symlink()

    record.unlink()
    plant_symlink(record, victim)
    with pytest.raises(RecordError):
        read_record(record, "vm", 1)
    record.unlink()
    plant_fifo(record)
    with pytest.raises(RecordError):  # a fifo must not hang the agent's startup
        read_record(record, "vm", 1)
    plant_fifo(folder / ".x.tmp")
    write_record(folder / "x", "vm", 1, {})  # a fifo as the temp file is replaced, not opened
    assert stat.S_ISREG((folder / "x").stat().st_mode)


async def test_ram_file_is_created_fresh_and_shared_by_descriptor(tmp_path: Path, victim: Path) -> None:
    ram = tmp_path / "vms" / "g1" / "ram"
    plant_symlink(ram, victim)
    qemu = QemuIdentity(uid=NOBODY, gid=NOBODY, name="nobody")
    created = await prepare_ram_file(ram, 2 * MIB, qemu.share_fd)
    st = os.lstat(ram)
    assert (created.st_ino, created.st_dev) == (st.st_ino, st.st_dev)
    os.close(open_regular(ram, os.O_RDWR, same_as=created))  # what migration reopens
    assert stat.S_ISREG(st.st_mode) and st.st_size == 2 * MIB
    assert st.st_gid == NOBODY and stat.S_IMODE(st.st_mode) == 0o660
    assert untouched(victim)

    # what the migration source/destination do before mmap: refuse a swapped name
    replacement = ram.with_name("other")
    replacement.write_bytes(b"\0" * 4096)
    replacement.replace(ram)  # a regular file, but not the agent's
    with pytest.raises(UnsafeFile):
        open_regular(ram, os.O_RDWR, same_as=created)
    ram.unlink()
    plant_symlink(ram, victim)
    for flags in (os.O_RDONLY, os.O_RDWR):
        with pytest.raises(UnsafeFile):
            open_regular(ram, flags)
    ram.unlink()
    plant_fifo(ram)
    with pytest.raises(UnsafeFile):
        open_regular(ram, os.O_RDWR)
    assert untouched(victim)


def test_share_file_does_not_follow_a_symlink(tmp_path: Path, victim: Path) -> None:
    name = tmp_path / "vms" / "g1" / "migrate.sock"
    plant_symlink(name, victim)
    with pytest.raises(UnsafeFile):
        QemuIdentity(uid=NOBODY, gid=NOBODY, name="nobody").share_file(name)
    assert untouched(victim)


def make_vm(tmp_path: Path, guest: GuestImage) -> VM:
    spec = parse_spec({"name": "g1", "vcpus": 1, "memory_mb": 16, "kernel": str(guest.kernel),
                       "initrd": str(guest.initrd), "accel": "tcg"})  # fmt: skip
    images = ImageDirs.of([guest.kernel.parent])
    folder = tmp_path / "vms" / "g1"
    folder.mkdir(parents=True)
    return VM(spec, "tcg", VMPaths(folder), images, qemu="/nonexistent/qemu")


async def test_vm_start_refuses_a_planted_qemu_log(tmp_path: Path, victim: Path, guest: GuestImage) -> None:
    vm = make_vm(tmp_path, guest)
    plant_symlink(vm.paths.qemu_log, victim)  # would become the next QEMU's stdout
    with pytest.raises(VMStartError):
        await vm.start()
    assert untouched(victim)
    assert not vm.ram_path.exists() and vm.pid is None


async def test_vm_start_refuses_a_planted_serial_log(tmp_path: Path, victim: Path, guest: GuestImage) -> None:
    vm = make_vm(tmp_path, guest)
    plant_fifo(vm.serial_log)
    with pytest.raises(UnsafeFile):
        await asyncio.wait_for(vm.start(), 10)
    assert not vm.ram_path.exists() and vm.pid is None


def test_console_and_log_tail_do_not_read_through_planted_names(tmp_path: Path, victim: Path,
                                                                 guest: GuestImage) -> None:
    vm = make_vm(tmp_path, guest)
    plant_symlink(vm.serial_log, victim)
    with pytest.raises(UnsafeFile):
        vm.read_serial()
    plant_symlink(vm.paths.qemu_log, victim)
    assert vm._qemu_log_tail() == ""
    vm.serial_log.unlink()
    plant_fifo(vm.serial_log)
    with pytest.raises(UnsafeFile):
        vm.read_serial()
    vm.serial_log.unlink()
    assert vm.read_serial() == b""  # no log yet is not an error
    assert untouched(victim)
