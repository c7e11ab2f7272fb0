"""Shared services hung off the aiohttp app; handlers reach them with ``request.app[KEY]``.

| key | type | what |
| --- | --- | --- |
| ``CONFIG`` | CoordinatorConfig | the coordinator's settings (tokens included: never log them) |
| ``STORE`` | Store | persistence (``novacron.coordinator.store``) |
| ``AGENTS`` | AgentClient | HTTP client for agent APIs (``novacron.coordinator.agent_client``) |
| ``PLACER`` | Placer | chooses a host for a new VM (``novacron.coordinator.placement``) |
| ``MIGRATIONS`` | MigrationManager | starts, follows and cancels migrations |
| ``RECONCILER`` | Reconciler | makes records follow what the agents really run (``novacron.coordinator.reconcile``) |
| ``EVENTS`` | EventHub | in-process pub/sub used for SSE progress streams |
| ``CLASSIFIER`` | TaskService | task classifier and swarm planner (``novacron.coordinator.classifier``) |
| ``IDENTITIES`` | HostIdentities | which identity each host name is bound to (``novacron.coordinator.identity``) |
| ``GRANTS`` | GrantSigner | signs migration grants (``novacron.grants``) |
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
    from novacron.coordinator.identity import HostIdentities
    from novacron.coordinator.lease import Lease
    from novacron.coordinator.metrics import CoordinatorMetrics
    from novacron.coordinator.migrations import MigrationManager
    from novacron.coordinator.placement import Placer
    from novacron.coordinator.reconcile import Reconciler
    from novacron.coordinator.store import Store
    from novacron.grants import GrantSigner

CONFIG: web.AppKey[CoordinatorConfig] = web.AppKey("config")
STORE: web.AppKey[Store] = web.AppKey("store")
AGENTS: web.AppKey[AgentClient] = web.AppKey("agents")
PLACER: web.AppKey[Placer] = web.AppKey("placer")
MIGRATIONS: web.AppKey[MigrationManager] = web.AppKey("migrations")
RECONCILER: web.AppKey[Reconciler] = web.AppKey("reconciler")
EVENTS: web.AppKey[EventHub] = web.AppKey("events")
CLASSIFIER: web.AppKey[TaskService] = web.AppKey("classifier")
IDENTITIES: web.AppKey[HostIdentities] = web.AppKey("identities")
GRANTS: web.AppKey[GrantSigner] = web.AppKey("grants")
INSTANCE: web.AppKey[str] = web.AppKey("instance", str)
LEASES: web.AppKey[dict[str, Lease]] = web.AppKey("leases")
METRICS: web.AppKey[CoordinatorMetrics] = web.AppKey("metrics")
