"""Accelerator detection: a /dev/kvm that exists is not trusted until a kernel
actually boots under it. Fake QEMUs stand in for the three outcomes; one test
boots the real kernel under TCG to show the probe recognises a live boot."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.vm.accel import AccelDetector, AccelInfo, AccelUnavailable, probe_kvm_boot

# Shell stand-ins for qemu-system-x86_64. Each records that it ran.
FAKE = {
    "boots": 'for a; do [ "$prev" = -serial ] && echo "Linux version 6.1" > "${a#file:}"; prev=$a; done; exec sleep 30',
    "hangs": "exec sleep 30",
    "fails": 'echo "Could not access KVM kernel module: Permission denied" >&2; exit 1',
}


def fake_qemu(tmp_path: Path, kind: str) -> tuple[str, Path]:
    runs = tmp_path / f"{kind}.runs"
    script = tmp_path / f"qemu-{kind}"
    script.write_text(f"#!/bin/sh\necho run >> {runs}\n{FAKE[kind]}\n")
    script.chmod(0o755)
    return str(script), runs


@pytest.fixture
def device(tmp_path: Path) -> Path:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    return dev


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinuz"
    k.write_bytes(b"kernel")
    return k


def detector(tmp_path: Path, device: Path, kernel: Path, qemu: str, cache: bool = True) -> AccelDetector:
    return AccelDetector(
        cache_file=tmp_path / "accel.json" if cache else None, probe_kernels=[kernel],
        device=device, qemu=qemu, probe_timeout=1.0,
    )  # fmt: skip


async def test_no_device_means_tcg(tmp_path: Path, kernel: Path) -> None:
    qemu, runs = fake_qemu(tmp_path, "boots")
    info = await detector(tmp_path, tmp_path / "absent", kernel, qemu).detect()
    assert (info.kvm_present, info.kvm_usable, info.default) == (False, False, "tcg")
    assert not runs.exists()  # nothing to probe


async def test_device_that_hangs_guests_is_not_usable(tmp_path: Path, device: Path, kernel: Path) -> None:
    qemu, runs = fake_qemu(tmp_path, "hangs")
    info = await detector(tmp_path, device, kernel, qemu).detect()
    assert (info.kvm_present, info.kvm_usable, info.default) == (True, False, "tcg")
    assert "printed nothing" in info.reason
    assert runs.read_text().count("run") == 1


async def test_device_that_boots_is_usable(tmp_path: Path, device: Path, kernel: Path) -> None:
    qemu, _runs = fake_qemu(tmp_path, "boots")
    info = await detector(tmp_path, device, kernel, qemu).detect()
    assert (info.kvm_present, info.kvm_usable, info.default) == (True, True, "kvm")


async def test_qemu_refusing_kvm_is_reported(tmp_path: Path, device: Path, kernel: Path) -> None:
    qemu, _runs = fake_qemu(tmp_path, "fails")
    info = await detector(tmp_path, device, kernel, qemu).detect()
    assert not info.kvm_usable and "Could not access KVM" in info.reason


async def test_answer_is_cached(tmp_path: Path, device: Path, kernel: Path) -> None:
    qemu, runs = fake_qemu(tmp_path, "boots")
    first = detector(tmp_path, device, kernel, qemu)
    assert (await first.detect()).kvm_usable
    assert (await first.detect()).kvm_usable  # in memory
    again = await detector(tmp_path, device, kernel, qemu).detect()  # from the cache file
    assert again.kvm_usable
    assert runs.read_text().count("run") == 1


async def test_no_probe_kernel(tmp_path: Path, device: Path) -> None:
    det = AccelDetector(probe_kernels=[], device=device)
    info = await det.detect()
    assert not info.kvm_usable and "no kernel" in info.reason


def test_resolve() -> None:
    hung = AccelInfo(True, False, "hangs")
    assert hung.resolve("auto") == "tcg" and hung.resolve("tcg") == "tcg"
    with pytest.raises(AccelUnavailable, match="kvm requested but not usable"):
        hung.resolve("kvm")
    good = AccelInfo(True, True, "ok")
    assert good.resolve("auto") == "kvm" and good.resolve("tcg") == "tcg"


@pytest.mark.e2e
async def test_probe_recognises_a_real_boot(guest: GuestImage) -> None:
    usable, reason = await probe_kvm_boot(guest.kernel, timeout=30, accel="tcg")
    assert usable, reason


def test_auto_detection_probes_the_configured_qemu(tmp_path: Path) -> None:
    from novacron.agent.config import AgentConfig
    from novacron.agent.daemon import make_accel

    cfg = AgentConfig(qemu_binary="/opt/qemu/bin/qemu-system-x86_64", accel_cache=str(tmp_path / "c"))
    detector = make_accel(cfg)
    assert isinstance(detector, AccelDetector)
    assert detector.qemu == "/opt/qemu/bin/qemu-system-x86_64"
