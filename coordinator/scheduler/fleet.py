"""Fleet state as a structure of numpy arrays, one slot per host.

Scoring 10,000 hosts must take well under a few milliseconds, so every
per-host quantity lives in a contiguous array and the scheduler works on
whole columns at once. Per-VM bookkeeping (where each VM is, its size and
its anti-affinity declarations) is kept in dicts: it is touched once per VM,
never once per host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from novacron.coordinator.scheduler.model import (
    Host,
    Priority,
    SchedulerInputError,
    Scope,
    VMRequest,
)

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]

# Latency assumed to a region a host has no measurement for: far, not infinite,
# so it loses on the objective but stays usable unless a hard limit is set.
UNKNOWN_LATENCY_MS = 250.0


@dataclass(frozen=True)
class PlacedVM:
    id: str
    host: int
    vcpus: int
    memory_mib: int
    priority: Priority
    affinity: tuple[str, ...]
    anti_affinity: tuple[str, ...]
    anti_affinity_scope: Scope
    networks: tuple[str, ...] = ()  # fleet networks its NICs join: a move needs them too

    def request(self) -> VMRequest:
        """The request that would place this VM again (used to move it)."""
        return VMRequest(self.id, self.vcpus, self.memory_mib, self.priority,
                         affinity=self.affinity, anti_affinity=self.anti_affinity,
                         anti_affinity_scope=self.anti_affinity_scope, networks=self.networks)


class FleetState:
    """Hosts and their allocations. Host slots are never reused or reordered."""

    def __init__(self, hosts: Iterable[Host] = ()) -> None:
        self.host_ids: list[str] = []
        self.index: dict[str, int] = {}
        self.zones: list[str] = []
        self.zone_index: dict[str, int] = {}
        self.regions: list[str] = []
        self.region_index: dict[str, int] = {}
        self._n = 0
        cap = 16
        self._cpu_cap = np.zeros(cap)
        self._mem_cap = np.zeros(cap)
        self._cpu_phys = np.zeros(cap)  # physical, before overcommit
        self._mem_phys = np.zeros(cap)
        self._cpu_used = np.zeros(cap)
        self._mem_used = np.zeros(cap)
        self._cost = np.zeros(cap)
        self._zone = np.zeros(cap, dtype=np.int64)
        self._vm_count = np.zeros(cap, dtype=np.int64)
        self._enabled = np.zeros(cap, dtype=bool)
        self._latency = np.full((cap, 0), UNKNOWN_LATENCY_MS)
        self._latency_cols: dict[int, F64] = {}
        self._reserved: dict[int, tuple[float, float]] = {}  # host -> (vCPU, MiB) not from VMs
        self.vms: dict[str, PlacedVM] = {}
        self.vms_on: list[set[str]] = []
        self.host_networks: list[frozenset[str] | None] = []  # None: not known (not filtered)
        self.host_cpu_models: list[frozenset[str] | None] = []  # None: not known (not filtered)
        # vm id -> ids of placed VMs that declared anti-affinity against it
        self._anti_from: dict[str, set[str]] = {}
        self.add_hosts(hosts)

    # -- views (length n, no copies) -------------------------------------------------
    @property
    def n(self) -> int:
        return self._n

    @property
    def cpu_cap(self) -> F64:
        return self._cpu_cap[: self._n]

    @property
    def mem_cap(self) -> F64:
        return self._mem_cap[: self._n]

    @property
    def cpu_phys(self) -> F64:
        return self._cpu_phys[: self._n]

    @property
    def mem_phys(self) -> F64:
        return self._mem_phys[: self._n]

    @property
    def cpu_used(self) -> F64:
        return self._cpu_used[: self._n]

    @property
    def mem_used(self) -> F64:
        return self._mem_used[: self._n]

    @property
    def cost(self) -> F64:
        return self._cost[: self._n]

    @property
    def zone(self) -> I64:
        return self._zone[: self._n]

    @property
    def vm_count(self) -> I64:
        return self._vm_count[: self._n]

    @property
    def enabled(self) -> Bool:
        return self._enabled[: self._n]

    @property
    def latency(self) -> F64:
        """(hosts, regions) round-trip times in ms."""
        return self._latency[: self._n]

    def latency_to(self, region_col: int) -> F64:
        """RTT of every host to one region, contiguous (cached until a host is added)."""
        cached = self._latency_cols.get(region_col)
        if cached is None or cached.size != self._n:
            cached = self._latency_cols[region_col] = np.ascontiguousarray(self.latency[:, region_col])
        return cached

    # -- hosts -----------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = len(self._cpu_cap)
        if need <= cap:
            return
        new = max(need, cap * 2)

        def grown(a: np.ndarray, fill: float | bool | int = 0) -> np.ndarray:
            out = np.full((new, *a.shape[1:]), fill, dtype=a.dtype)
            out[:cap] = a
            return out

        self._cpu_cap, self._mem_cap = grown(self._cpu_cap), grown(self._mem_cap)
        self._cpu_phys, self._mem_phys = grown(self._cpu_phys), grown(self._mem_phys)
        self._cpu_used, self._mem_used = grown(self._cpu_used), grown(self._mem_used)
        self._cost, self._zone = grown(self._cost), grown(self._zone)
        self._vm_count, self._enabled = grown(self._vm_count), grown(self._enabled, False)
        self._latency = grown(self._latency, UNKNOWN_LATENCY_MS)

    def _region(self, name: str) -> int:
        idx = self.region_index.get(name)
        if idx is None:
            idx = len(self.regions)
            self.regions.append(name)
            self.region_index[name] = idx
            col = np.full((len(self._latency), 1), UNKNOWN_LATENCY_MS)
            self._latency = np.hstack([self._latency, col])
        return idx

    def add_hosts(self, hosts: Iterable[Host]) -> None:
        for h in hosts:
            self.add_host(h)

    def add_host(self, h: Host) -> int:
        if h.id in self.index:
            raise SchedulerInputError(f"host {h.id}", "duplicate host id")
        i = self._n
        self._grow(i + 1)
        self._n += 1
        self.host_ids.append(h.id)
        self.index[h.id] = i
        self.vms_on.append(set())
        self.host_networks.append(h.networks)
        self.host_cpu_models.append(h.cpu_models)
        z = self.zone_index.get(h.zone)
        if z is None:
            z = self.zone_index[h.zone] = len(self.zones)
            self.zones.append(h.zone)
        self._cpu_cap[i] = h.vcpus * h.cpu_overcommit
        self._mem_cap[i] = h.memory_mib * h.mem_overcommit
        self._cpu_phys[i] = h.vcpus
        self._mem_phys[i] = h.memory_mib
        self._cost[i] = h.cost_per_hour
        self._zone[i] = z
        self._enabled[i] = h.enabled
        for region, ms in h.latency_ms.items():
            col = self._region(region)  # may replace self._latency, so look it up first
            self._latency[i, col] = ms
        self._latency_cols.clear()
        return i

    def has_networks(self, names: tuple[str, ...]) -> Bool:
        """Hosts that have every network in ``names`` (or do not report networks)."""
        need = set(names)
        return np.fromiter((nets is None or need <= nets for nets in self.host_networks),
                           dtype=bool, count=self._n)

    def runs_cpu_model(self, model: str) -> Bool:
        """Hosts that run CPU model ``model`` (or do not report their models)."""
        return np.fromiter((models is None or model in models for models in self.host_cpu_models),
                           dtype=bool, count=self._n)

    def set_enabled(self, host_id: str, enabled: bool) -> None:
        self._enabled[self._host(host_id)] = enabled

    def _host(self, host_id: str) -> int:
        try:
            return self.index[host_id]
        except KeyError:
            raise SchedulerInputError("host", f"unknown host {host_id!r}") from None

    def region_column(self, region: str | None) -> int | None:
        return None if region is None else self.region_index.get(region)

    # -- VMs -------------------------------------------------------------------------
    def place(self, req: VMRequest, host: int | str) -> PlacedVM:
        """Record ``req`` on ``host`` (an index or id). Capacity is not re-checked here."""
        i = self._host(host) if isinstance(host, str) else host
        if not 0 <= i < self._n:
            raise SchedulerInputError("host", f"no host slot {i}")
        if req.id in self.vms:
            raise SchedulerInputError(f"vm {req.id}", "already placed")
        vm = PlacedVM(req.id, i, req.vcpus, req.memory_mib, req.priority, req.affinity,
                      req.anti_affinity, req.anti_affinity_scope, req.networks)
        self.vms[req.id] = vm
        self.vms_on[i].add(req.id)
        self._cpu_used[i] += req.vcpus
        self._mem_used[i] += req.memory_mib
        self._vm_count[i] += 1
        for other in req.anti_affinity:
            self._anti_from.setdefault(other, set()).add(req.id)
        return vm

    def remove(self, vm_id: str) -> PlacedVM:
        vm = self.vms.pop(vm_id, None)
        if vm is None:
            raise SchedulerInputError(f"vm {vm_id}", "not placed")
        i = vm.host
        self.vms_on[i].discard(vm_id)
        self._cpu_used[i] -= vm.vcpus
        self._mem_used[i] -= vm.memory_mib
        self._vm_count[i] -= 1
        if self._vm_count[i] == 0:  # drop float residue so "empty" is exact
            self._cpu_used[i], self._mem_used[i] = self._reserved.get(i, (0.0, 0.0))
        for other in vm.anti_affinity:
            peers = self._anti_from.get(other)
            if peers is not None:
                peers.discard(vm_id)
                if not peers:
                    del self._anti_from[other]
        return vm

    def add_load(self, hosts: I64, vcpus: F64, memory_mib: F64) -> None:
        """Count VMs by size only (host slots, vCPUs, MiB; one entry per VM): how a new
        VM's placement sees the VMs it names no rule about, with no per-VM record."""
        np.add.at(self._cpu_used, hosts, vcpus)
        np.add.at(self._mem_used, hosts, memory_mib)
        np.add.at(self._vm_count, hosts, 1)

    def move(self, vm_id: str, host: int) -> PlacedVM:
        return self.place(self.remove(vm_id).request(), host)

    def reserve(self, host: int, vcpus: float, memory_mib: float) -> None:
        """Count capacity used by something other than placed VMs (host overhead,
        VMs the host reports but the fleet does not know)."""
        self._cpu_used[host] += vcpus
        self._mem_used[host] += memory_mib
        self._reserved[host] = (self._reserved.get(host, (0.0, 0.0))[0] + vcpus,
                                self._reserved.get(host, (0.0, 0.0))[1] + memory_mib)

    def anti_affinity_against(self, vm_id: str) -> set[str]:
        """Placed VMs that declared anti-affinity with ``vm_id`` (the reverse direction)."""
        return self._anti_from.get(vm_id, set())

    def utilisation(self) -> F64:
        """Per host: the larger of CPU and memory allocation over offered capacity."""
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.maximum(self.cpu_used / self.cpu_cap, self.mem_used / self.mem_cap)
        return np.nan_to_num(u)
