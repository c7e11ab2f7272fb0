"""The scheduler as the coordinator's placer, and the fleet view it works on.

The coordinator's records know each host's CPUs and memory; what only the
scheduler needs (price, zone, overcommit, latency to user regions) lives in
the store collection ``scheduler.hosts``, one document per host name, set
through ``PUT /api/v1/placements/hosts/{name}``. Hosts without one get the
defaults below.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from novacron.coordinator.models import HOST_UP, VM, VMSummary, spec_cpu_model, spec_networks
from novacron.coordinator.models import Host as StoreHost
from novacron.coordinator.placement import unreported_mib
from novacron.coordinator.scheduler.fleet import FleetState
from novacron.coordinator.scheduler.learned import LearnedPlacer
from novacron.coordinator.scheduler.model import (
    Host,
    SchedulerInputError,
    VMRequest,
    parse_host,
    parse_request,
)
from novacron.coordinator.scheduler.policy import (
    ARMS,
    STATE_VERSION,
    BanditPolicy,
    PolicyStateError,
)
from novacron.coordinator.scheduler.scheduler import Decision, Scheduler

if TYPE_CHECKING:
    from novacron.coordinator.store import Store

log = logging.getLogger("novacron.scheduler")

ATTRS = "scheduler.hosts"
POLICY_DOC = ("scheduler.policy", "bandit")
# KVM hosts commonly run 4 vCPUs per core; memory is not overcommitted.
DEFAULT_CPU_OVERCOMMIT = 4.0
ATTR_FIELDS = ("cost_per_hour", "zone", "cpu_overcommit", "mem_overcommit", "latency_ms", "enabled")


def host_from_record(h: StoreHost, attrs: dict[str, Any] | None) -> Host:
    used = {k: v for k, v in (attrs or {}).items() if k in ATTR_FIELDS}
    return _scheduler_host(h.name, h.cpus, h.memory_bytes, h.state == HOST_UP, tuple(h.networks),
                           tuple(h.cpu_models) if h.cpu_models is not None else None,
                           json.dumps(used, sort_keys=True) if used else "")


# Every placement reads the whole fleet, and hosts rarely change what the scheduler sees
# of them: validated hosts are kept (immutable) until one of these inputs changes.
@functools.lru_cache(maxsize=1 << 16)
def _scheduler_host(name: str, cpus: int, memory_bytes: int, up: bool, networks: tuple[str, ...],
                    cpu_models: tuple[str, ...] | None, attrs_json: str) -> Host:
    doc: dict[str, Any] = {"id": name, "vcpus": max(1, cpus), "memory_mib": max(1, memory_bytes >> 20),
                           "cpu_overcommit": DEFAULT_CPU_OVERCOMMIT}
    if attrs_json:
        doc.update(json.loads(attrs_json))
    host = parse_host(doc, f"host {name}")
    host = dataclasses.replace(host, networks=frozenset(networks),
                               cpu_models=frozenset(cpu_models) if cpu_models is not None else None)
    if not up:  # down hosts stay visible (and counted as rejected) but take nothing
        host = Host(**{**host.__dict__, "enabled": False})
    return host


def _request_of(name: str, spec: dict[str, Any]) -> VMRequest:
    return VMRequest(name, max(1, int(spec.get("vcpus", 1))), max(1, int(spec.get("memory_mb", 0))),
                     networks=spec_networks(spec))  # a rebalance moves it only where they are


def build_fleet(hosts: Iterable[StoreHost], vms: Iterable[VM],
                attrs: dict[str, dict[str, Any]]) -> FleetState:
    """Fleet state from the coordinator's records, every VM placed by its spec (what
    moving VMs needs), raised to what each host reports in use."""
    hosts, vms = list(hosts), list(vms)
    fleet = FleetState(host_from_record(h, attrs.get(h.name)) for h in hosts)
    for vm in vms:
        if vm.host in fleet.index and vm.name not in fleet.vms:
            fleet.place(_request_of(vm.name, vm.spec), vm.host)
    _reserve_reported(fleet, hosts, unreported_mib(hosts, [
        VMSummary(v.name, v.host, v.state, 0, int(v.spec.get("memory_mb", 0))) for v in vms]))
    return fleet


def placement_fleet(hosts: Sequence[StoreHost], vms: Sequence[VMSummary],
                    attrs: dict[str, dict[str, Any]], peers: Iterable[str] = ()) -> FleetState:
    """The fleet a new VM is placed on: VMs counted by size per host in one numpy pass,
    only ``peers`` (the VMs its affinity rules name) placed as records. Same figures as
    ``build_fleet``, at a fraction of the cost (100,000 VMs: seconds -> tens of ms)."""
    fleet = FleetState(host_from_record(h, attrs.get(h.name)) for h in hosts)
    wanted = set(peers)
    slots: list[int] = []
    cpus: list[int] = []
    mems: list[int] = []
    for v in vms:
        i = fleet.index.get(v.host)
        if i is None:
            continue
        if v.name in wanted:
            if v.name not in fleet.vms:
                fleet.place(VMRequest(v.name, max(1, v.vcpus), max(1, v.memory_mb)), i)
            continue
        slots.append(i)
        cpus.append(max(1, v.vcpus))
        mems.append(max(1, v.memory_mb))
    fleet.add_load(np.asarray(slots, dtype=np.int64), np.asarray(cpus, dtype=np.float64),
                   np.asarray(mems, dtype=np.float64))
    _reserve_reported(fleet, hosts, unreported_mib(hosts, vms))
    return fleet


def _reserve_reported(fleet: FleetState, hosts: Iterable[StoreHost], unreported: dict[str, int]) -> None:
    """Raise each host's memory in use to what it reports (other workloads, VMs the fleet
    does not know) plus the VMs placed there that its report does not list yet."""
    for h in hosts:
        i = fleet.index[h.name]
        reported = (h.memory_bytes - h.memory_available_bytes) >> 20
        fleet.reserve(i, 0.0, max(0.0, reported + unreported.get(h.name, 0) - float(fleet.mem_used[i])))


async def load_attrs(store: Store) -> dict[str, dict[str, Any]]:
    return dict(await store.list_docs(ATTRS))


# Maintenance is the scheduler attribute ``enabled: false``: one flag, read by placement,
# migration checks and the host list alike.
def in_maintenance(attrs: dict[str, Any] | None) -> bool:
    return attrs is not None and attrs.get("enabled") is False


async def host_in_maintenance(store: Store, name: str) -> bool:
    return in_maintenance(await store.get_doc(ATTRS, name))


async def set_maintenance(store: Store, name: str, on: bool) -> None:
    """Enter or leave maintenance, keeping the host's other scheduler attributes."""
    attrs = dict(await store.get_doc(ATTRS, name) or {})
    if on:
        attrs["enabled"] = False
    else:
        attrs.pop("enabled", None)
    await store.put_doc(ATTRS, name, attrs)


