"""Rebalancing plans: free light hosts, relieve hot ones, respect caps and rules, change nothing."""

from __future__ import annotations

import numpy as np

from novacron.coordinator.scheduler import FleetState, RebalanceOptions, VMRequest, plan
from novacron.coordinator.scheduler.rebalance import PRECOPY_FACTOR
from tests.scheduler.conftest import host


def _snapshot(fleet: FleetState) -> tuple[list[float], list[float], dict[str, int], list[bool]]:
    return (fleet.cpu_used.tolist(), fleet.mem_used.tolist(),
            {v: vm.host for v, vm in fleet.vms.items()}, fleet.enabled.tolist())


def test_drains_light_hosts_into_running_ones() -> None:
    fleet = FleetState([host(i, cost_per_hour=2.0) for i in range(4)])
    fleet.place(VMRequest("a", 8, 4096), 0)
    fleet.place(VMRequest("b", 2, 2048), 1)  # 12 %: drain candidate
    fleet.place(VMRequest("c", 2, 2048), 2)  # 12 %: drain candidate
    before = _snapshot(fleet)
    p = plan(fleet)
    assert _snapshot(fleet) == before  # planning changed nothing
    assert p.hosts_freed == ["h1", "h2"]
    assert {m.target for m in p.moves} == {"h0"}  # never powers the empty h3 on
    assert p.hourly_saving == 4.0
    m = p.moves[0]
    assert m.reason == "free-host"
    assert m.est_bytes == int(m.memory_mib * (1 << 20) * PRECOPY_FACTOR)
    assert np.isclose(m.est_seconds, m.est_bytes * 8 / 10e9, atol=1e-3)


def test_relieves_hot_host_with_smallest_vms_first() -> None:
    fleet = FleetState([host(0), host(1)])
    fleet.place(VMRequest("big", 12, 8192), 0)
    fleet.place(VMRequest("small", 3, 1024), 0)  # h0 at 94 %
    fleet.place(VMRequest("other", 2, 1024), 1)
    p = plan(fleet, RebalanceOptions(drain_threshold=0.05))
    assert [(m.vm, m.source, m.target, m.reason) for m in p.moves] == [("small", "h0", "h1", "relieve-hot")]
    assert p.hot_relieved == ["h0"]


def test_cap_on_migrations() -> None:
    fleet = FleetState([host(i) for i in range(12)])
    fleet.place(VMRequest("anchor", 8, 1024), 0)
    for i in range(1, 12):
        fleet.place(VMRequest(f"v{i}", 1, 512), i)
    p = plan(fleet, RebalanceOptions(max_migrations=3))
    assert len(p.moves) == 3 and p.capped
    assert len(p.hosts_freed) == 3


def test_anti_affinity_and_affinity_are_respected() -> None:
    fleet = FleetState([host(0), host(1), host(2)])
    fleet.place(VMRequest("r1", 8, 1024), 0)
    fleet.place(VMRequest("r2", 1, 512, anti_affinity=("r1",)), 1)  # may not join r1
    fleet.place(VMRequest("db", 1, 512), 2)
    fleet.place(VMRequest("app", 1, 512, affinity=("db",)), 2)  # pinned pair: not moved
    p = plan(fleet)
    assert all(m.vm not in ("db", "app") for m in p.moves)
    assert all(not (m.vm == "r2" and m.target == "h0") for m in p.moves)


def test_nothing_to_do_on_balanced_fleet() -> None:
    fleet = FleetState([host(0), host(1)])
    fleet.place(VMRequest("a", 8, 1024), 0)
    fleet.place(VMRequest("b", 8, 1024), 1)
    p = plan(fleet)
    assert p.moves == [] and not p.capped
    assert p.to_dict()["total_bytes"] == 0


def test_moves_never_make_a_target_hot() -> None:
    fleet = FleetState([host(0), host(1), host(2)])
    fleet.place(VMRequest("busy", 14, 1024), 0)  # 87.5 %: one more vCPU-pair makes it hot
    fleet.place(VMRequest("mid", 8, 1024), 1)
    fleet.place(VMRequest("lone", 2, 1024), 2)  # 12.5 %: drain candidate
    p = plan(fleet)
    assert [(m.vm, m.target) for m in p.moves] == [("lone", "h1")]  # not the fuller h0
    fleet2 = FleetState([host(0), host(1)])
    fleet2.place(VMRequest("busy", 14, 1024), 0)
    fleet2.place(VMRequest("lone", 2, 1024), 1)
    assert plan(fleet2).moves == []
