"""Disk clusters the destination already holds are named by digest, not sent.

A local disk copied from a store image (``image`` in its spec) starts as that image, and
the destination usually has the same image in its store. The destination indexes that
image's clusters (BLAKE3 of every non-zero 64 KiB cluster at a 64 KiB-aligned guest
offset) and announces the first 8 bytes of each digest (the ``DISK_KEYS`` stream, before
``prepared``). The source's relay, which follows QEMU's NBD writes
(:class:`nbdwire.NbdTracker`), then replaces each whole aligned cluster of a write whose
key was announced by its full digest (a ``T_WRITE`` frame); every other byte of that
disk's NBD stream goes as ``T_RAW``. The destination reads a named cluster from its own
image, checks the full digest, and hands its QEMU the write only once it is whole.

A cluster that is not what was announced (the image replaced since, or two digests that
share 8 bytes) is a miss: the destination asks for it (``disk_need``: the write's
handle and positions), holds that disk's later frames behind it, and the source sends
the bytes on the ``DISK_REPAIR`` stream from the copy it keeps of every such write until
the destination's QEMU has answered it. Nothing wrong is ever written, and a miss costs
a round trip, never correctness.

A compressed qcow2 cluster has no file offset to hash or read back: such an image is
indexed through its uncompressed copy (vm/expanded.py), made once.

Bounds: an index holds at most ``MAX_CLUSTERS`` clusters (64 GiB of image; 16 bytes
each, reported as ``index_bytes``); a frame at most one NBD write; frames held behind a
miss at most ``MAX_HELD`` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import numpy as np

from novacron.agent.channel.records import MAX_DATA_CHUNK, Channel, ProtocolError
from novacron.agent.migration.nbdwire import MAX_PAYLOAD
from novacron.agent.migration.status import MigrationStatus
from novacron.agent.vm.disks import DiskError, qemu_img
from novacron.agent.vm.expanded import Expanded

log = logging.getLogger("novacron.agent.migration")

CLUSTER = 64 * 1024  # QEMU's default qcow2 cluster and mirror granularity
DISK_KEYS = 254  # DATA stream id, destination -> source: disk index byte + 8-byte keys
DISK_REPAIR = 253  # DATA stream id, source -> destination: a missed cluster's bytes
MAX_CLUSTERS = 1 << 20
MAX_HELD = 64 << 20
READ_RUN = 4 << 20  # the index reads the image this much at a time
INDEX_BUDGET_S = 30.0  # an image's first index reads at most this long (3.6 GB/s from page cache here)
INDEX_CACHE = 2  # indexes kept between migrations (by the image's inode, size and mtime)

T_RAW, T_WRITE = 0, 1
_FRAME = struct.Struct(">BI")  # type, body length
_NBD_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, command, handle, offset, length
_REF = struct.Struct(">I32s")  # position in the payload, full digest
_REPAIR = struct.Struct(">BQI")  # disk stream, handle, position
_ZERO = bytes(CLUSTER)
_KEYS_PER_RECORD = (MAX_DATA_CHUNK - 1) // 8
MAX_BODY = _NBD_REQUEST.size + 4 + (MAX_PAYLOAD // CLUSTER + 1) * _REF.size + MAX_PAYLOAD


def key_of(digest: bytes) -> int:
    return int.from_bytes(digest[:8], "little")


def _find(keys: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """Where each of ``ks`` is in the sorted ``keys``, -1 where it is not."""
    if not len(keys):
        return np.full(len(ks), -1, dtype=np.int64)
    at = np.searchsorted(keys, ks)
    clipped = np.minimum(at, len(keys) - 1)
    return np.where(keys[clipped] == ks, clipped, -1)


# ----- the destination's index ----------------------------------------------------------
@dataclass
class ClusterIndex:
    """Sorted 8-byte keys of an image's clusters and, for each, a file offset holding it."""

    keys: np.ndarray  # uint64, sorted, unique
    offsets: np.ndarray  # int64, the file offset of keys[i]'s cluster
    truncated: bool = False  # the image had more than MAX_CLUSTERS non-zero clusters
    unmapped: int = 0  # guest bytes of data with no file offset (compressed or encrypted clusters)
    data_bytes: int = 0  # guest bytes of data in all (qemu-img map)

    @property
    def index_bytes(self) -> int:
        return int(self.keys.nbytes + self.offsets.nbytes)

    def offset_of(self, digest: bytes) -> int | None:
        i = int(_find(self.keys, np.array([key_of(digest)], dtype=np.uint64))[0])
        return int(self.offsets[i]) if i >= 0 else None


