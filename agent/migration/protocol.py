"""Control messages of the migration protocol and their validation.

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
import re
from typing import Any

from novacron.agent.channel.records import Channel, ChannelClosed, ProtocolError

TAG_DEVICE_STATE = 1  # blob frames carrying QEMU's migration stream
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
