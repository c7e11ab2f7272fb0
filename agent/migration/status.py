"""Live status and metrics of one migration (what ``GET /v1/migrations/{id}`` shows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("prepare", "precopy", "stopcopy", "commit", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class MigrationStatus:
    id: str
    vm: str
    role: str  # "source" or "destination"
    peer: str = ""
    phase: str = "prepare"
    round: int = 0
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # counters
    pages_total: int = 0
    pages_sent: int = 0
    pages_zero: int = 0  # zero pages: skipped at the first scan, or later sent as zero records
    pages_dedup: int = 0
    bytes_raw: int = 0
    bytes_wire: int = 0
    device_state_bytes: int = 0
    disk_bytes: int = 0  # local disks' mirror: NBD bytes relayed over the channel (source: sent)
    disk_ready_s: float | None = None  # seconds from the start until every disk mirror was ready
    dirty_pages_last_round: int = 0
    dirty_rate_pages_s: float = 0.0
    bandwidth_bytes_s: float = 0.0
    downtime_ms: float | None = None
    downtime_parts: dict[str, float] = field(default_factory=dict)  # where the pause went
    converged: bool | None = None
    throttle_pct: float = 0.0
    digest_source: str | None = None
    digest_destination: str | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # how a switchover whose answer was lost with the channel got settled
    resolution: str | None = None
    # the pause outlasted the downtime budget: never a plain success (see source.py)
    budget_exceeded: bool = False
    pause_ceiling_ms: float | None = None
    journal: Any = None  # this side's journal entry (journal.Entry), once written
    native: dict[str, Any] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # time spent in each phase
    # called once when the migration ends (metrics); set by the manager that keeps it
    on_finish: Callable[[MigrationStatus], None] | None = field(default=None, repr=False)
    _t0: float = field(default_factory=time.monotonic)
    _t_end: float | None = None
    _t_phase: float = field(default_factory=time.monotonic)

    def set_phase(self, phase: str) -> None:
        assert phase in PHASES, phase
        now = time.monotonic()
        if self.phase not in TERMINAL:
            self.phase_seconds[self.phase] = self.phase_seconds.get(self.phase, 0.0) + now - self._t_phase
        self._t_phase = now
        ended = phase in TERMINAL and self._t_end is None
        self.phase = phase
        if phase in TERMINAL:
            self.finished = time.time()
            self._t_end = now
        if ended and self.on_finish is not None:
            self.on_finish(self)

    def fail(self, reason: str, *, cancelled: bool = False) -> None:
        self.error = reason
        self.set_phase("cancelled" if cancelled else "failed")

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL

    @property
    def total_s(self) -> float:
        end = self._t_end if self._t_end is not None else time.monotonic()
        return end - self._t0

    def metrics(self) -> dict[str, Any]:
        ratio = (self.bytes_raw / self.bytes_wire) if self.bytes_wire else None
        return {
            "pages": self.pages_total,
            "pages_sent": self.pages_sent,
            "pages_zero": self.pages_zero,
            "pages_dedup": self.pages_dedup,
            "bytes_raw": self.bytes_raw,
            "bytes_wire": self.bytes_wire,
            "device_state_bytes": self.device_state_bytes,
            "disk_bytes": self.disk_bytes,
            "disk_ready_s": None if self.disk_ready_s is None else round(self.disk_ready_s, 3),
            "dirty_pages_last_round": self.dirty_pages_last_round,
            "dirty_rate_pages_s": round(self.dirty_rate_pages_s, 1),
            "bandwidth_bytes_s": round(self.bandwidth_bytes_s, 1),
            "compression_ratio": round(ratio, 3) if ratio else None,
            "dedup_ratio": round(self.pages_dedup / self.pages_sent, 4) if self.pages_sent else None,
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 2),
            "downtime_parts": self.downtime_parts,
            "budget_exceeded": self.budget_exceeded,
            "pause_ceiling_ms": self.pause_ceiling_ms,
            "total_s": round(self.total_s, 3),
            "converged": self.converged,
            "throttle_pct": self.throttle_pct,
            "phase_seconds": {k: round(v, 4) for k, v in self.phase_seconds.items()},
            "native": self.native,
        }

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id,
            "vm": self.vm,
            "role": self.role,
            "peer": self.peer,
            "phase": self.phase,
            "round": self.round,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "options": self.options,
            "metrics": self.metrics(),
            "rounds": self.rounds[-50:],
        }
        if self.resolution:
            doc["resolution"] = self.resolution
        doc["budget_exceeded"] = self.budget_exceeded
        # what survives a restart of this agent, and whether the VM is still fenced
        doc["journal"] = self.journal.public() if self.journal is not None else None
        if self.digest_source or self.digest_destination:
            doc["digest"] = {
                "source": self.digest_source,
                "destination": self.digest_destination,
                "equal": self.digest_source == self.digest_destination,
            }
        return doc
