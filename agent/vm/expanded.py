"""Uncompressed copies of compressed store images, for the disk cluster index.

A migration names the clusters of a local disk that the destination's copy of the
disk's image already holds (agent/migration/diskdedup.py): the destination hashes
that image's clusters where ``qemu-img map`` gives their file offsets, and later
reads the named ones back by offset. A compressed qcow2 cluster (how distribution
cloud images ship) has no such offset, so an image made of them would name nothing.

For those, the agent keeps a sparse raw copy of the image's guest-visible data in
``<state_dir>/disk-index/``: made once by ``qemu-img convert`` (in the background,
so a migration waits for it only while its index budget allows and the next one
finds it ready), named by the image's device, inode, size and mtime, so a changed
image gets a new copy (and a stale one costs misses, repaired by the digest check,
never wrong data). Bounds: at most ``KEEP`` copies and ``MAX_BYTES`` of allocated
space, least recently used dropped first, and never past ``RESERVE`` of the file
system's free space.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from novacron.agent.vm.disks import DiskError, qemu_img

log = logging.getLogger("novacron.agent.disks")

KEEP = 4  # copies kept
MAX_BYTES = 64 << 30  # allocated bytes of all copies
RESERVE = 0.10  # of the file system, left free
_SUFFIX = ".raw"


class Expanded:
    def __init__(self, folder: Path, keep: int = KEEP, max_bytes: int = MAX_BYTES) -> None:
        self.folder, self.keep, self.max_bytes = folder, keep, max_bytes
        self._making: dict[str, asyncio.Task[bool]] = {}
        self.made = 0  # copies finished by this agent (for tests and the status)

    @staticmethod
    def name_of(st: os.stat_result) -> str:
        return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}{_SUFFIX}"

    def open(self, st: os.stat_result) -> int | None:
        """A read-only descriptor of the finished copy of the image ``st`` describes, or None."""
        path = self.folder / self.name_of(st)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        # last use, for the eviction order (the access time: the mtime keys its index)
        with contextlib.suppress(OSError):
            os.utime(fd, ns=(time.time_ns(), os.fstat(fd).st_mtime_ns))
        return fd

    def making(self, st: os.stat_result) -> asyncio.Task[bool] | None:
        return self._making.get(self.name_of(st))

    def start(self, fd: int, fmt: str, st: os.stat_result, data_bytes: int) -> asyncio.Task[bool] | None:
        """Begin (or join) the copy of the image open on ``fd`` (not closed here: the copy
        keeps its own descriptor); its task says whether it finished. None where it
        would not fit the bounds."""
        name = self.name_of(st)
        if (task := self._making.get(name)) is not None:
            return task
        if why := self._no_room(data_bytes):
            log.warning("compressed disk image not expanded for indexing; its compressed clusters are sent",
                        extra={"reason": why})
            return None
        own = os.dup(fd)
        task = asyncio.ensure_future(self._make(own, fmt, name))
        self._making[name] = task
        task.add_done_callback(lambda _t: self._making.pop(name, None))
        return task

    async def _make(self, fd: int, fmt: str, name: str) -> bool:
        part = self.folder / f".{name}.part"
        t0 = time.monotonic()
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                part.unlink()  # an earlier agent's, cut short
            # -S: runs of zeroes stay holes; -U: the image may be open elsewhere (read-only)
            await qemu_img("convert", "-U", "-f", fmt, "-O", "raw", "-S", "64k",
                           f"/proc/self/fd/{fd}", str(part), pass_fds=(fd,))
            os.rename(part, self.folder / name)
        except (OSError, DiskError) as exc:
            log.warning("compressed disk image not expanded for indexing; its compressed clusters are sent",
                        extra={"error": str(exc)})
            with contextlib.suppress(OSError):
                part.unlink()
            return False
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        finally:
            os.close(fd)
        self.made += 1
        log.info("compressed disk image expanded for indexing",
                 extra={"copy": name, "seconds": round(time.monotonic() - t0, 2)})
        self._evict()
        return True

    def _copies(self) -> list[tuple[float, int, Path]]:
        """(last use, allocated bytes, path) of the finished copies, least recent first."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.folder):
                if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                    with contextlib.suppress(OSError):
                        s = entry.stat(follow_symlinks=False)
                        out.append((s.st_atime, s.st_blocks * 512, Path(entry.path)))
        return sorted(out)

    def _no_room(self, need: int) -> str:
        """Empty when a copy of ``need`` allocated bytes fits (dropping old copies), else why not."""
        if need > self.max_bytes:
            return f"the image holds {need} bytes of data, more than the {self.max_bytes} kept for copies"
        with contextlib.suppress(FileNotFoundError):  # copies cut short by an earlier agent
            for entry in os.scandir(self.folder):
                if entry.name.startswith(".") and entry.name.endswith(".part") \
                        and entry.name[1:-5] not in self._making:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        copies = self._copies()
        held = sum(b for _, b, _ in copies)
        while copies and (len(copies) >= self.keep or held + need > self.max_bytes):
            _, b, path = copies.pop(0)
            with contextlib.suppress(OSError):
                path.unlink()
                held -= b
        try:
            fs = os.statvfs(self.folder if self.folder.exists() else self.folder.parent)
        except OSError as exc:
            return f"cannot tell the free space: {exc}"
        free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
        if free - need < RESERVE * total:
            return f"{need} bytes would leave less than {RESERVE:.0%} of the file system free"
        return ""

    def _evict(self) -> None:
        copies = self._copies()
        held = sum(b for _, b, _ in copies)
        while len(copies) > self.keep or (copies and held > self.max_bytes):
            _, b, path = copies.pop(0)
            with contextlib.suppress(OSError):
                path.unlink()
            held -= b

    def as_dict(self) -> dict[str, Any]:
        copies = self._copies()
        return {"copies": len(copies), "bytes": sum(b for _, b, _ in copies), "making": len(self._making)}
