"""A VM's data disks: created by the agent, handed to QEMU as descriptors.

Where a disk's file lives is never the caller's choice:

- ``local`` disks live in the VM folder as ``disk<i>.qcow2`` / ``disk<i>.raw`` and
  go with the folder (``vm delete``, or the source side of a migration). The
  agent creates them with ``qemu-img`` before QEMU first runs in that folder
  (empty at ``size_gb``, a qcow2 overlay on a ``backing`` image, or a copy of an
  ``image``); from then on they are opened through ``safefs`` (QEMU can write the
  folder, so no symlink or fifo is ever followed).
- ``shared`` disks are an image in one of the image dirs (``images.py`` decides
  which file a name means), the same file on every host; the agent never creates
  or removes them.

QEMU gets each file as two descriptors in an fdset (``-add-fd``, read-write and
read-only: the block layer reopens either way) and a ``-blockdev`` graph with
node names: ``disk<i>-file`` (protocol) under ``disk<i>`` (format), and for an
overlay ``base<i>-file`` / ``base<i>`` read-only, named as the overlay's
``backing`` node, so QEMU never opens the path the qcow2 header names.

Cache mode: ``cache.direct=on`` (O_DIRECT, no host page cache) where the
filesystem allows it (probed on the opened descriptor; tmpfs does not), plus
QEMU's default write-back to the format layer, which every ``stop`` flushes.
For shared disks that matters: the source's QEMU flushes and inactivates the
image when its migration completes and only then does the destination's QEMU
(started with ``-incoming``, its images inactive) activate it, so no stale page
cache on either host serves the other's writes. A shared dir without O_DIRECT is
only coherent when both "hosts" are one kernel (tests); the agent logs that.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from novacron.agent.safefs import UnsafeFile, open_regular
from novacron.agent.vm.images import ImageDirs, refuse_external_qcow2
from novacron.agent.vm.spec import Disk, SpecError, VMSpec

if TYPE_CHECKING:  # (it runs qemu-img from here)
    from novacron.agent.vm.expanded import Expanded

log = logging.getLogger("novacron.agent.vm")

QEMU_IMG = "qemu-img"
QEMU_IMG_TIMEOUT_S = 600.0
DISK_FDSET_BASE = 10  # fdset of disk i: 10 + 2i (its file), 11 + 2i (its backing image)
DIGEST_CHUNK = 4 << 20


class DiskError(SpecError):
    """A disk cannot be created or opened (a 400 at create, an admission refusal at a migration)."""


@dataclass
class OpenedDisk:
    """The descriptors QEMU inherits for one disk."""

    rw: int
    ro: int
    direct: bool
    base_ro: int | None = None  # the backing image of an overlay
    base_format: str = ""

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.rw, self.ro, self.base_ro) if fd is not None)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class OpenedDisks:
    disks: list[OpenedDisk] = field(default_factory=list)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for d in self.disks for fd in d.fds)

    def close(self) -> None:
        for d in self.disks:
            d.close()
        self.disks.clear()


def node(i: int) -> str:
    """The format node QEMU knows disk ``i`` by (mirrors and exports use it)."""
    return f"disk{i}"


def local_path(folder: Path, spec: VMSpec, i: int) -> Path:
    return folder / spec.disks[i].file_name(i)


def supports_direct(fd: int) -> bool:
    """Whether this file's filesystem takes O_DIRECT (tmpfs refuses it)."""
    try:
        probe = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(probe)
    return True


async def qemu_img(*args: str, pass_fds: tuple[int, ...] = (), cwd: Path | None = None,
                   timeout_s: float = QEMU_IMG_TIMEOUT_S) -> str:
    """Run qemu-img (never through a shell); DiskError with its last line on failure."""
    try:
        proc = await asyncio.create_subprocess_exec(
            QEMU_IMG, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=pass_fds, cwd=cwd)
    except FileNotFoundError:
        raise DiskError(f"{QEMU_IMG} not found (install qemu-utils)") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace").strip().splitlines()[-1:]
        raise DiskError(f"qemu-img {args[0]} failed: {' '.join(detail)}")
    return out.decode(errors="replace")


async def virtual_size(fd: int, fmt: str) -> int:
    """The guest-visible size of the image open on ``fd`` (read through /proc/self/fd)."""
    info = json.loads(await qemu_img("info", "--output=json", "-U", "-f", fmt, f"/proc/self/fd/{fd}",
                                     pass_fds=(fd,)))
    return int(info["virtual-size"])


_digests: dict[tuple[int, int, int, int], str] = {}


