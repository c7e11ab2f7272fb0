"""The three placement objectives, computed for a set of candidate hosts.

All are minimised, and all describe the host *after* the VM lands on it:

* cost ($/h): the host's whole hourly price if it is empty now (placing the
  VM powers it on), plus the VM's share of the price (its dominant fraction
  of the host's offered CPU or memory).
* performance (0..2): contention, how far the busier of CPU and memory is
  allocated past the priority's comfort level of the *physical* host (high
  80 %, normal 100 %, low 150 %: only overcommitted hosts can pass 100 %,
  and that is where vCPUs wait for cores), capped at 1; plus fragmentation, the mean of the CPU and memory
  fractions left free: scattered small leftovers are what later large VMs
  cannot use, so the fullest host that fits is preferred (best-fit's rule).
* latency (ms): round-trip from the host to the VM's user region (0 when the
  VM names no region).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from novacron.coordinator.scheduler.fleet import F64, UNKNOWN_LATENCY_MS, FleetState
from novacron.coordinator.scheduler.model import VMRequest, Weights

COMFORT = {"high": 0.8, "normal": 1.0, "low": 1.5}
# Latency is normalised against this round-trip (and capped at 1) when weighed.
LATENCY_SCALE_MS = 200.0
PERF_SCALE = 2.0


@dataclass
class Objectives:
    hosts: npt.NDArray[np.int64]  # fleet slots these rows describe
    cost: F64
    performance: F64
    latency: F64
    power_on: npt.NDArray[np.bool_]
    util_after: F64

    def matrix(self) -> F64:
        return np.column_stack([self.cost, self.performance, self.latency])


def evaluate(fleet: FleetState, req: VMRequest, hosts: npt.NDArray[np.int64]) -> Objectives:
    # Whole-fleet arithmetic on contiguous arrays, then one gather per output:
    # cheaper than gathering every input when most hosts are candidates.
    cpu_cap, mem_cap, price = fleet.cpu_cap, fleet.mem_cap, fleet.cost
    cpu_new = fleet.cpu_used + req.vcpus
    mem_new = fleet.mem_used + req.memory_mib
    cpu_after = cpu_new / cpu_cap
    mem_after = mem_new / mem_cap
    power_on = fleet.vm_count == 0
    share = np.maximum(req.vcpus / cpu_cap, req.memory_mib / mem_cap)
    cost = price * share
    cost += np.where(power_on, price, 0.0)

    util_after = np.maximum(cpu_after, mem_after)
    phys_after = np.maximum(cpu_new / fleet.cpu_phys, mem_new / fleet.mem_phys)
    phys_after -= COMFORT[req.priority]
    contention = np.clip(phys_after, 0.0, 1.0)
    fragmentation = np.clip(1.0 - 0.5 * (cpu_after + mem_after), 0.0, 1.0)
    performance = contention + fragmentation

    col = fleet.region_column(req.region)
    if req.region is None:
        latency = np.zeros(hosts.size)
    elif col is None:
        latency = np.full(hosts.size, UNKNOWN_LATENCY_MS)
    else:
        latency = fleet.latency_to(col)[hosts]
    return Objectives(hosts, cost[hosts], performance[hosts], latency, power_on[hosts],
                      util_after[hosts])


def weighted_score(obj: Objectives, weights: Weights, max_cost: float) -> F64:
    """One number per host (lower is better) from the normalised objectives."""
    wc, wp, wl = weights.as_tuple()
    cost_n = obj.cost / max_cost if max_cost > 0 else np.zeros_like(obj.cost)
    lat_n = np.minimum(obj.latency / LATENCY_SCALE_MS, 1.0)
    return wc * cost_n + wp * (obj.performance / PERF_SCALE) + wl * lat_n
