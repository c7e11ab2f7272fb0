"""The agent's HTTP API, one route module per area.

Each module in ROUTE_MODULES exposes ``setup(app: web.Application) -> None``
that adds its routes; shared objects are on the app under the keys in
``novacron.agent.appkeys`` (CONFIG, VMS, ACCEL). Authentication and JSON
error replies are handled by the daemon's middlewares for every module.

``novacron.agent.api.migrations`` (the migration engine's routes) is listed
already; until that file exists it is skipped.
"""

from __future__ import annotations

import importlib
import logging

from aiohttp import web

log = logging.getLogger("novacron.agent.api")

ROUTE_MODULES = [
    "novacron.agent.api.host",
    "novacron.agent.api.vms",
    "novacron.agent.api.images",
    "novacron.agent.api.migrations",
    "novacron.agent.api.audit",
]
OPTIONAL_MODULES = {"novacron.agent.api.migrations"}
# hypervisor = "libvirt": the libvirt daemon's domains answer /v1/vms, and migrations
# are libvirt's own (the native engine's routes would act on QEMUs the agent runs)
LIBVIRT_MODULE = "novacron.agent.api.libvirt"
REPLACED_BY_LIBVIRT = {"novacron.agent.api.vms", "novacron.agent.api.migrations"}


def route_modules(app: web.Application) -> list[str]:
    from novacron.agent.appkeys import CONFIG

    if CONFIG not in app or app[CONFIG].hypervisor != "libvirt":
        return list(ROUTE_MODULES)
    return [LIBVIRT_MODULE if m == "novacron.agent.api.vms" else m
            for m in ROUTE_MODULES if m == "novacron.agent.api.vms" or m not in REPLACED_BY_LIBVIRT]


def setup_routes(app: web.Application) -> list[str]:
    """Register every route module's routes; returns the modules used."""
    used = []
    for name in route_modules(app):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if name in OPTIONAL_MODULES and exc.name == name:
                log.info("route module not present", extra={"module": name})
                continue
            raise
        module.setup(app)
        used.append(name)
    return used
