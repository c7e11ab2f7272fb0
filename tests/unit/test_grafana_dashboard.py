"""deploy/grafana/novacron.json: valid, and every query names only metrics we export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from novacron.agent.metrics import AgentMetrics
from novacron.coordinator.metrics import CoordinatorMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "novacron.json"
METRIC = re.compile(r"\bnovacron_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can expose (families with no samples yet included)."""
    names = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def all_exported() -> set[str]:
    coordinator, agent = CoordinatorMetrics(), AgentMetrics()
    coordinator.watch_migrations(list)
    agent.watch(list)
    return exported(coordinator.registry) | exported(agent.registry)


def queries(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for v in node.values() for q in queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in queries(v)]
    return []


def test_every_query_names_an_exported_metric() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"]
    names = all_exported()
    exprs = queries(doc["panels"])
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        found = set(METRIC.findall(expr))
        assert found, f"query names no NovaCron metric: {expr}"
        assert found <= names, f"{sorted(found - names)} not exported (query: {expr})"
        used |= found
    # it shows a fleet and its migrations, from both coordinators and agents
    for needed in ("novacron_hosts", "novacron_vms", "novacron_heartbeats_total",
                   "novacron_api_request_duration_seconds_bucket",
                   "novacron_placement_duration_seconds_bucket",
                   "novacron_migration_downtime_seconds_bucket",
                   "novacron_migration_phase_duration_seconds_bucket",
                   "novacron_migration_pages_total", "novacron_migration_dirty_rate_pages_per_second",
                   "novacron_agent_migration_downtime_seconds_bucket"):
        assert needed in used, needed


def test_every_panel_has_a_query_and_a_unique_id() -> None:
    doc = json.loads(DASHBOARD.read_text())
    panels = [p for p in doc["panels"] if p["type"] != "row"]
    assert all(queries(p) for p in panels)
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_the_check_catches_a_misspelt_metric() -> None:
    names = all_exported()
    assert "novacron_migration_downtime_seconds_bucket" in names
    assert not set(METRIC.findall("rate(novacron_migration_downtim_seconds_bucket[5m])")) <= names
