"""Migration routes of the agent API and the hooks that run the migration
manager (and its data-channel server on ``data_port``) with the daemon.

    POST /v1/migrations               {"vm", "grant", "options": {...},
                                       optional "id" (the caller's name for it)} -> 202
                                      (the coordinator's grant names the destination; see
                                      novacron.grants; no destination credential is accepted)
    GET  /v1/migrations               -> {"migrations": [status, ...]}
    GET  /v1/migrations/{id}          -> status (phase, round, metrics, error)
    POST /v1/migrations/{id}/cancel   -> status
    PATCH /v1/migrations/{id}         {"bandwidth_mbps"?, "downtime_ms"?} -> status
                                      (a running outgoing migration's limits, live)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from novacron import httpjson, tls
from novacron.agent.api.common import BODY, GRANT_READ, json_error
from novacron.agent.api.host import host_name
from novacron.agent.appkeys import CONFIG, METRICS, VMS
from novacron.agent.config import AgentConfig
from novacron.agent.migration.dedupdest import PageIndex
from novacron.agent.migration.journal import Journal
from novacron.agent.migration.manager import EngineStarter, MigrationManager, MigrationRequestError
from novacron.agent.migration.offline import OfflineSource
from novacron.agent.migration.qemu_port import (
    QemuDestFactory,
    QemuLocalVMs,
    clean_stale_incoming,
    clean_stale_relay_sockets,
    offline_source,
    source_vm,
)
from novacron.agent.migration.throttle import lift_stale
from novacron.agent.migration.vmport import DestFactory, LocalVMs, SourceVM
from novacron.agent.vm.errors import VMError
from novacron.agent.vm.manager import VMManager
from novacron.grants import GrantError, GrantVerifier

log = logging.getLogger("novacron.agent.migration")

MANAGER_KEY = web.AppKey("novacron_migrations", MigrationManager)
MAX_BODY = 64 * 1024



GRANT_KEY_FILE = "coordinator-grant-key"  # the last coordinator's key, so a restart verifies at once


def saved_grant_key(state_dir: Path) -> str:
    """The grant key the coordinator gave at the last registration ('' if none): a
    restarted agent verifies grants before it has registered again."""
    try:
        key = (state_dir / GRANT_KEY_FILE).read_text().strip()
        GrantVerifier(key)  # a damaged file is no key, not a failed start
    except (OSError, UnicodeDecodeError, GrantError):
        return ""
    return key


def save_grant_key(state_dir: Path, key: str) -> None:
    tmp = state_dir / (GRANT_KEY_FILE + ".tmp")
    tmp.write_text(key + "\n")
    os.replace(tmp, state_dir / GRANT_KEY_FILE)


def setup(app: web.Application) -> None:
    """Attach the migration manager (config and VMs from the app) and its routes."""
    attach(app, app[CONFIG], app[VMS])


def attach(app: web.Application, cfg: AgentConfig, vms: VMManager) -> MigrationManager:

    async def get_source(name: str) -> SourceVM:
        return await source_vm(vms, name)

    async def get_offline_source(name: str) -> OfflineSource:
        return await offline_source(vms, name)

    manager = make_manager(
        cfg, source_vm=get_source, dest_factory=QemuDestFactory(vms), local_vms=QemuLocalVMs(vms),
        offline_source=get_offline_source,
        # destination-side dedup: the RAM of the VMs running here, indexed once each
        page_index=PageIndex(cfg.dedup_index_max_mb, lambda: [vm.ram_path for vm in vms.list() if vm.alive])
        if cfg.dedup else None)
    if cfg.coordinator_url:
        manager.key_current.clear()  # until the coordinator answers our registration (daemon.py)
    vms.resume_fence = manager  # resume waits for every migration of the VM to settle

    async def before_start() -> None:
        await clean_stale_incoming(cfg.state_dir)
        clean_stale_relay_sockets(cfg.state_dir)
        for vm in vms.list():  # a killed agent's auto-converge quota must not outlive it
            if vm.pid is not None:
                try:
                    lift_stale(vm.pid)
                except OSError as exc:
                    log.error("could not lift a stale CPU quota", extra={"vm": vm.name, "error": str(exc)})

    install(app, cfg, manager, before_start)
    return manager


def make_manager(cfg: AgentConfig, *, source_vm: Callable[[str], Awaitable[SourceVM]], dest_factory: DestFactory,
                 local_vms: LocalVMs, engines: dict[str, EngineStarter] | None = None,
                 page_index: PageIndex | None = None,
                 offline_source: Callable[[str], Awaitable[OfflineSource]] | None = None) -> MigrationManager:
    """The migration manager of this agent (grants, TLS, journal from the config) over a
    VM runtime's ports (``qemu_port`` or ``hypervisors.libvirt_port``)."""
    return MigrationManager(
        cluster_secret=cfg.cluster_secret,
        source_vm=source_vm,
        dest_factory=dest_factory,
        data_host=cfg.host,
        data_port=cfg.data_port,
        host_name=host_name(cfg.name),
        grants=GrantVerifier(saved_grant_key(cfg.state_dir) or cfg.grant_key),
        peer_ssl=tls.peer_client_context(cfg),
        data_ssl=tls.server_context(cfg, require_client_cert=True) if tls.enabled(cfg) else None,
        journal=Journal(cfg.state_dir / "migrations"),
        local_vms=local_vms,
        engines=engines,
        page_index=page_index,
        offline_source=offline_source,
    )