def _hash_extents(fd: int, extents: list[dict[str, Any]], budget_s: float = INDEX_BUDGET_S,
                  stop: threading.Event | None = None) -> ClusterIndex:
    """Hash every whole aligned cluster of the image's data extents (``qemu-img map``),
    as many as ``budget_s`` allows (the source waits for ``prepared`` meanwhile) until
    ``stop`` is set."""
    deadline = time.monotonic() + budget_s
    keys: list[int] = []
    offs: list[int] = []
    truncated = False
    unmapped = data_bytes = 0
    for e in extents:
        if not (e.get("data") and e.get("depth", 0) == 0):
            continue
        data_bytes += int(e.get("length", 0))
        if not isinstance(e.get("offset"), int):
            unmapped += int(e.get("length", 0))
            continue
        start, length, off0 = int(e["start"]), int(e["length"]), int(e["offset"])
        g = -(-start // CLUSTER) * CLUSTER  # first aligned guest offset in the extent
        end = (start + length) // CLUSTER * CLUSTER
        while g < end and not truncated:
            n = min(READ_RUN, end - g)
            base = off0 + (g - start)
            run = os.pread(fd, n, base)
            if len(run) < n:  # the image is shorter than its map says: index what is there
                end = g + len(run) // CLUSTER * CLUSTER
            view = memoryview(run)
            for p in range(0, len(run) // CLUSTER * CLUSTER, CLUSTER):
                piece = view[p:p + CLUSTER]
                if piece == _ZERO:  # the mirror writes zeroes as write-zeroes anyway
                    continue
                if len(keys) >= MAX_CLUSTERS:
                    truncated = True
                    break
                keys.append(key_of(blake3.blake3(piece).digest()))
                offs.append(base + p)
            g += n
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                truncated = True
    k = np.array(keys, dtype=np.uint64)
    o = np.array(offs, dtype=np.int64)
    k, first = np.unique(k, return_index=True)  # sorted; one offset per key will do
    return ClusterIndex(k, o[first], truncated, unmapped, data_bytes)


_cache: OrderedDict[tuple[int, int, int, int, str], ClusterIndex] = OrderedDict()


async def index_image(fd: int, fmt: str, budget_s: float = INDEX_BUDGET_S) -> ClusterIndex:
    """The cluster index of the image open on ``fd`` (format ``fmt``), read within
    ``budget_s``: once per (device, inode, size, mtime), then kept for the next
    migrations (unless it is partial: a later migration, its reads cached, may finish it)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, fmt)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    t0 = time.monotonic()
    # guest offsets -> file offsets: a qcow2's data clusters are where its map says
    # (a compressed or encrypted cluster has no offset there: see _index_template)
    try:
        out = await asyncio.wait_for(qemu_img("map", "--output=json", "-U", "-f", fmt, f"/proc/self/fd/{fd}",
                                              pass_fds=(fd,)), budget_s)
    except TimeoutError:
        raise DiskError(f"qemu-img map took longer than {budget_s:.0f} s") from None
    stop = threading.Event()
    hashing = asyncio.ensure_future(asyncio.to_thread(
        _hash_extents, fd, json.loads(out), budget_s - (time.monotonic() - t0), stop))
    try:
        index = await asyncio.shield(hashing)
    except BaseException:
        stop.set()  # cancelled: the thread stops reading before the caller closes fd
        with contextlib.suppress(BaseException):
            await hashing
        raise
    if index.truncated:
        log.warning("disk image indexed in part: the rest of its clusters are sent",
                    extra={"clusters": len(index.keys), "budget_s": round(budget_s, 1), "max": MAX_CLUSTERS})
        return index
    _cache[key] = index
    while len(_cache) > INDEX_CACHE:
        _cache.popitem(last=False)
    return index


class TemplateHolder(Protocol):
    def disk_template(self, index: int) -> tuple[int, str] | None: ...

    def disk_expanded(self) -> Expanded | None: ...


async def _index_template(fd: int, fmt: str, budget_s: float, expanded: Expanded | None,
                          stats: dict[str, Any]) -> tuple[int, ClusterIndex]:
    """The index of the image open on ``fd``, and the descriptor its offsets are of: the
    image's own, or (the image's then closed) its uncompressed copy where its clusters
    are compressed (vm/expanded.py), once that copy exists or is made within half the
    budget. Without one, its compressed clusters are not indexed: they are sent. Takes
    ``fd`` over: closed here on failure."""
    t0 = time.monotonic()
    held = fd

    async def use(copy: int) -> tuple[int, ClusterIndex]:
        nonlocal held
        os.close(fd)
        held = copy
        stats["expanded_copies_used"] = stats.get("expanded_copies_used", 0) + 1
        return copy, await index_image(copy, "raw", budget_s - (time.monotonic() - t0))

    try:
        st = os.fstat(fd)
        if expanded is not None and (copy := expanded.open(st)) is not None:
            return await use(copy)
        index = await index_image(fd, fmt, budget_s)
        if not index.unmapped or expanded is None:
            return fd, index
        making = expanded.start(fd, fmt, st, index.data_bytes)
        left = budget_s - (time.monotonic() - t0)
        if making is None or left < 2:
            return fd, index
        stats["expanded_copies_awaited"] = stats.get("expanded_copies_awaited", 0) + 1
        # with half of what is left (the copy is hashed after it); a cancel here leaves
        # it running for the next migration
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(making), left / 2)
        made = making.done() and not making.cancelled() and making.exception() is None and making.result()
        copy = expanded.open(st) if made else None
        if copy is None:
            log.info("compressed disk image not expanded in time; its compressed clusters are sent this time",
                     extra={"unmapped_bytes": index.unmapped})
            return fd, index
        return await use(copy)
    except BaseException:
        os.close(held)
        raise


async def announce(ch: Channel, status: MigrationStatus, dest: TemplateHolder,
                   disks: list[int]) -> dict[int, FrameDecoder]:
    """Destination: index the images here that local ``disks`` were copied from and send
    their keys (before ``prepared``, whose ``disk_keys`` is :func:`announced`); returns
    the decoders of those disks' framed streams. A disk without an image here (or whose
    image cannot be read) is the plain NBD relay: its data is sent."""
    t0 = time.monotonic()
    decoders: dict[int, FrameDecoder] = {}
    stats = status.disk_dedup
    try:
        for i in disks:
            left = INDEX_BUDGET_S - (time.monotonic() - t0)  # one budget for all: 'prepared' waits
            try:
                template = dest.disk_template(i) if left > 1 else None
            except (OSError, DiskError) as exc:
                log.warning("disk image not opened for indexing; its clusters are sent",
                            extra={"migration": status.id, "disk": i, "error": str(exc)})
                continue
            if template is None:
                continue
            fd, fmt = template
            try:
                fd, index = await _index_template(fd, fmt, left, dest.disk_expanded(), stats)
            except (OSError, ValueError, DiskError) as exc:  # (fd closed there)
                log.warning("disk image not indexed; its clusters are sent",
                            extra={"migration": status.id, "disk": i, "error": str(exc)})
                continue
            if not len(index.keys):  # nothing to name: the disk's stream stays plain
                os.close(fd)
                continue
            decoders[i] = FrameDecoder(i, fd, index)
            for record in key_records(i, index):
                ch.write_data(DISK_KEYS, record)
            await ch.drain()
            stats["clusters_announced"] = stats.get("clusters_announced", 0) + len(index.keys)
            stats["index_bytes"] = stats.get("index_bytes", 0) + index.index_bytes
    except BaseException:
        for dec in decoders.values():
            dec.close()
        raise
    if decoders:
        status.prepare_parts["disk_index_s"] = round(time.monotonic() - t0, 4)
    return decoders


def announced(decoders: dict[int, FrameDecoder]) -> dict[str, int]:
    """``prepared``'s ``disk_keys``: how many keys each framed disk announced."""
    return {str(i): len(d.index.keys) for i, d in decoders.items()}


