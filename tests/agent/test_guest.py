"""The test guest: the cpio writer, the cached build, and the workload itself
(run natively here: it is a static x86-64 program)."""

from __future__ import annotations

import gzip
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from novacron.agent.guest import GuestImage, cpio, ensure_guest
from novacron.agent.guest.build import (
    DISK_MODULES,
    NET_MODULES,
    PAGECACHE_MB,
    _is_static_elf,
    compile_workload,
)
from tests.agent.workload_pages import page_prefix


def test_cpio_archive_lists_with_real_cpio(tmp_path: Path) -> None:
    data = cpio.archive([
        cpio.directory("bin"),
        cpio.file("bin/hello", b"hi there\n", 0o755),
        cpio.symlink("bin/sh", "hello"),
        cpio.chardev("console", 5, 1),
    ])  # fmt: skip
    assert len(data) % 4 == 0
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout.decode()
    assert re.search(r"^drwxr-xr-x .* bin$", text, re.M)
    assert re.search(r"^-rwxr-xr-x .* 9 .* bin/hello$", text, re.M)
    assert re.search(r"^lrwxrwxrwx .* bin/sh -> hello$", text, re.M)
    assert re.search(r"^crw------- .* 5,\s*1 .* console$", text, re.M)
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "bin/hello"], input=data, cwd=out,
                   capture_output=True, timeout=30, check=True)  # fmt: skip
    assert (out / "bin/hello").read_bytes() == b"hi there\n"


def test_guest_is_cached_and_complete(guest: GuestImage) -> None:
    assert guest.kernel.stat().st_size > 1_000_000
    assert guest.initrd.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    assert "console=ttyS0" in guest.cmdline and "novacron.rate_mb=" in guest.cmdline
    again = ensure_guest()  # second call: found by key, not rebuilt
    assert again == guest
    assert "novacron.mem_mb=48 novacron.rate_mb=0" in guest.workload_cmdline(mem_mb=48, rate_mb=0)
    assert guest.network_cmdline("198.18.0.5/24", 7001).endswith("novacron.ip=198.18.0.5/24 novacron.port=7001")


def test_guest_carries_the_virtio_net_modules_in_load_order(guest: GuestImage) -> None:
    # Debian builds virtio-net as modules; init.sh loads /lib/modules/*.ko in glob order
    listing = subprocess.run(["cpio", "-t"], input=gzip.decompress(guest.initrd.read_bytes()),
                             capture_output=True, check=True).stdout.decode().split()
    mods = sorted(m for m in listing if m.startswith("lib/modules/") and m.endswith(".ko") and m.count("/") == 2)
    assert [m.split("-", 1)[1] for m in mods] == [Path(m).name for m in NET_MODULES]
    assert mods[-1].endswith("virtio_net.ko") and mods[0].endswith("virtio_ring.ko")
    # the disk workload's own set (disk.sh), outside the NIC's glob
    disk = sorted(m for m in listing if m.startswith("lib/modules/disk/"))
    assert [m.split("-", 1)[1] for m in disk] == [Path(m).name for m in DISK_MODULES]
    assert "bin/diskload" in listing and "bin/disk-init" in listing


@pytest.fixture(scope="module")
def workload_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = compile_workload(tmp_path_factory.mktemp("wl"))
    assert _is_static_elf(path.read_bytes())
    return path


class Running:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.out = b""

    def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.out.decode(errors="replace"))
            if m:
                return m
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                self.out += os.read(self.proc.stdout.fileno(), 65536)
        raise AssertionError(f"{pattern!r} not in workload output: {self.out[-500:]!r}")

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()