def install(app: web.Application, cfg: AgentConfig, manager: MigrationManager,
            before_start: Callable[[], Awaitable[None]] | None = None, *, run: bool = True) -> None:
    """Serve ``manager``'s routes and, with ``run``, run it with the app (its data port
    at startup); without, the caller starts it (``start_manager``) and closes it."""
    app[MANAGER_KEY] = manager
    app[GRANT_READ] = manager.may_read
    metrics = app.get(METRICS)
    if metrics is not None:
        manager.on_finish = metrics.finished
        metrics.watch(manager.list)

    add_routes(app)
    if not run:
        return

    async def on_startup(_app: web.Application) -> None:
        if before_start is not None:
            await before_start()
        await start_manager(cfg, manager)

    async def on_cleanup(_app: web.Application) -> None:
        await manager.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)


async def start_manager(cfg: AgentConfig, manager: MigrationManager) -> None:
    port = await manager.start()
    if cfg.data_port == 0:
        cfg.data_port = port  # so /v1/host reports the port actually bound


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/migrations", create)
    app.router.add_get("/v1/migrations", list_all)
    app.router.add_get("/v1/migrations/{id}", get_one)
    app.router.add_post("/v1/migrations/{id}/cancel", cancel)
    app.router.add_patch("/v1/migrations/{id}", change)


async def _body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise MigrationRequestError(f"request body larger than {MAX_BODY} bytes", 413)
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise MigrationRequestError(f"request body larger than {MAX_BODY} bytes", 413)
    try:
        doc = httpjson.loads(raw or b"null")
    except ValueError as exc:
        raise MigrationRequestError(f"request body is not valid JSON: {exc}") from None
    request[BODY] = doc  # the audit log names its "vm"
    return doc


async def create(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    try:
        status = await manager.start_migration(await _body(request))
    except MigrationRequestError as exc:
        return json_error(exc.status, str(exc))
    except VMError as exc:
        return json_error(exc.status, str(exc))
    return web.json_response(status.to_dict(), status=202)


async def list_all(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    return web.json_response({"migrations": [s.to_dict() for s in manager.list()]})


async def get_one(request: web.Request) -> web.Response:
    status = request.app[MANAGER_KEY].get(request.match_info["id"])
    if status is None:
        return json_error(404, f"no migration {request.match_info['id']!r}")
    return web.json_response(status.to_dict())


async def cancel(request: web.Request) -> web.Response:
    try:
        status = request.app[MANAGER_KEY].cancel(request.match_info["id"])
    except MigrationRequestError as exc:
        return json_error(exc.status, str(exc))
    return web.json_response(status.to_dict())


async def change(request: web.Request) -> web.Response:
    manager = request.app[MANAGER_KEY]
    try:
        status = manager.change(request.match_info["id"], await _body(request))
    except MigrationRequestError as exc:
        return json_error(exc.status, str(exc))
    return web.json_response(status.to_dict())
