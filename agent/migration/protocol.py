"""Control messages of the migration protocol and their validation.

Destination-side dedup (``dedupdest.py``): the source offers pages by digest in
``TAG_HAVE`` blob frames (``pack_have``); the destination answers each batch with
one or more ``need`` messages (``batch``, ``seq``: its own counter, ``pages``:
base64 of little-endian u32 page numbers it could not fill, ``final``: the batch
is fully answered); the source sends those pages as data, then ``repaired``
(``seq``). Every offered page is answered before the source ends its round.

Source -> destination: ``prepare``, ``round_end``, ``paused`` (the guest stopped:
the destination announces its NICs), ``device_begin``,
``device_end``, ``go``, ``done``, ``abort``, and for local disks ``disk_open``
and ``disks_done``. Destination -> source: ``prepared``, ``ready``,
``resumed``, ``error``, ``ack`` (``bytes``: the
page-stream bytes received so far, cumulative; after ``ACK_BYTES`` and
``ACK_MIN_S``, or ``ACK_MAX_S`` while bytes arrive, and at once for each
``round_end``, then with its ``round``;
``t``: its monotonic clock, which times the link):
the source counts bytes as sent when acknowledged. Both ways: ``disk_eof``
(see ``diskrelay.py``). Both ways, from ``prepare``
on: ``keepalive`` (every ``liveness_s / 4``; silence for ``liveness_s`` means
the peer is dead or hung). A channel may instead open with ``query``
(``id``, ``vm``) in place of the grant: a restarted source asks what became of
a migration, and the destination answers ``outcome`` (``committed``,
``rolled_back`` or ``pending``) and closes. Page data and device state
travel as native page-stream frames between them. Every field read from the
peer is checked here, so a malformed message becomes one clear ProtocolError.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from novacron.agent.channel.records import Channel, ChannelClosed, ProtocolError

TAG_DEVICE_STATE = 1  # blob frames carrying QEMU's migration stream
TAG_HAVE = 2  # blob frames offering page digests instead of data (have/need, see dedupdest.py)
RELAY_SOCKET = "migrate-out.sock"  # source side: QEMU's device state enters the relay here
PAGE = 4096
MAX_RAM = 1 << 40  # 1 TiB: anything larger is a garbled message, not a VM
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")  # \Z: "$" would allow a trailing newline
ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


def _field(msg: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = msg.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"'{msg.get('op')}' message: field {key!r} missing or of wrong type")
    return value


KEEPALIVE = {"op": "keepalive"}
ACK_BYTES = 256 * 1024  # acks are cheap but not free: at most one per this many bytes ...
ACK_MIN_S = 0.02  # ... and per this many seconds (a fast link: <= 50 acks/s),
ACK_MAX_S = 0.25  # but at least this often while bytes arrive (a slow link)


def check_ack(msg: dict[str, Any], written: int) -> tuple[int, int | None, float | None]:
    """``(bytes, round or None, t or None)`` of an ``ack`` (``t``: the destination's
    monotonic seconds); it cannot acknowledge more than we wrote."""
    acked = check_int(msg, "bytes", 0, written)
    rnd = msg.get("round")
    if rnd is not None:
        rnd = check_int(msg, "round", 1, 100_000)
    t = msg.get("t")
    if t is not None and (isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < 1e12):
        raise ProtocolError("'ack' message: t must be a non-negative number")
    return acked, rnd, None if t is None else float(t)
OUTCOMES = ("committed", "rolled_back", "pending")


def check_prepare(msg: dict[str, Any]) -> tuple[str, str, dict[str, Any], int, bool]:
    mid = _field(msg, "id", str)
    if not ID_RE.match(mid):
        raise ProtocolError("'prepare' message: bad migration id")
    vm = _field(msg, "vm", str)
    if not NAME_RE.match(vm):
        raise ProtocolError("'prepare' message: bad VM name")
    spec = _field(msg, "spec", dict)
    ram = _field(msg, "ram_size", int)
    if ram <= 0 or ram % PAGE or ram > MAX_RAM:
        raise ProtocolError("'prepare' message: ram_size must be a positive multiple of 4096")
    digest = msg.get("test_digest", False)
    if not isinstance(digest, bool):
        raise ProtocolError("'prepare' message: test_digest must be a boolean")
    return mid, vm, spec, ram, digest


MAX_DISKS = 8
MAX_DISK_BYTES = 1 << 46  # 64 TiB
DIGEST_RE = re.compile(r"^[0-9a-f]{64}\Z")


def check_disk_plan(msg: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``disks`` of a ``prepare``: what the destination must create (see diskrelay)."""
    plan = msg.get("disks", [])
    if not isinstance(plan, list) or len(plan) > MAX_DISKS:
        raise ProtocolError(f"'prepare' message: disks must be a list of at most {MAX_DISKS}")
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for item in plan:
        if not isinstance(item, dict):
            raise ProtocolError("'prepare' message: a disk plan entry is not an object")
        index = item.get("index")
        size = item.get("size")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < MAX_DISKS or index in seen:
            raise ProtocolError("'prepare' message: bad or repeated disk index")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_DISK_BYTES or size % 512:
            raise ProtocolError("'prepare' message: disk size must be a positive multiple of 512")
        if item.get("format") not in ("qcow2", "raw"):
            raise ProtocolError("'prepare' message: disk format must be qcow2 or raw")
        digest = item.get("backing_digest")
        if digest is not None and (not isinstance(digest, str) or not DIGEST_RE.match(digest)):
            raise ProtocolError("'prepare' message: backing_digest must be a sha256 hex digest")
        seen.add(index)
        out.append({"index": index, "size": size, "format": item["format"], "backing_digest": digest})
    return out