def content_digest(fd: int) -> str:
    """sha256 of a backing image's bytes, cached per (device, inode, size, mtime): two hosts
    whose copies have the same digest need not send the image's content (see migration)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, DIGEST_CHUNK, offset):
            h.update(chunk)
            offset += len(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


class DiskStore:
    """Creates, opens and describes the disks of VMs; images come from ``images``."""

    def __init__(self, images: ImageDirs, expanded: Expanded | None = None) -> None:
        self.images = images
        self.expanded = expanded  # uncompressed copies of compressed images, for migrations' indexes

    # ----- checks ----------------------------------------------------------
    def check(self, spec: VMSpec, *, creating: bool) -> None:
        """Every image a disk names is acceptable here (SpecError otherwise). A migration
        destination (``creating`` False) needs only shared images and backing images:
        a local disk's content arrives over the migration."""
        for i, d in enumerate(spec.disks):
            if d.image and (creating or d.storage == "shared"):
                with self._open_image(i, "image", d.image,
                                      os.O_RDWR if d.storage == "shared" else os.O_RDONLY, d.format):
                    pass
            if d.backing:
                with self._open_image(i, "backing", d.backing, os.O_RDONLY, ""):
                    pass

    def _open_image(self, i: int, key: str, ref: str, flags: int, fmt: str) -> _Fd:
        fd = self.images.open_ref(f"disks[{i}].{key}", ref, flags)
        try:
            if (fmt or ("qcow2" if ref.endswith(".qcow2") else "raw")) == "qcow2":
                refuse_external_qcow2(ref, fd, f"disks[{i}].{key}")
        except BaseException:
            os.close(fd)
            raise
        return _Fd(fd)

    # ----- creation ----------------------------------------------------------
    async def create_local(self, spec: VMSpec, folder: Path) -> list[Path]:
        """Create every local disk of a new VM in ``folder`` (before QEMU runs there);
        returns the files made. On failure nothing is left."""
        made: list[Path] = []
        try:
            for i, d in enumerate(spec.disks):
                if d.storage != "local":
                    continue
                path = local_path(folder, spec, i)
                made.append(path)
                await self._create_one(i, d, path)
        except BaseException:
            for p in made:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise
        log.info("disks created", extra={"vm": spec.name, "disks": [p.name for p in made]})
        return made

    async def _create_one(self, i: int, d: Disk, path: Path, size: int = 0) -> None:
        if os.path.lexists(path):
            raise DiskError(f"disks[{i}]: {path.name} exists already in the VM folder")
        if d.image and not size:  # a private copy of a store image
            with self._open_image(i, "image", d.image, os.O_RDONLY, d.format) as src:
                await qemu_img("convert", "-f", d.format, "-O", d.format, f"/proc/self/fd/{src.fd}",
                               str(path), pass_fds=(src.fd,))
        elif d.backing:
            with self._open_image(i, "backing", d.backing, os.O_RDONLY, "") as base:
                bfmt = "qcow2" if d.backing.endswith(".qcow2") else "raw"
                size = size or d.size_bytes or await virtual_size(base.fd, bfmt)
                # -u: the header records the image's name only; QEMU is always given the
                # backing node itself (qemu_args), never this name to open
                await qemu_img("create", "-q", "-f", "qcow2", "-F", bfmt, "-b", d.backing, "-u", str(path),
                               str(size))
        else:
            await qemu_img("create", "-q", "-f", d.format, str(path), str(size or d.size_bytes))
        os.chmod(path, 0o600)

    async def create_for_migration(self, spec: VMSpec, folder: Path, plan: list[dict[str, object]]) -> None:
        """A migration destination's local disks: empty files of the source's sizes (an
        overlay on the same backing image when the digests match), filled by the mirror."""
        made: list[Path] = []
        try:
            for item in plan:
                i = int(item["index"])  # type: ignore[call-overload]
                d = spec.disks[i]
                if d.backing:
                    with self._open_image(i, "backing", d.backing, os.O_RDONLY, "") as base:
                        mine = await asyncio.to_thread(content_digest, base.fd)
                    if mine != item.get("backing_digest"):
                        raise DiskError(f"disks[{i}].backing: image {d.backing!r} here differs from the "
                                        f"source's (sha256 {mine[:16]}… here); copy the same image first")
                path = local_path(folder, spec, i)
                made.append(path)
                await self._create_one(i, Disk(d.format, d.bus, d.storage, backing=d.backing), path,
                                       size=int(item["size"]))  # type: ignore[call-overload]
        except BaseException:
            for p in made:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise

    async def migration_plan(self, spec: VMSpec, folder: Path) -> list[dict[str, object]]:
        """What a destination needs to create this VM's local disks: their virtual size
        and the digest of their backing image."""
        plan: list[dict[str, object]] = []
        for i, d in enumerate(spec.disks):
            if d.storage != "local":
                continue
            fd = open_regular(local_path(folder, spec, i), os.O_RDONLY)
            try:
                item: dict[str, object] = {"index": i, "size": await virtual_size(fd, d.format),
                                           "format": d.format}
            finally:
                os.close(fd)
            if d.backing:
                with self._open_image(i, "backing", d.backing, os.O_RDONLY, "") as base:
                    item["backing_digest"] = await asyncio.to_thread(content_digest, base.fd)
            plan.append(item)
        return plan

    def open_store_image(self, ref: str) -> tuple[int, str]:
        """A read-only descriptor of store image ``ref`` (the caller closes it) and its format
        (by its name), with the checks of any image a spec names; SpecError if refused."""
        fmt = "qcow2" if ref.endswith(".qcow2") else "raw"
        fd = self.images.open_ref("image", ref, os.O_RDONLY)
        try:
            if fmt == "qcow2":
                refuse_external_qcow2(ref, fd, "image")
        except BaseException:
            os.close(fd)
            raise
        return fd, fmt

    def open_template(self, spec: VMSpec, i: int) -> tuple[int, str] | None:
        """A read-only descriptor of the store image local disk ``i`` was copied from, and
        its format, if this host has it (a migration names its clusters: diskdedup.py)."""
        d = spec.disks[i]
        if d.storage != "local" or not d.image:
            return None
        try:
            return self._open_image(i, "image", d.image, os.O_RDONLY, d.format).take(), d.format
        except SpecError:
            return None

    async def copy_to_nbd(self, spec: VMSpec, folder: Path, i: int, socket: str) -> None:
        """Offline migration (source): write local disk ``i``'s guest-visible data to the
        NBD export ``node(i)`` behind the unix ``socket`` (relative to ``folder``), which
        the destination created empty. Only clusters allocated here are written, zero
        ones as NBD write-zeroes; an overlay's unallocated clusters are skipped (-B: the
        destination reads them from its own copy of the backing image). Every image is
        opened by descriptor: a name in a qcow2 header is never followed."""
        d = spec.disks[i]
        with _Fd(open_regular(local_path(folder, spec, i), os.O_RDONLY)) as top:
            src: dict[str, object] = {"driver": d.format,
                                      "file": {"driver": "file", "filename": f"/proc/self/fd/{top.fd}"}}
            fds = [top.fd]
            opts = ["--target-is-zero"]  # a fresh image at the destination reads as zeroes
            with contextlib.ExitStack() as stack:
                if d.backing:
                    base = stack.enter_context(self._open_image(i, "backing", d.backing, os.O_RDONLY, ""))
                    bfmt = "qcow2" if d.backing.endswith(".qcow2") else "raw"
                    src["backing"] = {"driver": bfmt,
                                      "file": {"driver": "file", "filename": f"/proc/self/fd/{base.fd}"}}
                    fds.append(base.fd)
                    # the target has the same backing image: copy the top layer only (its
                    # zero clusters too, as they hide backing data); -n: -B only says so
                    opts = ["-B", d.backing, "-F", bfmt]
                elif d.format == "qcow2":
                    src["backing"] = None
                await qemu_img("convert", "-n", *opts, "-O", "raw", json.dumps(src).join(("json:", "")),
                               f"nbd+unix:///{node(i)}?socket={socket}", pass_fds=tuple(fds), cwd=folder)

    def export_args(self, spec: VMSpec, folder: Path, indices: list[int], socket: str,
                    stack: contextlib.ExitStack) -> tuple[list[str], tuple[int, ...]]:
        """Offline migration (destination): ``qemu-storage-daemon`` arguments exporting the
        (new) local disks ``indices`` of ``folder`` writable over NBD on ``socket`` (relative
        to ``folder``, its working directory), export names ``node(i)``; and the backing
        images' descriptors it inherits (closed when ``stack`` closes)."""
        args: list[str] = []
        fds: list[int] = []
        for i in indices:
            d = spec.disks[i]
            backing = ""
            if d.backing:
                base = stack.enter_context(self._open_image(i, "backing", d.backing, os.O_RDONLY, ""))
                fds.append(base.fd)
                bfmt = "qcow2" if d.backing.endswith(".qcow2") else "raw"
                args += ["--blockdev", f"driver=file,node-name=base{i}-file,filename=/proc/self/fd/{base.fd},"
                                       "read-only=on",
                         "--blockdev", f"driver={bfmt},node-name=base{i},file=base{i}-file,read-only=on"]
                backing = f",backing=base{i}"
            args += ["--blockdev", f"driver=file,node-name={node(i)}-file,"
                                   f"filename={local_path(folder, spec, i).name}",
                     "--blockdev", f"driver={d.format},node-name={node(i)},file={node(i)}-file{backing}"]
        args += ["--nbd-server", f"addr.type=unix,addr.path={socket}"]
        for i in indices:
            args += ["--export", f"type=nbd,id=e{i},node-name={node(i)},name={node(i)},writable=on"]
        return args, tuple(fds)

    # ----- opening -----------------------------------------------------------
    def open(self, spec: VMSpec, folder: Path) -> OpenedDisks:
        """Descriptors for every disk of ``spec``; DiskError (nothing left open) if one is refused."""
        opened = OpenedDisks()
        try:
            for i, d in enumerate(spec.disks):
                opened.disks.append(self._open_disk(spec, folder, i, d))
        except BaseException:
            opened.close()
            raise
        return opened

    def _open_disk(self, spec: VMSpec, folder: Path, i: int, d: Disk) -> OpenedDisk:
        if d.storage == "shared":
            rw = self._open_image(i, "image", d.image, os.O_RDWR, d.format).take()
        else:
            path = local_path(folder, spec, i)
            try:
                rw = open_regular(path, os.O_RDWR)
            except FileNotFoundError:
                raise DiskError(f"disks[{i}]: {path.name} is missing from the VM folder") from None
            except UnsafeFile as exc:
                raise DiskError(f"disks[{i}]: {path.name}: {exc.strerror}") from None
            if d.format == "qcow2" and not d.backing:
                try:
                    refuse_external_qcow2(path.name, rw, f"disks[{i}]")
                except BaseException:
                    os.close(rw)
                    raise
        disk = OpenedDisk(rw, -1, supports_direct(rw))
        try:
            disk.ro = os.open(f"/proc/self/fd/{rw}", os.O_RDONLY | os.O_CLOEXEC)
            if d.backing:
                disk.base_ro = self._open_image(i, "backing", d.backing, os.O_RDONLY, "").take()
                disk.base_format = "qcow2" if d.backing.endswith(".qcow2") else "raw"
        except BaseException:
            disk.close()
            raise
        if d.storage == "shared" and not disk.direct:
            log.warning("shared disk without O_DIRECT: coherent only within one kernel",
                        extra={"vm": spec.name, "disk": i, "image": d.image})
        return disk


