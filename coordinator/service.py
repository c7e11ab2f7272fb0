"""Coordinator process lifecycle: build the aiohttp app and serve until signalled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from novacron import __version__, audit, logs, tls
from novacron.coordinator.agent_client import AgentClient
from novacron.coordinator.api import load_route_modules
from novacron.coordinator.api.auth import make_auth_middleware
from novacron.coordinator.api.errors import error_middleware
from novacron.coordinator.api.health import OPENAPI_DOC
from novacron.coordinator.api.keys import (
    AGENTS,
    CONFIG,
    EVENTS,
    GRANTS,
    IDENTITIES,
    INSTANCE,
    LEASES,
    METRICS,
    MIGRATIONS,
    PLACER,
    RECONCILER,
    STORE,
)
from novacron.coordinator.api.openapi import add_routes, build_document, json_body
from novacron.coordinator.config import CoordinatorConfig
from novacron.coordinator.events import EventHub
from novacron.coordinator.identity import HostIdentities
from novacron.coordinator.lease import Lease
from novacron.coordinator.metrics import CoordinatorMetrics
from novacron.coordinator.migrations import MigrationManager
from novacron.coordinator.models import HOST_DOWN, HOST_UP
from novacron.coordinator.placement import Placer, most_free_memory
from novacron.coordinator.reconcile import RECONCILE_LEASE, Reconciler
from novacron.coordinator.store import Store, open_store
from novacron.daemon import start_site, until_signalled
from novacron.grants import GrantSigner
from novacron.metrics import metrics_response

log = logging.getLogger("novacron.coordinator")

GRANT_KEY_FILE = "grant-signing.key"  # Ed25519, 0600


def build_app(cfg: CoordinatorConfig, *, store: Store | None = None,
              placer: Placer | None = None) -> web.Application:
    modules = load_route_modules()
    tables = [m.routes for m in modules]
    roles = {(r.method, r.full_path): r.auth for t in tables for r in t.routes}
    roles[("GET", "/metrics")] = "metrics"
    metrics = CoordinatorMetrics()
    audit_log = audit.AuditLog(cfg.audit_file or cfg.data_dir / "audit.log", fsync=cfg.audit_fsync)
    app = web.Application(
        middlewares=[audit.audit_middleware(audit_log, body_of=json_body), metrics.middleware(), error_middleware,
                     make_auth_middleware(roles)],
        client_max_size=cfg.max_body_bytes,
    )
    audit.install(app, audit_log)
    app[CONFIG] = cfg
    app[STORE] = store or open_store(cfg)
    app[METRICS] = metrics
    app[INSTANCE] = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    app[LEASES] = {}
    app[AGENTS] = AgentClient(cfg.agent_timeout_s, ssl=tls.peer_client_context(cfg))
    app[EVENTS] = EventHub(app[STORE], app[INSTANCE])
    app[PLACER] = placer or most_free_memory
    app[RECONCILER] = Reconciler(app[STORE], app[AGENTS])
    app[IDENTITIES] = HostIdentities(app[STORE])
    app[GRANTS] = grant_signer(cfg)
    app[MIGRATIONS] = MigrationManager(cfg, app[STORE], app[AGENTS], app[EVENTS], app[RECONCILER],
                                       app[GRANTS], app[INSTANCE], metrics=metrics)
    app[OPENAPI_DOC] = build_document(tables, version=__version__)
    add_routes(app, tables)
    app.router.add_get("/metrics", serve_metrics)
    app.cleanup_ctx.append(_core_services)  # first: later contexts see an open store
    for module in modules:
        setup = getattr(module, "setup", None)
        if setup is not None:
            setup(app)
    return app


async def serve_metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; fleet counts are taken from the store now."""
    app = request.app
    metrics, store = app[METRICS], app[STORE]
    hosts, vms = await store.state_counts()  # counted by the database: a scrape decodes no record
    metrics.count_states(metrics.hosts, hosts, (HOST_UP, HOST_DOWN))
    metrics.count_states(metrics.vms, vms,
                         ("creating", "running", "stopped", "paused", "migrating"))
    for name, lease in app[LEASES].items():
        metrics.leases.labels(name).set(1 if lease.held else 0)
    return metrics_response(metrics.registry)


def grant_signer(cfg: CoordinatorConfig) -> GrantSigner:
    """The migration-grant key, kept on disk so agents' copies stay valid across restarts."""
    if cfg.grant_key_file:
        return GrantSigner.load_or_create(Path(cfg.grant_key_file))
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return GrantSigner.load_or_create(cfg.data_dir / GRANT_KEY_FILE)


async def _core_services(app: web.Application) -> AsyncIterator[None]:
    await app[STORE].open()
    for host in await app[STORE].list_hosts():
        logs.register_secret(host.token, pinned=False)  # agents' tokens, stored by an earlier run
    await app[EVENTS].start()  # events published by other coordinators on this database
    await app[AGENTS].start()
    await app[MIGRATIONS].resume_all()
    # Reconciliation writes VM records from what agents report: one coordinator of the
    # fleet at a time, or two could settle the same VM from reports a moment apart.
    lease = Lease(app[STORE], RECONCILE_LEASE, app[INSTANCE], app[CONFIG].lease_ttl_s)
    app[LEASES][RECONCILE_LEASE] = lease
    if await lease.renew():  # before serving: VMs left creating or migrating, records behind the agents
        await app[RECONCILER].run_once_logged()
    lease.start()
    loop = asyncio.create_task(app[RECONCILER].run(app[CONFIG].reconcile_interval_s, lease), name="reconcile")
    try:
        yield
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await lease.close()
        await app[MIGRATIONS].close()
        await app[AGENTS].close()
        await app[EVENTS].close()
        await app[STORE].close()


def write_listen_file(cfg: CoordinatorConfig, url: str) -> None:
    """Tell whoever started us (tests, the demo) where we listen when port was 0."""
    path = cfg.data_dir / "listen.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(path)


async def serve(cfg: CoordinatorConfig) -> None:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    # Client certificates are optional at the TLS layer (operators' CLIs have none) but
    # verified when shown; host routes require one (novacron.coordinator.api.hosts).
    ssl_context = tls.server_context(cfg, require_client_cert=False) if tls.enabled(cfg) else None
    runner, port = await start_site(build_app(cfg), cfg.host, cfg.port, cfg.http, ssl_context=ssl_context)
    url = f"{tls.url_scheme(cfg)}://{cfg.host}:{port}"
    write_listen_file(cfg, url)
    log.info("coordinator listening", extra={"url": url, "data_dir": str(cfg.data_dir)})
    try:
        await until_signalled()
    finally:
        await runner.cleanup()
        (cfg.data_dir / "listen.json").unlink(missing_ok=True)
