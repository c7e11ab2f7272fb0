"""Build the test guest once and cache it, keyed by everything that goes in.

Inputs: the Debian kernel package that ``linux-image-amd64`` currently points
at (fetched with ``apt-get download``, unpacked with ``dpkg -x``), the static
busybox from ``busybox-static``, our workload (``workload.c``, compiled static
with gcc here), the soft-dirty check (``softdirty_check.c`` with the engine's
own reader ``native/nc_pagemap.h``) and ``init.sh``. Output, under
``${XDG_CACHE_HOME:-~/.cache}/novacron/guest/<key>/``: ``vmlinuz`` and
``initrd.img`` (gzip'd newc cpio). Debian builds virtio-net as modules, so the
initramfs carries them (``NET_MODULES``, loaded in order by ``init.sh``).

``initrd-realistic.img`` is the same initramfs followed by an uncompressed cpio
of a real file set for the guest's page cache (``pagecache_files``): the kernel
modules under ``kernel/fs`` and ``kernel/net`` of that same kernel package,
sorted by path, up to ``PAGECACHE_MB``. The guest unpacks it into its rootfs
(ramfs: the files' pages are page-cache pages, resident for its whole life), so
every VM booted from it holds the same file pages; ``novacron.profile=realistic``
makes the workload check them too. Uncompressed because a TCG guest would spend
seconds inflating it at every boot; the default ``initrd.img`` is unchanged, so
guests that do not ask for it boot as before.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from novacron.agent.guest import cpio

log = logging.getLogger("novacron.agent.guest")

# Bump when the build steps change in a way the inputs below do not capture.
BUILDER_VERSION = "7"  # 3: virtio-net modules, guest network; 4: ACPI power button; 5: disk workload;
# 6: virtio-scsi disks; 7: initrd-realistic.img (page-cache file set) and the workload's
# memory profiles
META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
BASE_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3"
# Debian's kernel does not get past decompression in 64 MiB, and the workload
# needs its working set on top of ~60 MiB for the kernel: give VMs at least this.
MIN_MEMORY_MB = 128
# The realistic image's page-cache file set: these folders of the kernel package's
# lib/modules/*/kernel, every file sorted by path, until this many MiB.
PAGECACHE_DIRS = ("fs", "net")
PAGECACHE_MB = 48
PAGECACHE_ROOT = "pagecache"  # where the guest finds them (init.sh)
# What a realistic guest needs besides its working set: the kernel, and the page-cache
# set twice while the kernel unpacks it (the initrd blob and the unpacked files) ...
REALISTIC_EXTRA_MB = MIN_MEMORY_MB - 32 + 2 * PAGECACHE_MB
# ... and at least this much in all: with less, unpacking the initrd runs out of memory
# ("Initramfs unpacking failed: write error"; 208 MiB fails, 224 boots).
REALISTIC_MIN_MEMORY_MB = 224
PROFILES = ("random", "realistic")


# virtio_net and what it needs, in load order (Debian 6.1: all =m, uncompressed .ko)
NET_MODULES = ("drivers/virtio/virtio_ring.ko", "drivers/virtio/virtio.ko",
               "drivers/virtio/virtio_pci_modern_dev.ko", "drivers/virtio/virtio_pci_legacy_dev.ko",
               "drivers/virtio/virtio_pci.ko", "net/core/failover.ko", "drivers/net/net_failover.ko",
               "drivers/net/virtio_net.ko")
# the ACPI power button as an input device, read by busybox acpid (init.sh): graceful stop
POWER_MODULES = ("drivers/input/evdev.ko", "drivers/acpi/button.ko")


# virtio_blk, virtio_scsi and what they need, in load order, under lib/modules/disk/ (disk.sh
# loads the ones not loaded yet; the NIC's loop in init.sh globs only lib/modules/*.ko). sd_mod
# needs t10-pi and its CRCs; their generic crypto drivers go first, so nothing asks for modprobe.
SCSI_MODULES = ("drivers/scsi/scsi_common.ko", "drivers/scsi/scsi_mod.ko", "crypto/crct10dif_common.ko",
                "crypto/crct10dif_generic.ko", "lib/crc-t10dif.ko", "lib/crc64.ko",
                "crypto/crc64_rocksoft_generic.ko", "lib/crc64-rocksoft.ko", "block/t10-pi.ko",
                "drivers/scsi/sd_mod.ko", "drivers/scsi/virtio_scsi.ko")
DISK_MODULES = (*NET_MODULES[:5], "drivers/block/virtio_blk.ko", *SCSI_MODULES)


class GuestBuildError(RuntimeError):
    """The guest could not be built; the message says which step and why."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    cmdline: str  # default workload settings; see workload_cmdline() for others
    # the initrd plus the page-cache file set (module docstring); for profile=realistic
    initrd_realistic: Path | None = None

    def initrd_for(self, profile: str) -> Path:
        """The initrd a guest of this memory profile boots from."""
        if profile not in PROFILES:
            raise ValueError(f"memory profile {profile!r}: one of {', '.join(PROFILES)}")
        if profile == "realistic":
            if self.initrd_realistic is None:
                raise GuestBuildError("this guest build has no initrd-realistic.img (rebuild: make guest)")
            return self.initrd_realistic
        return self.initrd

    def workload_cmdline(self, mem_mb: int = 32, rate_mb: int = 4, verify_s: int = 4,
                         profile: str = "random") -> str:
        """Kernel command line that runs the workload with these settings: a
        ``mem_mb`` working set, ``rate_mb`` MB/s rewritten, a background check of
        every page each ``verify_s`` s, the working set's content by ``profile``
        (``random``, or ``realistic``: zero/text/random pages, and with
        ``initrd_realistic`` the page-cache files checked too; workload.c). The VM
        needs ``MIN_MEMORY_MB`` + ``mem_mb`` - 32 MiB or more (the default cmdline fits
        a 128 MiB VM); a realistic one ``REALISTIC_EXTRA_MB`` + ``mem_mb`` and at
        least ``REALISTIC_MIN_MEMORY_MB``."""
        if profile not in PROFILES:
            raise ValueError(f"memory profile {profile!r}: one of {', '.join(PROFILES)}")
        out = (
            f"{BASE_CMDLINE} novacron.mem_mb={int(mem_mb)} novacron.rate_mb={int(rate_mb)} "
            f"novacron.verify_s={int(verify_s)}"
        )
        return out if profile == "random" else f"{out} novacron.profile={profile}"

    def disk_cmdline(self, dev: str = "vda", ref: str = "", rate_kb: int = 256, verify_s: int = 3,
                     blocks: int = 2048, **workload: Any) -> str:
        """The workload cmdline plus the disk workload (``diskload.c``) on ``/dev/<dev>``:
        ``rate_kb`` KiB/s of checksummed 4 KiB blocks over the first ``blocks`` blocks,
        all verified every ``verify_s`` s; ``ref`` names a reference disk written first."""
        for d in (dev, ref):
            if d and not d.isalnum():
                raise ValueError(f"disk device name {d!r}")
        out = (f"{self.workload_cmdline(**workload)} novacron.disk={dev} novacron.disk_rate_kb={int(rate_kb)} "
               f"novacron.disk_verify_s={int(verify_s)} novacron.disk_blocks={int(blocks)}")
        return f"{out} novacron.disk_ref={ref}" if ref else out

    def network_cmdline(self, ip_cidr: str, port: int = 7000, **workload: Any) -> str:
        """The workload cmdline plus a NIC: ``ip_cidr`` (e.g. ``10.0.0.5/24``) on the
        first virtio NIC, and a TCP echo service on ``port``."""
        return f"{self.workload_cmdline(**workload)} novacron.ip={ip_cidr} novacron.port={int(port)}"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "novacron" / "guest"


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise GuestBuildError(f"{argv[0]} not found (see tools/system-packages.txt)") from None
    except subprocess.TimeoutExpired:
        raise GuestBuildError(f"{' '.join(argv)} timed out") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise GuestBuildError(f"{' '.join(argv)} failed: {' | '.join(detail)}")
    return done.stdout