class _Fd:
    """A descriptor closed on leaving ``with`` unless ``take``n."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def take(self) -> int:
        fd, self.fd = self.fd, -1
        return fd

    def __enter__(self) -> _Fd:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def blockdev_args(spec: VMSpec, disks: OpenedDisks) -> list[str]:
    """``-add-fd``/``-blockdev``/``-device`` for every disk, in spec order (PCI slots and
    node names then match on both ends of a migration)."""
    if len(disks.disks) != len(spec.disks):
        raise ValueError(f"{len(spec.disks)} disks but {len(disks.disks)} opened")
    args: list[str] = []
    scsi = False
    for i, (d, fds) in enumerate(zip(spec.disks, disks.disks, strict=True)):
        top, base = DISK_FDSET_BASE + 2 * i, DISK_FDSET_BASE + 2 * i + 1
        cache = "on" if fds.direct else "off"
        args += ["-add-fd", f"fd={fds.rw},set={top}", "-add-fd", f"fd={fds.ro},set={top}"]
        backing = ""
        if fds.base_ro is not None:
            args += ["-add-fd", f"fd={fds.base_ro},set={base}",
                     "-blockdev", f"driver=file,node-name=base{i}-file,filename=/dev/fdset/{base},read-only=on",
                     "-blockdev", f"driver={fds.base_format},node-name=base{i},file=base{i}-file,read-only=on"]
            backing = f",backing=base{i}"
        args += ["-blockdev", f"driver=file,node-name={node(i)}-file,filename=/dev/fdset/{top},"
                              f"cache.direct={cache},discard=unmap",
                 "-blockdev", f"driver={d.format},node-name={node(i)},file={node(i)}-file{backing}"]
        if d.bus == "virtio-blk":
            args += ["-device", f"virtio-blk-pci,drive={node(i)},id=vd{i},serial=nc-disk{i}"]
        else:
            if not scsi:
                args += ["-device", "virtio-scsi-pci,id=scsi0"]
                scsi = True
            args += ["-device", f"scsi-hd,drive={node(i)},bus=scsi0.0,id=sd{i},serial=nc-disk{i}"]
    return args
