"""Two realistic guests booted from the same image (real QEMU, TCG): their RAM holds
the same page-cache file pages, while their working sets differ (seeded per boot).
What cross-VM and destination-side dedup can, and cannot, find."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage
from novacron.agent.guest.build import PAGECACHE_MB, REALISTIC_EXTRA_MB, REALISTIC_MIN_MEMORY_MB
from novacron.agent.local import state_parent
from novacron.agent.vm import AccelDetector, VMManager
from novacron.agent.vm.images import ImageDirs

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]
# NOVACRON_SHARING_MB=64: the working set of `bench wan`'s guests (256 MiB), and -s
# prints what a destination running the first guest could copy of the second
WORKING_MB = int(os.environ.get("NOVACRON_SHARING_MB", "16"))
PAGE = 4096


def page_digests(ram: Path) -> Counter[bytes]:
    """How often each non-zero page content occurs in a guest's RAM file."""
    zero = bytes(PAGE)
    out: Counter[bytes] = Counter()
    with ram.open("rb") as f:
        while page := f.read(PAGE):
            if page != zero:
                out[hashlib.blake2b(page, digest_size=16).digest()] += 1
    return out


def own_pages_zstd(ram: Path, other: Counter[bytes]) -> str:
    """zstd sizes (1 MiB frames, as the engine sends them) of the non-zero pages of
    ``ram`` whose content ``other`` lacks: what must cross the link whatever the dedup."""
    import zstandard

    zero = bytes(PAGE)
    own = []
    with ram.open("rb") as f:
        while page := f.read(PAGE):
            if page != zero and hashlib.blake2b(page, digest_size=16).digest() not in other:
                own.append(page)
    sizes = []
    for level in (1, 3, 5, 19):
        z = zstandard.ZstdCompressor(level=level)
        total = sum(len(z.compress(b"".join(own[i:i + 256]))) for i in range(0, len(own), 256))
        sizes.append(f"level {level} {total / 1e6:.1f}")
    return f"its own pages: {len(own)} ({len(own) * PAGE / 1e6:.1f} MB), zstd MB " + ", ".join(sizes)


async def test_two_guests_of_the_image_share_file_pages_not_working_sets(guest: GuestImage) -> None:
    root = Path(tempfile.mkdtemp(prefix="nc-share-", dir=state_parent()))
    mgr = VMManager(root, AccelDetector(probe_kernels=[]), images=ImageDirs.of([guest.kernel.parent]))
    try:
        vms = [await mgr.create({
            "name": f"twin{i}", "vcpus": 1, "memory_mb": max(REALISTIC_MIN_MEMORY_MB, REALISTIC_EXTRA_MB + WORKING_MB), "accel": "tcg",
            "kernel": str(guest.kernel), "initrd": str(guest.initrd_for("realistic")),
            "cmdline": guest.workload_cmdline(mem_mb=WORKING_MB, rate_mb=0, verify_s=60, profile="realistic"),
        }) for i in range(2)]  # fmt: skip
        ready = await asyncio.gather(*(vm.wait_serial(r"NOVACRON-READY boot=(\w+) .*file_pages=(\d+)", 180)
                                       for vm in vms))
        assert ready[0].group(1) != ready[1].group(1)  # two boots
        file_pages = int(ready[0].group(2))
        assert file_pages > (PAGECACHE_MB - 4) * 256
        await asyncio.gather(*(vm.wait_serial(r"NOVACRON-HB .* ok=1", 60) for vm in vms))
        a, b = await asyncio.gather(*(asyncio.to_thread(page_digests, vm.ram_path) for vm in vms))
        shared = a.keys() & b.keys()
        print(f"second guest: {sum(b.values())} non-zero pages, {sum(b[d] for d in shared)} of them "
              f"with content the first holds; {await asyncio.to_thread(own_pages_zstd, vms[1].ram_path, a)}")
        # the image's page-cache files are in both (beside the kernel's own pages)
        assert len(shared) >= 0.95 * file_pages, (len(shared), file_pages)
        # the working sets' text and random pages (70 % of WORKING_MB) are each guest's own
        own = len(a.keys() - b.keys())
        assert own >= 0.6 * WORKING_MB * 256, own
        for vm in vms:
            await vm.send_serial("verify\n")
        checks = await asyncio.gather(*(vm.wait_serial(r"NOVACRON-VERIFY boot=\w+ pages=(\d+) bad=0 result=ok", 60)
                                        for vm in vms))
        assert all(int(c.group(1)) == WORKING_MB * 256 + file_pages for c in checks)
    finally:
        await mgr.shutdown(stop_vms=True)
        shutil.rmtree(root, ignore_errors=True)