def _source(name: str) -> bytes:
    return resources.files("novacron.agent.guest").joinpath(name).read_bytes()


def _native_source(name: str) -> bytes:
    return resources.files("novacron.native").joinpath(name).read_bytes()


def resolve_kernel_package() -> tuple[str, str]:
    """(package, version) that ``linux-image-amd64`` depends on right now."""
    out = _run(["apt-cache", "depends", META_PACKAGE])
    names = [
        line.split(":", 1)[1].strip()
        for line in out.splitlines()
        if line.strip().startswith("Depends:") and "linux-image-" in line
    ]
    if not names:
        raise GuestBuildError(f"apt-cache depends {META_PACKAGE}: no linux-image-* dependency")
    pkg = names[0]
    show = _run(["apt-cache", "show", "--no-all-versions", pkg])
    for line in show.splitlines():
        if line.startswith("Version:"):
            return pkg, line.split(":", 1)[1].strip()
    raise GuestBuildError(f"apt-cache show {pkg}: no Version")


def _is_static_elf(data: bytes) -> bool:
    """True for an ELF64 executable without a PT_INTERP (dynamic loader) header."""
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return False
    phoff = int.from_bytes(data[32:40], "little")
    phentsize = int.from_bytes(data[54:56], "little")
    phnum = int.from_bytes(data[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(data[off : off + 4], "little") == 3:  # PT_INTERP
            return False
    return True


def _gcc_version() -> str:
    return _run(["gcc", "-dumpfullversion"]).strip()


def build_key(kernel_pkg: str, kernel_ver: str) -> str:
    digest = hashlib.sha256()
    for part in (
        BUILDER_VERSION.encode(),
        kernel_pkg.encode(),
        kernel_ver.encode(),
        hashlib.sha256(BUSYBOX.read_bytes()).digest(),
        _source("workload.c"),
        _source("softdirty_check.c"),
        _native_source("nc_pagemap.h"),
        _source("init.sh"),
        _source("diskload.c"),
        _source("disk.sh"),
        _gcc_version().encode(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def _fetch_kernel(pkg: str, version: str, debs: Path, work: Path,
                  wanted: tuple[str, ...] = NET_MODULES) -> tuple[bytes, list[bytes], Path]:
    """The kernel image, the modules ``wanted`` from its package in that order, and
    the unpacked package's ``lib/modules/*/kernel`` folder (under ``work``)."""
    debs.mkdir(parents=True, exist_ok=True)
    deb = debs / f"{pkg}_{version.replace(':', '%3a')}_amd64.deb"
    if not deb.exists():
        log.info("downloading kernel package", extra={"package": pkg, "version": version})
        fetch_dir = Path(tempfile.mkdtemp(dir=debs))
        try:
            _run(["apt-get", "download", "-q", f"{pkg}={version}"], cwd=fetch_dir)
            got = list(fetch_dir.glob("*.deb"))
            if len(got) != 1:
                raise GuestBuildError(f"apt-get download {pkg}: expected one .deb, got {got}")
            os.replace(got[0], deb)
        finally:
            shutil.rmtree(fetch_dir, ignore_errors=True)
    unpacked = work / "kernel"
    _run(["dpkg", "-x", str(deb), str(unpacked)])
    images = sorted((unpacked / "boot").glob("vmlinuz-*"))
    if not images:
        raise GuestBuildError(f"{deb.name} holds no boot/vmlinuz-*")
    module_dirs = sorted((unpacked / "lib" / "modules").glob("*/kernel"))
    if len(module_dirs) != 1:
        raise GuestBuildError(f"{deb.name}: expected one lib/modules/*/kernel, got {module_dirs}")
    missing = [m for m in wanted if not (module_dirs[0] / m).is_file()]
    if missing:
        raise GuestBuildError(f"{deb.name} lacks the modules {missing} (built in or compressed?)")
    return images[0].read_bytes(), [(module_dirs[0] / m).read_bytes() for m in wanted], module_dirs[0]


def pagecache_files(module_dir: Path, limit_mb: int = PAGECACHE_MB) -> list[tuple[str, bytes]]:
    """The realistic image's page-cache set: (path relative to ``module_dir``, content)
    of every file under ``PAGECACHE_DIRS``, sorted by path, while the total stays
    within ``limit_mb`` MiB."""
    out: list[tuple[str, bytes]] = []
    total = 0
    for top in PAGECACHE_DIRS:
        for path in sorted(p for p in (module_dir / top).rglob("*") if p.is_file() and not p.is_symlink()):
            size = path.stat().st_size
            if total + size > limit_mb << 20:
                return out
            out.append((path.relative_to(module_dir).as_posix(), path.read_bytes()))
            total += size
    if total < (limit_mb << 20) // 2:
        raise GuestBuildError(f"{module_dir}: only {total >> 20} MiB of files for the page-cache set")
    return out


def _pagecache_archive(files: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed newc cpio of ``files`` under ``PAGECACHE_ROOT``, parents first."""
    dirs: list[str] = [PAGECACHE_ROOT]
    entries: list[cpio.Entry] = []
    for rel, data in files:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join([PAGECACHE_ROOT, *parts[:i]])
            if d not in dirs:
                dirs.append(d)
                entries.append(cpio.directory(d))
        entries.append(cpio.file(f"{PAGECACHE_ROOT}/{rel}", data, 0o444))
    return cpio.archive([cpio.directory(PAGECACHE_ROOT), *entries])


def realistic_initrd(initrd: bytes, files: list[tuple[str, bytes]]) -> bytes:
    """``initrd`` followed by the page-cache archive: the kernel unpacks concatenated
    archives in turn and skips the zero padding between them (it wants each
    uncompressed one 4-byte aligned; 512 keeps it simple)."""
    return initrd + b"\0" * (-len(initrd) % 512) + _pagecache_archive(files)


def compile_workload(work: Path, name: str = "workload") -> Path:
    """Compile ``name``.c (static, so it runs as-is in the initramfs) into ``work``."""
    src = work / f"{name}.c"
    src.write_bytes(_source(f"{name}.c"))
    out = work / name
    _run(["gcc", "-O2", "-static", "-s", "-Wall", "-Werror", "-o", str(out), str(src)])
    return out


def compile_softdirty_check(work: Path) -> Path:
    """Compile softdirty_check.c against the engine's pagemap reader (static) into ``work``."""
    src = work / "softdirty_check.c"
    src.write_bytes(_source("softdirty_check.c"))
    (work / "nc_pagemap.h").write_bytes(_native_source("nc_pagemap.h"))
    out = work / "softdirty-check"
    _run(["gcc", "-O2", "-static", "-s", "-Wall", "-Werror", "-I", str(work), "-o", str(out), str(src)])
    return out


def _initramfs(busybox: bytes, workload: bytes, modules: list[bytes],
               softdirty_check: bytes = b"", diskload: bytes = b"",
               disk_modules: tuple[bytes, ...] = ()) -> bytes:
    net, power = modules[: len(NET_MODULES)], modules[len(NET_MODULES) :]
    entries = [
        cpio.directory("bin"),
        cpio.directory("dev"),
        cpio.chardev("dev/console", 5, 1),
        cpio.chardev("dev/ttyS0", 4, 64),
        cpio.chardev("dev/null", 1, 3, 0o666),
        cpio.directory("proc"),
        cpio.directory("sys"),
        cpio.directory("tmp", 0o1777),
        cpio.directory("root", 0o700),
        cpio.file("bin/busybox", busybox, 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.file("bin/workload", workload, 0o755),
        *([cpio.file("bin/softdirty-check", softdirty_check, 0o755)] if softdirty_check else []),
        cpio.file("init", _source("init.sh"), 0o755),
        cpio.directory("lib"),
        cpio.directory("lib/modules"),
        # numbered so init.sh loads them in dependency order with a glob
        *(cpio.file(f"lib/modules/{i}-{Path(m).name}", data, 0o644)
          for i, (m, data) in enumerate(zip(NET_MODULES, net, strict=True))),
        cpio.directory("lib/power"),
        *(cpio.file(f"lib/power/{Path(m).name}", data, 0o644)
          for m, data in zip(POWER_MODULES, power, strict=True)),
    ]
    if diskload:
        entries += [
            cpio.file("bin/diskload", diskload, 0o755),
            cpio.file("bin/disk-init", _source("disk.sh"), 0o755),
            cpio.directory("lib/modules/disk"),
            *(cpio.file(f"lib/modules/disk/{i:02d}-{Path(m).name}", data, 0o644)  # globbed in order
              for i, (m, data) in enumerate(zip(DISK_MODULES, disk_modules, strict=True))),
        ]
    return gzip.compress(cpio.archive(entries), compresslevel=6, mtime=0)


def _image(folder: Path) -> GuestImage:
    realistic = folder / "initrd-realistic.img"
    return GuestImage(
        kernel=folder / "vmlinuz",
        initrd=folder / "initrd.img",
        cmdline=(folder / "cmdline").read_text().strip(),
        initrd_realistic=realistic if realistic.is_file() else None,
    )


def _complete(folder: Path) -> bool:
    return all((folder / n).is_file()
               for n in ("vmlinuz", "initrd.img", "initrd-realistic.img", "cmdline", "manifest.json"))


def _latest_cached(root: Path) -> Path | None:
    done = [d for d in root.glob("*") if d.is_dir() and _complete(d)]
    return max(done, key=lambda d: d.stat().st_mtime) if done else None


def ensure_guest(root: Path | None = None) -> GuestImage:
    """The cached guest for the current inputs, building it first if needed.

    Safe to call from several processes at once (a file lock serialises the
    build). Without apt (no package index) the newest cached build is used.
    """
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    try:
        pkg, version = resolve_kernel_package()
    except GuestBuildError:
        cached = _latest_cached(root)
        if cached is None:
            raise
        return _image(cached)
    key = build_key(pkg, version)
    folder = root / key
    if _complete(folder):
        return _image(folder)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(folder):
            return _image(folder)
        busybox = BUSYBOX.read_bytes()
        if not _is_static_elf(busybox):
            raise GuestBuildError(f"{BUSYBOX} is not statically linked (install busybox-static)")
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            work = Path(tmp)
            wanted = tuple(dict.fromkeys((*NET_MODULES, *POWER_MODULES, *DISK_MODULES)))
            kernel, blobs, module_dir = _fetch_kernel(pkg, version, root / "debs", work, wanted)
            by_name = dict(zip(wanted, blobs, strict=True))
            modules = [by_name[m] for m in NET_MODULES + POWER_MODULES]
            workload = compile_workload(work).read_bytes()
            sd_check = compile_softdirty_check(work).read_bytes()
            diskload = compile_workload(work, "diskload").read_bytes()
            stage = work / "out"
            stage.mkdir()
            (stage / "vmlinuz").write_bytes(kernel)
            initrd = _initramfs(busybox, workload, modules, sd_check, diskload,
                                tuple(by_name[m] for m in DISK_MODULES))
            (stage / "initrd.img").write_bytes(initrd)
            files = pagecache_files(module_dir)
            (stage / "initrd-realistic.img").write_bytes(realistic_initrd(initrd, files))
            (stage / "cmdline").write_text(GuestImage(Path(), Path(), "").workload_cmdline() + "\n")
            manifest = {"key": key, "kernel_package": pkg, "kernel_version": version,
                        "pagecache": {"dirs": list(PAGECACHE_DIRS), "files": len(files),
                                      "bytes": sum(len(d) for _, d in files)}}
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(stage, folder)
        log.info("guest built", extra={"dir": str(folder), "kernel": f"{pkg} {version}"})
    return _image(folder)
