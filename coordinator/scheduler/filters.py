"""Feasibility filter: which hosts may take a VM, and why the others may not."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from novacron.coordinator.scheduler.fleet import Bool, FleetState
from novacron.coordinator.scheduler.model import SchedulerInputError, VMRequest

# Checked in this order; a host is counted under the first rule it fails, so
# the counts add up to the number of rejected hosts.
REASONS: dict[str, str] = {
    "disabled": "host is down or in maintenance",
    "affinity": "not the host of the VM's affinity peers",
    "anti_affinity": "holds (or shares a zone with) a VM it must be kept apart from",
    "network": "lacks a network the VM's NICs join",
    "cpu_model": "cannot run the VM's CPU model",
    "latency": "round-trip to the VM's region above max_latency_ms",
    "cpu": "not enough free vCPU (after overcommit)",
    "memory": "not enough free memory (after overcommit)",
}

_EPS = 1e-9


@dataclass
class Feasibility:
    ok: Bool
    rejected: dict[str, int]  # reason -> hosts rejected for it (first failing rule)

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.ok))


def _affinity_mask(fleet: FleetState, req: VMRequest) -> Bool | None:
    if not req.affinity:
        return None
    hosts = set()
    for peer in req.affinity:
        vm = fleet.vms.get(peer)
        if vm is None:
            raise SchedulerInputError("affinity", f"VM {peer!r} is not placed, so there is no host to join")
        hosts.add(vm.host)
    mask = np.zeros(fleet.n, dtype=bool)
    if len(hosts) == 1:  # peers split over hosts: nowhere satisfies all of them
        mask[hosts.pop()] = True
    return mask


def _anti_affinity_mask(fleet: FleetState, req: VMRequest) -> Bool | None:
    bad_hosts: set[int] = set()
    bad_zones: set[int] = set()

    def avoid(vm_host: int, scope: str) -> None:
        if scope == "zone":
            bad_zones.add(int(fleet.zone[vm_host]))
        else:
            bad_hosts.add(vm_host)

    for peer in req.anti_affinity:
        vm = fleet.vms.get(peer)
        if vm is not None:  # not placed yet: nothing to avoid now (checked when it is)
            avoid(vm.host, req.anti_affinity_scope)
    for other in fleet.anti_affinity_against(req.id):  # rules declared by placed VMs
        vm = fleet.vms[other]
        avoid(vm.host, vm.anti_affinity_scope)
    if not bad_hosts and not bad_zones:
        return None
    mask = np.ones(fleet.n, dtype=bool)
    if bad_hosts:
        mask[list(bad_hosts)] = False
    if bad_zones:
        mask &= ~np.isin(fleet.zone, list(bad_zones))
    return mask


def feasible(fleet: FleetState, req: VMRequest) -> Feasibility:
    rules: list[tuple[str, Bool | None]] = [
        ("disabled", fleet.enabled),
        ("affinity", _affinity_mask(fleet, req)),
        ("anti_affinity", _anti_affinity_mask(fleet, req)),
    ]
    if req.networks:
        rules.append(("network", fleet.has_networks(req.networks)))
    if req.cpu_model:
        rules.append(("cpu_model", fleet.runs_cpu_model(req.cpu_model)))
    if req.max_latency_ms is not None:
        col = fleet.region_column(req.region)
        if col is None:  # no host has a measurement for this region
            rules.append(("latency", np.zeros(fleet.n, dtype=bool)))
        else:
            rules.append(("latency", fleet.latency[:, col] <= req.max_latency_ms))
    rules.append(("cpu", fleet.cpu_used + req.vcpus <= fleet.cpu_cap + _EPS))
    rules.append(("memory", fleet.mem_used + req.memory_mib <= fleet.mem_cap + _EPS))
    ok = np.ones(fleet.n, dtype=bool)
    rejected: dict[str, int] = {}
    for name, mask in rules:
        if mask is None:
            continue
        failing = int(np.count_nonzero(ok & ~mask))
        if failing:
            rejected[name] = failing
            ok &= mask
    return Feasibility(ok, rejected)
