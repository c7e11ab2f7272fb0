"""The coordinator's Prometheus metrics (``GET /metrics``: the admin token, or
``metrics_token`` when set, so a scraper needs no admin rights).

API latency by route and status (middleware), heartbeats, placement latency,
hosts and VMs by state (counted at scrape time), and migrations as the
coordinator sees them through the agents' reports: results, phase durations,
downtime and bytes as histograms, pages by kind; running ones live.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from novacron.coordinator.models import Migration
from novacron.metrics import BYTES, DOWNTIME, SECONDS, page_counts


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.api_latency = Histogram(
            "novacron_api_request_duration_seconds", "API requests by route template, method and status",
            ["route", "method", "status"], buckets=SECONDS, registry=r)
        self.heartbeats = Counter("novacron_heartbeats", "Agent heartbeats by result (ok, unknown, shed, failed)",
                                  ["result"], registry=r)
        self.placement = Histogram(
            "novacron_placement_duration_seconds",
            "Placing a new VM, by outcome: placed, refused (no host), raced (another coordinator won)",
            ["outcome"], buckets=SECONDS, registry=r)
        self.hosts = Gauge("novacron_hosts", "Registered hosts by state", ["state"], registry=r)
        self.vms = Gauge("novacron_vms", "VMs by state", ["state"], registry=r)
        self.leases = Gauge("novacron_lease_held", "1 while this coordinator holds the lease",
                            ["lease"], registry=r)
        self.migrations = Counter("novacron_migrations", "Migrations ended, by result",
                                  ["result"], registry=r)
        self.migration_duration = Histogram(
            "novacron_migration_duration_seconds", "Whole migrations, start (out of the queue) to end", ["result"],
            buckets=SECONDS, registry=r)
        self.migration_phase = Histogram(
            "novacron_migration_phase_duration_seconds", "Time migrations spent in each phase "
            "(source agent's clock)", ["phase"], buckets=SECONDS, registry=r)
        self.migration_downtime = Histogram(
            "novacron_migration_downtime_seconds", "Guest pause of completed migrations",
            buckets=DOWNTIME, registry=r)
        self.migration_budget_exceeded = Counter(
            "novacron_migration_budget_exceeded", "Migrations whose pause outlasted their downtime "
            "budget, by result (completed: forced; failed: paused past it, then rolled back)",
            ["result"], registry=r)
        self.migration_bytes = Histogram(
            "novacron_migration_bytes", "Bytes per migration: raw (guest pages), wire, device_state",
            ["kind"], buckets=BYTES, registry=r)
        self.migration_pages = Counter(
            "novacron_migration_pages", "Pages of ended migrations by kind (sent, zero, dedup, compressed)",
            ["kind"], registry=r)

    def migration_ended(self, mig: Migration) -> None:
        m = mig.metrics if isinstance(mig.metrics, dict) else {}
        self.migrations.labels(mig.phase).inc()
        if mig.budget_exceeded or m.get("budget_exceeded") is True:
            self.migration_budget_exceeded.labels(mig.phase).inc()
        if mig.finished_at is not None:
            started = mig.started_at or mig.created_at  # time in the queue is not migrating
            self.migration_duration.labels(mig.phase).observe(max(0.0, mig.finished_at - started))
        phases = m.get("phase_seconds")
        if isinstance(phases, dict):
            for phase, seconds in phases.items():
                if isinstance(seconds, (int, float)) and isinstance(phase, str):
                    self.migration_phase.labels(phase).observe(float(seconds))
        downtime = m.get("downtime_ms")
        if mig.phase == "completed" and isinstance(downtime, (int, float)):
            self.migration_downtime.observe(downtime / 1000.0)
        for kind, key in (("raw", "bytes_raw"), ("wire", "bytes_wire"),
                          ("device_state", "device_state_bytes")):
            value = m.get(key)
            if isinstance(value, (int, float)):
                self.migration_bytes.labels(kind).observe(value)
        for kind, count in page_counts(m).items():
            self.migration_pages.labels(kind).inc(count)

    def watch_migrations(self, running: Callable[[], Iterable[Migration]]) -> None:
        self.registry.register(_LiveMigrations(running))

    def middleware(self) -> Middleware:
        latency = self.api_latency

        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
            start = time.perf_counter()
            status = 500
            try:
                resp = await handler(request)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                resource = request.match_info.route.resource
                # the route's template, never the raw path: bounded label values
                route = resource.canonical if resource is not None else "(unmatched)"
                latency.labels(route, request.method, str(status)).observe(time.perf_counter() - start)

        return measure

    def count_states(self, gauge: Gauge, counts: dict[str, int], known: Iterable[str]) -> None:
        """Set ``gauge`` per state; ``known`` states absent from ``counts`` read 0."""
        for state, n in {**dict.fromkeys(known, 0), **counts}.items():
            gauge.labels(state).set(n)


class _LiveMigrations(Collector):
    def __init__(self, running: Callable[[], Iterable[Migration]]) -> None:
        self.running = running

    def collect(self) -> Iterable[Metric]:
        labels = ["migration", "vm", "source", "target", "phase"]
        pages = GaugeMetricFamily("novacron_migration_live_pages",
                                  "Pages a running migration has handled so far, by kind",
                                  labels=[*labels, "kind"])
        dirty = GaugeMetricFamily("novacron_migration_dirty_rate_pages_per_second",
                                  "Dirty rate of a running migration's guest", labels=labels)
        wire = GaugeMetricFamily("novacron_migration_live_bytes_wire",
                                 "Bytes a running migration has sent so far", labels=labels)
        progress = GaugeMetricFamily("novacron_migration_progress_percent",
                                     "A running migration's progress: bytes the destination acknowledged "
                                     "against acknowledged + remaining (never runs backwards)",
                                     labels=labels)
        count = GaugeMetricFamily("novacron_migrations_running", "Migrations this coordinator follows")
        n = 0
        for mig in list(self.running()):
            if mig.done:
                continue
            n += 1
            key = [mig.id, mig.vm, mig.source, mig.target, mig.phase]
            m: dict[str, Any] = mig.metrics if isinstance(mig.metrics, dict) else {}
            for kind, value in page_counts(m).items():
                pages.add_metric([*key, kind], value)
            rate = m.get("dirty_rate_pages_s")
            dirty.add_metric(key, float(rate) if isinstance(rate, (int, float)) else 0.0)
            sent = m.get("bytes_wire")
            wire.add_metric(key, float(sent) if isinstance(sent, (int, float)) else 0.0)
            pct = m.get("progress_pct")
            if isinstance(pct, (int, float)):
                progress.add_metric(key, float(pct))
        count.add_metric([], n)
        return [pages, dirty, wire, progress, count]
