"""Placement through the bandit policy: pick a strategy per context, place,
and feed the outcome back."""

from __future__ import annotations

from pathlib import Path

from novacron.coordinator.scheduler.model import VMRequest
from novacron.coordinator.scheduler.objectives import LATENCY_SCALE_MS
from novacron.coordinator.scheduler.policy import BanditPolicy, context_of
from novacron.coordinator.scheduler.scheduler import Decision, Scheduler


class LearnedPlacer:
    def __init__(self, scheduler: Scheduler, policy: BanditPolicy | None = None,
                 state_path: Path | None = None) -> None:
        self.scheduler = scheduler
        self.state_path = state_path
        if policy is None:
            policy = BanditPolicy.load(state_path) if state_path is not None else BanditPolicy()
        self.policy = policy

    def place(self, req: VMRequest) -> Decision:
        fleet = self.scheduler.fleet
        ctx = context_of(fleet, req)
        arm = self.policy.choose(ctx)
        d = self.scheduler.place(req, strategy=arm)
        if d.host_index is None:
            self.policy.rejected(ctx, arm)
        else:
            chosen = d.explanation["chosen"]
            max_cost = float(fleet.cost.max()) or 1.0
            powered = float(fleet.cost[d.host_index]) / max_cost if chosen["powers_on"] else 0.0
            self.policy.placed(req.id, ctx, arm, powered_on_frac=powered,
                               latency_frac=chosen["latency_ms"] / LATENCY_SCALE_MS, host=d.host or "")
        d.explanation["policy"] = {"context": ctx, "arm": arm}
        return d

    def departed(self, vm_id: str) -> None:
        self.scheduler.fleet.remove(vm_id)
        self.policy.departed(vm_id)

    def migrated(self, vm_id: str) -> None:
        self.policy.migrated(vm_id)

    def save(self) -> None:
        if self.state_path is not None:
            self.policy.save(self.state_path)
