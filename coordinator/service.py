"""Coordinator process lifecycle: build the aiohttp app and serve until signalled."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator

from aiohttp import web

from novacron import __version__, logs
from novacron.coordinator.agent_client import AgentClient, AgentError, reported_state
from novacron.coordinator.api import load_route_modules
from novacron.coordinator.api.auth import make_auth_middleware
from novacron.coordinator.api.errors import error_middleware
from novacron.coordinator.api.health import OPENAPI_DOC
from novacron.coordinator.api.keys import (
    AGENTS,
    CONFIG,
    EVENTS,
    INSTANCE,
    LEASES,
    METRICS,
    MIGRATIONS,
    PLACER,
    STORE,
)
from novacron.coordinator.api.openapi import add_routes, build_document
from novacron.coordinator.config import CoordinatorConfig
from novacron.coordinator.events import EventHub
from novacron.coordinator.metrics import CoordinatorMetrics
from novacron.coordinator.migrations import MigrationManager
from novacron.coordinator.models import HOST_DOWN, HOST_UP
from novacron.coordinator.placement import Placer, most_free_memory
from novacron.coordinator.store import Store, open_store
from novacron.daemon import start_site, until_signalled
from novacron.metrics import metrics_response

log = logging.getLogger("novacron.coordinator")


def build_app(cfg: CoordinatorConfig, *, store: Store | None = None,
              placer: Placer | None = None) -> web.Application:
    modules = load_route_modules()
    tables = [m.routes for m in modules]
    roles = {(r.method, r.full_path): r.auth for t in tables for r in t.routes}
    roles[("GET", "/metrics")] = "metrics"
    metrics = CoordinatorMetrics()
    app = web.Application(
        middlewares=[metrics.middleware(), error_middleware, make_auth_middleware(roles)],
        client_max_size=cfg.max_body_bytes,
    )
    app[CONFIG] = cfg
    app[METRICS] = metrics
    app[INSTANCE] = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    app[LEASES] = {}
    app[STORE] = store or open_store(cfg)
    app[AGENTS] = AgentClient(cfg.agent_timeout_s)
    app[EVENTS] = EventHub(app[STORE], app[INSTANCE])
    app[PLACER] = placer or most_free_memory
    app[MIGRATIONS] = MigrationManager(cfg, app[STORE], app[AGENTS], app[EVENTS], app[INSTANCE],
                                       metrics=metrics)
    app[OPENAPI_DOC] = build_document(tables, version=__version__)
    add_routes(app, tables)
    app.router.add_get("/metrics", serve_metrics)
    app.cleanup_ctx.append(_core_services)  # first: later contexts see an open store
    for module in modules:
        setup = getattr(module, "setup", None)
        if setup is not None:
            setup(app)
    return app


async def _core_services(app: web.Application) -> AsyncIterator[None]:
    await app[STORE].open()
    for host in await app[STORE].list_hosts():
        logs.register_secret(host.token, pinned=False)  # agents' tokens, stored by an earlier run
    await app[EVENTS].start()  # events published by other coordinators on this database
    await app[AGENTS].start()
    await app[MIGRATIONS].resume_all()
    await settle_unfinished_creates(app)
    try:
        yield
    finally:
        await app[MIGRATIONS].close()
        await app[AGENTS].close()
        await app[EVENTS].close()
        await app[STORE].close()


async def serve_metrics(request: web.Request) -> web.Response:
    """Prometheus exposition; fleet counts are taken from the store now."""
    app = request.app
    metrics, store = app[METRICS], app[STORE]
    metrics.count_states(metrics.hosts, (h.state for h in await store.list_hosts()),
                         (HOST_UP, HOST_DOWN))
    metrics.count_states(metrics.vms, (v.state for v in await store.list_vms()),
                         ("creating", "running", "stopped", "paused", "migrating"))
    for name, lease in app[LEASES].items():
        metrics.leases.labels(name).set(1 if lease.held else 0)
    return metrics_response(metrics.registry)


async def settle_unfinished_creates(app: web.Application) -> None:
    """VMs left 'creating' by a stop mid-request: keep what the agent has, drop the rest."""
    store, agents = app[STORE], app[AGENTS]
    for vm in await store.list_vms():
        if vm.state != "creating":
            continue
        host = await store.get_host(vm.host)
        if host is None:
            await store.delete_vm(vm.name)
            continue
        try:
            status = await agents.call(host.name, host.url, host.token, "GET",
                                       f"/v1/vms/{vm.name}", timeout_s=5)
        except AgentError as exc:
            if exc.status == 404:
                await store.delete_vm(vm.name)
                log.info("dropped a VM whose create never reached its agent",
                         extra={"vm": vm.name, "host": host.name})
            continue  # agent unreachable: decide later (the record keeps its reservation)
        vm.state = reported_state(status, "running")
        vm.updated_at = time.time()
        await store.put_vm(vm)


def write_listen_file(cfg: CoordinatorConfig, url: str) -> None:
    """Tell whoever started us (tests, the demo) where we listen when port was 0."""
    path = cfg.data_dir / "listen.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(path)


async def serve(cfg: CoordinatorConfig) -> None:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    runner, port = await start_site(build_app(cfg), cfg.host, cfg.port)
    url = f"http://{cfg.host}:{port}"
    write_listen_file(cfg, url)
    log.info("coordinator listening", extra={"url": url, "data_dir": str(cfg.data_dir)})
    try:
        await until_signalled()
    finally:
        await runner.cleanup()
        (cfg.data_dir / "listen.json").unlink(missing_ok=True)
