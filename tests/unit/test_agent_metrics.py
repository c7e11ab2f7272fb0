"""The agent's migration histograms: disk bytes only for migrations that moved disks."""

from __future__ import annotations

from novacron.agent.metrics import AgentMetrics
from novacron.agent.migration.status import MigrationStatus


def ended(role: str, disk_bytes: int = 0, named: int = 0) -> MigrationStatus:
    st = MigrationStatus(id=f"m-{role}-{disk_bytes}", vm="v", role=role, peer="p")
    st.bytes_raw, st.bytes_wire, st.disk_bytes = 1000, 800, disk_bytes
    if named:
        st.disk_dedup["bytes_named"] = named
    st.set_phase("completed")
    return st


def test_disk_bytes_are_observed_only_where_disks_moved() -> None:
    m = AgentMetrics()
    for st in (ended("source"), ended("source", 5000, 60000), ended("destination", 5000)):
        m.finished(st)

    def sample(suffix: str, role: str, kind: str) -> float | None:
        return m.registry.get_sample_value(f"novacron_agent_migration_bytes_{suffix}", {"role": role, "kind": kind})

    assert sample("count", "source", "wire") == 2
    assert sample("count", "source", "disk") == 1 and sample("sum", "source", "disk") == 5000
    assert sample("sum", "source", "disk_named") == 60000
    assert sample("sum", "destination", "disk") == 5000
    assert sample("count", "destination", "disk_named") is None  # the source's figure only
