"""The VM and migration routes of an agent with ``hypervisor = "libvirt"``.

They replace ``novacron.agent.api.vms`` and ``novacron.agent.api.migrations``
on such an agent (see ``setup_routes``): the same ``/v1/vms`` paths, so the
fleet reads the host's VMs the same way, answered from the libvirt daemon:

    GET  /v1/vms                       -> {"vms": [domain, ...]} (every domain, adopted or not)
    GET  /v1/vms/{name}                -> domain (name, uuid, state, vcpus, memory_mb, disks,
                                          nics, cpu_model, adopted, persistent)
    GET  /v1/vms/{name}/stats          -> CPU time and memory figures
    POST /v1/vms/{name}/console        {"text"} typed on the console (reading it back: the
                                          domain's own serial log, where its XML puts it)
    POST /v1/vms/{name}/{action}       -> domain; action: adopt, start, shutdown (graceful,
                                          409 if the guest ignores it), stop (graceful, then
                                          destroy), destroy, pause, resume

Creating and deleting domains is not offered: define them with libvirt, then
adopt. The fleet's migration API (``novacron.agent.api.migrations``: ``/v1/migrations``,
authorised by the coordinator's grant) runs either engine, by the option
``engine``: "novacron" (ours, ``hypervisors.libvirt_port``; the domain's RAM must be a
shared file) or "libvirt" (libvirt's own, to the ``libvirt_peers`` entry named after
the destination host). So placement, drain, policies and metrics treat a libvirt
host like any other. libvirt's engine with all its options (post-copy, parallel
connections, compression, TLS) is also offered directly, naming a configured peer:

    POST /v1/libvirt/migrations        {"vm", "peer", "options", optional "id"} -> 202
    GET  /v1/libvirt/migrations        -> {"migrations": [status, ...]}
    GET  /v1/libvirt/migrations/{id}   -> status (phase, round, metrics, error)
    POST /v1/libvirt/migrations/{id}/cancel -> status
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from novacron.agent.api.common import json_error, read_json_object
from novacron.agent.api.migrations import install, make_manager, start_manager
from novacron.agent.appkeys import CONFIG
from novacron.agent.hypervisors.libvirt import LibvirtHost, LibvirtUnavailable
from novacron.agent.hypervisors.libvirt_migration import LibvirtMigrations
from novacron.agent.hypervisors.libvirt_port import (
    LibvirtDestFactory,
    LibvirtLocalVMs,
    clean_stale_incoming,
    libvirt_source,
    running_rams,
)
from novacron.agent.migration.dedupdest import PageIndex
from novacron.agent.migration.manager import OtherEngine
from novacron.agent.migration.options import MigrationOptions
from novacron.agent.migration.vmport import SourceVM
from novacron.grants import Grant

log = logging.getLogger("novacron.agent.api")

LIBVIRT = web.AppKey("novacron_libvirt_host", LibvirtHost)
LIBVIRT_MIGRATIONS = web.AppKey("novacron_libvirt_migrations", LibvirtMigrations)
BUSY = web.AppKey("novacron_libvirt_busy", set)
MAX_CONSOLE_INPUT = 1024
ACTIONS = ("adopt", "start", "shutdown", "stop", "destroy", "pause", "resume")


def _shown(request: web.Request, doc: dict[str, Any]) -> dict[str, Any]:
    """A running domain this agent is migrating reads "migrating", as a QEMU VM would."""
    moving = request.app[LIBVIRT_MIGRATIONS].migrating(doc["name"]) or doc["name"] in request.app[BUSY]
    if doc["state"] in ("running", "paused") and moving:
        doc["state"] = "migrating"
    return doc


async def list_vms(request: web.Request) -> web.Response:
    return web.json_response({"vms": [_shown(request, d) for d in await request.app[LIBVIRT].list()]})


async def get_vm(request: web.Request) -> web.Response:
    return web.json_response(_shown(request, await request.app[LIBVIRT].get(request.match_info["name"])))


async def vm_stats(request: web.Request) -> web.Response:
    return web.json_response(await request.app[LIBVIRT].stats(request.match_info["name"]))


async def vm_action(request: web.Request) -> web.Response:
    name, action = request.match_info["name"], request.match_info["action"]
    host = request.app[LIBVIRT]
    if action not in ACTIONS:
        await host.get(name)  # an unknown domain is the more useful 404
        return json_error(404, f"unknown action {action!r} (one of {', '.join(ACTIONS)})")
    return web.json_response(await getattr(host, action)(name))


async def console_write(request: web.Request) -> web.Response:
    """Type ``{"text": ...}`` on the domain's console (a pty serial port)."""
    doc = await read_json_object(request)
    text = doc.get("text")
    if not isinstance(text, str) or not text or len(text) > MAX_CONSOLE_INPUT:
        return json_error(400, f"text: expected a non-empty string of at most {MAX_CONSOLE_INPUT} characters")
    return web.json_response({"sent": await request.app[LIBVIRT].send_console(request.match_info["name"], text)})