def key_records(disk: int, index: ClusterIndex) -> list[bytes]:
    """``DISK_KEYS`` records announcing ``index`` for local disk ``disk``."""
    raw = index.keys.astype("<u8").tobytes()
    step = _KEYS_PER_RECORD * 8
    return [bytes([disk]) + raw[i:i + step] for i in range(0, len(raw), step)]


# ----- the source's side -----------------------------------------------------------------
class AnnouncedKeys:
    """The keys the destination announced, per disk (source side)."""

    def __init__(self, disks: list[int]) -> None:
        self.disks = disks
        self._parts: dict[int, list[bytes]] = {}
        self._count: dict[int, int] = {}
        self.keys: dict[int, np.ndarray] = {}
        self.settled = False

    def add(self, frame: bytes) -> None:
        if self.settled:
            raise ProtocolError("disk keys after 'prepared'")
        if len(frame) < 9 or (len(frame) - 1) % 8:
            raise ProtocolError(f"disk keys record of {len(frame)} bytes")
        disk = frame[0]
        if disk not in self.disks:
            raise ProtocolError(f"disk keys for disk {disk}, which this migration does not mirror")
        n = self._count.get(disk, 0) + (len(frame) - 1) // 8
        if n > MAX_CLUSTERS:
            raise ProtocolError(f"more than {MAX_CLUSTERS} disk keys for disk {disk}")
        self._count[disk] = n
        self._parts.setdefault(disk, []).append(frame[1:])

    def settle(self, announced: Any) -> None:
        """``prepared``'s ``disk_keys`` ({disk: count}) must match what arrived."""
        if announced is None:
            announced = {}
        if not isinstance(announced, dict):
            raise ProtocolError("'prepared' message: disk_keys must be an object")
        want = {}
        for k, v in announced.items():
            if not (isinstance(k, str) and k.isascii() and k.isdecimal() and isinstance(v, int)
                    and not isinstance(v, bool)):
                raise ProtocolError("'prepared' message: disk_keys must map disk indices to counts")
            want[int(k)] = v
        if want != self._count:
            raise ProtocolError(f"'prepared' announced disk keys {want}, received {self._count}")
        for disk, parts in self._parts.items():
            self.keys[disk] = np.frombuffer(b"".join(parts), dtype="<u8").astype(np.uint64)
            self.keys[disk].sort()
        self._parts.clear()
        self.settled = True


