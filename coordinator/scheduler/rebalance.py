"""Rebalancing plan: migrations that relieve hot hosts and free nearly empty ones.

The plan is computed by trying the moves on the live fleet state with the
same feasibility rules and scoring as placement (so anti-affinity, capacity
and maintenance are honoured), then undoing every trial move: planning
changes nothing. Each move's cost is estimated from the VM's memory size:
pre-copy sends all of guest RAM once plus re-sent dirty pages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from novacron.coordinator.scheduler.fleet import FleetState, PlacedVM
from novacron.coordinator.scheduler.model import SchedulerInputError, VMRequest
from novacron.coordinator.scheduler.scheduler import Scheduler

# Bytes sent per byte of guest RAM: one full copy plus ~30 % re-sent dirty
# pages for a moderately busy guest (before dedup and compression, so an upper-ish bound).
PRECOPY_FACTOR = 1.3
SEARCH_BUDGET_PER_MOVE = 20


@dataclass(frozen=True)
class RebalanceOptions:
    max_migrations: int = 10
    hot_threshold: float = 0.90  # relieve hosts whose dominant utilisation is above this
    drain_threshold: float = 0.30  # try to empty hosts below this
    bandwidth_mbps: float = 10_000.0  # link used for the cost estimate

    def check(self) -> RebalanceOptions:
        if not 1 <= self.max_migrations <= 10_000:
            raise SchedulerInputError("max_migrations", "must be between 1 and 10000")
        if not 0 < self.drain_threshold < self.hot_threshold <= 1.0:
            raise SchedulerInputError("thresholds", "need 0 < drain_threshold < hot_threshold <= 1")
        if not 0 < self.bandwidth_mbps <= 1e7:
            raise SchedulerInputError("bandwidth_mbps", "must be > 0 and at most 10,000,000")
        return self


@dataclass
class Move:
    vm: str
    source: str
    target: str
    reason: str  # "relieve-hot" | "free-host"
    memory_mib: int
    est_bytes: int
    est_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class RebalancePlan:
    moves: list[Move] = field(default_factory=list)
    hosts_freed: list[str] = field(default_factory=list)
    hot_relieved: list[str] = field(default_factory=list)
    hot_unrelieved: list[str] = field(default_factory=list)
    hourly_saving: float = 0.0
    capped: bool = False  # stopped at max_migrations (or the search budget) with work left

    def to_dict(self) -> dict[str, Any]:
        return {
            "moves": [m.to_dict() for m in self.moves],
            "hosts_freed": self.hosts_freed,
            "hot_relieved": self.hot_relieved,
            "hot_unrelieved": self.hot_unrelieved,
            "hourly_saving": round(self.hourly_saving, 4),
            "total_bytes": sum(m.est_bytes for m in self.moves),
            "total_seconds": round(sum(m.est_seconds for m in self.moves), 3),
            "capped": self.capped,
        }


class _Trial:
    """Moves applied to the fleet for planning, undone in reverse on exit."""

    def __init__(self, fleet: FleetState) -> None:
        self.fleet = fleet
        self.applied: list[tuple[str, int]] = []  # (vm, original host)
        self.enabled = fleet.enabled.copy()

    def move(self, vm_id: str, target: int) -> None:
        src = self.fleet.vms[vm_id].host
        self.fleet.move(vm_id, target)
        self.applied.append((vm_id, src))

    def rollback_to(self, mark: int) -> None:
        while len(self.applied) > mark:
            vm_id, src = self.applied.pop()
            self.fleet.move(vm_id, src)

    def __enter__(self) -> _Trial:
        return self

    def __exit__(self, *_: object) -> None:
        self.rollback_to(0)
        self.fleet.enabled[:] = self.enabled


def _movable(fleet: FleetState, vm: PlacedVM) -> bool:
    """VMs tied to peers by affinity move only as a group, which plans leave to operators."""
    if vm.affinity:
        return False
    return not any(vm.id in fleet.vms[o].affinity for o in fleet.vms_on[vm.host] if o != vm.id)


def _estimate(vm: PlacedVM, opts: RebalanceOptions) -> tuple[int, float]:
    sent = int(vm.memory_mib * (1 << 20) * PRECOPY_FACTOR)
    return sent, sent * 8 / (opts.bandwidth_mbps * 1e6)


def _find_target(sched: Scheduler, vm: PlacedVM) -> int | None:
    """Best enabled host for ``vm`` (already lifted off the fleet)."""
    req = VMRequest(vm.id, vm.vcpus, vm.memory_mib, vm.priority,
                    anti_affinity=vm.anti_affinity, anti_affinity_scope=vm.anti_affinity_scope,
                    networks=vm.networks)
    return sched.decide(req, strategy="pack").host_index


def plan(fleet: FleetState, opts: RebalanceOptions | None = None) -> RebalancePlan:
    opts = (opts or RebalanceOptions()).check()
    sched = Scheduler(fleet)
    out = RebalancePlan()
    ids = fleet.host_ids
    with _Trial(fleet) as trial:
        base_enabled = trial.enabled.copy()  # trial.enabled stays pristine for the undo
        # Targets are running hosts only: powering one on to relieve another frees nothing.
        # Nor may a move make its target hot.
        def restrict_targets(exclude: int, vm: PlacedVM, limit: float) -> None:
            fits = np.maximum((fleet.cpu_used + vm.vcpus) / fleet.cpu_cap,
                              (fleet.mem_used + vm.memory_mib) / fleet.mem_cap) <= limit + 1e-9
            fleet.enabled[:] = base_enabled & (fleet.vm_count > 0) & fits
            fleet.enabled[exclude] = False

        # Each trial placement is a full scoring pass; bound them so a plan over a
        # large fleet with many hopeless candidates still returns quickly.
        budget = [SEARCH_BUDGET_PER_MOVE * opts.max_migrations + 100]

        def lift_and_place(vm_id: str, src: int, limit: float) -> int | None:
            if budget[0] <= 0:
                out.capped = True
                return None
            budget[0] -= 1
            vm = fleet.remove(vm_id)
            try:
                restrict_targets(src, vm, limit)
                target = _find_target(sched, vm)
            finally:
                fleet.place(vm.request(), src)
            return target

        def record(vm_id: str, src: int, target: int, reason: str) -> None:
            vm = fleet.vms[vm_id]
            sent, secs = _estimate(vm, opts)
            trial.move(vm_id, target)
            out.moves.append(Move(vm_id, ids[src], ids[target], reason, vm.memory_mib, sent, round(secs, 3)))

        # 1. hot hosts, hottest first: move the smallest-memory VMs off until below the threshold
        util = fleet.utilisation()
        hot = np.flatnonzero((util > opts.hot_threshold) & (fleet.vm_count > 1))
        for h in hot[np.argsort(-util[hot], kind="stable")]:
            h = int(h)
            candidates = sorted((fleet.vms[v] for v in fleet.vms_on[h]), key=lambda v: (v.memory_mib, v.id))
            for vm in candidates:
                if fleet.utilisation()[h] <= opts.hot_threshold:
                    break
                if len(out.moves) >= opts.max_migrations:
                    out.capped = True
                    break
                if not _movable(fleet, vm):
                    continue
                target = lift_and_place(vm.id, h, opts.hot_threshold)
                if target is not None:
                    record(vm.id, h, target, "relieve-hot")
            (out.hot_relieved if fleet.utilisation()[h] <= opts.hot_threshold
             else out.hot_unrelieved).append(ids[h])

        # 2. nearly empty hosts, emptiest first: move all their VMs or none
        util = fleet.utilisation()
        light = np.flatnonzero((util < opts.drain_threshold) & (fleet.vm_count > 0) & base_enabled)
        drained: set[int] = set()
        for h in light[np.argsort(util[light], kind="stable")]:
            h = int(h)
            room = opts.max_migrations - len(out.moves)
            vms = sorted(fleet.vms_on[h])
            if room <= 0 or budget[0] <= 0:
                out.capped = True
                break
            if len(vms) > room or not all(_movable(fleet, fleet.vms[v]) for v in vms):
                continue
            mark, moves_mark = len(trial.applied), len(out.moves)
            base_enabled[h] = False  # nothing may land on a host being emptied
            ok = True
            for v in vms:
                target = lift_and_place(v, h, opts.hot_threshold)
                if target is None or target in drained:
                    ok = False
                    break
                record(v, h, target, "free-host")
            if ok:
                drained.add(h)
                out.hosts_freed.append(ids[h])
                out.hourly_saving += float(fleet.cost[h])
            else:
                trial.rollback_to(mark)
                del out.moves[moves_mark:]
                base_enabled[h] = trial.enabled[h]
    return out
