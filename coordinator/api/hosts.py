"""Hosts: agents register and heartbeat (agent token); operators list and remove them.

The agent's side of the contract (``novacron.agent.coordinator_link.CoordinatorLink``
implements it; an agent can run one with its ``GET /v1/host`` document):

- ``POST /api/v1/hosts/register`` with ``Authorization: Bearer <agent_token>``
  and ``{"name", "url" (the agent's API base URL), "token" (the agent's API
  token, so the coordinator can drive it), "cpus", "memory_bytes",
  "memory_available_bytes", optional "accel", "data_port", "version", "vms",
  "load"}`` -> ``{"host": {...}, "heartbeat_interval_s"}``. Re-registering
  replaces the record. Unknown fields are refused (400).
- ``POST /api/v1/hosts/{name}/heartbeat`` with ``{"memory_available_bytes",
  optional "vms", "load"}`` -> ``{"state": "up", "heartbeat_interval_s"}``;
  404 means the coordinator does not know the host: register again.
- A host silent for ``heartbeat_timeout_s`` is marked ``down``; no VM is placed
  on or migrated to it until it heartbeats again.
- Past ``max_pending_heartbeats`` in progress, or while its event loop runs late
  (requests queueing), the coordinator sheds load: 503 with
  ``Retry-After`` (agents wait an interval or two, at random, and try again). A
  coordinator that shed heartbeats marks no host down for ``heartbeat_timeout_s``:
  it cannot tell a silent host from one it turned away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from novacron import logs
from novacron.coordinator.api import schemas
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import CONFIG, INSTANCE, LEASES, METRICS, STORE
from novacron.coordinator.api.openapi import RouteTable, json_body
from novacron.coordinator.lease import Lease
from novacron.coordinator.models import HOST_UP, Host

log = logging.getLogger("novacron.coordinator.hosts")
routes = RouteTable("hosts", "Hypervisor hosts and their agents")

_MAX_COUNT = 2**62
_COUNT = {"type": "integer", "minimum": 0, "maximum": _MAX_COUNT}
_USAGE: dict[str, Any] = {
    "memory_available_bytes": _COUNT,
    "vms": {"type": "array", "maxItems": 10000, "items": schemas.NAME},
    "load": {"type": "number", "minimum": 0, "maximum": 1e6},
}

REGISTER: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "url", "token", "cpus", "memory_bytes", "memory_available_bytes"],
    "properties": {
        "name": schemas.NAME,
        "url": {"type": "string", "pattern": "^https?://[^\\s/]+(/\\S*)?$", "maxLength": 2048},
        "token": {"type": "string", "minLength": 1, "maxLength": 4096},
        "cpus": {"type": "integer", "minimum": 1, "maximum": 65536},
        "memory_bytes": _COUNT,
        "accel": {"type": "object", "maxProperties": 32},
        "data_port": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535},
        "version": {"type": "string", "maxLength": 64},
        **_USAGE,
    },
}

HEARTBEAT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["memory_available_bytes"],
    "properties": dict(_USAGE),
}

REGISTERED: dict[str, Any] = {
    "type": "object", "required": ["host", "heartbeat_interval_s"],
    "properties": {"host": schemas.HOST, "heartbeat_interval_s": {"type": "number"}},
}


@routes.post("/hosts/register", "Register (or re-register) an agent's host", auth="agent",
             request=REGISTER, response=REGISTERED)
async def register(request: web.Request) -> web.Response:
    body = json_body(request)
    if body["memory_available_bytes"] > body["memory_bytes"]:
        raise ApiError(400, "body.memory_available_bytes: larger than memory_bytes")
    logs.register_secret(body["token"], pinned=False)  # it rides in every call to this agent
    store, cfg = request.app[STORE], request.app[CONFIG]
    now = time.time()
    old = await store.get_host(body["name"])
    host = Host(**body, state=HOST_UP, last_heartbeat=now,
                registered_at=old.registered_at if old else now)
    await store.put_host(host)
    log.info("host registered", extra={"host": host.name, "url": host.url, "cpus": host.cpus})
    return web.json_response({"host": host.public(),
                              "heartbeat_interval_s": cfg.heartbeat_interval_s})


_NAME = re.compile(schemas.NAME["pattern"])
_HEARTBEAT_KEYS = frozenset(HEARTBEAT["properties"])


def heartbeat_valid(body: Any) -> bool:
    """HEARTBEAT checked by hand (jsonschema costs more than the rest of a heartbeat);
    True only if the schema accepts the body (a property test holds it to that)."""
    if type(body) is not dict or not body.keys() <= _HEARTBEAT_KEYS:
        return False
    mem = body.get("memory_available_bytes")
    if type(mem) is not int or not 0 <= mem <= _MAX_COUNT:
        return False
    if "load" in body:
        load = body["load"]
        if type(load) not in (int, float) or not 0 <= load <= _USAGE["load"]["maximum"]:
            return False
    if "vms" in body:
        vms = body["vms"]
        if type(vms) is not list or len(vms) > _USAGE["vms"]["maxItems"]:
            return False
        if not all(type(v) is str and _NAME.fullmatch(v) for v in vms):
            return False
    return True


HEARTBEAT_REPLY: dict[str, Any] = {
    "type": "object", "required": ["state", "heartbeat_interval_s"],
    "properties": {"state": {"const": "up"}, "heartbeat_interval_s": {"type": "number"}},
}


# An event loop this late means requests wait in queues far longer than their work:
# heartbeats are shed for LAG_HOLD_S after such a tick, before they time out anyway.
LAG_TICK_S, LAG_SHED_S, LAG_HOLD_S = 0.1, 0.5, 2.0


class Intake:
    """Heartbeats in progress, whether the event loop is overloaded, and when this
    coordinator last turned a heartbeat away."""

    def __init__(self) -> None:
        self.pending = 0
        self.last_shed = -float("inf")  # monotonic
        self.busy_until = -float("inf")  # monotonic; set by the loop-lag watcher

    def overloaded(self) -> bool:
        return time.monotonic() < self.busy_until

    async def watch_lag(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            if time.monotonic() - start - LAG_TICK_S > LAG_SHED_S:
                self.busy_until = time.monotonic() + LAG_HOLD_S


INTAKE = web.AppKey("heartbeat_intake", Intake)


@routes.post("/hosts/{name}/heartbeat", "Report usage; keeps the host up", auth="agent",
             request=HEARTBEAT, response=HEARTBEAT_REPLY, errors=(503,), fast_valid=heartbeat_valid)
async def heartbeat(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    app, intake = request.app, request.app[INTAKE]
    if intake.pending >= app[CONFIG].max_pending_heartbeats or intake.overloaded():
        intake.last_shed = time.monotonic()
        app[METRICS].heartbeats.labels("shed").inc()
        raise ApiError(503, "coordinator busy: heartbeat not taken; retry after the interval",
                       headers={"Retry-After": str(max(1, round(app[CONFIG].heartbeat_interval_s)))})
    intake.pending += 1
    try:
        host = await app[STORE].heartbeat(name, json_body(request), time.time())
    finally:
        intake.pending -= 1
    app[METRICS].heartbeats.labels("ok" if host is not None else "unknown").inc()
    if host is None:
        raise ApiError(404, f"host {name!r} is not registered; register first")
    # Small on purpose: heartbeats are the hot path; GET /hosts/{name} has the full record.
    return web.json_response({"state": host.state,
                              "heartbeat_interval_s": request.app[CONFIG].heartbeat_interval_s})


@routes.get("/hosts", "List hosts", response=schemas.list_of("hosts", schemas.HOST))
async def list_hosts(request: web.Request) -> web.Response:
    hosts = await request.app[STORE].list_hosts()
    return web.json_response({"hosts": [h.public() for h in hosts]})


@routes.get("/hosts/{name}", "One host", response=schemas.HOST)
async def get_host(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    host = await request.app[STORE].get_host(name)
    if host is None:
        raise ApiError(404, f"no host named {name!r}")
    return web.json_response(host.public())


@routes.delete("/hosts/{name}", "Forget a host that runs no VMs",
               response={"type": "object", "required": ["deleted"]}, errors=(409,))
async def delete_host(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    store = request.app[STORE]
    if await store.get_host(name) is None:
        raise ApiError(404, f"no host named {name!r}")
    vms = await store.list_vms(host=name)
    if vms:
        raise ApiError(409, f"host {name!r} still runs {len(vms)} VM(s): "
                       + ", ".join(v.name for v in vms[:5]))
    await store.delete_host(name)
    return web.json_response({"deleted": name})


MONITOR_LEASE = "heartbeat-monitor"


async def _monitor(app: web.Application) -> AsyncIterator[None]:
    """Mark hosts down when their heartbeats stop: one coordinator of the fleet at a
    time, the holder of the ``heartbeat-monitor`` lease."""
    cfg, store, intake = app[CONFIG], app[STORE], app[INTAKE]
    lease = Lease(store, MONITOR_LEASE, app[INSTANCE], cfg.lease_ttl_s)
    app[LEASES][MONITOR_LEASE] = lease

    async def loop() -> None:
        period = max(0.05, cfg.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            fence = lease.fence()
            if fence is None:
                continue  # another coordinator watches the fleet
            if intake.overloaded() or \
                    time.monotonic() - intake.last_shed < cfg.heartbeat_timeout_s:
                continue  # we turned heartbeats away, or kept them waiting: silence proves nothing
            try:
                down = await store.mark_down(time.time() - cfg.heartbeat_timeout_s, fence=fence)
            except Exception:
                log.exception("heartbeat check failed")
                continue
            for name in down:
                log.warning("host missed heartbeats; marked down", extra={"host": name})

    lease.start()
    tasks = [asyncio.create_task(loop(), name="heartbeat-monitor"),
             asyncio.create_task(intake.watch_lag(), name="loop-lag-watch")]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await lease.close()


def setup(app: web.Application) -> None:
    app[INTAKE] = Intake()
    app.cleanup_ctx.append(_monitor)