@dataclass
class Encoded:
    frame: bytes
    refs: list[int] = field(default_factory=list)  # positions sent as digests


def encode_raw(data: bytes | bytearray) -> bytes:
    return _FRAME.pack(T_RAW, len(data)) + data


def encode_write(header: bytes, payload: bytes, keys: np.ndarray) -> Encoded:
    """A ``T_WRITE`` frame: the NBD request ``header``, then each whole aligned cluster
    of ``payload`` whose key is in ``keys`` as (position, digest), then the rest."""
    offset = _NBD_REQUEST.unpack(header)[4]
    first = (-offset) % CLUSTER
    positions = list(range(first, len(payload) - CLUSTER + 1, CLUSTER))
    view = memoryview(payload)
    digests = [blake3.blake3(view[p:p + CLUSTER]).digest() for p in positions]
    refs: list[int] = []
    chosen: list[bytes] = []
    if digests:
        # the index holds no zero cluster: a zero one is never named (the destination's
        # full-digest check would turn an 8-byte collision into a repair anyway)
        hit = _find(keys, np.array([key_of(d) for d in digests], dtype=np.uint64)) >= 0
        for p, d, h in zip(positions, digests, hit, strict=True):
            if h:
                refs.append(p)
                chosen.append(_REF.pack(p, d))
    literal = bytearray()
    last = 0
    for p in refs:
        literal += view[last:p]
        last = p + CLUSTER
    literal += view[last:]
    body = header + struct.pack(">I", len(refs)) + b"".join(chosen) + literal
    return Encoded(_FRAME.pack(T_WRITE, len(body)) + body, refs)


def repair_record(stream: int, handle: int, pos: int, data: bytes | memoryview) -> bytes:
    return _REPAIR.pack(stream, handle, pos) + bytes(data)