async def load_policy(store: Store) -> tuple[bool, BanditPolicy]:
    """(enabled, policy) from the store; a damaged document is reported and replaced
    by a fresh, disabled policy rather than breaking VM creation."""
    doc = await store.get_doc(*POLICY_DOC)
    if doc is None:
        return False, BanditPolicy()
    try:
        return bool(doc.get("enabled", False)), BanditPolicy.from_json(doc.get("state") or {
            "version": STATE_VERSION, "arms": list(ARMS), "stats": {}})
    except PolicyStateError as exc:
        log.warning("scheduler policy state unusable, starting fresh", extra={"problem": str(exc)})
        return False, BanditPolicy()


async def save_policy(store: Store, enabled: bool, policy: BanditPolicy) -> None:
    await store.put_doc(*POLICY_DOC, {"enabled": enabled, "state": policy.to_json()})


PREFERENCE_KEYS = ("priority", "region", "max_latency_ms", "affinity", "anti_affinity",
                   "anti_affinity_scope")


def request_doc(spec: dict[str, Any]) -> dict[str, Any]:
    """The scheduler's request document for a VM spec (with its placement preferences)."""
    doc = {"id": spec.get("name", "(new)"), "vcpus": spec.get("vcpus"),
           "memory_mib": spec.get("memory_mb")}
    doc.update({k: spec[k] for k in PREFERENCE_KEYS if k in spec})
    return doc