async def start_migration(request: web.Request) -> web.Response:
    doc = await read_json_object(request)
    mig = request.app[LIBVIRT_MIGRATIONS].start(doc)
    return web.json_response(mig.status.to_dict(), status=202)


async def list_migrations(request: web.Request) -> web.Response:
    jobs = request.app[LIBVIRT_MIGRATIONS].jobs
    return web.json_response({"migrations": [m.status.to_dict() for m in jobs.values()]})


async def get_migration(request: web.Request) -> web.Response:
    return web.json_response(request.app[LIBVIRT_MIGRATIONS].get(request.match_info["id"]).status.to_dict())


async def cancel_migration(request: web.Request) -> web.Response:
    mig = request.app[LIBVIRT_MIGRATIONS].get(request.match_info["id"])
    return web.json_response((await mig.cancel()).to_dict())


def setup(app: web.Application) -> None:
    cfg = app[CONFIG]
    try:
        host = LibvirtHost(cfg.libvirt_uri, shutdown_timeout_s=cfg.libvirt_shutdown_timeout_s)
        migrations = LibvirtMigrations(host, dict(cfg.libvirt_peers))
    except LibvirtUnavailable as exc:
        raise SystemExit(f"novacron-agent: {exc}") from None
    except ValueError as exc:
        raise SystemExit(f"novacron-agent: config error: {exc}") from None
    app[LIBVIRT] = host
    app[LIBVIRT_MIGRATIONS] = migrations
    # the fleet's migration API (/v1/migrations, coordinator grants), both engines behind it
    busy: set[str] = set()  # domains our engine is moving (either way)
    memory_dir = Path(cfg.libvirt_memory_dir)

    async def get_source(name: str) -> SourceVM:
        return await libvirt_source(host, name, memory_dir, busy)

    async def libvirt_engine(name: str, grant: Grant, mid: str, opts: MigrationOptions) -> OtherEngine:
        return await migrations.for_grant(name, grant.target, mid, opts)

    # destination-side dedup: the RAM files of the domains running on this daemon
    index = PageIndex(cfg.dedup_index_max_mb, lambda: running_rams(memory_dir, busy)) if cfg.dedup else None
    manager = make_manager(cfg, source_vm=get_source,
                           dest_factory=LibvirtDestFactory(host, memory_dir, busy,
                                                           [Path(p) for p in cfg.libvirt_path_dirs]),
                           local_vms=LibvirtLocalVMs(host, busy), engines={"libvirt": libvirt_engine},
                           page_index=index)
    app[BUSY] = busy

    async def lifecycle(_app: web.Application) -> AsyncIterator[None]:
        try:
            await host.connect()
        except LibvirtUnavailable as exc:
            raise SystemExit(f"novacron-agent: {exc}") from None
        await clean_stale_incoming(host)  # a killed agent's half-received domains
        await start_manager(cfg, manager)  # its recovery asks the daemon
        yield
        await manager.close()
        await migrations.close()
        await host.close()

    app.cleanup_ctx.append(lifecycle)
    install(app, cfg, manager, run=False)
    app.router.add_get("/v1/vms", list_vms)
    app.router.add_get("/v1/vms/{name}", get_vm)
    app.router.add_get("/v1/vms/{name}/stats", vm_stats)
    app.router.add_post("/v1/vms/{name}/console", console_write)
    app.router.add_post("/v1/vms/{name}/{action}", vm_action)
    app.router.add_post("/v1/libvirt/migrations", start_migration)
    app.router.add_get("/v1/libvirt/migrations", list_migrations)
    app.router.add_get("/v1/libvirt/migrations/{id}", get_migration)
    app.router.add_post("/v1/libvirt/migrations/{id}/cancel", cancel_migration)
