"""Small fleets the scheduler tests share."""

from __future__ import annotations

import pytest

from novacron.coordinator.scheduler import FleetState, Host, Scheduler


def host(i: int | str, vcpus: int = 16, mem_gib: int = 64, **kw: object) -> Host:
    return Host(id=f"h{i}" if isinstance(i, int) else i, vcpus=vcpus,
                memory_mib=mem_gib * 1024, **kw)  # type: ignore[arg-type]


@pytest.fixture
def fleet() -> FleetState:
    """Four hosts over two zones; h3 is pricier and far from region 'eu'."""
    return FleetState([
        host(0, zone="a", latency_ms={"eu": 5.0}),
        host(1, zone="a", latency_ms={"eu": 6.0}),
        host(2, zone="b", latency_ms={"eu": 20.0}),
        host(3, zone="b", cost_per_hour=3.0, latency_ms={"eu": 150.0}),
    ])


@pytest.fixture
def sched(fleet: FleetState) -> Scheduler:
    return Scheduler(fleet)


# A real coordinator on loopback with two fake agents (alpha 8 GiB, beta 4 GiB, 8 CPUs each).
from tests.coordinator.conftest import agents, coordinator  # noqa: E402, F401
