"""Feasibility filter: capacity, overcommit, maintenance, latency limits, reason counts."""

from __future__ import annotations

import numpy as np

from novacron.coordinator.scheduler import FleetState, Scheduler, VMRequest
from novacron.coordinator.scheduler.filters import feasible
from tests.scheduler.conftest import host


def test_capacity_counts_allocations(fleet: FleetState) -> None:
    fleet.place(VMRequest("big", 12, 8 * 1024), "h0")
    f = feasible(fleet, VMRequest("x", 8, 1024))
    assert f.ok.tolist() == [False, True, True, True]
    assert f.rejected == {"cpu": 1}
    f = feasible(fleet, VMRequest("y", 1, 60 * 1024))
    assert f.ok.tolist() == [False, True, True, True]
    assert f.rejected == {"memory": 1}


def test_exact_fit_is_feasible_and_one_more_is_not(fleet: FleetState) -> None:
    assert feasible(fleet, VMRequest("x", 16, 64 * 1024)).count == 4
    assert feasible(fleet, VMRequest("x", 17, 1024)).count == 0
    assert feasible(fleet, VMRequest("x", 1, 64 * 1024 + 1)).count == 0


def test_overcommit_raises_offered_capacity() -> None:
    fleet = FleetState([host(0, vcpus=4, cpu_overcommit=4.0), host(1, vcpus=4)])
    f = feasible(fleet, VMRequest("x", 16, 1024))
    assert f.ok.tolist() == [True, False]


def test_maintenance_hosts_take_nothing(fleet: FleetState) -> None:
    fleet.set_enabled("h0", False)
    f = feasible(fleet, VMRequest("x", 1, 1024))
    assert not f.ok[0] and f.rejected == {"disabled": 1}


def test_latency_limit_and_unknown_region(fleet: FleetState) -> None:
    f = feasible(fleet, VMRequest("x", 1, 1024, region="eu", max_latency_ms=10))
    assert f.ok.tolist() == [True, True, False, False]
    assert f.rejected == {"latency": 2}
    f = feasible(fleet, VMRequest("x", 1, 1024, region="mars", max_latency_ms=10))
    assert f.count == 0 and f.rejected == {"latency": 4}


def test_reason_counts_add_up_to_rejected_hosts(fleet: FleetState) -> None:
    fleet.set_enabled("h3", False)
    fleet.place(VMRequest("fill", 16, 1024), "h1")
    f = feasible(fleet, VMRequest("x", 2, 1024, region="eu", max_latency_ms=10))
    assert sum(f.rejected.values()) == fleet.n - f.count
    assert f.rejected == {"disabled": 1, "latency": 1, "cpu": 1}


def test_no_host_fits_gives_reasoned_refusal(sched: Scheduler) -> None:
    d = sched.decide(VMRequest("x", 64, 1024))
    assert not d.placed and d.host is None
    assert d.explanation["feasible"] == 0
    assert d.explanation["rejected"]["cpu"]["hosts"] == 4
    assert "vCPU" in d.explanation["why"]


def test_decide_changes_nothing(sched: Scheduler) -> None:
    before = (sched.fleet.cpu_used.copy(), sched.fleet.mem_used.copy(), dict(sched.fleet.vms))
    d = sched.decide(VMRequest("x", 2, 2048))
    assert d.placed
    assert np.array_equal(before[0], sched.fleet.cpu_used)
    assert np.array_equal(before[1], sched.fleet.mem_used)
    assert before[2] == sched.fleet.vms


def test_hosts_lacking_a_vm_network_are_filtered_out() -> None:
    fleet = FleetState([host(0, networks=frozenset({"prod", "dev"})), host(1, networks=frozenset({"dev"})),
                        host(2, networks=frozenset()), host(3)])  # host 3: reports no networks (a simulation)
    f = feasible(fleet, VMRequest("x", 1, 1024, networks=("prod",)))
    assert f.ok.tolist() == [True, False, False, True] and f.rejected == {"network": 2}
    f = feasible(fleet, VMRequest("x", 1, 1024, networks=("prod", "dev")))
    assert f.ok.tolist() == [True, False, False, True]
    assert feasible(fleet, VMRequest("x", 1, 1024)).count == 4  # no NICs: any host
    assert Scheduler(fleet).decide(VMRequest("y", 1, 1024, networks=("dev", "prod"))).host in ("h0", "h3")


def test_hosts_that_cannot_run_the_cpu_model_are_filtered_out() -> None:
    fleet = FleetState([host(0, cpu_models=frozenset({"Nehalem", "qemu64"})),
                        host(1, cpu_models=frozenset({"qemu64"})),
                        host(2, cpu_models=frozenset({"Nehalem", "host"})),
                        host(3)])  # host 3: reports no models (not filtered)
    f = feasible(fleet, VMRequest("x", 1, 1024, cpu_model="Nehalem"))
    assert f.ok.tolist() == [True, False, True, True] and f.rejected == {"cpu_model": 1}
    f = feasible(fleet, VMRequest("x", 1, 1024, cpu_model="host"))
    assert f.ok.tolist() == [False, False, True, True] and f.rejected == {"cpu_model": 2}
    assert feasible(fleet, VMRequest("x", 1, 1024)).count == 4  # no model asked: nothing filtered
    decision = Scheduler(fleet).decide(VMRequest("y", 1, 1024, cpu_model="Westmere"))
    assert decision.host == "h3"


def test_cpu_model_admission_names_model_and_host() -> None:
    from novacron.coordinator.models import Host as StoreHost
    from novacron.coordinator.models import cpu_model_problem

    def store_host(name: str, models: list[str] | None, sig: str = "GenuineIntel/6/85/7/abc") -> StoreHost:
        return StoreHost(name=name, url="http://h", token="t" * 16, cpus=4, memory_bytes=1 << 30,
                         memory_available_bytes=1 << 30, cpu_models=models, cpu_signature=sig)

    a, b = store_host("a", ["Nehalem", "host"]), store_host("b", ["qemu64", "host"], "AuthenticAMD/25/1/1/def")
    assert cpu_model_problem({}, a) is None  # the default model, Nehalem
    assert "'Nehalem'" in (cpu_model_problem({}, b) or "") and "'b'" in (cpu_model_problem({}, b) or "")
    assert cpu_model_problem({"cpu_model": "Westmere"}, store_host("c", None)) is None  # not reported
    # passthrough: only between hosts with the same CPU signature
    assert cpu_model_problem({"cpu_model": "host"}, a, source=store_host("a2", ["host"])) is None
    why = cpu_model_problem({"cpu_model": "host"}, b, source=a) or ""
    assert "passthrough" in why and "AuthenticAMD" in why, why
