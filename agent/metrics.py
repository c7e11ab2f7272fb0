"""The agent's Prometheus metrics (``GET /metrics``, with the agent's token).

Histograms are observed when a migration ends (``MigrationStatus.on_finish``);
running migrations' live figures (pages by kind, dirty rate, round) are read
from their status at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from novacron.agent.migration.status import MigrationStatus
from novacron.metrics import BYTES, DOWNTIME, PAGE_KINDS, SECONDS, page_counts

log = logging.getLogger("novacron.agent.metrics")


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.migrations = Counter("novacron_agent_migrations", "Migrations ended, by role and result",
                                  ["role", "result"], registry=r)
        self.phase_seconds = Histogram(
            "novacron_agent_migration_phase_duration_seconds", "Time a migration spent in each phase",
            ["role", "phase"], buckets=SECONDS, registry=r)
        self.duration = Histogram("novacron_agent_migration_duration_seconds",
                                  "Whole migrations, start to end", ["role", "result"],
                                  buckets=SECONDS, registry=r)
        self.downtime = Histogram("novacron_agent_migration_downtime_seconds",
                                  "Guest pause of completed migrations (source side)",
                                  buckets=DOWNTIME, registry=r)
        self.bytes = Histogram("novacron_agent_migration_bytes",
                               "Bytes of one migration: raw (guest pages), wire (sent), device_state; with "
                               "local disks: disk (relayed), disk_named (sent as digests, source)",
                               ["role", "kind"], buckets=BYTES, registry=r)
        self.pages = Counter("novacron_agent_migration_pages", "Pages of ended migrations by kind",
                             ["role", "kind"], registry=r)
        self.budget_exceeded = Counter(
            "novacron_agent_migration_budget_exceeded", "Migrations whose pause outlasted their "
            "downtime budget, by result (completed: forced through; failed: rolled back)",
            ["result"], registry=r)
        self.heartbeats = Counter("novacron_agent_heartbeats", "Heartbeats to the coordinator by result",
                                  ["result"], registry=r)

    def finished(self, st: MigrationStatus) -> None:
        """Observe an ended migration (``MigrationStatus.on_finish``); never raises."""
        try:
            m = st.metrics()
            self.migrations.labels(st.role, st.phase).inc()
            self.duration.labels(st.role, st.phase).observe(st.total_s)
            for phase, seconds in st.phase_seconds.items():
                self.phase_seconds.labels(st.role, phase).observe(seconds)
            if st.budget_exceeded and st.role == "source":
                self.budget_exceeded.labels(st.phase).inc()
            if st.phase == "completed" and st.role == "source" and st.downtime_ms is not None:
                self.downtime.observe(st.downtime_ms / 1000.0)
            sizes = [("raw", st.bytes_raw), ("wire", st.bytes_wire), ("device_state", st.device_state_bytes)]
            if st.disk_bytes:  # only migrations that moved disks: no zeros from the others
                sizes.append(("disk", st.disk_bytes))
                if st.role == "source":
                    sizes.append(("disk_named", int(st.disk_dedup.get("bytes_named", 0))))
            for kind, value in sizes:
                self.bytes.labels(st.role, kind).observe(value)
            for kind, count in page_counts(m).items():
                self.pages.labels(st.role, kind).inc(count)
        except Exception:
            log.exception("migration metrics not recorded", extra={"migration": st.id})

    def watch(self, statuses: Callable[[], Iterable[MigrationStatus]]) -> None:
        """Export running migrations' live figures, read from ``statuses()`` per scrape."""
        self.registry.register(_LiveMigrations(statuses))


class _LiveMigrations(Collector):
    def __init__(self, statuses: Callable[[], Iterable[MigrationStatus]]) -> None:
        self.statuses = statuses

    def collect(self) -> Iterable[Metric]:
        labels = ["migration", "vm", "role", "phase"]
        pages = GaugeMetricFamily("novacron_agent_migration_live_pages",
                                  "Pages of a running migration so far, by kind",
                                  labels=[*labels, "kind"])
        dirty = GaugeMetricFamily("novacron_agent_migration_dirty_rate_pages_per_second",
                                  "Dirty rate of a running migration's guest (last round)",
                                  labels=labels)
        rounds = GaugeMetricFamily("novacron_agent_migration_round",
                                   "Pre-copy round of a running migration", labels=labels)
        wire = GaugeMetricFamily("novacron_agent_migration_live_bytes_wire",
                                 "Bytes a running migration has sent so far", labels=labels)
        acked = GaugeMetricFamily("novacron_agent_migration_live_bytes_acked",
                                  "Bytes the destination acknowledged so far (counted as sent)",
                                  labels=labels)
        remaining = GaugeMetricFamily("novacron_agent_migration_remaining_bytes",
                                      "Bytes still to send, estimated from the dirty set",
                                      labels=labels)
        progress = GaugeMetricFamily("novacron_agent_migration_progress_percent",
                                     "Progress of a running migration (never runs backwards)",
                                     labels=labels)
        running = GaugeMetricFamily("novacron_agent_migrations_running",
                                    "Migrations in progress on this agent")
        count = 0
        for st in list(self.statuses()):
            if st.done:
                continue
            count += 1
            key = [st.id, st.vm, st.role, st.phase]
            for kind, value in page_counts(st.metrics()).items():
                pages.add_metric([*key, kind], value)
            dirty.add_metric(key, st.dirty_rate_pages_s)
            rounds.add_metric(key, st.round)
            wire.add_metric(key, st.bytes_wire)
            if st.role == "source":
                acked.add_metric(key, st.bytes_acked)
                remaining.add_metric(key, st.remaining_bytes or 0)
                progress.add_metric(key, st.progress_pct)
        running.add_metric([], count)
        return [pages, dirty, rounds, wire, acked, remaining, progress, running]


__all__ = ["PAGE_KINDS", "AgentMetrics"]
