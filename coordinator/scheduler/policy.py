"""The learned policy: a contextual bandit choosing a placement strategy.

Context: the VM's size class and how full the fleet is. Arms: the named
weight sets plus best-fit. Each decision's reward (0..1) is settled when the
VM leaves (or is rejected): it starts at 1 and loses for powering on a host
(relative to the fleet's priciest host), for latency to the VM's region, and
for every later migration the VM needed. Rejections score 0. Arm choice is
UCB1 per context, so it is deterministic given the state, which is persisted
as a JSON file (written atomically).

Off by default: the benchmark compares it with best-fit on every run, and it
is enabled only through configuration.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from novacron.coordinator.scheduler.fleet import FleetState
from novacron.coordinator.scheduler.model import VMRequest

ARMS: tuple[str, ...] = ("balanced", "pack", "latency", "headroom", "best-fit")
STATE_VERSION = 1
EXPLORATION = 0.5  # UCB1 constant; rewards are in 0..1
POWER_ON_PENALTY = 0.6
LATENCY_PENALTY = 0.2  # at LATENCY_SCALE_MS and beyond
MIGRATION_PENALTY = 0.3


class PolicyStateError(Exception):
    """The persisted policy file is unreadable or malformed."""


def context_of(fleet: FleetState, req: VMRequest) -> str:
    size = "s" if req.vcpus <= 2 else "m" if req.vcpus <= 4 else "l"
    cap = float(fleet.cpu_cap.sum())
    load = float(fleet.cpu_used.sum()) / cap if cap > 0 else 0.0
    band = "lo" if load < 0.5 else "mid" if load < 0.8 else "hi"
    return f"{size}/{band}"


@dataclass
class ArmStats:
    n: int = 0
    total: float = 0.0

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0


@dataclass
class _Pending:
    context: str
    arm: str
    reward: float
    host: str = ""  # where the VM was placed; a change later means it was migrated


@dataclass
class BanditPolicy:
    arms: tuple[str, ...] = ARMS
    stats: dict[str, dict[str, ArmStats]] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)  # vm id -> open decision

    def choose(self, context: str) -> str:
        table = self.stats.setdefault(context, {})
        for arm in self.arms:  # play every arm once first
            if table.get(arm, ArmStats()).n == 0:
                return arm
        total = sum(s.n for s in table.values())
        log_t = math.log(max(total, 1))
        return max(self.arms, key=lambda a: table[a].mean
                   + EXPLORATION * math.sqrt(2 * log_t / table[a].n))

    def _settle(self, context: str, arm: str, reward: float) -> None:
        s = self.stats.setdefault(context, {}).setdefault(arm, ArmStats())
        s.n += 1
        s.total += min(1.0, max(0.0, reward))

    # -- outcomes --------------------------------------------------------------------
    def placed(self, vm_id: str, context: str, arm: str, *, powered_on_frac: float,
               latency_frac: float, host: str = "") -> None:
        """A decision took effect; its reward stays open until the VM leaves."""
        reward = 1.0 - POWER_ON_PENALTY * powered_on_frac - LATENCY_PENALTY * min(latency_frac, 1.0)
        self.pending[vm_id] = _Pending(context, arm, reward, host)

    def observe(self, where: dict[str, str]) -> tuple[int, int]:
        """Settle outcomes from the current VM -> host map (e.g. the coordinator's
        records): VMs gone have departed, VMs on another host were migrated.
        Returns (departed, migrated)."""
        gone = [vm for vm in self.pending if vm not in where]
        for vm in gone:
            self.departed(vm)
        moved = 0
        for vm, p in self.pending.items():
            if p.host and where[vm] != p.host:
                p.reward -= MIGRATION_PENALTY
                p.host = where[vm]
                moved += 1
        return len(gone), moved

    def rejected(self, context: str, arm: str) -> None:
        self._settle(context, arm, 0.0)

    def migrated(self, vm_id: str) -> None:
        p = self.pending.get(vm_id)
        if p is not None:
            p.reward -= MIGRATION_PENALTY

    def departed(self, vm_id: str) -> None:
        p = self.pending.pop(vm_id, None)
        if p is not None:
            self._settle(p.context, p.arm, p.reward)

    def best_arm(self, context: str) -> str | None:
        table = self.stats.get(context)
        if not table:
            return None
        return max(table, key=lambda a: table[a].mean)

    # -- persistence -----------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "arms": list(self.arms),
            "stats": {ctx: {a: {"n": s.n, "total": s.total} for a, s in t.items()}
                      for ctx, t in self.stats.items()},
            # open decisions are kept too, so a restart does not lose their outcome
            "pending": {vm: [p.context, p.arm, p.reward, p.host] for vm, p in self.pending.items()},
        }

    @classmethod
    def from_json(cls, doc: Any) -> BanditPolicy:
        try:
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported version {doc.get('version')!r}")
            arms = tuple(doc["arms"])
            unknown = set(arms) - set(ARMS)
            if unknown:
                raise ValueError(f"unknown arm(s) {sorted(unknown)}")
            stats: dict[str, dict[str, ArmStats]] = {}
            for ctx, table in doc["stats"].items():
                stats[str(ctx)] = {}
                for arm, s in table.items():
                    if arm not in arms:
                        raise ValueError(f"stats for unknown arm {arm!r}")
                    n, total = int(s["n"]), float(s["total"])
                    if n < 0 or not 0 <= total <= n or not math.isfinite(total):
                        raise ValueError(f"bad counts for {ctx}/{arm}")
                    stats[str(ctx)][arm] = ArmStats(n, total)
            pending = {str(vm): _Pending(str(c), str(a), float(r), str(h))
                       for vm, (c, a, r, h) in doc.get("pending", {}).items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise PolicyStateError(f"malformed policy state: {exc}") from None
        return cls(arms, stats, pending)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_json(), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> BanditPolicy:
        """The saved policy, or a fresh one when the file does not exist yet."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise PolicyStateError(f"{path}: {exc.strerror}") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PolicyStateError(f"{path}: not JSON: {exc}") from None
        try:
            return cls.from_json(doc)
        except PolicyStateError as exc:
            raise PolicyStateError(f"{path}: {exc}") from None