@pytest.fixture
def run_workload(workload_bin: Path) -> Iterator[type[Running]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> Running:
        proc = subprocess.Popen([str(workload_bin), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(proc)
        return Running(proc)

    yield start  # type: ignore[misc]
    for proc in started:
        proc.kill()
        proc.wait()


def test_workload_heartbeat_and_verify(run_workload) -> None:  # type: ignore[no-untyped-def]
    w = run_workload("--mem-mb", "4", "--rate-mb", "8", "--verify-s", "1")
    w.wait_for(r"NOVACRON-READY boot=\w+ pages=1024 mem_mb=4 rate_mb=8")
    hb = w.wait_for(r"NOVACRON-HB boot=\w+ seq=2 uptime=[\d.]+ ok=1 bad=0 passes=\d+ dirtied_mb=(\d+)", 5)
    assert int(hb.group(1)) >= 8  # 8 MB/s for ~2 s
    w.send("verify\n")
    w.wait_for(r"NOVACRON-VERIFY boot=\w+ pages=1024 bad=0 result=ok")


def _find_in_process(pid: int, needle: bytes) -> int:
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            addr, perms = line.split()[:2]
            if not perms.startswith("rw"):
                continue
            lo, hi = (int(x, 16) for x in addr.split("-"))
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue
            at = data.find(needle)
            if at >= 0:
                return lo + at
    raise AssertionError("workload page not found in its memory")


def test_workload_detects_a_corrupted_page(run_workload) -> None:  # type: ignore[no-untyped-def]
    """The checksums really check: flip bytes of one page behind its back."""
    w = run_workload("--mem-mb", "4", "--rate-mb", "0", "--verify-s", "60")
    boot = int(w.wait_for(r"NOVACRON-READY boot=(\w+)").group(1), 16)
    addr = _find_in_process(w.proc.pid, page_prefix(boot, idx=77))
    with open(f"/proc/{w.proc.pid}/mem", "r+b") as mem:
        mem.seek(addr + 1000)
        mem.write(b"\xde\xad\xbe\xef")
    w.send("verify\n")
    w.wait_for(r"NOVACRON-VERIFY boot=\w+ pages=1024 bad=1 result=FAIL")
    w.wait_for(r"NOVACRON-HB .* ok=0 bad=1 ", 3)


def test_workload_rejects_bad_arguments(workload_bin: Path) -> None:
    res = subprocess.run([str(workload_bin), "--mem-mb", "lots"], capture_output=True, timeout=10)
    assert res.returncode == 2 and b"bad value for --mem-mb" in res.stderr


def test_realistic_initrd_appends_the_page_cache_set(guest: GuestImage) -> None:
    """initrd-realistic.img = the default initramfs, zero padding, then an uncompressed
    cpio of the kernel package's own modules under pagecache/ (what init.sh checks)."""
    assert guest.initrd_realistic is not None
    base, full = guest.initrd.read_bytes(), guest.initrd_realistic.read_bytes()
    assert full.startswith(base)
    tail = full[len(base):].lstrip(b"\0")
    assert (len(full) - len(tail)) % 4 == 0 and tail.startswith(b"070701")  # newc, 4-byte aligned
    listing = subprocess.run(["cpio", "-t"], input=tail, capture_output=True, check=True).stdout.decode().split()
    files = [f for f in listing if f.endswith(".ko")]
    assert files and all(f.startswith(("pagecache/fs/", "pagecache/net/")) for f in files)
    assert files == sorted(files, key=lambda f: (not f.startswith("pagecache/fs/"), f))
    assert (PAGECACHE_MB - 4) << 20 < len(tail) < (PAGECACHE_MB + 2) << 20
    assert guest.initrd_for("realistic") == guest.initrd_realistic and guest.initrd_for("random") == guest.initrd
    assert guest.workload_cmdline(profile="realistic").endswith(" novacron.profile=realistic")
    assert "profile" not in guest.workload_cmdline()  # the default guest is unchanged
    with pytest.raises(ValueError, match="memory profile"):
        guest.workload_cmdline(profile="lots")


def _working_set(pid: int, nbytes: int) -> bytes:
    """``nbytes`` of the workload's working set: its anonymous mapping of at least that
    size (give or take the allocator's header page: proportions are what is checked)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if fields[1].startswith("rw") and len(fields) == 5 and hi - lo >= nbytes:
                mem.seek(lo)
                return mem.read(nbytes)
    raise AssertionError("no mapping holds the working set")


def test_realistic_profile_mix_and_file_pages_are_checked(run_workload, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """profile=realistic: about 30 % zero, 40 % text, 30 % random pages (text compresses,
    random does not); the files under --files are checked too, and a changed file page
    is caught."""
    import zstandard

    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    (files / "a.txt").write_bytes(os.urandom(3 * 4096 + 100))
    (files / "sub" / "b.bin").write_bytes(bytes(range(256)) * 64)
    w = run_workload("--mem-mb", "16", "--rate-mb", "0", "--verify-s", "60", "--profile", "realistic",
                     "--files", str(files))
    w.wait_for(r"NOVACRON-READY boot=\w+ pages=4096 mem_mb=16 rate_mb=0 profile=realistic file_pages=8")
    pages = [p for mem in [_working_set(w.proc.pid, 16 << 20)] for p in
             (mem[i:i + 4096] for i in range(0, len(mem), 4096))]
    zero = sum(p == bytes(4096) for p in pages)
    text = [p for p in pages if p != bytes(4096) and not p.translate(None, b"abcdefghijklmnopqrstuvwxyz \n")]
    rand = len(pages) - zero - len(text)
    assert 0.2 < zero / 4096 < 0.4 and 0.3 < len(text) / 4096 < 0.5 and 0.2 < rand / 4096 < 0.4, (zero, len(text))
    cctx = zstandard.ZstdCompressor(level=1)
    assert len(cctx.compress(b"".join(text[:64]))) < 64 * 4096 / 2.5  # text-like: compressible
    w.send("verify\n")
    w.wait_for(r"NOVACRON-VERIFY boot=\w+ pages=4104 bad=0 result=ok")
    with open(files / "a.txt", "r+b") as f:  # the mapping is the page cache: it sees this
        f.seek(4096 + 7)
        f.write(b"changed")
    w.send("verify\n")
    w.wait_for(r"NOVACRON-VERIFY boot=\w+ pages=4104 bad=1 result=FAIL")


def test_workload_rejects_an_unknown_profile(workload_bin: Path) -> None:
    res = subprocess.run([str(workload_bin), "--profile", "busy"], capture_output=True, timeout=10)
    assert res.returncode == 2 and b"unknown profile busy" in res.stderr
