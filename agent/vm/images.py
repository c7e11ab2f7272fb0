"""Images are not paths: kernels, initrds and disks come only from image dirs.

A VM spec names an image relative to one of the agent's image directories
(``[images] dirs``, default ``<state_dir>/images``); an absolute path is
accepted only when its real path lies inside one of them. Whatever a name
resolves to must be a regular file inside that dir after every symlink is
followed, and it is refused (a :class:`SpecError` naming the field, so a 400)
before QEMU starts otherwise: ``..``, a symlink leading out, /etc, /proc,
/dev, fifos, another VM's RAM file or serial log (the state dir never overlaps
an image dir) are all the same "not in an image directory" case.

QEMU never gets the path itself: :meth:`ImageDirs.open` opens the validated
file once (``O_NOFOLLOW``, then checks the *opened* file's real path and type),
and QEMU is handed that descriptor (``/proc/self/fd/N`` for ``-kernel`` and
``-initrd``, which QEMU reads with plain ``open``; ``/dev/fdset`` for disks).
So a file swapped after the check (TOCTOU) is never the one QEMU reads.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novacron.agent.vm.sandbox import QemuIdentity
from novacron.agent.vm.spec import SpecError, VMSpec

MAX_LISTED = 1000  # GET /v1/images lists at most this many files
MAX_DEPTH = 3  # ... found at most this many folders deep


@dataclass
class OpenedImages:
    """Descriptors of a VM's validated images, to be inherited by QEMU."""

    kernel: int | None = None
    initrd: int | None = None
    disk_rw: int | None = None
    disk_ro: int | None = None  # QEMU's block layer reopens read-only at times

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd in (self.kernel, self.initrd, self.disk_rw, self.disk_ro) if fd is not None)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.kernel = self.initrd = self.disk_rw = self.disk_ro = None


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True)
class ImageDirs:
    """The folders VM images may come from; everything else is refused."""

    dirs: tuple[Path, ...]
    qemu: QemuIdentity = field(default_factory=QemuIdentity)

    @classmethod
    def of(cls, dirs: list[Path] | tuple[Path, ...], qemu: QemuIdentity | None = None) -> ImageDirs:
        return cls(tuple(Path(os.path.realpath(d)) for d in dirs), qemu or QemuIdentity())

    # ----- resolution ------------------------------------------------------
    def resolve(self, key: str, ref: str) -> Path:
        """The real path of image ``ref`` (spec field ``key``) inside an image dir."""
        return Path(self._check_open(key, ref, os.O_RDONLY, close=True)[1])

    def _candidates(self, key: str, ref: str) -> Iterator[tuple[Path, Path]]:
        if not ref or "\0" in ref:
            raise SpecError(f"{key}: expected an image name")
        if os.path.isabs(ref):
            for d in self.dirs:
                yield d, Path(ref)
            return
        if ".." in Path(ref).parts:
            raise SpecError(f"{key}: '..' is not allowed in an image name: {ref!r}")
        for d in self.dirs:
            yield d, d / ref

    def _check_open(self, key: str, ref: str, flags: int, *, close: bool = False) -> tuple[int, str]:
        if not self.dirs:
            raise SpecError(f"{key}: this agent has no image directories configured")
        for folder, candidate in self._candidates(key, ref):
            real = os.path.realpath(candidate)
            if not _inside(real, str(folder)):
                continue  # an absolute path into another dir, or a symlink leading out
            try:
                if not stat.S_ISREG(os.stat(real).st_mode):  # never open a fifo or a device
                    raise SpecError(f"{key}: image {ref!r} is not a regular file")
                fd = os.open(real, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # a relative name may live in a later dir
            except OSError as exc:
                raise SpecError(f"{key}: image {ref!r} cannot be opened: {exc.strerror}") from None
            try:
                self._check_fd(key, ref, fd, str(folder))
            except BaseException:
                os.close(fd)
                raise
            if close:
                os.close(fd)
            return fd, real
        where = ", ".join(map(str, self.dirs))
        if os.path.isabs(ref):
            raise SpecError(f"{key}: {ref!r} is not a file inside an image directory ({where})")
        raise SpecError(f"{key}: no image {ref!r} in the image directories ({where})")

    def _check_fd(self, key: str, ref: str, fd: int, folder: str) -> None:
        # what was opened, not what the name pointed at a moment ago
        opened = os.path.realpath(f"/proc/self/fd/{fd}")
        if not _inside(opened, folder):
            raise SpecError(f"{key}: image {ref!r} moved out of the image directory while opening it")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped for one since the stat above
            raise SpecError(f"{key}: image {ref!r} is not a regular file")
        os.set_blocking(fd, True)
        # QEMU reopens kernels and initrds through /proc/self/fd as itself; disks
        # reach it as descriptors only (/dev/fdset), whoever owns the file
        if key in ("kernel", "initrd") and not self.qemu.can_read(st):
            raise SpecError(f"{key}: image {ref!r} is not readable by the QEMU user (uid {self.qemu.uid})")

    def open_ref(self, key: str, ref: str, flags: int) -> int:
        """A descriptor (``flags``: O_RDONLY or O_RDWR) for the image ``ref`` of spec field ``key``."""
        return self._check_open(key, ref, flags)[0]

    def open(self, spec: VMSpec) -> OpenedImages:
        """Open every image of ``spec``; SpecError (and nothing left open) if one is refused."""
        opened = OpenedImages()
        try:
            if spec.kernel:
                opened.kernel = self._check_open("kernel", spec.kernel, os.O_RDONLY)[0]
            if spec.initrd:
                opened.initrd = self._check_open("initrd", spec.initrd, os.O_RDONLY)[0]
            if spec.disk:
                opened.disk_rw = self._check_open("disk", spec.disk, os.O_RDWR)[0]
                if spec.disk_format == "qcow2":
                    refuse_external_qcow2(spec.disk, opened.disk_rw)
                opened.disk_ro = os.open(f"/proc/self/fd/{opened.disk_rw}", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            opened.close()
            raise
        return opened

    def check(self, spec: VMSpec) -> None:
        """Refuse ``spec`` (SpecError) unless every image it names is acceptable."""
        self.open(spec).close()

    # ----- listing -----------------------------------------------------------
    def listing(self) -> list[dict[str, Any]]:
        """The images a spec may name: regular files inside the image dirs."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for folder in self.dirs:
            base = str(folder)
            for root, dirs, files in os.walk(folder):
                depth = len(Path(root).relative_to(folder).parts)
                if depth >= MAX_DEPTH:
                    dirs.clear()
                dirs.sort()
                for name in sorted(files):
                    full = os.path.join(root, name)
                    real = os.path.realpath(full)
                    rel = os.path.relpath(full, base)
                    if rel in seen or not _inside(real, base):
                        continue
                    with contextlib.suppress(OSError):
                        st = os.stat(real)
                        if stat.S_ISREG(st.st_mode):
                            seen.add(rel)
                            out.append({"name": rel, "dir": base, "size": st.st_size})
                    if len(out) >= MAX_LISTED:
                        return out
        return out


QCOW2_MAGIC = b"QFI\xfb"
QCOW2_EXTERNAL_DATA = 1 << 2  # incompatible feature bit: guest data lives in another file


def refuse_external_qcow2(ref: str, fd: int, key: str = "disk") -> None:
    """A qcow2 header can name other files (a backing file, an external data
    file) that QEMU would open by path: refuse those images outright."""
    header = os.pread(fd, 80, 0)
    if header[:4] != QCOW2_MAGIC:
        raise SpecError(f"{key}: image {ref!r} is not a qcow2 file (its name or format says qcow2)")
    version = int.from_bytes(header[4:8], "big")
    backing_offset = int.from_bytes(header[8:16], "big")
    incompatible = int.from_bytes(header[72:80], "big") if version >= 3 and len(header) >= 80 else 0
    if backing_offset or incompatible & QCOW2_EXTERNAL_DATA:
        raise SpecError(f"{key}: qcow2 image {ref!r} refers to another file (backing or data file); "
                        "flatten it with qemu-img convert first")


# host folders an image dir must not be, contain or lie inside (config, secrets, devices) ...
SYSTEM_DIRS = ("/etc", "/proc", "/sys", "/dev", "/run")
# ... and ones it must not contain whole (an image dir inside one, e.g. a cache, is fine)
PRIVATE_DIRS = ("/root", "/home", "/var/lib")


def check_image_dirs(dirs: list[Path], state_dir: Path) -> str:
    """Why ``dirs`` cannot be image dirs next to ``state_dir`` ("" if they can).

    VM files (RAM, serial logs, QMP sockets) live under the state dir, so no
    image dir may be the state dir, contain it, or lie inside it, except the
    default ``<state_dir>/images``, which holds nothing else. Nor may one be
    or contain a system folder such as /etc (the agent's config lives there).
    """
    state = os.path.realpath(state_dir)
    allowed_inside = os.path.join(state, "images")
    for d in dirs:
        if not d.is_absolute():
            return f"{d}: image dirs must be absolute paths"
        real = os.path.realpath(d)
        if _inside(state, real):
            return f"{d}: an image dir must not contain the state dir {state_dir}"
        system = next((s for s in SYSTEM_DIRS if _inside(s, real) or _inside(real, s)), "")
        if system:
            return f"{d}: an image dir must not be, contain or lie inside the system folder {system}"
        private = next((s for s in PRIVATE_DIRS if _inside(s, real)), "")
        if private:
            return f"{d}: an image dir must not contain {private}"
        if _inside(real, state) and not _inside(real, allowed_inside):
            return f"{d}: an image dir inside the state dir must be under {allowed_inside}"
    return ""
