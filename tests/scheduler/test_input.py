"""Bad hosts, requests and weights are refused with a message naming the field."""

from __future__ import annotations

import math

import pytest

from novacron.coordinator.scheduler import (
    DEFAULT_WEIGHTS,
    FleetState,
    SchedulerInputError,
    parse_host,
    parse_request,
    parse_weights,
)
from novacron.coordinator.scheduler.rebalance import RebalanceOptions


@pytest.mark.parametrize(("doc", "needle"), [
    ("nope", "expected an object"),
    ({"memory_mib": 1024}, "missing required field 'vcpus'"),
    ({"vcpus": 0, "memory_mib": 1024}, "vm.vcpus: must be > 0"),
    ({"vcpus": True, "memory_mib": 1024}, "vm.vcpus: expected an integer"),
    ({"vcpus": 1.5, "memory_mib": 1024}, "vm.vcpus: expected an integer"),
    ({"vcpus": 1, "memory_mib": -1}, "vm.memory_mib"),
    ({"vcpus": 1, "memory_mib": 1024, "colour": "red"}, "unknown field(s): colour"),
    ({"vcpus": 1, "memory_mib": 1024, "priority": "urgent"}, "vm.priority"),
    ({"vcpus": 1, "memory_mib": 1024, "max_latency_ms": 5}, "needs 'region'"),
    ({"vcpus": 1, "memory_mib": 1024, "region": "eu", "max_latency_ms": math.nan}, "finite"),
    ({"vcpus": 1, "memory_mib": 1024, "affinity": "db"}, "vm.affinity: expected a list"),
    ({"vcpus": 1, "memory_mib": 1024, "affinity": [""]}, "vm.affinity[0]"),
    ({"vcpus": 1, "memory_mib": 1024, "affinity": ["a"], "anti_affinity": ["a"]}, "both"),
    ({"vcpus": 1, "memory_mib": 1024, "anti_affinity_scope": "rack"}, "anti_affinity_scope"),
    ({"id": "x" * 200, "vcpus": 1, "memory_mib": 1024}, "longer than"),
])
def test_bad_requests(doc: object, needle: str) -> None:
    with pytest.raises(SchedulerInputError) as err:
        parse_request(doc)
    assert needle in str(err.value)


def test_good_request_round_trip() -> None:
    r = parse_request({"id": "web-1", "vcpus": 2, "memory_mib": 3584, "priority": "high",
                       "region": "eu", "max_latency_ms": 30, "anti_affinity": ["web-0"],
                       "anti_affinity_scope": "zone"})
    assert (r.vcpus, r.memory_mib, r.priority, r.anti_affinity) == (2, 3584, "high", ("web-0",))


@pytest.mark.parametrize(("doc", "needle"), [
    ({"vcpus": 4, "memory_mib": 1024}, "missing required field 'id'"),
    ({"id": "h", "vcpus": 4, "memory_mib": 1024, "cost_per_hour": -1}, "cost_per_hour"),
    ({"id": "h", "vcpus": 4, "memory_mib": 1024, "cpu_overcommit": 0}, "cpu_overcommit"),
    ({"id": "h", "vcpus": 4, "memory_mib": 1024, "mem_overcommit": 100}, "not sensible"),
    ({"id": "h", "vcpus": 4, "memory_mib": 1024, "latency_ms": {"eu": "far"}}, "latency_ms.eu"),
    ({"id": "h", "vcpus": 4, "memory_mib": 1024, "latency_ms": [1]}, "latency_ms"),
    ({"id": "h", "vcpus": 4, "memory_mib": 1024, "enabled": "yes"}, "enabled"),
])
def test_bad_hosts(doc: object, needle: str) -> None:
    with pytest.raises(SchedulerInputError) as err:
        parse_host(doc)
    assert needle in str(err.value)


def test_duplicate_host_leaves_fleet_unchanged() -> None:
    fleet = FleetState([parse_host({"id": "h", "vcpus": 4, "memory_mib": 1024})])
    with pytest.raises(SchedulerInputError, match="duplicate"):
        fleet.add_host(parse_host({"id": "h", "vcpus": 8, "memory_mib": 2048}))
    assert fleet.n == 1 and fleet.cpu_cap.tolist() == [4.0]


def test_weights() -> None:
    assert parse_weights(None) == DEFAULT_WEIGHTS
    assert parse_weights({"latency": 0.5}).latency == 0.5
    for bad in ({"cost": -1}, {"cost": 0, "performance": 0, "latency": 0}, {"speed": 1}, [1]):
        with pytest.raises(SchedulerInputError):
            parse_weights(bad)


@pytest.mark.parametrize("opts", [
    RebalanceOptions(max_migrations=0),
    RebalanceOptions(drain_threshold=0.9, hot_threshold=0.5),
    RebalanceOptions(bandwidth_mbps=0),
])
def test_bad_rebalance_options(opts: RebalanceOptions) -> None:
    with pytest.raises(SchedulerInputError):
        opts.check()
