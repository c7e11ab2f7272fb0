"""Disks that move with the VM, through two real agents on loopback.

A guest writes checksummed blocks to a local qcow2 disk (``vda``) and, first, the same
blocks to a shared raw disk (``vdb``: one file in an image dir both agents list, never
copied, only handed over). It migrates A -> B -> A; after each hop its own verifier
passes on both disks, and nothing of the VM is left on the host it left.

The byte-for-byte check: with the guest paused on A (``stop`` drains and flushes its
disks), ``qemu-img compare`` of the migrated local disk against the shared disk. The
two were written by the guest through different paths (one mirrored over the
channel twice, one never moved), so they agree only if the mirror lost nothing. A
pause may land between the two writes of one block (reference first, then the local
disk); then the single difference vanishes after the guest runs on and is paused
again, which a lost block never does: up to five pauses are tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from novacron.agent.guest import cache_root, ensure_guest
from novacron.agent.local import LocalAgent
from tests.migration.agents import Api
from tests.migration.qemu_helpers import CuttableProxy, qemu_processes_using

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]
SECRET = secrets.token_urlsafe(32)
VM = "dsk"
DISK_VERIFY = re.compile(r"NOVACRON-DISK-VERIFY boot=(\w+) pass=(\d+) written=(\d+) bad=(\d+) result=(\w+)")
BLOCKS = 2048  # 8 MiB the guest rewrites


def spec(images: Path, name: str = VM, *, ref: bool = True, seed: str = "") -> dict[str, Any]:
    g = ensure_guest()
    disks: list[dict[str, Any]] = [{"image": seed} if seed else {"size_gb": 0.0625}]
    if ref:
        disks.append({"image": "ref.raw", "storage": "shared"})
    return {"name": name, "vcpus": 1, "memory_mb": 128, "accel": "tcg", "kernel": str(g.kernel),
            "initrd": str(g.initrd), "disks": disks,
            "cmdline": g.disk_cmdline("vda", "vdb" if ref else "", rate_kb=512, verify_s=2, blocks=BLOCKS)}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def images() -> AsyncIterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="nc-dimg-"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(d / "ref.raw"), str(BLOCKS * 4096)], check=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def agent(name: str, images: Path, **kw: Any) -> LocalAgent:
    return LocalAgent(name, cluster_secret=SECRET, accel="tcg", image_dirs=[cache_root(), images], **kw)


async def verified_after(api: Api, offset: int, passes: int = 2, boot: str = "", vm: str = VM) -> str:
    """Wait for ``passes`` disk verifier results printed after ``offset``; all must be ok."""
    text = ""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    while True:
        chunk, offset = await api.console(vm, offset)
        text += chunk
        results = DISK_VERIFY.findall(text)
        assert "NOVACRON-DISK-ERROR" not in text and "NOVACRON-DISK-BAD" not in text, text[-2000:]
        assert all(r[4] == "ok" and r[3] == "0" for r in results), results
        if len(results) >= passes:
            assert not boot or all(r[0] == boot for r in results), results  # no reboot
            assert int(results[-1][2]) > 0
            return str(results[-1][0])
        assert loop.time() < deadline, f"no disk verification on the console: {text[-500:]!r}"
        await asyncio.sleep(0.3)


async def hop(src: LocalAgent, dst: LocalAgent, boot: str) -> dict[str, Any]:
    s, d = Api(src), Api(dst)
    pid = (await s.ok("GET", f"/v1/vms/{VM}"))["pid"]
    mig = await s.migrate(VM, dst, test_digest=True, downtime_ms=300)
    st = await s.wait_migration(mig["id"], timeout=240)
    assert st["phase"] == "completed", st["error"]
    m = st["metrics"]
    assert st["digest"]["equal"] is True
    assert m["disk_bytes"] > 0 and m["disk_ready_s"] is not None, m
    _, offset = await d.console(VM)
    await verified_after(d, offset, boot=boot)
    # nothing left where it was: QEMU, VM folder (with its local disk), relay sockets
    assert not os.path.exists(f"/proc/{pid}")
    assert not (src.state_dir / "vms" / VM).exists()
    assert qemu_processes_using(src.state_dir) == []
    incoming = dst.state_dir / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    print(f"hop {src.name}->{dst.name}: disk {m['disk_bytes']} B ready after {m['disk_ready_s']} s, "
          f"downtime {m['downtime_ms']} ms ({m['downtime_parts']}), total {m['total_s']} s, wire {m['bytes_wire']} B")
    return st


def compare(disk: Path, ref: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", str(disk), str(ref)],
                          capture_output=True, text=True, timeout=120)


async def test_local_disk_moves_a_b_a(images: Path) -> None:
    async with agent("da", images) as a, agent("db", images) as b:
        api_a = Api(a)
        await api_a.ok("POST", "/v1/vms", spec(images), want=201)
        boot = await verified_after(api_a, 0, passes=1)
        await hop(a, b, boot)
        await hop(b, a, boot)
        disk = a.state_dir / "vms" / VM / "disk0.qcow2"
        for attempt in range(5):
            await api_a.ok("POST", f"/v1/vms/{VM}/pause")
            done = compare(disk, images / "ref.raw")
            if done.returncode == 0:
                break
            print("compare attempt", attempt, done.stdout.strip(), done.stderr.strip())
            await api_a.ok("POST", f"/v1/vms/{VM}/resume")
            await asyncio.sleep(0.5)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "identical" in done.stdout
        await api_a.ok("POST", f"/v1/vms/{VM}/resume")
        _, offset = await api_a.console(VM)
        await verified_after(api_a, offset, passes=1, boot=boot)
        # vm delete removes the disk it created; the shared image stays
        await api_a.ok("DELETE", f"/v1/vms/{VM}")
        assert not disk.exists() and (images / "ref.raw").exists()
        assert not (b.state_dir / "vms" / VM).exists()


async def test_overlay_moves_without_its_backing_image(images: Path) -> None:
    """A qcow2 overlay on a 64 MiB backing image both hosts hold (same sha256): only the
    overlay's clusters cross; the guest reads the backing data through the destination's copy."""
    base = images / "base.qcow2"
    raw = images / "base.raw"
    raw.write_bytes(os.urandom(64 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)], check=True)
    raw.unlink()
    doc = spec(images, ref=False)
    doc["disks"] = [{"backing": "base.qcow2"}]
    async with agent("oa", images) as a, agent("ob", images) as b:
        api_a = Api(a)
        await api_a.ok("POST", "/v1/vms", doc, want=201)
        boot = await verified_after(api_a, 0, passes=1)
        await hop(a, b, boot)
        overlay = b.state_dir / "vms" / VM / "disk0.qcow2"
        # the guest rewrites only the first 8 MiB of the 64 MiB disk: the destination's
        # overlay holds data there and nowhere else, so none of the backing image was sent
        # (disk_bytes depends on how often the guest re-dirties copied chunks meanwhile)
        top = json.loads(subprocess.run(
            ["qemu-img", "map", "-U", "--output=json",
             json.dumps({"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": str(overlay)}},
                        separators=(",", ":")).join(("json:", ""))],
            capture_output=True, text=True, check=True).stdout)
        written = [e for e in top if e["data"]]
        assert written and all(e["start"] + e["length"] <= BLOCKS * 4096 for e in written), written
        info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(overlay)],
                              capture_output=True, text=True, check=True).stdout
        assert '"backing-filename": "base.qcow2"' in info
        # every block the guest has not written still reads as the backing image's data
        await Api(b).ok("POST", f"/v1/vms/{VM}/pause")
        done = subprocess.run(["qemu-img", "compare", "-U",
                               f"json:{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{overlay}\"}},"
                               f"\"backing\":{{\"driver\":\"qcow2\",\"file\":{{\"driver\":\"file\",\"filename\":\"{base}\"}}}}}}",
                               str(base)], capture_output=True, text=True)
        print("overlay vs base:", done.stdout.strip(), done.stderr.strip())
        # differs exactly where the guest wrote (its first 8 MiB), never beyond
        m = re.search(r"offset (\d+)", done.stdout)
        assert done.returncode == 1 and m and int(m.group(1)) < BLOCKS * 4096
        await Api(b).ok("POST", f"/v1/vms/{VM}/resume")


async def test_copy_of_an_image_both_hosts_hold_moves_by_digest(images: Path) -> None:
    """A local disk copied from a 64 MiB image that both hosts hold: the clusters the guest
    has not rewritten cross as digests (diskdedup.py) and each destination rebuilds them
    from its own copy of the image. After A -> B -> A the guest's own checks pass, and the
    disk reads as the image everywhere the guest did not write."""
    tpl = images / "tpl.qcow2"
    raw = images / "tpl.raw"
    raw.write_bytes(os.urandom(64 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(tpl)], check=True)
    raw.unlink()
    clusters = (64 << 20) // (64 << 10)
    written = BLOCKS * 4096 // (64 << 10)  # the guest rewrites its first 8 MiB
    async with agent("ta", images) as a, agent("tb", images) as b:
        api_a = Api(a)
        await api_a.ok("POST", "/v1/vms", spec(images, ref=False, seed=tpl.name), want=201)
        boot = await verified_after(api_a, 0, passes=1)
        for src, dst in ((a, b), (b, a)):
            m = (await hop(src, dst, boot))["metrics"]
            named = m["disk_dedup"].get("clusters_named", 0)
            print(f"{src.name}->{dst.name}: {named} of {clusters} clusters named by digest, "
                  f"{m['disk_bytes']} disk bytes sent, {m['disk_dedup']}")
            assert named >= clusters - written, m["disk_dedup"]
            assert m["disk_bytes"] < 3 * BLOCKS * 4096  # the image is 64 MiB, random
        disk = a.state_dir / "vms" / VM / "disk0.qcow2"
        await api_a.ok("POST", f"/v1/vms/{VM}/pause")
        done = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2", str(disk), str(tpl)],
                              capture_output=True, text=True, timeout=120)
        print("disk vs image:", done.stdout.strip(), done.stderr.strip())
        first = re.search(r"offset (\d+)", done.stdout)
        assert done.returncode == 1 and first and int(first.group(1)) < BLOCKS * 4096
        # and nothing beyond the guest's blocks differs
        tail = subprocess.run(
            ["qemu-img", "compare", "-U", "--image-opts",
             f"driver=raw,offset={BLOCKS * 4096},file.driver=qcow2,file.file.driver=file,file.file.filename={disk}",
             f"driver=raw,offset={BLOCKS * 4096},file.driver=qcow2,file.file.driver=file,file.file.filename={tpl}"],
            capture_output=True, text=True, timeout=120)
        assert tail.returncode == 0, (tail.stdout, tail.stderr)
        await api_a.ok("POST", f"/v1/vms/{VM}/resume")


# ----- faults during the mirror ---------------------------------------------------------
SEED = "seed.qcow2"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def source(images: Path) -> AsyncIterator[LocalAgent]:
    """A guest whose local disk starts as a copy of 192 MiB of incompressible data, so the
    mirror runs long enough for a fault to land in it."""
    raw = images / "seed.raw"
    with raw.open("wb") as f:
        for _ in range(192):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(images / SEED)], check=True)
    raw.unlink()
    async with agent("dsrc", images) as a:
        api = Api(a)
        await api.ok("POST", "/v1/vms", spec(images, ref=False, seed=SEED), want=201)
        # the destinations must not hold the image: its clusters would cross as digests
        # (diskdedup.py) and the mirror would end before a fault could land in it
        (images / SEED).unlink()
        await verified_after(api, 0, passes=1)
        yield a


def mirroring(st: dict[str, Any]) -> bool:
    return st["metrics"]["disk_bytes"] > 0 and st["metrics"]["disk_ready_s"] is None


async def assert_source_intact(a: LocalAgent) -> None:
    api = Api(a)
    vm = await api.ok("GET", f"/v1/vms/{VM}")
    if vm["state"] != "running":
        print("\n".join(a.log_path.read_text().splitlines()[-40:]))
    assert vm["state"] == "running", vm["error"]
    assert (a.state_dir / "vms" / VM / "disk0.qcow2").exists()
    assert not list((a.state_dir / "vms" / VM).glob("nbd-relay-*"))
    _, offset = await api.console(VM)
    await verified_after(api, offset, passes=2)


async def assert_nothing_left(d: LocalAgent, vm: str = VM) -> None:
    assert not (d.state_dir / "vms" / vm).exists()
    incoming = d.state_dir / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []
    assert qemu_processes_using(d.state_dir) == []


async def failed(api: Api, mid: str) -> dict[str, Any]:
    st = await api.wait_migration(mid, timeout=120)
    assert st["phase"] == "failed", st
    return st


async def test_destination_killed_during_mirror(source: LocalAgent, images: Path) -> None:
    api = Api(source)
    dst = agent("dkill", images)
    await dst.start()
    try:
        mig = await api.migrate(VM, dst)
        st = await api.wait_migration(mig["id"], until=mirroring)
        assert mirroring(st), st
        dst.kill()
        st = await failed(api, mig["id"])
        print("destination killed:", st["error"])
        await assert_source_intact(source)
        await dst.start()  # the next agent removes the half-received VM and its disk
        await assert_nothing_left(dst)
    finally:
        await dst.stop()


async def test_destination_killed_under_write_blocking_guest_writes(images: Path) -> None:
    """The guest writes 4 MiB/s (write-blocking mirror: each write waits for its copy
    through the relay) when the destination dies: first in the bulk copy of a 96 MiB disk,
    then once the mirror is ready (pre-copy). The relay answers QEMU's outstanding and
    later NBD requests itself until the job is cancelled, with the guest held paused
    meanwhile, so QEMU never sees its NBD connection drop under a live job nor a job end
    under in-flight guest writes (QEMU 7.2 can abort on either): the source guest runs on
    and its disk verifies. NOVACRON_DISK_KILL_REPEAT=N runs N kills (alternating)."""
    seed = images / "wb-seed.qcow2"
    if not seed.exists():
        raw = images / "wb-seed.raw"
        raw.write_bytes(os.urandom(96 << 20))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(seed)], check=True)
        raw.unlink()
    doc = spec(images, "wbk", ref=False, seed=seed.name)
    doc["cmdline"] = ensure_guest().disk_cmdline("vda", rate_kb=4096, verify_s=2, blocks=BLOCKS)
    runs = int(os.environ.get("NOVACRON_DISK_KILL_REPEAT", "2"))
    async with agent("wsrc", images) as a:
        api = Api(a)
        await api.ok("POST", "/v1/vms", doc, want=201)
        # a kill mid-copy needs a long copy: the destination must not hold the image (as in
        # ``source``); a kill once the mirror is ready finds the disk's stream framed, its
        # clusters named by digest (diskdedup.py), as the relay answers QEMU itself
        hidden = seed.with_name("wb-seed.hidden")
        await verified_after(api, 0, passes=1, vm="wbk")
        for run in range(runs):
            ready = run % 2 == 1
            present, gone = (seed, hidden) if ready else (hidden, seed)
            if gone.exists():
                gone.rename(present)
            dst = agent("wdst", images)
            await dst.start()
            try:
                # pages capped, disks not: the mirror is quick, pre-copy lasts
                mig = await api.migrate("wbk", dst, bandwidth_mbps=40)
                st = await api.wait_migration(mig["id"], until=(lambda s: s["metrics"]["disk_ready_s"] is not None)
                                              if ready else mirroring)
                assert st["phase"] not in ("completed", "failed", "cancelled"), (run, st["error"])
                dst.kill()
                st = await failed(api, mig["id"])
                vm = await api.ok("GET", "/v1/vms/wbk")
                if vm["state"] != "running":
                    print("\n".join(a.log_path.read_text().splitlines()[-40:]))
                assert vm["state"] == "running", (run, vm["error"])
                print(f"run {run}: destination killed {'after the mirror was ready' if ready else 'mid-copy'} "
                      f"({st['metrics']['disk_bytes']} disk bytes, {st['metrics']['disk_dedup']}): {st['error']}")
                # framed exactly when the destination held the image
                assert bool(st["metrics"]["disk_dedup"].get("clusters_named")) == ready, st["metrics"]
                _, offset = await api.console("wbk")
                await verified_after(api, offset, passes=2, vm="wbk")
                assert not list((a.state_dir / "vms" / "wbk").glob("nbd-relay-*"))
                await dst.start()  # the next agent removes the half-received VM
                await assert_nothing_left(dst, "wbk")
            finally:
                await dst.stop()
        # the path this test is about was taken: the relay answered QEMU itself, and the
        # guest was held paused (this long) while the jobs ended
        log_text = a.log_path.read_text()
        assert log_text.count("disk relay answers QEMU itself") >= runs
        held = [json.loads(line)["ms"] for line in log_text.splitlines() if "guest held paused while" in line]
        print(f"guest held paused while its mirror was cancelled: {held} ms")
        # every ready kill had a job to cancel; a kill mid-copy may land before the job exists
        assert runs // 2 <= len(held) <= runs, held


async def test_channel_cut_during_mirror(source: LocalAgent, images: Path) -> None:
    api = Api(source)
    async with agent("dcut", images) as dst:
        proxy = CuttableProxy(dst.data_port)
        await proxy.start()
        try:
            mig = await api.migrate(VM, dst, data_port=proxy.port)
            st = await api.wait_migration(mig["id"], until=mirroring)
            assert mirroring(st), st
            proxy.cut()
            st = await failed(api, mig["id"])
            print("channel cut:", st["error"])
        finally:
            await proxy.close()
        await assert_source_intact(source)
        for _ in range(100):
            if not (dst.state_dir / "incoming" / VM).exists():
                break
            await asyncio.sleep(0.1)
        await assert_nothing_left(dst)


async def test_destination_disk_full_during_mirror(source: LocalAgent, images: Path) -> None:
    """The destination's state dir is a tmpfs with room for the 128 MiB RAM file and
    64 MiB more: the 192 MiB disk cannot fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting the small tmpfs needs root")
    api = Api(source)
    mnt = Path(tempfile.mkdtemp(prefix="nc-dfull-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192m", "nc-test-dfull", str(mnt)], check=True)
    try:
        async with agent("dfull", images, state_dir=mnt) as dst:
            mig = await api.migrate(VM, dst)
            st = await failed(api, mig["id"])
            print("destination disk full:", st["error"])
            await assert_source_intact(source)
            await assert_nothing_left(dst)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        with contextlib.suppress(OSError):
            mnt.rmdir()


async def test_virtio_scsi_disk_writes_and_moves(images: Path) -> None:
    """A local qcow2 disk on virtio-scsi: the guest (virtio_scsi, sd_mod from the same kernel
    package in its initramfs) sees it as sda, its verifier passes, and it moves A -> B."""
    doc = spec(images, ref=False)
    doc["disks"] = [{"size_gb": 0.0625, "bus": "virtio-scsi"}]
    doc["cmdline"] = ensure_guest().disk_cmdline("sda", rate_kb=512, verify_s=2, blocks=BLOCKS)
    async with agent("sa", images) as a, agent("sb", images) as b:
        api_a = Api(a)
        await api_a.ok("POST", "/v1/vms", doc, want=201)
        boot = await verified_after(api_a, 0, passes=1)
        await hop(a, b, boot)
        await Api(b).ok("DELETE", f"/v1/vms/{VM}")
