"""Pareto front: nothing returned is dominated, nothing non-dominated is left out."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from novacron.coordinator.scheduler import FleetState, Scheduler, VMRequest
from novacron.coordinator.scheduler.objectives import evaluate
from novacron.coordinator.scheduler.pareto import pareto_front
from tests.scheduler.conftest import host


def dominated_by_any(points: np.ndarray, i: int) -> bool:
    others = np.delete(points, i, axis=0)
    return bool(((others <= points[i]).all(axis=1) & (others < points[i]).any(axis=1)).any())


# small integer grids make ties and duplicates common; floats of wildly
# different magnitude exercise rounding in the column sums
values = st.one_of(
    st.integers(0, 4).map(float),
    st.floats(0, 1e12, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=300, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(0, 40), st.integers(1, 4)), elements=values))
def test_front_is_exactly_the_non_dominated_rows(points: np.ndarray) -> None:
    front = set(pareto_front(points).tolist())
    for i in range(points.shape[0]):
        assert (i in front) == (not dominated_by_any(points, i)), (i, points)


def test_front_of_known_points() -> None:
    pts = np.array([[1, 5, 0], [2, 2, 0], [5, 1, 0], [3, 3, 0], [2, 2, 0], [6, 6, 6]], float)
    assert pareto_front(pts).tolist() == [0, 1, 2, 4]
    assert pareto_front(np.zeros((0, 3))).tolist() == []


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 16), st.sampled_from([1.0, 2.0, 3.5]),
                          st.floats(1, 300)), min_size=1, max_size=25),
       st.integers(1, 8))
def test_weighted_choice_lies_on_the_front(spec: list[tuple[int, float, float]], vcpus: int) -> None:
    fleet = FleetState([host(i, cost_per_hour=c, latency_ms={"eu": lat}) for i, (_, c, lat) in enumerate(spec)])
    for i, (used, _, _) in enumerate(spec):
        if used:
            fleet.place(VMRequest(f"bg{i}", used, 1024), i)
    d = Scheduler(fleet).decide(VMRequest("x", vcpus, 2048, region="eu"))
    hosts = np.flatnonzero(fleet.cpu_used + vcpus <= fleet.cpu_cap)
    if not d.placed:
        assert hosts.size == 0
        return
    obj = evaluate(fleet, VMRequest("x", vcpus, 2048, region="eu"), hosts)
    front_hosts = set(hosts[pareto_front(obj.matrix())].tolist())
    assert d.host_index in front_hosts
    assert d.explanation["pareto_front_size"] == len(front_hosts)


def test_equal_scores_resolve_to_the_host_that_is_not_dominated() -> None:
    """Latency is capped when weighed: 201 ms and 200 ms score the same, but only the
    200 ms host is Pareto-optimal (found by the property above)."""
    fleet = FleetState([host(0, latency_ms={"eu": 201.0}), host(1, latency_ms={"eu": 200.0})])
    d = Scheduler(fleet).decide(VMRequest("x", 1, 2048, region="eu"))
    assert d.host == "h1"
