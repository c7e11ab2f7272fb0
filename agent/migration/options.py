"""Migration options as given in ``POST /v1/migrations`` (validated, with defaults)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

NO_CONVERGE = ("abort", "force", "postcopy")
# "novacron": this engine; "libvirt": libvirt's own live migration (an agent with
# hypervisor = "libvirt" only; see agent/hypervisors/libvirt_migration.py)
ENGINES = ("novacron", "libvirt")
# what may change while a migration runs (PATCH /v1/migrations/{id})
LIVE = ("bandwidth_mbps", "downtime_ms")


@dataclass
class MigrationOptions:
    bandwidth_mbps: float = 0.0  # MB/s cap on page data (0 = unlimited)
    downtime_ms: float = 300.0  # budget for the stop-and-copy pause (QEMU's default)
    max_rounds: int = 30  # pre-copy rounds before forcing stop-and-copy
    compression_level: int = 1  # zstd level of page frames
    # per batch, dedup + zstd only when that moves pages faster (pipeline.py); off: always
    adaptive_compression: bool = True
    throttle: bool = True  # auto-converge: duty-cycle the vCPUs when pre-copy cannot keep up
    dedup: bool = True  # send pages the destination already holds as references
    # destination-side dedup: offer pages by BLAKE3 digest first; the destination copies
    # the ones it already holds (its VMs' RAM, pages received) and asks for the rest
    dest_dedup: bool = True
    # local disks: clusters of the image a disk was copied from, when the destination
    # holds it too, cross as digests (diskdedup.py); off: every cluster's bytes
    disk_dedup: bool = True
    test_digest: bool = False  # BLAKE3 both RAMs at switchover and compare
    # fingerprint only the pages the VM's process may have written while it is paused
    # (soft-dirty bits or its resident pages, see stopscan.py); off: every page
    bounded_pause: bool = True
    batch_pages: int = 1024  # pages encoded per batch (bounds memory and limiter granularity)
    timeout_s: float = 600.0  # whole migration
    # after a channel loss past 'go': how long to ask the destination's API what
    # happened (longer than its 60 s idle timeout, so a silent partition settles)
    in_doubt_timeout_s: float = 120.0
    # liveness: each side sends keepalives every liveness_s / 4; a peer silent for
    # liveness_s fails the migration (before 'go': the source resumes)
    liveness_s: float = 2.0
    # hard ceiling of the pause: min(downtime_ms * pause_factor, max_pause_ms); reached
    # before 'go', the source resumes and the migration fails
    pause_factor: float = 10.0
    max_pause_ms: float = 10_000.0
    # pre-copy could not reach the downtime budget: 'abort' (the guest keeps running
    # here, the migration fails with the figures) or 'force' (stop-and-copy anyway,
    # reported as budget_exceeded) or 'postcopy' (QEMU moves RAM and, not converged after
    # max_rounds, runs the guest at the destination before all its memory arrived; postcopy.py)
    on_no_converge: str = "abort"
    # post-copy: how long a lost channel is retried before the migration is left in doubt
    # (the guest waits at the destination; neither copy is destroyed)
    postcopy_recover_s: float = 60.0
    # the pages sent while the guest is paused obey bandwidth_mbps too (default: they
    # go at link speed, so the cap never lengthens the pause)
    throttle_final: bool = False
    engine: str = "novacron"  # see ENGINES
    # a stopped VM: copy its local disks and define it at the destination, stopped
    # (offline.py); every other option is for the live path and ignored
    offline: bool = False

    @classmethod
    def from_dict(cls, raw: Any) -> MigrationOptions:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError("options must be an object")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"unknown option(s): {', '.join(unknown)}")
        opts = cls()
        for key, value in raw.items():
            default = getattr(opts, key)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"option {key!r} must be true or false")
            elif isinstance(default, str):
                if not isinstance(value, str):
                    raise ValueError(f"option {key!r} must be a string")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"option {key!r} must be an integer")
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"option {key!r} must be a number")
            setattr(opts, key, value)
        opts.validate()
        return opts

    def validate(self) -> None:
        if not 0 <= self.bandwidth_mbps <= 1e6:
            raise ValueError("option 'bandwidth_mbps' must be between 0 (unlimited) and 1e6")
        if not 1 <= self.downtime_ms <= 60_000:
            raise ValueError("option 'downtime_ms' must be between 1 and 60000")
        if not 1 <= self.max_rounds <= 1000:
            raise ValueError("option 'max_rounds' must be between 1 and 1000")
        if not 1 <= self.compression_level <= 19:
            raise ValueError("option 'compression_level' must be between 1 and 19")
        if not 64 <= self.batch_pages <= 65536:
            raise ValueError("option 'batch_pages' must be between 64 and 65536")
        if not 1 <= self.timeout_s <= 86_400:
            raise ValueError("option 'timeout_s' must be between 1 and 86400")
        if not 0.1 <= self.in_doubt_timeout_s <= 3600:
            raise ValueError("option 'in_doubt_timeout_s' must be between 0.1 and 3600")
        if not 0.5 <= self.liveness_s <= 60:
            raise ValueError("option 'liveness_s' must be between 0.5 and 60")
        if not 1 <= self.pause_factor <= 10_000:
            raise ValueError("option 'pause_factor' must be between 1 and 10000")
        if not 10 <= self.max_pause_ms <= 600_000:
            raise ValueError("option 'max_pause_ms' must be between 10 and 600000")
        if self.engine not in ENGINES:
            raise ValueError(f"option 'engine' must be one of {', '.join(ENGINES)}")
        if self.on_no_converge not in NO_CONVERGE:
            raise ValueError("option 'on_no_converge' must be 'abort', 'force' or 'postcopy'")
        if not 1 <= self.postcopy_recover_s <= 3600:
            raise ValueError("option 'postcopy_recover_s' must be between 1 and 3600")
        if self.offline and (self.on_no_converge == "postcopy" or self.test_digest):
            raise ValueError("option 'offline' cannot be combined with post-copy or test_digest")
        if self.on_no_converge == "postcopy" and self.test_digest:
            # the destination's RAM fills while the guest runs there: no moment to compare
            raise ValueError("option 'test_digest' cannot be combined with on_no_converge 'postcopy'")

    @property
    def pause_ceiling_ms(self) -> float:
        return min(self.downtime_ms * self.pause_factor, self.max_pause_ms)

    def changed(self, raw: Any) -> MigrationOptions:
        """A copy with the live-changeable options in ``raw`` applied (validated)."""
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"give at least one of: {', '.join(LIVE)}")
        fixed = sorted(set(raw) - set(LIVE))
        if fixed:
            raise ValueError(f"cannot change {', '.join(fixed)} while migrating; "
                             f"only {', '.join(LIVE)}")
        return MigrationOptions.from_dict({**self.as_dict(), **raw})

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
