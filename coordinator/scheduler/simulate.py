"""Replays a VM trace against one placement policy and measures the outcome.

Used by ``novacron bench scheduler``. Only the scheduler call itself is timed
for placement latency; the simulator's own bookkeeping is not.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from novacron.coordinator.scheduler.fleet import FleetState
from novacron.coordinator.scheduler.learned import LearnedPlacer
from novacron.coordinator.scheduler.model import DEFAULT_WEIGHTS, Host, VMRequest, Weights
from novacron.coordinator.scheduler.policy import BanditPolicy
from novacron.coordinator.scheduler.rebalance import RebalanceOptions, plan
from novacron.coordinator.scheduler.scheduler import Scheduler
from novacron.coordinator.scheduler.trace import Arrival

POLICIES = ("first-fit", "best-fit", "spread", "ours", "ours+learned")


@dataclass
class SimResult:
    policy: str
    hosts_peak: int = 0  # most hosts carrying VMs at once
    hosts_end: int = 0
    hosts_mean: float = 0.0  # time-weighted hosts carrying VMs
    power_ons: int = 0  # empty hosts that received a VM
    cost: float = 0.0  # $ paid for hosts carrying VMs over the trace
    mean_util: float = 0.0  # time-weighted vCPU allocated / vCPU of hosts in use
    peak_util: float = 0.0
    rejections: int = 0
    placed: int = 0
    mean_latency_ms: float = 0.0  # RTT from the chosen host to the VM's region
    latency_samples_s: list[float] = field(default_factory=list, repr=False)
    # CPU time of the same calls: on a shared, busy machine wall-clock tails
    # include time the process was not running at all
    cpu_samples_s: list[float] = field(default_factory=list, repr=False)
    policy_arms: dict[str, int] = field(default_factory=dict)
    migrations: int = 0  # moves carried out from rebalancing plans
    migrated_gib: float = 0.0

    def p(self, q: float) -> float:
        """Wall-clock placement latency percentile, ms."""
        return float(np.percentile(self.latency_samples_s, q) * 1e3) if self.latency_samples_s else 0.0

    def p_cpu(self, q: float) -> float:
        return float(np.percentile(self.cpu_samples_s, q) * 1e3) if self.cpu_samples_s else 0.0


def simulate(hosts: list[Host], background: list[tuple[VMRequest, int, float]],
             arrivals: list[Arrival], policy: str, *, bandit: BanditPolicy | None = None,
             weights: Weights = DEFAULT_WEIGHTS, rebalance_every_h: float = 0.0,
             rebalance: RebalanceOptions | None = None) -> SimResult:
    """Replay ``arrivals`` after placing ``background``; with ``rebalance_every_h``
    a rebalancing plan is computed and carried out at that interval."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}")
    fleet = FleetState(hosts)
    departures: list[tuple[float, int, str]] = []
    horizon = arrivals[-1].at if arrivals else 0.0
    for seq, (req, slot, life) in enumerate(background):
        fleet.place(req, slot)
        if life < horizon:
            departures.append((life, -seq - 1, req.id))
    heapq.heapify(departures)
    sched = Scheduler(fleet, weights)
    learned = LearnedPlacer(sched, bandit or BanditPolicy()) if policy == "ours+learned" else None
    strategy = "balanced" if policy == "ours" else policy
    res = SimResult(policy)

    cpu_cap, cost = fleet.cpu_cap, fleet.cost
    active = fleet.vm_count > 0
    n_active = int(active.sum())
    active_cost = float(cost[active].sum())
    active_cap = float(cpu_cap[active].sum())
    alloc = float(fleet.cpu_used.sum())
    res.hosts_peak = n_active
    now = 0.0
    util_time = 0.0
    hosts_time = 0.0
    latency_sum = 0.0
    region_col = {r: fleet.region_index[r] for r in fleet.regions}

    def advance(t: float) -> None:
        nonlocal now, util_time, hosts_time
        dt = t - now
        if dt > 0:
            res.cost += active_cost * dt
            hosts_time += n_active * dt
            util_time += (alloc / active_cap if active_cap else 0.0) * dt
            now = t

    def depart(vm_id: str) -> None:
        nonlocal n_active, active_cost, active_cap, alloc
        vm = fleet.vms.get(vm_id)
        if vm is None:
            return
        if learned is not None:
            learned.departed(vm_id)
        else:
            fleet.remove(vm_id)
        alloc -= vm.vcpus
        if fleet.vm_count[vm.host] == 0:
            n_active -= 1
            active_cost -= float(cost[vm.host])
            active_cap -= float(cpu_cap[vm.host])

    def recount() -> None:
        nonlocal n_active, active_cost, active_cap
        on = fleet.vm_count > 0
        n_active, active_cost, active_cap = int(on.sum()), float(cost[on].sum()), float(cpu_cap[on].sum())

    def carry_out_plan() -> None:
        p = plan(fleet, rebalance)
        for m in p.moves:
            fleet.move(m.vm, fleet.index[m.target])
            res.migrations += 1
            res.migrated_gib += m.memory_mib / 1024
            if learned is not None:
                learned.migrated(m.vm)
        if p.moves:
            recount()

    next_rebalance = rebalance_every_h if rebalance_every_h > 0 else float("inf")
    for arr in arrivals:
        while True:  # departures and rebalancing rounds due before this arrival, in time order
            t_dep = departures[0][0] if departures else float("inf")
            if min(t_dep, next_rebalance) > arr.at:
                break
            if t_dep <= next_rebalance:
                t, _, vm_id = heapq.heappop(departures)
                advance(t)
                depart(vm_id)
            else:
                advance(next_rebalance)
                carry_out_plan()
                next_rebalance += rebalance_every_h
        advance(arr.at)
        t0, c0 = time.perf_counter(), time.thread_time()
        if learned is not None:
            d = learned.place(arr.request)
        else:
            d = sched.place(arr.request, strategy=strategy)
        res.latency_samples_s.append(time.perf_counter() - t0)
        res.cpu_samples_s.append(time.thread_time() - c0)
        if d.host_index is None:
            res.rejections += 1
            continue
        h = d.host_index
        res.placed += 1
        alloc += arr.request.vcpus
        if fleet.vm_count[h] == 1:
            res.power_ons += 1
            n_active += 1
            active_cost += float(cost[h])
            active_cap += float(cpu_cap[h])
            res.hosts_peak = max(res.hosts_peak, n_active)
        if arr.request.region is not None:
            latency_sum += float(fleet.latency[h, region_col[arr.request.region]])
        if learned is not None:
            arm = d.explanation["policy"]["arm"]
            res.policy_arms[arm] = res.policy_arms.get(arm, 0) + 1
        res.peak_util = max(res.peak_util, alloc / active_cap if active_cap else 0.0)
        end = arr.at + arr.lifetime
        if end < horizon:
            heapq.heappush(departures, (end, len(res.latency_samples_s), arr.request.id))
    res.hosts_end = n_active
    res.mean_util = util_time / horizon if horizon > 0 else 0.0
    res.hosts_mean = hosts_time / horizon if horizon > 0 else float(n_active)
    res.mean_latency_ms = latency_sum / res.placed if res.placed else 0.0
    return res
