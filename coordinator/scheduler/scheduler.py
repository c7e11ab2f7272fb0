"""The placement decision: filter, score on three objectives, Pareto front,
choose by weights, explain.

``Scheduler.decide`` is a dry run (nothing changes); ``Scheduler.place``
decides and records the VM on the chosen host.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from novacron.coordinator.scheduler.filters import REASONS, feasible
from novacron.coordinator.scheduler.fleet import FleetState
from novacron.coordinator.scheduler.model import (
    DEFAULT_WEIGHTS,
    SchedulerInputError,
    VMRequest,
    Weights,
)
from novacron.coordinator.scheduler.objectives import Objectives, evaluate, weighted_score
from novacron.coordinator.scheduler.pareto import pareto_front
from novacron.coordinator.scheduler.strategies import BASELINES, WEIGHT_SETS, baseline_pick

log = logging.getLogger("novacron.scheduler")

TOP_ALTERNATIVES = 3
ALTERNATIVE_POOL = 64  # best-scored hosts searched for distinct runners-up


@dataclass
class Decision:
    vm: VMRequest
    strategy: str
    host: str | None  # None: nowhere feasible
    host_index: int | None
    explanation: dict[str, Any] = field(default_factory=dict)

    @property
    def placed(self) -> bool:
        return self.host is not None

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm.id, "host": self.host, "strategy": self.strategy,
                "placed": self.placed, "explanation": self.explanation}


def _round(x: float) -> float:
    return round(float(x), 4)


class Scheduler:
    """Places VMs on a :class:`FleetState` it shares with its owner."""

    def __init__(self, fleet: FleetState, weights: Weights = DEFAULT_WEIGHTS) -> None:
        self.fleet = fleet
        self.weights = weights

    def decide(self, req: VMRequest, *, strategy: str = "balanced",
               weights: Weights | None = None) -> Decision:
        """Choose a host for ``req`` without changing anything."""
        if strategy not in WEIGHT_SETS and strategy not in BASELINES:
            raise SchedulerInputError("strategy", f"unknown strategy {strategy!r}")
        if req.id in self.fleet.vms:
            raise SchedulerInputError(f"vm {req.id}", "already placed")
        fleet = self.fleet
        feas = feasible(fleet, req)
        hosts = np.flatnonzero(feas.ok)
        expl: dict[str, Any] = {
            "hosts_considered": fleet.n,
            "feasible": int(hosts.size),
            "rejected": {r: {"hosts": c, "why": REASONS[r]} for r, c in feas.rejected.items()},
        }
        if hosts.size == 0:
            worst = max(feas.rejected.items(), key=lambda kv: kv[1])[0] if feas.rejected else None
            expl["why"] = ("no host can take this VM" +
                           (f"; most often: {REASONS[worst]}" if worst else ": the fleet has no hosts"))
            return Decision(req, strategy, None, None, expl)

        obj = evaluate(fleet, req, hosts)
        if strategy in BASELINES:
            pick = baseline_pick(strategy, fleet, req, hosts)
            pos, scores = pick.position, pick.scores
            expl["weights"] = None
            front = None
        else:
            w = weights if weights is not None else (
                self.weights if strategy == "balanced" else WEIGHT_SETS[strategy])
            max_cost = float(fleet.cost.max()) if fleet.n else 0.0
            scores = weighted_score(obj, w, max_cost)
            front = pareto_front(obj.matrix())
            # The score never decreases along an objective, so its minimum is reached on
            # the front; choosing there breaks ties (latency is capped when weighed, so
            # 200 and 201 ms score alike) towards the host that is not dominated.
            pos = int(front[np.argmin(scores[front])])
            expl["weights"] = {"cost": w.cost, "performance": w.performance, "latency": w.latency}
            expl["pareto_front_size"] = int(front.size)
        chosen = int(hosts[pos])
        expl["chosen"] = self._describe(obj, pos, scores)
        expl["alternatives"] = self._alternatives(obj, pos, scores)
        expl["why"] = self._why(strategy, obj, pos, front)
        return Decision(req, strategy, fleet.host_ids[chosen], chosen, expl)

    def place(self, req: VMRequest, *, strategy: str = "balanced",
              weights: Weights | None = None) -> Decision:
        d = self.decide(req, strategy=strategy, weights=weights)
        if d.host_index is not None:
            self.fleet.place(req, d.host_index)
        return d

    # -- explanation -----------------------------------------------------------------
    def _describe(self, obj: Objectives, pos: int, scores: np.ndarray | None) -> dict[str, Any]:
        i = int(obj.hosts[pos])
        out: dict[str, Any] = {
            "host": self.fleet.host_ids[i],
            "zone": self.fleet.zones[int(self.fleet.zone[i])],
            "cost_per_hour": _round(obj.cost[pos]),
            "powers_on": bool(obj.power_on[pos]),
            "performance": _round(obj.performance[pos]),
            "latency_ms": _round(obj.latency[pos]),
            "utilisation_after": _round(obj.util_after[pos]),
        }
        if scores is not None:
            out["score"] = _round(scores[pos])
        return out

    def _alternatives(self, obj: Objectives, pos: int, scores: np.ndarray | None) -> list[dict[str, Any]]:
        # Runners-up with distinct objective values: ten identical empty hosts say
        # less than the best few different options.
        k = min(obj.hosts.size, ALTERNATIVE_POOL)
        if scores is None:  # first-fit has no ranking: the next slots are the runners-up
            order = np.arange(k)
        else:
            part = np.argpartition(scores, k - 1)[:k]
            order = part[np.argsort(scores[part], kind="stable")]
        # then the best host on each single objective, to show the trade-offs
        order = np.concatenate([order, [int(np.argmin(c)) for c in
                                        (obj.cost, obj.performance, obj.latency)]])
        alts: list[dict[str, Any]] = []
        seen = {(obj.cost[pos], obj.performance[pos], obj.latency[pos])}
        for raw in order:
            p = int(raw)
            key = (obj.cost[p], obj.performance[p], obj.latency[p])
            if p == pos or key in seen:
                continue
            seen.add(key)
            alt = self._describe(obj, p, scores)
            alt["loses_on"] = [name for name, col in (("cost", obj.cost),
                                                      ("performance", obj.performance),
                                                      ("latency", obj.latency))
                               if col[p] > col[pos] + 1e-12]
            alts.append(alt)
            if len(alts) == TOP_ALTERNATIVES:
                break
        return alts

    def _why(self, strategy: str, obj: Objectives, pos: int, front: np.ndarray | None) -> str:
        if strategy == "first-fit":
            return "first feasible host in fleet order"
        if strategy == "best-fit":
            return "feasible host left with the least free CPU and memory"
        if strategy == "spread":
            return "feasible host least allocated after placement"
        parts = [f"lowest weighted score among {front.size if front is not None else 0} "
                 f"Pareto-optimal hosts ({strategy} weights)"]
        if not obj.power_on[pos]:
            empty = int(np.count_nonzero(obj.power_on))
            if empty:
                parts.append(f"uses a running host instead of one of {empty} empty hosts (an empty host "
                             "starts costing its cost_per_hour)")
        elif obj.power_on.all():
            parts.append("no running host could take it, so it goes to an empty host (which starts costing)")
        else:
            parts.append("uses an empty host: its gains outweigh that host's cost at these weights")
        return "; ".join(parts)