def check_stream(msg: dict[str, Any], streams: list[int]) -> int:
    """The ``stream`` of a ``disk_open``/``disk_eof``: one of this migration's disks."""
    stream = _field(msg, "stream", int)
    if stream not in streams:
        raise ProtocolError(f"'{msg.get('op')}' message: stream {stream} is not a disk of this migration")
    return int(stream)


def liveness_of(msg: dict[str, Any], default: float) -> float:
    """The source's liveness deadline from ``prepare`` (absent: ``default``)."""
    value = msg.get("liveness_s", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.5 <= value <= 60:
        raise ProtocolError("'prepare' message: liveness_s must be a number between 0.5 and 60")
    return float(value)


def check_query(msg: dict[str, Any]) -> tuple[str, str]:
    mid, vm = _field(msg, "id", str), _field(msg, "vm", str)
    if not ID_RE.match(mid) or not NAME_RE.match(vm):
        raise ProtocolError("'query' message: bad migration id or VM name")
    return mid, vm


def check_int(msg: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    value = _field(msg, key, int)
    if not lo <= value <= hi:
        raise ProtocolError(f"'{msg.get('op')}' message: {key} out of range")
    return int(value)


def reason_of(msg: dict[str, Any]) -> str:
    value = msg.get("reason")
    return value[:500] if isinstance(value, str) and value else "no reason given"


async def keepalive(ch: Channel, liveness: float) -> None:
    """Send ``keepalive`` every ``liveness / 4`` until cancelled or the channel closes.
    A slow drain (page data queued ahead) is no reason to stop: the peer is reading."""
    while not ch.writer.is_closing():
        await asyncio.sleep(liveness / 4)
        try:
            await ch.send_ctrl(KEEPALIVE, timeout=liveness)
        except ChannelClosed:
            continue
        except (OSError, ValueError):
            return


def failure_reason(exc: BaseException, peer: str, timeout: str = "timed out") -> str:
    """One line saying why a migration side failed (``peer``: "source"/"destination")."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, ProtocolError):
        return f"protocol error: {exc}"
    if isinstance(exc, ChannelClosed):
        return f"channel to {peer} lost: {exc}"
    if isinstance(exc, TimeoutError):
        return timeout
    return str(exc) or type(exc).__name__


# -- destination-side dedup: have / need -----------------------------------
HAVE_HEADER = struct.Struct("<II")  # batch number, page count
MAX_HAVE_PAGES = 65536  # one batch (options.batch_pages is at most this)
MAX_NEED_PAGES = 8192  # one 'need' message (base64: ~44 KB, under the 64 KiB control limit)
DIGEST = 32


def pack_have(batch: int, pages: npt.NDArray[np.uint64], digests: npt.NDArray[np.uint8]) -> bytes:
    """A ``TAG_HAVE`` blob: batch, count, u32 page numbers, then their 32-byte digests."""
    n = int(pages.size)
    if not 0 < n <= MAX_HAVE_PAGES or digests.shape != (n, DIGEST):
        raise ValueError("a have batch holds 1..65536 pages with one digest each")
    return (HAVE_HEADER.pack(batch, n) + pages.astype("<u4").tobytes()
            + np.ascontiguousarray(digests, dtype=np.uint8).tobytes())


def check_have(data: bytes, npages: int, expect_batch: int
               ) -> tuple[int, npt.NDArray[np.uint32], npt.NDArray[np.uint8]]:
    """``(batch, pages, (n, 32) digests)`` of a ``TAG_HAVE`` blob; batches come in order,
    pages are inside guest memory and not repeated."""
    if len(data) < HAVE_HEADER.size:
        raise ProtocolError("have batch shorter than its header")
    batch, n = HAVE_HEADER.unpack_from(data)
    if batch != expect_batch:
        raise ProtocolError(f"have batch {batch} out of order (expected {expect_batch})")
    if not 0 < n <= MAX_HAVE_PAGES or len(data) != HAVE_HEADER.size + n * (4 + DIGEST):
        raise ProtocolError("have batch size does not match its page count")
    pages = np.frombuffer(data, dtype="<u4", count=n, offset=HAVE_HEADER.size).astype(np.uint32)
    if int(pages.max()) >= npages:
        raise ProtocolError("have batch names a page outside guest memory")
    if np.unique(pages).size != n:
        raise ProtocolError("have batch names a page twice")
    digests = np.frombuffer(data, dtype=np.uint8, offset=HAVE_HEADER.size + 4 * n).reshape(n, DIGEST)
    return int(batch), pages, digests


def need_message(batch: int, seq: int, pages: list[int] | npt.NDArray[np.uint32], final: bool
                 ) -> dict[str, Any]:
    raw = np.asarray(pages, dtype="<u4").tobytes()
    return {"op": "need", "batch": batch, "seq": seq, "final": final,
            "pages": base64.b64encode(raw).decode("ascii")}


def check_need(msg: dict[str, Any]) -> tuple[int, int, npt.NDArray[np.uint32], bool]:
    """``(batch, seq, pages, final)`` of a ``need``; the caller checks the pages were offered."""
    batch = check_int(msg, "batch", 0, 1 << 32)
    seq = check_int(msg, "seq", 0, 1 << 40)
    final = _field(msg, "final", bool)
    text = _field(msg, "pages", str)
    if len(text) > 4 * ((4 * MAX_NEED_PAGES + 2) // 3):
        raise ProtocolError("'need' message: too many pages")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("'need' message: pages is not base64") from None
    if len(raw) % 4:
        raise ProtocolError("'need' message: pages is not a list of u32")
    pages = np.frombuffer(raw, dtype="<u4").astype(np.uint32)
    if np.unique(pages).size != pages.size:
        raise ProtocolError("'need' message: a page is named twice")
    return batch, seq, pages, bool(final)
