"""The coordinator's records as a fleet: capacity, reported usage, down hosts, attributes."""

from __future__ import annotations

from novacron.coordinator.models import HOST_DOWN, VM, Host, VMSummary
from novacron.coordinator.scheduler import Scheduler, VMRequest
from novacron.coordinator.scheduler.placer import (
    DEFAULT_CPU_OVERCOMMIT,
    build_fleet,
    placement_fleet,
)

GIB = 1 << 30


def rec(name: str, avail_gib: int, vms: list[str] | None = None, state: str = "up") -> Host:
    return Host(name=name, url="http://127.0.0.1:1", token="t", cpus=4, memory_bytes=16 * GIB,
                memory_available_bytes=avail_gib * GIB, state=state, vms=vms or [])


def test_allocations_and_reported_usage_both_count() -> None:
    hosts = [rec("a", 12, vms=["v1"]), rec("b", 6), rec("c", 16, state=HOST_DOWN)]
    vms = [VM("v1", "a", {"vcpus": 2, "memory_mb": 4096}),  # reported by a: in its 4 GiB used
           VM("v2", "a", {"vcpus": 1, "memory_mb": 2048})]  # placed, not yet reported
    fleet = build_fleet(hosts, vms, {"b": {"cost_per_hour": 0.5, "zone": "z9"}})
    a, b, c = (fleet.index[n] for n in "abc")
    assert fleet.cpu_cap[a] == 4 * DEFAULT_CPU_OVERCOMMIT and fleet.cpu_used[a] == 3
    assert fleet.mem_used[a] == 6 * 1024  # 4 GiB reported + 2 GiB on the way
    assert fleet.mem_used[b] == 10 * 1024  # something else uses b's memory
    assert fleet.vm_count[b] == 0 and fleet.cost[b] == 0.5 and fleet.zones[fleet.zone[b]] == "z9"
    assert not fleet.enabled[c]
    d = Scheduler(fleet).decide(VMRequest("new", 1, 8 * 1024))
    assert d.host == "a"  # b has only 6 GiB free, c is down
    assert d.explanation["rejected"] == {"disabled": {"hosts": 1, "why": "host is down or in maintenance"},
                                         "memory": {"hosts": 1, "why": d.explanation["rejected"]["memory"]["why"]}}
    fleet.remove("v1")
    fleet.remove("v2")  # the last VM leaves: what is reserved stays counted
    assert fleet.mem_used[a] == 0 and fleet.mem_used[b] == 10 * 1024


def test_a_new_vms_fleet_counts_the_same_as_the_full_one() -> None:
    """``placement_fleet`` (sizes summed per host, only named peers as records) must give
    the scheduler the same figures as ``build_fleet`` (every VM a record)."""
    hosts = [rec("a", 12, vms=["v1", "v3"]), rec("b", 6, vms=["v4"]), rec("c", 16, state=HOST_DOWN)]
    vms = [VM("v1", "a", {"vcpus": 2, "memory_mb": 4096}, "running"),
           VM("v2", "a", {"vcpus": 1, "memory_mb": 2048}),  # placed, not yet reported
           VM("v3", "a", {"memory_mb": 512}, "running"),  # no vcpus field: counts as 1
           VM("v4", "b", {"vcpus": 3, "memory_mb": 1024}, "running"),
           VM("gone", "x", {"vcpus": 1, "memory_mb": 1})]  # on a host no longer registered
    summaries = [VMSummary(v.name, v.host, v.state, int(v.spec.get("vcpus", 0)),
                           int(v.spec["memory_mb"])) for v in vms]
    full = build_fleet(hosts, vms, {})
    fast = placement_fleet(hosts, summaries, {}, peers=["v4"])
    for column in ("cpu_used", "mem_used", "vm_count", "enabled", "cpu_cap", "mem_cap"):
        assert list(getattr(fast, column)) == list(getattr(full, column)), column
    assert set(fast.vms) == {"v4"} and fast.vms["v4"].host == fast.index["b"]
    req = VMRequest("new", 1, 4 * 1024, anti_affinity=("v4",))
    assert Scheduler(fast).decide(req).host == Scheduler(full).decide(req).host == "a"
