"""What an agent restart makes of the VM records it finds (no QEMU needed)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from novacron.agent.records import RecordError, read_record
from novacron.agent.records import write_record as write_record_atomic
from novacron.agent.vm import AccelDetector, VMManager, machine
from novacron.agent.vm.recovery import qemus_under


def write_record(state_dir: Path, name: str, state: str, pid: int | None, **extra: object) -> None:
    folder = state_dir / "vms" / name
    folder.mkdir(parents=True)
    spec = {"name": name, "vcpus": 1, "memory_mb": 128, "kernel": "/k", "initrd": "", "cmdline": "",
            "disk": "", "disk_format": "", "accel": "auto"}  # fmt: skip
    (folder / "vm.json").write_text(json.dumps({"spec": spec, "accel": "tcg", "state": state, "pid": pid, **extra}))


async def test_records_are_listed_with_honest_states(tmp_path: Path) -> None:
    write_record(tmp_path, "off", "stopped", None)
    write_record(tmp_path, "gone", "running", 2**22 + 12345)  # no such process
    write_record(tmp_path, "bad", "crashed", None, error="QEMU exited unexpectedly")
    write_record(tmp_path, "impostor", "running", 1)  # pid 1 is alive but is not this VM's QEMU
    (tmp_path / "vms" / "junk").mkdir()
    (tmp_path / "vms" / "junk" / "vm.json").write_text("{not json")
    mgr = VMManager(tmp_path, AccelDetector(probe_kernels=[]))
    await mgr.load()
    states = {vm.name: (vm.status()["state"], vm.pid) for vm in mgr.list()}
    assert states == {"off": ("stopped", None), "gone": ("crashed", None), "bad": ("crashed", None),
                      "impostor": ("crashed", None)}  # fmt: skip
    assert "gone" in mgr.get("gone").error and mgr.get("bad").error == "QEMU exited unexpectedly"
    assert json.loads((tmp_path / "vms" / "gone" / "vm.json").read_text())["state"] == "crashed"
    assert not (tmp_path / "vms" / "junk").exists()  # an unreadable record must not block the name


async def test_migrating_is_reported_while_the_engine_holds_the_vm(tmp_path: Path) -> None:
    write_record(tmp_path, "m", "stopped", None)
    mgr = VMManager(tmp_path, AccelDetector(probe_kernels=[]))
    await mgr.load()
    vm = mgr.get("m")
    vm.migrating = True
    assert vm.status()["state"] == "stopped"  # only a live VM migrates
    vm.state = "running"
    assert vm.status()["state"] == "migrating"


def test_filesystem_type() -> None:
    from novacron.agent.vm.ramfile import filesystem_type

    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/dev/shm/some/file")) == "tmpfs"


def fake_qemu(folder: Path, name: str) -> subprocess.Popen[bytes]:
    """A process that looks like a VM's QEMU to the start-up scan (its folder, its name)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-name", f"guest={name}"],
                            cwd=folder)  # fmt: skip


async def test_unfinished_operations_are_settled(tmp_path: Path) -> None:
    write_record(tmp_path, "half-created", "stopped", None, pending="create")
    write_record(tmp_path, "half-started", "stopped", None, pending="start")
    write_record(tmp_path, "half-deleted", "stopped", None, pending="delete")
    (tmp_path / "vms" / "no-record").mkdir()  # killed between mkdir and the first record
    for name in ("half-created", "half-started"):
        (tmp_path / "vms" / name / "ram").write_bytes(b"\0" * 4096)
        (tmp_path / "vms" / name / "qmp.sock").write_bytes(b"")
    mgr = VMManager(tmp_path, AccelDetector(probe_kernels=[]))
    await mgr.load()
    assert [vm.name for vm in mgr.list()] == ["half-started"]
    vm = mgr.get("half-started")
    assert vm.state == "stopped" and not vm.ram_path.exists() and not vm.paths.qmp.exists()
    assert json.loads(vm.paths.meta.read_text())["pending"] == ""
    assert sorted(p.name for p in (tmp_path / "vms").iterdir()) == ["half-started"]  # names free again


async def test_orphan_qemus_are_killed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "ADOPT_QMP_TIMEOUT_S", 0.5)
    write_record(tmp_path, "off", "stopped", None)
    write_record(tmp_path, "mute", "running", None)  # its "QEMU" never answers QMP
    write_record(tmp_path, "new", "stopped", None, pending="create")
    (tmp_path / "vms" / "ghost").mkdir()  # no record at all
    procs = {n: fake_qemu(tmp_path / "vms" / n, n) for n in ("off", "mute", "new", "ghost")}
    stranger = fake_qemu(tmp_path / "vms" / "off", "someone-else")  # not this VM's name
    try:
        for _ in range(100):  # bounded: until the scan can see all five
            if sum(len(v) for v in qemus_under(tmp_path / "vms").values()) == 5:
                break
            time.sleep(0.02)
        mgr = VMManager(tmp_path, AccelDetector(probe_kernels=[]))
        await mgr.load()
        for name, proc in [*procs.items(), ("stranger", stranger)]:
            assert proc.wait(10) == -signal.SIGKILL, name
        assert {vm.name: vm.state for vm in mgr.list()} == {"off": "stopped", "mute": "crashed"}
        assert not (tmp_path / "vms" / "new").exists() and not (tmp_path / "vms" / "ghost").exists()
        assert qemus_under(tmp_path / "vms") == {}
    finally:
        for proc in [*procs.values(), stranger]:
            proc.kill()
            proc.wait()


def test_records_are_written_whole(tmp_path: Path) -> None:
    write_record_atomic(tmp_path / "r.json", "vm", 1, {"a": 1})
    assert read_record(tmp_path / "r.json", "vm", 1) == {"kind": "vm", "format": 1, "a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left
    with pytest.raises(RecordError, match="journal"):
        read_record(tmp_path / "r.json", "journal", 1)
    write_record_atomic(tmp_path / "r.json", "vm", 2, {})
    with pytest.raises(RecordError, match="newer"):
        read_record(tmp_path / "r.json", "vm", 1)


async def test_a_newer_agents_record_is_left_alone(tmp_path: Path) -> None:
    write_record(tmp_path, "future", "running", None, format=99)  # e.g. after a downgrade
    proc = fake_qemu(tmp_path / "vms" / "future", "future")
    try:
        mgr = VMManager(tmp_path, AccelDetector(probe_kernels=[]))
        await mgr.load()
        assert mgr.list() == [] and (tmp_path / "vms" / "future" / "vm.json").exists()
        assert proc.poll() is None  # neither adopted nor killed
    finally:
        proc.kill()
        proc.wait()


async def test_half_received_vms_are_removed_with_their_qemu(tmp_path: Path) -> None:
    from novacron.agent.migration.qemu_port import clean_stale_incoming

    folder = tmp_path / "incoming" / "in1"
    folder.mkdir(parents=True)  # killed before its record named the pid
    proc = fake_qemu(folder, "in1")
    try:
        for _ in range(100):  # bounded: until the scan can see it
            if qemus_under(tmp_path / "incoming"):
                break
            time.sleep(0.02)
        assert await clean_stale_incoming(tmp_path) == ["in1"]
        assert proc.wait(10) == -signal.SIGKILL and not folder.exists()
    finally:
        proc.kill()
        proc.wait()