async def choose_target(store: Store, vm: VM, busy: Iterable[str] = ()) -> tuple[str | None, str]:
    """Where a running VM should move (never its own host, nor one in maintenance or
    down, nor one lacking its networks): (host or None, why not). VMs on their way to a
    host already count there. Hosts in ``busy`` (no free inbound migration slot) are
    chosen only when no other host fits: the move would wait in the queue."""
    hosts = await store.list_hosts()
    fleet = build_fleet(hosts, await store.list_vms(), await load_attrs(store))
    for mig in await store.active_migrations():
        if mig.vm != vm.name and mig.vm in fleet.vms and mig.target in fleet.index:
            fleet.move(mig.vm, fleet.index[mig.target])
    if vm.name in fleet.vms:
        fleet.remove(vm.name)
    if vm.host in fleet.index:
        fleet.set_enabled(vm.host, False)
    networks = spec_networks(vm.spec)
    try:
        req = dataclasses.replace(parse_request(request_doc({**vm.spec, "name": vm.name})),
                                  networks=networks)
    except SchedulerInputError as exc:
        return None, f"its spec is not placeable: {exc}"
    enabled = fleet.enabled.copy()
    for name in busy:
        if name in fleet.index:
            fleet.set_enabled(name, False)
    d = Scheduler(fleet).decide(req)
    if d.host is None:
        fleet.enabled[:] = enabled
        d = Scheduler(fleet).decide(req)
    if d.host is not None:
        return d.host, str(d.explanation.get("why", ""))
    others = [h for h in hosts if h.name != vm.host and h.state == HOST_UP]
    if networks and not any(set(networks) <= set(h.networks) for h in others):
        return None, f"no other up host has the network(s) {', '.join(networks)}"
    why = str(d.explanation.get("why", "")).removeprefix("no host can take this VM; ")
    return None, why


class SchedulerPlacer:
    """Callable with the coordinator's ``Placer`` shape: (spec, hosts, vms) -> host or None.

    With the learned policy enabled (``PUT /api/v1/placements/policy``; off by
    default) the bandit picks the strategy, and the outcomes of its earlier
    decisions (VMs gone, VMs moved) are read from the VM records first.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.last: Decision | None = None
        self._lock = asyncio.Lock()  # policy state is read-modify-write

    async def __call__(self, spec: dict[str, Any], hosts: list[StoreHost],
                       vms: Sequence[VMSummary]) -> StoreHost | None:
        attrs = await load_attrs(self.store)
        doc = request_doc(spec)
        async with self._lock:
            try:
                req = dataclasses.replace(parse_request(doc), networks=spec_networks(spec),
                                          cpu_model=spec_cpu_model(spec))
                # a thread: at fleet scale this is tens of ms the event loop keeps serving
                fleet = await asyncio.to_thread(placement_fleet, hosts, vms, attrs,
                                                (*req.affinity, *req.anti_affinity))
                enabled, policy = await load_policy(self.store)
                if enabled:
                    policy.observe({v.name: v.host for v in vms})
                    d = LearnedPlacer(Scheduler(fleet), policy).place(req)
                    await save_policy(self.store, True, policy)
                else:
                    d = Scheduler(fleet).decide(req)
            except SchedulerInputError as exc:
                log.warning("placement refused", extra={"vm": doc["id"], "problem": str(exc)})
                return None
        self.last = d
        log.info("placement", extra={"vm": doc["id"], "host": d.host,
                                     "feasible": d.explanation["feasible"],
                                     "why": d.explanation["why"]})
        if d.host is None:
            return None
        return next(h for h in hosts if h.name == d.host)