def parse_need(msg: dict[str, Any]) -> tuple[int, int, list[int]]:
    """``disk_need``: stream, handle, positions (checked for shape; the relay checks them
    against what it sent)."""
    stream, handle, pos = msg.get("stream"), msg.get("handle"), msg.get("pos")
    if not (isinstance(stream, int) and isinstance(handle, int) and isinstance(pos, list)
            and 0 < len(pos) <= MAX_PAYLOAD // CLUSTER and all(isinstance(p, int) for p in pos)):
        raise ProtocolError("'disk_need' message: stream, handle and pos are required")
    return stream, handle, pos


# ----- the destination's side ------------------------------------------------------------
@dataclass
class _Pending:
    """A write whose named clusters are not all resolved yet."""

    handle: int
    header: bytes
    payload: bytearray
    missing: set[int]


class FrameDecoder:
    """One disk's framed stream at the destination -> the NBD bytes for its QEMU.

    :meth:`feed` and :meth:`fill` return what may go to QEMU now, in order, and the
    positions to ask the source for (one write at a time: later frames wait behind it)."""

    def __init__(self, stream: int, fd: int, index: ClusterIndex) -> None:
        self.stream = stream
        self.fd = fd
        self.index = index
        self._buf = bytearray()
        self._pending: _Pending | None = None
        self._held: deque[tuple[int, bytes]] = deque()  # frames behind a miss
        self._held_bytes = 0
        self.stats = {"refs": 0, "bytes_saved": 0, "misses": 0}

    def feed(self, data: bytes | bytearray) -> tuple[list[bytes], list[int]]:
        self._buf += data
        out: list[bytes] = []
        need: list[int] = []
        while len(self._buf) >= _FRAME.size:
            kind, length = _FRAME.unpack_from(self._buf)
            if kind not in (T_RAW, T_WRITE) or length > MAX_BODY:
                raise ProtocolError(f"disk stream {self.stream}: frame type {kind} of {length} bytes")
            if len(self._buf) < _FRAME.size + length:
                break
            body = bytes(self._buf[_FRAME.size:_FRAME.size + length])
            del self._buf[:_FRAME.size + length]
            if self._pending is not None:
                self._hold(kind, body)
                continue
            need = self._frame(kind, body, out)
        return out, need

    def _hold(self, kind: int, body: bytes) -> None:
        self._held.append((kind, body))
        self._held_bytes += len(body)
        if self._held_bytes > MAX_HELD:
            raise ProtocolError(f"disk stream {self.stream}: more than {MAX_HELD} bytes wait behind a "
                                "missing cluster")

    def _frame(self, kind: int, body: bytes, out: list[bytes]) -> list[int]:
        """Handle one frame; returns the positions to ask for (then it is pending)."""
        if kind == T_RAW:
            out.append(body)
            return []
        if len(body) < _NBD_REQUEST.size + 4:
            raise ProtocolError(f"disk stream {self.stream}: short write frame")
        header = body[:_NBD_REQUEST.size]
        _magic, _flags, cmd, handle, _offset, length = _NBD_REQUEST.unpack(header)
        (n,) = struct.unpack_from(">I", body, _NBD_REQUEST.size)
        pos0 = _NBD_REQUEST.size + 4
        lit0 = pos0 + n * _REF.size
        if cmd != 1 or length > MAX_PAYLOAD or len(body) < lit0 or len(body) - lit0 != length - n * CLUSTER:
            raise ProtocolError(f"disk stream {self.stream}: write frame does not add up")
        refs = [_REF.unpack_from(body, pos0 + i * _REF.size) for i in range(n)]
        payload = bytearray(length)
        src = memoryview(body)[lit0:]
        at = last = 0
        missing: set[int] = set()
        for p, digest in refs:
            if p < last or p + CLUSTER > length:
                raise ProtocolError(f"disk stream {self.stream}: write frame cluster at {p} out of order")
            payload[last:p] = src[at:at + p - last]
            at += p - last
            last = p + CLUSTER
            if not self._resolve(payload, p, digest):
                missing.add(p)
        payload[last:] = src[at:]
        self.stats["refs"] += n
        self.stats["bytes_saved"] += (n - len(missing)) * CLUSTER
        if missing:
            self.stats["misses"] += len(missing)
            self._pending = _Pending(handle, header, payload, missing)
            return sorted(missing)
        out.append(header + payload)
        return []

    def _resolve(self, payload: bytearray, p: int, digest: bytes) -> bool:
        off = self.index.offset_of(digest)
        if off is None:
            return False
        try:
            data = os.pread(self.fd, CLUSTER, off)
        except OSError:  # the image unreadable there now: a miss, repaired like any other
            return False
        if len(data) != CLUSTER or blake3.blake3(data).digest() != digest:
            return False  # the image changed since it was indexed, or a key collision
        payload[p:p + CLUSTER] = data
        return True

    def fill(self, handle: int, pos: int, data: bytes) -> tuple[list[bytes], list[int]]:
        """A repaired cluster: completes the pending write, then the frames behind it."""
        pend = self._pending
        if pend is None or pend.handle != handle or pos not in pend.missing or len(data) != CLUSTER:
            raise ProtocolError(f"disk stream {self.stream}: repair for handle {handle:#x} at {pos}, "
                                "which was not asked for")
        pend.payload[pos:pos + CLUSTER] = data
        pend.missing.discard(pos)
        out: list[bytes] = []
        if pend.missing:
            return out, []
        out.append(pend.header + pend.payload)
        self._pending = None
        while self._held:
            kind, body = self._held.popleft()
            self._held_bytes -= len(body)
            need = self._frame(kind, body, out)
            if need:
                return out, need
        return out, []

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def pending_handle(self) -> int | None:
        return None if self._pending is None else self._pending.handle

    @property
    def idle(self) -> bool:
        """Nothing waits for a repair (the copy may be declared complete)."""
        return self._pending is None and not self._held and not self._buf


def parse_repair(frame: bytes) -> tuple[int, int, int, bytes]:
    if len(frame) != _REPAIR.size + CLUSTER:
        raise ProtocolError(f"disk repair record of {len(frame)} bytes")
    stream, handle, pos = _REPAIR.unpack_from(frame)
    return stream, handle, pos, frame[_REPAIR.size:]
