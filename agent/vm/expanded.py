"""Uncompressed copies of compressed store images, for the disk cluster index.

A migration names the clusters of a local disk that the destination's copy of the
disk's image already holds (agent/migration/diskdedup.py): the destination hashes
that image's clusters where ``qemu-img map`` gives their file offsets, and later
reads the named ones back by offset. A compressed qcow2 cluster (how distribution
cloud images ship) has no such offset, so an image made of them would name nothing.

For those, the agent keeps a sparse raw copy of the image's guest-visible data in
``disk_index_dir`` (default ``<state_dir>/disk-index``): made once by ``qemu-img
convert`` in the background, so a migration waits for it only while its index
budget allows and the next one finds it ready; named by the image's device, inode,
size and mtime, so a changed image gets a new copy (and a stale one costs misses,
repaired by the digest check, never wrong data). Bounds: one copy made at a time;
at most ``KEEP`` copies and ``MAX_BYTES`` of them, room made (least recently used
dropped first) before a copy starts, never past ``RESERVE`` of the file system's free space,
and never on a memory-backed file system (a tmpfs ``state_dir`` holds guest RAM:
copies there would take the host's memory). A copy that failed is not tried again
for ``RETRY_S``.
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
from novacron.agent.vm.ramfile import MEMORY_FILESYSTEMS, filesystem_type

log = logging.getLogger("novacron.agent.disks")

KEEP = 4  # copies kept
MAX_BYTES = 64 << 30  # allocated bytes of all copies
RESERVE = 0.10  # of the file system, left free
RETRY_S = 3600.0  # after a failed copy of an image
MIN_RATE = 50e6  # bytes/s a copy is given at least (qemu-img's time limit)
_SUFFIX = ".raw"


class Expanded:
    def __init__(self, folder: Path, keep: int = KEEP, max_bytes: int = MAX_BYTES) -> None:
        self.folder, self.keep, self.max_bytes = folder, keep, max_bytes
        self._making: tuple[str, asyncio.Task[bool]] | None = None  # (name, task): one at a time
        self._failed: dict[str, float] = {}  # name -> when
        self._warned = ""
        self.refusal = ""  # why the last start() made no copy
        self.made = 0  # copies finished by this agent (for tests and the status)

    @staticmethod
    def name_of(st: os.stat_result) -> str:
        return f"{st.st_dev:x}-{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}{_SUFFIX}"

    def open(self, st: os.stat_result) -> int | None:
        """A read-only descriptor of the finished copy of the image ``st`` describes, or None."""
        try:
            fd = os.open(self.folder / self.name_of(st), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        with contextlib.suppress(OSError):  # used now: the access time orders eviction (the mtime keys its index)
            os.utime(fd, ns=(time.time_ns(), os.fstat(fd).st_mtime_ns))
        return fd

    def start(self, fd: int, fmt: str, st: os.stat_result, data_bytes: int) -> asyncio.Future[bool] | None:
        """Begin (or join) the copy of the image open on ``fd`` (not closed here: the copy
        keeps its own descriptor), ``data_bytes`` of guest data; the future says whether
        it finished. None where it may not be made now (see the module notes)."""
        name = self.name_of(st)
        if self._making is not None and self._making[0] == name:
            return self._making[1]
        if (self.folder / name).exists():  # made meanwhile (by a copy another migration started)
            done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            done.set_result(True)
            return done
        why = ""
        if self._making is not None:
            why = "another image's copy is being made"
        elif time.monotonic() - self._failed.get(name, -RETRY_S) < RETRY_S:
            why = "its copy failed within the last hour"
        else:
            why = self._no_room(data_bytes)
        self.refusal = why
        if why:
            if why != self._warned:  # once per reason, not once per migration
                log.warning("compressed disk image not expanded for indexing; its compressed clusters are sent",
                            extra={"reason": why})
                self._warned = why
            return None
        own = os.dup(fd)
        task = asyncio.ensure_future(self._make(own, fmt, name, data_bytes))
        self._making = (name, task)
        task.add_done_callback(self._made)
        return task

    def _made(self, task: asyncio.Task[bool]) -> None:
        self._making = None
        if not task.cancelled() and (exc := task.exception()) is not None:  # (retrieved: logged here)
            log.error("disk image copy failed", extra={"error": repr(exc)})

    async def _make(self, fd: int, fmt: str, name: str, data_bytes: int) -> bool:
        part = self.folder / f".{name}.part"
        t0 = time.monotonic()
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                part.unlink()  # an earlier agent's, cut short
            # -S: runs of zeroes stay holes; -U: the image may be open elsewhere (read-only)
            await qemu_img("convert", "-U", "-f", fmt, "-O", "raw", "-S", "64k",
                           f"/proc/self/fd/{fd}", str(part), pass_fds=(fd,),
                           timeout_s=max(600.0, data_bytes / MIN_RATE))
            os.rename(part, self.folder / name)
            self._evict(keep=name)
        except (OSError, DiskError) as exc:  # (a timeout too)
            self._failed[name] = time.monotonic()
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
        return True

    def _copies(self) -> list[tuple[float, int, Path]]:
        """(last use, allocated bytes, path) of the finished copies, least recent first."""
        out = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for entry in os.scandir(self.folder):
                if entry.name.endswith(_SUFFIX) and not entry.name.startswith("."):
                    with contextlib.suppress(OSError):
                        s = entry.stat(follow_symlinks=False)
                        out.append((s.st_atime, s.st_blocks * 512, Path(entry.path)))
        return sorted(out)

    def _no_room(self, need: int) -> str:
        """Empty when a copy of ``need`` allocated bytes fits once old copies are dropped
        (they are then), else why not (and nothing is dropped)."""
        if need > self.max_bytes:
            return f"the image holds {need} bytes of data, more than the {self.max_bytes} kept for copies"
        at = self.folder
        while not at.exists() and at != at.parent:
            at = at.parent
        if (kind := filesystem_type(at)) in MEMORY_FILESYSTEMS:
            return (f"{self.folder} is on {kind}: a copy would take the host's memory "
                    "(set disk_index_dir to a folder on disk)")
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # copies cut short by an earlier agent
            for entry in os.scandir(self.folder):
                if entry.name.startswith(".") and entry.name.endswith(".part"):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
        copies = self._copies()
        drop: list[tuple[float, int, Path]] = []
        held = sum(b for _, b, _ in copies)
        while copies and (len(copies) >= self.keep or held + need > self.max_bytes):
            drop.append(copies.pop(0))
            held -= drop[-1][1]
        try:
            fs = os.statvfs(at)
        except OSError as exc:
            return f"cannot tell the free space: {exc}"
        free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
        if free + sum(b for _, b, _ in drop) - need < RESERVE * total:
            return f"{need} bytes would leave less than {RESERVE:.0%} of the file system free"
        for _, _, path in drop:
            with contextlib.suppress(OSError):
                path.unlink()  # (one a migration still reads frees its space when it closes it)
        return ""

    def _evict(self, keep: str) -> None:
        copies = [c for c in self._copies() if c[2].name != keep]  # never the copy just made
        held = sum(b for _, b, _ in copies)
        with contextlib.suppress(OSError):
            path = self.folder / keep
            s = path.stat(follow_symlinks=False)
            os.utime(path, ns=(time.time_ns(), s.st_mtime_ns), follow_symlinks=False)  # used now
            held += s.st_blocks * 512
        while copies and (len(copies) + 1 > self.keep or held > self.max_bytes):
            _, b, path = copies.pop(0)
            with contextlib.suppress(OSError):
                path.unlink()
            held -= b

    def as_dict(self) -> dict[str, Any]:
        copies = self._copies()
        return {"folder": str(self.folder), "copies": len(copies), "bytes": sum(b for _, b, _ in copies),
                "making": self._making[0] if self._making else None}

