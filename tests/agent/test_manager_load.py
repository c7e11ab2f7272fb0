"""What an agent restart makes of the VM records it finds (no QEMU needed)."""

from __future__ import annotations

import json
from pathlib import Path

from novacron.agent.vm import AccelDetector, VMManager


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
