"""Placement scheduler: where a VM should run, and why.

Pipeline for one VM (``Scheduler.decide``): feasibility filter (maintenance,
affinity, anti-affinity, latency limit, CPU, memory; counts per reason) ->
three objectives per feasible host (cost incl. power-on, performance =
contention + fragmentation, latency to the VM's region) -> Pareto front ->
choice by operator weights (defaults: cost 0.7, performance 0.2, latency 0.1,
see ``model.Weights``) -> explanation (chosen host and its objective values,
rejected hosts per reason, top alternatives and what they lose on).

Fleet state is a structure of numpy arrays (``fleet.FleetState``), so a
decision over 10,000 hosts is a few dozen whole-array operations.

Also here: a contextual-bandit policy over strategies (``policy``, off by
default), rebalancing plans (``rebalance``), the coordinator adapter
(``placer``) and the synthetic trace + replay used by ``novacron bench scheduler``.
"""

from novacron.coordinator.scheduler.fleet import FleetState
from novacron.coordinator.scheduler.model import (
    DEFAULT_WEIGHTS,
    Host,
    SchedulerInputError,
    VMRequest,
    Weights,
    parse_host,
    parse_request,
    parse_weights,
)
from novacron.coordinator.scheduler.rebalance import RebalanceOptions, RebalancePlan, plan
from novacron.coordinator.scheduler.scheduler import Decision, Scheduler

__all__ = [
    "DEFAULT_WEIGHTS",
    "Decision",
    "FleetState",
    "Host",
    "RebalanceOptions",
    "RebalancePlan",
    "Scheduler",
    "SchedulerInputError",
    "VMRequest",
    "Weights",
    "parse_host",
    "parse_request",
    "parse_weights",
    "plan",
]
