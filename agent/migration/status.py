"""Live status and metrics of one migration (what ``GET /v1/migrations/{id}`` shows)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("prepare", "precopy", "stopcopy", "postcopy", "commit", "completed", "failed", "cancelled")
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
    # seconds from the start until the destination confirmed it runs the guest (None: not
    # yet, or never): the guest's move ends here, before the source's copy is released
    resumed_s: float | None = None
    # accounting (estimate.py): bytes count as sent once the destination acked them
    bytes_acked: int = 0
    link_rate_bytes_s: float = 0.0  # measured from acks while the link was busy
    # the rate the estimate gives the pages sent while paused (uncapped unless throttle_final)
    final_rate_bytes_s: float = 0.0
    rate_bytes_s: float = 0.0  # acked bytes/s lately
    remaining_bytes: int | None = None  # still to send, estimated from the dirty set
    eta_s: float | None = None
    progress_pct: float = 0.0  # never runs backwards (see advance)
    estimate_ms: float | None = None  # the pause predicted when stop-and-copy began
    estimate_parts: dict[str, float] = field(default_factory=dict)
    no_converge: dict[str, Any] | None = None  # the figures when pre-copy gave up
    throttle_method: str = ""  # how auto-converge slowed the guest, once it did
    downtime_parts: dict[str, float] = field(default_factory=dict)  # where the pause went
    stop_scan: dict[str, Any] = field(default_factory=dict)  # what the paused scan read (stopscan.py)
    pipeline: dict[str, Any] = field(default_factory=dict)  # compression choices and rates (pipeline.py)
    # post-copy (postcopy.py): used, time_to_resume_ms, recoveries, recover_ms, blocktime, qemu figures
    postcopy: dict[str, Any] = field(default_factory=dict)
    # the link to the destination shared with this agent's other migrations to it (estimate.LinkShare)
    link_share: dict[str, Any] = field(default_factory=dict)
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
    # destination-side dedup (have/need): pages offered by digest, hits, repairs, index memory
    dedup: dict[str, Any] = field(default_factory=dict)
    # local disks' clusters named by digest (diskdedup.py): announced, named, saved, repaired
    disk_dedup: dict[str, Any] = field(default_factory=dict)
    phase_seconds: dict[str, float] = field(default_factory=dict)  # time spent in each phase
    # source: where the prepare phase went (connect_s, destination_s, first_scan_s; the last
    # two overlap, the phase ends when both did) and first_scan_pages (pages it read)
    prepare_parts: dict[str, float] = field(default_factory=dict)
    # source: where bytes_wire went (have: digests offered; round1_data, later_rounds,
    # final_pages: data frames by when; repairs: pages the destination asked for;
    # device_state), and pages sent as data, packed (zstd) or stored
    wire_parts: dict[str, int] = field(default_factory=dict)
    # called once when the migration ends (metrics); set by the manager that keeps it
    on_finish: Callable[[MigrationStatus], None] | None = field(default=None, repr=False)
    _t0: float = field(default_factory=time.monotonic)
    _t_end: float | None = None
    # CPU of this whole agent process (all threads) while the migration ran
    _cpu0: float = field(default_factory=time.process_time)
    _cpu_end: float | None = None
    _t_phase: float = field(default_factory=time.monotonic)

    def set_phase(self, phase: str) -> None:
        assert phase in PHASES, phase
        now = time.monotonic()
        if self.phase not in TERMINAL:
            self.phase_seconds[self.phase] = self.phase_seconds.get(self.phase, 0.0) + now - self._t_phase
        self._t_phase = now
        ended = phase in TERMINAL and self._t_end is None
        self.phase = phase
        if phase == "completed":
            self.progress_pct, self.remaining_bytes, self.eta_s = 100.0, 0, 0.0
        if phase in TERMINAL:
            self.finished = time.time()
            self._t_end = now
            if self._cpu_end is None:
                self._cpu_end = time.process_time()
        if ended and self.on_finish is not None:
            self.on_finish(self)

    def advance(self, pct: float) -> None:
        """Progress moves forward only; 100 only once completed."""
        self.progress_pct = max(self.progress_pct, min(99.0, round(pct, 1)))

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

    def mark_resumed(self) -> None:
        """The destination confirmed it runs the guest (the first time counts)."""
        if self.resumed_s is None:
            self.resumed_s = time.monotonic() - self._t0

    @property
    def cpu_s(self) -> float:
        end = self._cpu_end if self._cpu_end is not None else time.process_time()
        return end - self._cpu0

    def metrics(self) -> dict[str, Any]:
        ratio = (self.bytes_raw / self.bytes_wire) if self.bytes_wire else None
        cpu, gib = self.cpu_s, float(1 << 30)
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
            "bytes_acked": self.bytes_acked,
            "bytes_queued": max(0, self.bytes_wire - self.bytes_acked) if self.role == "source" else 0,
            "link_rate_bytes_s": round(self.link_rate_bytes_s, 1),
            "final_rate_bytes_s": round(self.final_rate_bytes_s, 1),
            "rate_bytes_s": round(self.rate_bytes_s, 1),
            "remaining_bytes": self.remaining_bytes,
            "eta_s": None if self.eta_s is None else round(self.eta_s, 2),
            "progress_pct": self.progress_pct,
            "dirty_rate_bytes_s": round(self.dirty_rate_pages_s * 4096, 1),
            "estimate_ms": None if self.estimate_ms is None else round(self.estimate_ms, 2),
            "estimate_parts": self.estimate_parts,
            "pause_vs_estimate": (round(self.downtime_ms / self.estimate_ms, 3)
                                  if self.downtime_ms and self.estimate_ms else None),
            "no_converge": self.no_converge,
            "throttle_method": self.throttle_method or None,
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 2),
            "downtime_parts": self.downtime_parts,
            "stop_scan": self.stop_scan,
            "pipeline": self.pipeline,
            "postcopy": self.postcopy or None,
            "budget_exceeded": self.budget_exceeded,
            "pause_ceiling_ms": self.pause_ceiling_ms,
            "total_s": round(self.total_s, 3),
            "resumed_s": None if self.resumed_s is None else round(self.resumed_s, 4),
            # agent process CPU (both cores' worth) per GiB of page data moved, and of guest RAM
            "cpu_s": round(cpu, 3),
            "cpu_s_per_gib": round(cpu * gib / self.bytes_raw, 3) if self.bytes_raw else None,
            "cpu_s_per_gib_ram": (round(cpu * gib / (self.pages_total * 4096), 3)
                                  if self.pages_total else None),
            "converged": self.converged,
            "throttle_pct": self.throttle_pct,
            "phase_seconds": {k: round(v, 4) for k, v in self.phase_seconds.items()},
            "prepare_parts": self.prepare_parts,
            "native": self.native,
            "dest_dedup": self.dedup,
            "disk_dedup": self.disk_dedup,
            "wire_parts": self.wire_parts,
            "link_share": self.link_share,
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
