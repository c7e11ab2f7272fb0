"""Disks in the VM spec: strict validation, files only in the VM folder or the image dirs,
QEMU given descriptors and named block nodes, created disks gone with the VM."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.vm.disks import DiskError, DiskStore, blockdev_args, content_digest
from novacron.agent.vm.images import ImageDirs
from novacron.agent.vm.spec import Disk, SpecError, VMSpec, parse_spec


def spec_doc(disks: Any) -> dict[str, Any]:
    return {"name": "d1", "vcpus": 1, "memory_mb": 128, "kernel": "vmlinuz", "disks": disks}


def test_disks_parse_with_defaults() -> None:
    spec = parse_spec(spec_doc([
        {"size_gb": 0.0625},
        {"format": "raw", "bus": "virtio-scsi", "size_gb": 1, "storage": "local"},
        {"image": "shared/ref.raw", "storage": "shared"},
        {"backing": "base.qcow2"},
        {"image": "seed.qcow2"},
    ]))
    assert spec.disks == (
        Disk("qcow2", "virtio-blk", "local", size_bytes=64 << 20),
        Disk("raw", "virtio-scsi", "local", size_bytes=1 << 30),
        Disk("raw", "virtio-blk", "shared", image="shared/ref.raw"),
        Disk("qcow2", "virtio-blk", "local", backing="base.qcow2"),
        Disk("qcow2", "virtio-blk", "local", image="seed.qcow2"),
    )
    # the record keeps them: a restarted agent or a destination gets the same disks
    assert VMSpec.from_record(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize(("disks", "message"), [
    ("disk0", "disks: expected a list"),
    ([{"size_gb": 1}] * 9, "at most 8 disks"),
    ([5], "disks[0]: expected an object"),
    ([{"size_gb": 1, "path": "/etc/shadow"}], "disks[0].path: unknown field"),
    ([{"size_gb": 1, "format": "vmdk"}], "disks[0].format: expected one of raw, qcow2"),
    ([{"size_gb": 1, "bus": "ide"}], "disks[0].bus: expected one of virtio-blk, virtio-scsi"),
    ([{"size_gb": 1, "storage": "nfs"}], "disks[0].storage: expected one of local, shared"),
    ([{}], "give exactly one of size_gb"),
    ([{"size_gb": 1, "image": "a.raw"}], "give exactly one of size_gb"),
    ([{"size_gb": 0}], "disks[0].size_gb: expected a number"),
    ([{"size_gb": -1}], "disks[0].size_gb"),
    ([{"size_gb": True}], "disks[0].size_gb"),
    ([{"size_gb": "1"}], "disks[0].size_gb"),
    ([{"size_gb": 10**9}], "disks[0].size_gb"),
    ([{"size_gb": 1e-9}], "at least 1 MiB"),
    ([{"image": "../../etc/shadow"}], "'..' is not allowed"),
    ([{"image": "a,b.raw"}], "without ','"),
    ([{"image": ""}], "disks[0].image: expected an image name"),
    ([{"image": "a.raw", "format": "qcow2"}], "does not match the image name"),
    ([{"backing": "b.qcow2", "format": "raw"}], "a disk with a backing image is qcow2"),
    ([{"size_gb": 1, "storage": "shared"}], "a shared disk is an image"),
    ([{"image": "x.raw", "storage": "shared"}, {"image": "x.raw", "storage": "shared"}], "named twice"),
])
def test_bad_disks_are_named(disks: Any, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_spec(spec_doc(disks))


@pytest.fixture
def store(tmp_path: Path) -> tuple[DiskStore, Path, Path]:
    images, vmdir = tmp_path / "images", tmp_path / "vm"
    images.mkdir()
    vmdir.mkdir()
    return DiskStore(ImageDirs.of([images])), images, vmdir


def img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def test_create_open_and_blockdev(store: tuple[DiskStore, Path, Path]) -> None:
    ds, images, vmdir = store
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "base.qcow2"), "32M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(images / "shared.raw"), "8M"], check=True)
    spec = parse_spec(spec_doc([{"size_gb": 0.0625}, {"format": "raw", "size_gb": 0.01, "bus": "virtio-scsi"},
                                {"backing": "base.qcow2"}, {"image": "shared.raw", "storage": "shared"},
                                {"image": "base.qcow2"}]))
    ds.check(spec, creating=True)
    made = asyncio.run(ds.create_local(spec, vmdir))
    assert [p.name for p in made] == ["disk0.qcow2", "disk1.raw", "disk2.qcow2", "disk4.qcow2"]
    assert img_info(vmdir / "disk0.qcow2")["virtual-size"] == 64 << 20
    assert img_info(vmdir / "disk1.raw")["virtual-size"] == 10 << 20
    overlay = img_info(vmdir / "disk2.qcow2")
    # the header keeps the image's name, never a host path; QEMU gets the node
    assert overlay["virtual-size"] == 32 << 20 and overlay["backing-filename"] == "base.qcow2"
    assert img_info(vmdir / "disk4.qcow2")["virtual-size"] == 32 << 20  # a private copy
    assert not (images / "disk0.qcow2").exists()  # nothing is created among the images
    opened = ds.open(spec, vmdir)
    try:
        args = blockdev_args(spec, opened)
        joined = " ".join(args)
        assert str(vmdir) not in joined and str(images) not in joined  # descriptors only
        assert "node-name=disk0," in joined and "virtio-blk-pci,drive=disk0" in joined
        assert "virtio-scsi-pci,id=scsi0" in joined and "scsi-hd,drive=disk1,bus=scsi0.0" in joined
        assert "driver=qcow2,node-name=disk2,file=disk2-file,backing=base2" in joined
        assert "node-name=base2,file=base2-file,read-only=on" in joined
        assert len(opened.fds) == 2 * 5 + 1
        assert all(f"fd={fd}," in joined for fd in opened.fds)
    finally:
        opened.close()
    # a second create into the same folder refuses, never overwrites
    with pytest.raises(DiskError, match="exists already"):
        asyncio.run(ds.create_local(spec, vmdir))


def test_refused_images_and_planted_files(store: tuple[DiskStore, Path, Path], tmp_path: Path) -> None:
    ds, images, vmdir = store
    outside = tmp_path / "secret.raw"
    outside.write_bytes(b"s" * 4096)
    (images / "escape.raw").symlink_to(outside)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "chain.qcow2"), "-b",
                    str(outside), "-F", "raw"], check=True)
    for disks, message in [
        ([{"image": "escape.raw", "storage": "shared"}], "disks[0].image: no image 'escape.raw'"),
        ([{"image": str(outside), "storage": "shared"}], "is not a file inside an image directory"),
        ([{"backing": "chain.qcow2"}], "disks[0].backing: qcow2 image 'chain.qcow2' refers to another file"),
        ([{"image": "missing.raw"}], "no image 'missing.raw'"),
    ]:
        with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ds.check(parse_spec(spec_doc(disks)), creating=True)
    # a local disk QEMU replaced by a symlink (it can write the VM folder) is refused
    spec = parse_spec(spec_doc([{"size_gb": 0.01}]))
    asyncio.run(ds.create_local(spec, vmdir))
    (vmdir / "disk0.qcow2").unlink()
    (vmdir / "disk0.qcow2").symlink_to(outside)
    with pytest.raises(DiskError, match="symlink"):
        ds.open(spec, vmdir)


def test_migration_plan_and_destination_disks(store: tuple[DiskStore, Path, Path], tmp_path: Path) -> None:
    ds, images, vmdir = store
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images / "base.qcow2"), "16M"], check=True)
    spec = parse_spec(spec_doc([{"backing": "base.qcow2"}, {"size_gb": 0.03, "format": "raw"},
                                {"image": "base.qcow2", "storage": "shared"}]))
    asyncio.run(ds.create_local(spec, vmdir))
    plan = asyncio.run(ds.migration_plan(spec, vmdir))
    fd = os.open(images / "base.qcow2", os.O_RDONLY)
    try:
        digest = content_digest(fd)
    finally:
        os.close(fd)
    assert plan == [{"index": 0, "size": 16 << 20, "format": "qcow2", "backing_digest": digest},
                    {"index": 1, "size": 30 << 20, "format": "raw"}]
    dest = tmp_path / "dest"
    dest.mkdir()
    asyncio.run(ds.create_for_migration(spec, dest, plan))
    assert sorted(p.name for p in dest.iterdir()) == ["disk0.qcow2", "disk1.raw"]
    assert img_info(dest / "disk0.qcow2")["backing-filename"] == "base.qcow2"
    # a different backing image at the destination is refused, and nothing is left
    other = tmp_path / "dest2"
    other.mkdir()
    bad = [dict(plan[0], backing_digest="0" * 64), plan[1]]
    with pytest.raises(DiskError, match="differs from the source's"):
        asyncio.run(ds.create_for_migration(spec, other, bad))
    assert list(other.iterdir()) == []


def test_spec_round_trips_through_its_own_form() -> None:
    """A migration sends ``to_dict`` and the destination parses it as a new spec."""
    spec = parse_spec(spec_doc([{"size_gb": 0.0625}, {"backing": "b.qcow2", "size_gb": 3.3},
                                {"image": "x.raw", "storage": "shared", "bus": "virtio-scsi"}]))
    doc = json.loads(json.dumps(spec.to_dict()))
    again = parse_spec({k: v for k, v in doc.items() if v not in ("", None)})
    assert again.disks == spec.disks


def test_cli_data_disk_flag() -> None:
    import argparse

    from novacron.cli.vm import disk_arg

    assert disk_arg("size_gb=20,bus=virtio-scsi") == {"size_gb": 20, "bus": "virtio-scsi"}
    assert disk_arg("image=nfs/db.raw,storage=shared") == {"image": "nfs/db.raw", "storage": "shared"}
    assert disk_arg("backing=base.qcow2,size_gb=0.5") == {"backing": "base.qcow2", "size_gb": 0.5}
    for bad in ("size_gb", "path=/etc/shadow", "size_gb=x", "size_gb=1,size_gb=2"):
        with pytest.raises(argparse.ArgumentTypeError):
            disk_arg(bad)
