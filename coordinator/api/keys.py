"""Shared services hung off the aiohttp app; handlers reach them with ``request.app[KEY]``.

| key | type | what |
| --- | --- | --- |
| ``CONFIG`` | CoordinatorConfig | the coordinator's settings (tokens included: never log them) |
| ``STORE`` | Store | persistence (``novacron.coordinator.store``) |
| ``AGENTS`` | AgentClient | HTTP client for agent APIs (``novacron.coordinator.agent_client``) |
| ``PLACER`` | Placer | chooses a host for a new VM (``novacron.coordinator.placement``) |
| ``MIGRATIONS`` | MigrationManager | starts, follows and cancels migrations |
| ``EVENTS`` | EventHub | in-process pub/sub used for SSE progress streams |
| ``CLASSIFIER`` | TaskService | task classifier and swarm planner (``novacron.coordinator.classifier``) |
| ``INSTANCE`` | str | this coordinator's unique name among those sharing a database (lease holder) |
| ``METRICS`` | CoordinatorMetrics | Prometheus metrics (``novacron.coordinator.metrics``) |
| ``LEASES`` | dict[str, Lease] | once-per-fleet leases this coordinator competes for, by name |

Features add their own keys in their own modules (``web.AppKey("name", Type)``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from novacron.coordinator.agent_client import AgentClient
    from novacron.coordinator.classifier.service import TaskService
    from novacron.coordinator.config import CoordinatorConfig
    from novacron.coordinator.events import EventHub
    from novacron.coordinator.lease import Lease
    from novacron.coordinator.metrics import CoordinatorMetrics
    from novacron.coordinator.migrations import MigrationManager
    from novacron.coordinator.placement import Placer
    from novacron.coordinator.store import Store

CONFIG: web.AppKey[CoordinatorConfig] = web.AppKey("config")
STORE: web.AppKey[Store] = web.AppKey("store")
AGENTS: web.AppKey[AgentClient] = web.AppKey("agents")
PLACER: web.AppKey[Placer] = web.AppKey("placer")
MIGRATIONS: web.AppKey[MigrationManager] = web.AppKey("migrations")
EVENTS: web.AppKey[EventHub] = web.AppKey("events")
CLASSIFIER: web.AppKey[TaskService] = web.AppKey("classifier")
INSTANCE: web.AppKey[str] = web.AppKey("instance", str)
LEASES: web.AppKey[dict[str, Lease]] = web.AppKey("leases")
METRICS: web.AppKey[CoordinatorMetrics] = web.AppKey("metrics")
