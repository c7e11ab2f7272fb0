"""Disks through a real agent's API: bad disks are a 400 that changes nothing; a created
disk lives in the VM folder and goes with ``vm delete``; a shared image stays."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from novacron.agent.guest import cache_root, ensure_guest
from novacron.agent.local import LocalAgent

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def spec(name: str, disks: Any) -> dict[str, Any]:
    g = ensure_guest()
    return {"name": name, "vcpus": 1, "memory_mb": 128, "accel": "tcg", "kernel": str(g.kernel),
            "initrd": str(g.initrd), "cmdline": g.cmdline, "disks": disks, "start": False}


async def test_disks_through_the_api() -> None:
    images = Path(tempfile.mkdtemp(prefix="nc-dapi-"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(images / "shared.raw"), "4M"], check=True)
    (images / "out.raw").symlink_to("/etc/shadow")
    try:
        async with LocalAgent("dapi", accel="tcg", image_dirs=[cache_root(), images]) as a:
            for disks, field in [
                ([{"size_gb": 1, "path": "/etc/shadow"}], "disks[0].path"),
                ([{"image": "/etc/shadow", "storage": "shared"}], "disks[0].image"),
                ([{"image": "out.raw", "storage": "shared"}], "disks[0].image"),
                ([{"image": "../../etc/passwd"}], "disks[0].image"),
                ([{"size_gb": 1}, {"backing": "missing.qcow2"}], "disks[1].backing"),
                ([{"size_gb": 0}], "disks[0].size_gb"),
                ([{"size_gb": 1, "bus": "ide"}], "disks[0].bus"),
            ]:
                status, doc = await a.request("POST", "/v1/vms", spec("bad", disks))
                assert status == 400 and doc["error"].startswith(field), (disks, status, doc)
            assert not (a.state_dir / "vms" / "bad").exists()
            status, doc = await a.request("POST", "/v1/vms", spec("ok", [
                {"size_gb": 0.01}, {"image": "shared.raw", "storage": "shared", "bus": "virtio-scsi"}]))
            assert status == 201, doc
            assert doc["spec"]["disks"][0] == {"format": "qcow2", "bus": "virtio-blk", "storage": "local",
                                               "size_gb": 0.009765625}
            disk = a.state_dir / "vms" / "ok" / "disk0.qcow2"
            assert disk.is_file()
            status, doc = await a.request("DELETE", "/v1/vms/ok")
            assert status == 200, doc
            assert not disk.exists() and (images / "shared.raw").is_file()
    finally:
        shutil.rmtree(images, ignore_errors=True)
