"""CPU models: the spec field and its default, what QEMU reports runnable here
(a real ``query-cpu-definitions`` under TCG), the ``cpu_models`` allow-list, and
refusals at create and at a migration destination's admission (real QEMU
probes; no guest boots)."""

from __future__ import annotations

from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.migration.qemu_port import QemuDestFactory
from novacron.agent.migration.vmport import AdmissionError
from novacron.agent.vm import AccelDetector, SpecError, VMManager
from novacron.agent.vm.cpumodels import CpuCatalog, cpu_signature
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.qemu_args import QEMU_BINARY
from novacron.agent.vm.spec import DEFAULT_CPU_MODEL, VMSpec, parse_spec

BASE = {"name": "v", "vcpus": 1, "memory_mb": 128, "kernel": "k"}


def test_spec_cpu_model_default_and_checks() -> None:
    assert parse_spec(BASE).cpu_model == DEFAULT_CPU_MODEL == "Nehalem"
    assert parse_spec({**BASE, "cpu_model": "qemu64"}).effective_cpu_model("kvm") == "qemu64"
    for bad in ("", "-x", "a b", "Nehalem,+avx", 7, "x" * 65):
        with pytest.raises(SpecError, match="cpu_model"):
            parse_spec({**BASE, "cpu_model": bad})
    with pytest.raises(SpecError, match="needs KVM"):
        parse_spec({**BASE, "cpu_model": "host", "accel": "tcg"})
    # a record from before CPU models keeps what such VMs ran with
    old = VMSpec.from_record({"name": "v", "vcpus": 1, "memory_mb": 128, "kernel": "k", "accel": "auto"})
    assert old.effective_cpu_model("tcg") == "qemu64" and old.effective_cpu_model("kvm") == "host"


def test_cpu_signature_of_this_host() -> None:
    sig = cpu_signature()
    vendor, family, model, _stepping, flags = sig.split("/")
    assert vendor and family.isdigit() and model.isdigit() and len(flags) == 12
    assert cpu_signature(Path("/nonexistent")) == ""


async def test_catalog_reports_runnable_models_and_allow_list() -> None:
    models = await CpuCatalog(QEMU_BINARY).models("tcg")
    assert models is not None and {"Nehalem", "qemu64"} <= models
    assert "host" not in models and "Skylake-Server" not in models  # TCG lacks their features
    narrowed = await CpuCatalog(QEMU_BINARY, ["qemu64", "Skylake-Server"]).models("tcg")
    assert narrowed == {"qemu64"}  # the allow-list narrows; it never adds
    assert await CpuCatalog("/nonexistent/qemu").models("tcg") is None  # unknown: not filtered


async def test_create_refuses_a_model_the_host_cannot_run(tmp_path: Path, guest: GuestImage) -> None:
    mgr = VMManager(tmp_path, AccelDetector(probe_kernels=[]), images=ImageDirs.of([guest.kernel.parent]),
                    cpus=CpuCatalog(QEMU_BINARY, host="host-x"))
    spec = {"name": "sky", "vcpus": 1, "memory_mb": 128, "kernel": str(guest.kernel), "accel": "tcg",
            "cpu_model": "Skylake-Server", "start": False}
    with pytest.raises(SpecError, match="host host-x cannot run CPU model 'Skylake-Server' under tcg"):
        await mgr.create(spec)
    assert mgr.vms == {} and list((tmp_path / "vms").glob("*")) == []
    assert (await mgr.create({**spec, "cpu_model": "Westmere"})).spec.cpu_model == "Westmere"


async def test_destination_admission_refuses_a_model_outside_the_allow_list(tmp_path: Path,
                                                                           guest: GuestImage) -> None:
    mgr = VMManager(tmp_path, AccelDetector(probe_kernels=[]), images=ImageDirs.of([guest.kernel.parent]),
                    cpus=CpuCatalog(QEMU_BINARY, ["Nehalem", "qemu64"], host="host-b"))
    spec = {"name": "west", "vcpus": 1, "memory_mb": 128, "kernel": str(guest.kernel), "accel": "tcg",
            "cpu_model": "Westmere"}
    with pytest.raises(AdmissionError, match="host host-b cannot run CPU model 'Westmere'"):
        await QemuDestFactory(mgr).prepare(spec, 128 << 20, "m-test")
    assert mgr.vms == {} and not (tmp_path / "incoming" / "west").exists()
