"""Post-copy: QEMU's own ``postcopy-ram``, its stream carried over our channel.

With ``on_no_converge = postcopy`` QEMU moves the guest's RAM itself (not our
page engine): QEMU's post-copy discards the destination's RAM when the
migration starts (``postcopy-advise``) and its source sends from a bitmap of
every page, so pages our engine had copied before would be thrown away and
sent again. The agents relay QEMU's migration connection, both ways (the
destination's page requests travel back on it), as ``DATA`` records of stream
``QEMU_STREAM`` on the authenticated, encrypted migration channel.

Pre-copy is QEMU's, under our cap (``max-bandwidth``) and budget
(``downtime-limit``). If it converges, QEMU completes it and the switchover is
the ordinary one (``ready``/``go``/``resumed``). If it has not after
``max_rounds`` dirty-bitmap syncs, the source journals ``go`` (from here on it
never resumes), tells the destination ``postcopy`` and runs
``migrate-start-postcopy``: QEMU stops the source, sends the device state, the
destination agent adopts the VM and starts it, and QEMU serves the pages the
guest touches on demand (ahead of the background push) until the destination
has every page; only then (``postcopy_done``) is the source released.

A channel lost during post-copy pauses the guest's missing-page faults at the
destination (QEMU ``postcopy-paused``); neither side destroys anything. The
source reconnects with the same grant (``postcopy_resume``), the destination
runs ``migrate-recover`` and answers ``recovering``, the source's QEMU
``migrate``s with ``resume``. Bounded: ``postcopy_recover_s``; after it both
copies are kept (the memory is split between them) and the migration is left
in doubt, never rolled back. See README "Post-copy" for the failure semantics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Callable
from typing import Any

from novacron.agent.channel.records import MAX_DATA_CHUNK, Channel, ChannelClosed

log = logging.getLogger("novacron.agent.migration")

QEMU_STREAM = 255  # DATA stream id of QEMU's migration connection (disk streams are 0..7)
READ_CHUNK = 256 * 1024
POLL_S = 0.1  # query-migrate while QEMU migrates
RECOVER_TRY_S = 10.0  # one recovery attempt: reconnect, handshake, QEMU resumes


class QemuStream:
    """QEMU's migration connection on this side, relayed both ways over a channel.

    Local bytes go out as DATA records; the peer's arrive through ``deliver``. The
    channel can be swapped (post-copy recovery) along with the local connection."""

    def __init__(self, ch: Channel, count: Callable[[int], None] | None = None) -> None:
        self.ch = ch
        self.count = count  # bytes this side pumped out
        self.writer: asyncio.StreamWriter | None = None
        self.pump: asyncio.Task[None] | None = None
        self.eof = asyncio.Event()  # local QEMU closed its end
        self.error: str | None = None

    def attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.eof.clear()
        self.error = None
        self.pump = asyncio.create_task(self._pump(reader), name="qemu stream")

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(min(READ_CHUNK, MAX_DATA_CHUNK)):
                self.ch.write_data(QEMU_STREAM, chunk)
                if self.count is not None:
                    self.count(len(chunk))
                await self.ch.drain()
        except (ChannelClosed, ConnectionError, OSError, TimeoutError) as exc:
            self.error = f"QEMU stream: {exc}"
        except asyncio.CancelledError:
            return
        self.eof.set()

    def deliver_nowait(self, data: bytes | bytearray) -> None:
        """The peer's bytes for our QEMU (source side: the return path, small)."""
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    async def deliver(self, data: bytes | bytearray) -> None:
        """The peer's bytes for our QEMU, with backpressure (destination side)."""
        if self.writer is None or self.writer.is_closing():
            return  # QEMU hung up (it failed, or recovery replaces it): the stream is dead
        self.writer.write(data)
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(self.writer.drain(), 60)

    async def close(self) -> None:
        """Drop the local connection (QEMU sees the stream break)."""
        if self.pump is not None:
            self.pump.cancel()
            with contextlib.suppress(BaseException):
                await self.pump
            self.pump = None
        w, self.writer = self.writer, None
        if w is not None:
            w.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(w.wait_closed(), 5)


def ram_progress(info: dict[str, Any]) -> dict[str, Any]:
    """The figures of QEMU's ``query-migrate`` we show (bytes, rates, rounds)."""
    ram = info.get("ram") or {}
    return {
        "transferred": int(ram.get("transferred", 0)),
        "remaining": int(ram.get("remaining", 0)),
        "total": int(ram.get("total", 0)),
        "mbps": float(ram.get("mbps", 0.0)),
        "dirty_pages_rate": int(ram.get("dirty-pages-rate", 0)),
        "dirty_sync_count": int(ram.get("dirty-sync-count", 0)),
        "postcopy_requests": int(ram.get("postcopy-requests", 0)),
        "postcopy_bytes": int(ram.get("postcopy-bytes", 0)),
        "normal_pages": int(ram.get("normal", 0)),
        "duplicate_pages": int(ram.get("duplicate", 0)),
    }


# QEMU trace events (log backend, timestamped by ``-msg timestamp=on``) that time each
# page fault at the destination: a vCPU blocks on a missing page, the page is placed
FAULT_EVENTS = ("mark_postcopy_blocktime_begin", "postcopy_place_page")
_TRACE = re.compile(rb"^\d+@(\d+\.\d+):(mark_postcopy_blocktime_begin|postcopy_place_page) (.*)$", re.M)
_BEGIN = re.compile(rb"addr: (0x[0-9a-f]+),.*already_received: 0")
_PLACE = re.compile(rb"host=(0x[0-9a-f]+)")


def fault_latencies(log: bytes) -> list[float]:
    """Milliseconds from each vCPU fault on a missing page to that page's placement,
    from the destination QEMU's trace lines (faults not yet served are left out)."""
    waiting: dict[bytes, float] = {}
    out: list[float] = []
    for m in _TRACE.finditer(log):
        t, event, rest = float(m.group(1)), m.group(2), m.group(3)
        if event == b"mark_postcopy_blocktime_begin":
            b = _BEGIN.search(rest)
            if b is not None:
                waiting.setdefault(b.group(1), t)
        else:
            p = _PLACE.search(rest)
            if p is not None and (t0 := waiting.pop(p.group(1), None)) is not None:
                out.append((t - t0) * 1000.0)
    return out


def percentiles(values: list[float]) -> dict[str, Any]:
    """count, p50, p99 and max (nearest rank) of ``values``, in the same unit."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 3)

    return {"count": len(v), "p50": rank(0.50), "p99": rank(0.99), "max": round(v[-1], 3)}


def blocktime(info: dict[str, Any]) -> dict[str, Any]:
    """The destination's ``postcopy-blocktime`` figures (ms the vCPUs waited on pages)."""
    per_vcpu = info.get("postcopy-vcpu-blocktime") or []
    return {"total_ms": info.get("postcopy-blocktime"),
            "vcpu_ms": [int(v) for v in per_vcpu if isinstance(v, int)]}
