"""Choices and their explanations: power-on cost, latency, packing, affinity rules."""

from __future__ import annotations

import pytest

from novacron.coordinator.scheduler import (
    FleetState,
    Scheduler,
    SchedulerInputError,
    VMRequest,
    Weights,
)
from novacron.coordinator.scheduler.strategies import STRATEGIES


def test_running_host_beats_powering_on_an_empty_one(fleet: FleetState, sched: Scheduler) -> None:
    fleet.place(VMRequest("bg", 2, 2048), "h2")
    d = sched.place(VMRequest("x", 2, 2048))
    assert d.host == "h2"
    ex = d.explanation
    assert ex["chosen"]["powers_on"] is False
    assert "instead of one of 3 empty hosts" in ex["why"]
    assert all("cost" in alt["loses_on"] for alt in ex["alternatives"])


def test_empty_fleet_powers_on_cheap_near_host(sched: Scheduler) -> None:
    d = sched.decide(VMRequest("x", 2, 2048, region="eu"))
    assert d.host == "h0"  # cheapest, closest to eu
    assert d.explanation["chosen"]["powers_on"] is True
    assert "no running host could take it" in d.explanation["why"]
    assert d.explanation["chosen"]["latency_ms"] == 5.0


def test_latency_weight_moves_vm_toward_its_region(fleet: FleetState, sched: Scheduler) -> None:
    fleet.place(VMRequest("a", 8, 2048), "h0")  # 5 ms from eu, half full
    fleet.place(VMRequest("b", 13, 2048), "h2")  # 20 ms, fuller: packing prefers it
    near = sched.decide(VMRequest("x", 2, 2048, region="eu"), weights=Weights(0.7, 0.0, 0.3))
    packed = sched.decide(VMRequest("x", 2, 2048, region="eu"), weights=Weights(0.7, 0.3, 0.0))
    assert near.host == "h0" and packed.host == "h2"
    assert near.explanation["alternatives"][0]["host"] == "h2"
    assert near.explanation["alternatives"][0]["loses_on"] == ["latency"]


def test_explanation_lists_rejections_and_alternatives(fleet: FleetState, sched: Scheduler) -> None:
    fleet.place(VMRequest("fill", 15, 1024), "h1")
    fleet.set_enabled("h2", False)
    ex = sched.decide(VMRequest("x", 4, 1024)).explanation
    assert ex["hosts_considered"] == 4 and ex["feasible"] == 2
    assert {k: v["hosts"] for k, v in ex["rejected"].items()} == {"disabled": 1, "cpu": 1}
    assert all(v["why"] for v in ex["rejected"].values())
    assert [a["host"] for a in ex["alternatives"]] == ["h3"]
    assert ex["chosen"]["score"] <= ex["alternatives"][0]["score"]
    assert ex["weights"] == {"cost": 0.7, "performance": 0.2, "latency": 0.1}


def test_affinity_joins_peer_host(fleet: FleetState, sched: Scheduler) -> None:
    fleet.place(VMRequest("db", 2, 2048), "h3")
    d = sched.decide(VMRequest("app", 2, 2048, affinity=("db",)))
    assert d.host == "h3"
    assert d.explanation["rejected"]["affinity"]["hosts"] == 3


def test_affinity_with_split_peers_or_full_host_fails(fleet: FleetState, sched: Scheduler) -> None:
    fleet.place(VMRequest("a", 2, 2048), "h0")
    fleet.place(VMRequest("b", 2, 2048), "h1")
    assert not sched.decide(VMRequest("c", 1, 1024, affinity=("a", "b"))).placed
    assert not sched.decide(VMRequest("c", 15, 1024, affinity=("a",))).placed


def test_affinity_to_unplaced_vm_is_an_input_error(sched: Scheduler) -> None:
    with pytest.raises(SchedulerInputError, match="not placed"):
        sched.decide(VMRequest("c", 1, 1024, affinity=("ghost",)))


def test_anti_affinity_host_and_zone_scope(fleet: FleetState, sched: Scheduler) -> None:
    fleet.place(VMRequest("r1", 2, 2048), "h0")
    d = sched.decide(VMRequest("r2", 2, 2048, anti_affinity=("r1",)))
    assert d.host != "h0" and d.explanation["rejected"]["anti_affinity"]["hosts"] == 1
    d = sched.decide(VMRequest("r2", 2, 2048, anti_affinity=("r1",), anti_affinity_scope="zone"))
    assert d.host in ("h2", "h3") and d.explanation["rejected"]["anti_affinity"]["hosts"] == 2


def test_anti_affinity_declared_by_a_placed_vm_binds_later_ones(fleet: FleetState, sched: Scheduler) -> None:
    sched.place(VMRequest("r1", 2, 2048, anti_affinity=("r2",)))  # r2 not placed yet
    first = fleet.vms["r1"].host
    d = sched.place(VMRequest("r2", 2, 2048))
    assert d.host_index != first
    fleet.remove("r1")  # the rule leaves with the VM that declared it
    assert sched.decide(VMRequest("r3", 2, 2048, anti_affinity=())).placed
    assert fleet.anti_affinity_against("r2") == set()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_places_feasibly_and_explains(fleet: FleetState, strategy: str) -> None:
    fleet.place(VMRequest("bg", 10, 4096), "h1")
    sched = Scheduler(fleet)
    d = sched.decide(VMRequest("x", 8, 4096), strategy=strategy)
    assert d.placed and d.host != "h1"  # h1 has only 6 vCPU left
    assert d.explanation["why"] and d.explanation["chosen"]["host"] == d.host


def test_baselines_pick_as_defined(fleet: FleetState) -> None:
    fleet.place(VMRequest("a", 8, 1024), "h1")
    fleet.place(VMRequest("b", 4, 1024), "h2")
    s = Scheduler(fleet)
    req = VMRequest("x", 2, 1024)
    assert s.decide(req, strategy="first-fit").host == "h0"
    assert s.decide(req, strategy="best-fit").host == "h1"
    assert s.decide(req, strategy="spread").host in ("h0", "h3")


def test_unknown_strategy_and_double_placement_rejected(sched: Scheduler) -> None:
    with pytest.raises(SchedulerInputError, match="unknown strategy"):
        sched.decide(VMRequest("x", 1, 1024), strategy="random")
    sched.place(VMRequest("x", 1, 1024))
    with pytest.raises(SchedulerInputError, match="already placed"):
        sched.place(VMRequest("x", 1, 1024))


def test_priority_high_avoids_overcommitted_host() -> None:
    from tests.scheduler.conftest import host

    fleet = FleetState([host(0, vcpus=8, cpu_overcommit=4.0), host(1, vcpus=8, cpu_overcommit=4.0)])
    fleet.place(VMRequest("busy", 10, 1024), 0)  # 150 % of physical cores once x lands
    fleet.place(VMRequest("calm", 2, 1024), 1)
    s = Scheduler(fleet)
    assert s.decide(VMRequest("hi", 2, 1024, priority="high")).host == "h1"
    assert s.decide(VMRequest("lo", 2, 1024, priority="low")).host == "h0"
