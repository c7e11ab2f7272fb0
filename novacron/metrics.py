"""Prometheus metrics plumbing shared by the agent and the coordinator.

Each app has its own ``CollectorRegistry`` (several agents or coordinators can
live in one test process); ``metrics_response`` renders one with
``prometheus_client`` for a ``GET /metrics`` handler.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

# Seconds: from a heartbeat's few ms to a long pre-copy phase.
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
# Pause of a migration: QEMU's default budget is 300 ms.
DOWNTIME = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10)
# Bytes of one migration: 1 MiB .. 64 GiB by factors of 4.
BYTES = tuple(float(1 << s) for s in range(20, 37, 2))

PAGE_KINDS = ("sent", "zero", "dedup", "compressed")


def page_counts(metrics: dict[str, object]) -> dict[str, int]:
    """Pages by kind from a migration status's metrics: sent (every page conveyed),
    zero (skipped or sent as zero records), dedup (sent as references), compressed
    (sent as page data: the rest of sent)."""
    def num(d: object, key: str) -> int:
        v = d.get(key) if isinstance(d, dict) else None
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    native = metrics.get("native")
    sent, dedup = num(metrics, "pages_sent"), num(metrics, "pages_dedup")
    return {"sent": sent, "zero": num(metrics, "pages_zero"), "dedup": dedup,
            "compressed": max(0, sent - dedup - num(native, "pages_zero_sent"))}


def metrics_response(registry: CollectorRegistry) -> web.Response:
    resp = web.Response(body=generate_latest(registry))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp
