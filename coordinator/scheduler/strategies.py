"""Placement strategies: the multi-objective one and the classic baselines.

Every strategy sees the same feasible candidates and returns the position
(within those candidates) of the host it picks, plus, for the weighted
strategies, the per-candidate scores used for the explanation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from novacron.coordinator.scheduler.fleet import F64, FleetState
from novacron.coordinator.scheduler.model import VMRequest, Weights

# Named weight sets; "balanced" is the default ("ours" in the benchmark), the
# others are the arms the learned policy can choose between.
WEIGHT_SETS: dict[str, Weights] = {
    "balanced": Weights(),
    "pack": Weights(cost=0.7, performance=0.3, latency=0.0),
    "latency": Weights(cost=0.6, performance=0.15, latency=0.25),
    "headroom": Weights(cost=0.6, performance=0.35, latency=0.05),
}
BASELINES = ("first-fit", "best-fit", "spread")
STRATEGIES = (*WEIGHT_SETS, *BASELINES)


@dataclass
class Pick:
    position: int
    scores: F64 | None  # baselines' ranking key, lower is better


def baseline_pick(name: str, fleet: FleetState, req: VMRequest, hosts: np.ndarray) -> Pick:
    """First-fit: lowest host slot. Best-fit: least CPU+memory fraction left.
    Spread (least-allocated): lowest dominant utilisation after placing."""
    if name == "first-fit":
        return Pick(0, None)  # hosts are ascending slots
    cpu_after = (fleet.cpu_used[hosts] + req.vcpus) / fleet.cpu_cap[hosts]
    mem_after = (fleet.mem_used[hosts] + req.memory_mib) / fleet.mem_cap[hosts]
    if name == "best-fit":
        key = (1.0 - cpu_after) + (1.0 - mem_after)
    elif name == "spread":
        key = np.maximum(cpu_after, mem_after)
    else:
        raise ValueError(f"unknown baseline {name!r}")
    return Pick(int(np.argmin(key)), key)
