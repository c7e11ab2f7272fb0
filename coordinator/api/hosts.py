"""Hosts: agents register and heartbeat; operators list, remove and retire them.

The agent's side of the contract (``novacron.agent.coordinator_link.CoordinatorLink``
implements it; an agent can run one with its ``GET /v1/host`` document):

- ``POST /api/v1/hosts/register`` with ``Authorization: Bearer <agent_token>`` (the
  shared bootstrap token) and ``{"name", "url" (the agent's API base URL), "token"
  (the agent's own API token, >= 16 characters, so the coordinator can drive it),
  "cpus", "memory_bytes", "memory_available_bytes", optional "accel", "data_port", "networks",
  "version", "vms", "load"}`` -> ``{"host": {...}, "heartbeat_interval_s",
  "grant_key"}``. Unknown fields are refused (400). ``grant_key`` verifies the
  migration grants this coordinator signs (``novacron.grants``).
- One identity per host (``novacron.coordinator.identity``): the caller's TLS
  client certificate (required when the coordinator serves TLS), else its own
  token. The first registration binds the name to that identity; another
  identity registering or heartbeating the name gets 403 (logged with its
  address) and changes nothing. Re-registering with the bound identity replaces
  the record.
- ``POST /api/v1/hosts/{name}/heartbeat`` with the host's own credential (its
  certificate, or ``Authorization: Bearer <its own token>``) and
  ``{"memory_available_bytes", optional "vms", "load"}`` -> ``{"state": "up",
  "heartbeat_interval_s"}``; 404 means the coordinator does not know the host:
  register again.
- A host silent for ``heartbeat_timeout_s`` is marked ``down``; no VM is placed
  on or migrated to it until it heartbeats again.
- Host documents carry ``maintenance`` (no new VMs, ``PUT /hosts/{name}/maintenance``),
  ``drain`` (the id of the drain emptying it, ``POST /hosts/{name}/drain`` in
  ``novacron.coordinator.api.drains``) and ``lifecycle``: ``active``, ``draining``
  while a drain runs, ``maintenance`` after; ``state`` stays the agent's up/down.
- ``DELETE /api/v1/hosts/{name}`` (admin) forgets the record but keeps the name's
  binding; ``?retire=true`` also releases the binding, so another identity (a
  reinstalled host) may register the name.
- Past ``max_pending_heartbeats`` in progress, or while its event loop keeps running
  late (requests queueing; one late check, such as a garbage collection's pause, is
  not overload), the coordinator sheds load: 503 with
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
from urllib.parse import urlsplit

from aiohttp import web

from novacron import audit, httpjson, logs, tls
from novacron.coordinator.api import schemas
from novacron.coordinator.api.auth import bearer
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import (
    CONFIG,
    GRANTS,
    IDENTITIES,
    INSTANCE,
    LEASES,
    METRICS,
    STORE,
)
from novacron.coordinator.api.openapi import RouteTable, json_body, query_params
from novacron.coordinator.drains import draining, draining_hosts
from novacron.coordinator.identity import MIN_TOKEN_CHARS, describe, request_identity
from novacron.coordinator.lease import Lease
from novacron.coordinator.models import HOST_UP, Host
from novacron.coordinator.scheduler.placer import ATTRS, in_maintenance, load_attrs, set_maintenance
from novacron.coordinator.store import Store

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
        "token": {"type": "string", "minLength": MIN_TOKEN_CHARS, "maxLength": 4096},
        "cpus": {"type": "integer", "minimum": 1, "maximum": 65536},
        "memory_bytes": _COUNT,
        "accel": {"type": "object", "maxProperties": 32},
        "data_port": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535},
        "networks": {"type": "array", "maxItems": 256, "uniqueItems": True, "items": schemas.NAME},
        "cpu_models": {"type": ["array", "null"], "maxItems": 1024, "uniqueItems": True,
                       "items": schemas.CPU_MODEL},
        "cpu_signature": {"type": "string", "maxLength": 256},
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
    "properties": {"host": schemas.HOST, "heartbeat_interval_s": {"type": "number"},
                   "grant_key": {"type": "string"}},
}


def _identity(request: web.Request, host_token: str | None) -> str:
    """The calling host's identity; with TLS on, only a fleet-CA certificate counts."""
    if tls.enabled(request.app[CONFIG]) and tls.peer_common_name(request.transport) is None:
        raise ApiError(401, "this coordinator identifies hosts by their TLS client certificate; "
                            "none was presented")
    identity = request_identity(request, host_token)
    if identity is None:
        raise ApiError(401, f"missing host credential (a token of at least {MIN_TOKEN_CHARS} "
                            "characters, or a client certificate)")
    return identity


def _refuse(request: web.Request, name: str, identity: str, action: str) -> ApiError:
    log.warning("host name bound to another identity; refused",
                extra={"host": name, "action": action, "remote": request.remote,
                       "identity": describe(identity)})
    return ApiError(403, f"host name {name!r} is bound to another identity; an admin must "
                         f"retire it first (DELETE /api/v1/hosts/{name}?retire=true)")


@routes.post("/hosts/register", "Register (or re-register) an agent's host", auth="agent",
             request=REGISTER, response=REGISTERED, errors=(403,))
async def register(request: web.Request) -> web.Response:
    body = json_body(request)
    if body["memory_available_bytes"] > body["memory_bytes"]:
        raise ApiError(400, "body.memory_available_bytes: larger than memory_bytes")
    store, cfg = request.app[STORE], request.app[CONFIG]
    url = urlsplit(body["url"])
    if tls.enabled(cfg) and url.scheme != "https" and not tls.is_loopback(url.hostname or ""):
        raise ApiError(400, "body.url: this coordinator drives agents over https only")
    identity = _identity(request, body["token"])
    cn = identity.removeprefix("cert:") if identity.startswith("cert:") else None
    if cn is not None and cn != body["name"]:  # a host certificate is issued for its name
        log.warning("registration under another host's name; refused",
                    extra={"host": body["name"], "remote": request.remote, "identity": identity})
        raise ApiError(403, f"the client certificate is host {cn!r}'s; it cannot register "
                            f"{body['name']!r}")
    now = time.time()
    if not await request.app[IDENTITIES].claim(body["name"], identity, now):
        raise _refuse(request, body["name"], identity, "register")
    logs.register_secret(body["token"], pinned=False)  # it rides in every call to this agent
    old = await store.get_host(body["name"])
    host = Host(**body, state=HOST_UP, last_heartbeat=now,
                registered_at=old.registered_at if old else now)
    await store.put_host(host)
    store.heartbeats.registered(host.name)  # an earlier "not registered" is stale now
    log.info("host registered", extra={"host": host.name, "url": host.url, "cpus": host.cpus,
                                       "identity": describe(identity)})
    return web.json_response({"host": host.public(),
                              "heartbeat_interval_s": cfg.heartbeat_interval_s,
                              "grant_key": request.app[GRANTS].public_key})


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


# An event loop this late on LAG_SHED_TICKS checks in a row means requests wait in queues
# far longer than their work: only a share of the heartbeats is taken, halved on each
# further late check and given back ADMIT_STEP per on-time one (so a coordinator past its
# capacity keeps taking about what it can, rather than none for a while and then all).
# A single late check (a pause, not overload) only holds the down-detection.
LAG_TICK_S, LAG_SHED_S, LAG_HOLD_S, LAG_SHED_TICKS = 0.1, 0.5, 2.0, 2
ADMIT_FLOOR, ADMIT_STEP = 0.05, 0.05


class Intake:
    """Whether the event loop is overloaded, and when this coordinator last turned a
    heartbeat away (the heartbeats waiting for the database are the store's backlog)."""

    def __init__(self) -> None:
        self.last_shed = -float("inf")  # monotonic
        self.admit = 1.0  # share of heartbeats taken; set by the loop-lag watcher
        self._credit = 0.0  # spreads the share evenly over arrivals
        self.late_until = -float("inf")  # monotonic; the loop ran late recently
        self.late_ticks = 0  # late checks in a row
        self.lag_s = 0.0  # how late the event loop last ran past LAG_SHED_S
        self.turned_away = asyncio.Event()  # set on each shed or late check: for _mark_busy

    def overloaded(self) -> bool:
        """Shed this heartbeat: the event loop has kept running late and it is not one
        of the ``admit`` share still taken."""
        if self.admit >= 1.0:
            return False
        self._credit += self.admit
        if self._credit >= 1.0:
            self._credit -= 1.0
            return False
        return True

    def late(self) -> bool:
        """The event loop ran late within LAG_HOLD_S: heartbeats may be waiting in queues."""
        return time.monotonic() < self.late_until

    def shed(self, reason: str) -> None:
        """Count a heartbeat turned away; say why in the log, at most once per LAG_HOLD_S."""
        now = time.monotonic()
        if now - self.last_shed > LAG_HOLD_S:
            log.warning("shedding heartbeats (503 + Retry-After): " + reason)
        self.last_shed = now
        self.turned_away.set()

    async def watch_lag(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(LAG_TICK_S)
            late = time.monotonic() - start - LAG_TICK_S
            if late <= LAG_SHED_S:
                self.late_ticks = 0
                self.admit = min(1.0, self.admit + ADMIT_STEP)
                continue
            self.late_ticks += 1
            self.late_until, self.lag_s = time.monotonic() + LAG_HOLD_S, late
            self.turned_away.set()
            if self.late_ticks >= LAG_SHED_TICKS:
                self.admit = max(ADMIT_FLOOR, self.admit / 2)


INTAKE = web.AppKey("heartbeat_intake", Intake)


@routes.post("/hosts/{name}/heartbeat", "Report usage; keeps the host up", auth="host",
             request=HEARTBEAT, response=HEARTBEAT_REPLY, errors=(403, 503),
             fast_valid=heartbeat_valid)
async def heartbeat(request: web.Request) -> web.Response:
    audit.skip(request)  # telemetry every few seconds per host; registration is what gets audited
    name = request.match_info["name"]
    app, intake, store = request.app, request.app[INTAKE], request.app[STORE]
    backlog = store.heartbeats.backlog
    retry = {"Retry-After": str(max(1, round(app[CONFIG].heartbeat_interval_s)))}  # with any 503
    if backlog >= app[CONFIG].max_pending_heartbeats or intake.overloaded():
        intake.shed(f"event loop ran {intake.lag_s * 1e3:.0f} ms late" if intake.overloaded() else
                    f"{backlog} heartbeats waiting for the database (max_pending_heartbeats)")
        app[METRICS].heartbeats.labels("shed").inc()
        raise ApiError(503, "coordinator busy: heartbeat not taken; retry after the interval",
                       headers=retry)
    identity = _identity(request, bearer(request))
    bound = await app[IDENTITIES].matches(name, identity)
    if bound is False:
        raise _refuse(request, name, identity, "heartbeat")
    if bound is None:  # a record from before bindings, or a retired name: register (and bind)
        app[METRICS].heartbeats.labels("unknown").inc()
        raise ApiError(404, f"host {name!r} is not registered; register first")
    # Answered without waiting for the database (see HeartbeatBatcher): what it made of
    # this host's previous heartbeat is answered now.
    news = store.heartbeats.post(name, json_body(request), time.time())
    if news == "unknown":  # its record was forgotten (DELETE /hosts/{name}), binding kept
        app[METRICS].heartbeats.labels("unknown").inc()
        raise ApiError(404, f"host {name!r} is not registered; register first")
    if news == "failing":
        # agents back off on this 503 as on a shed one: no host is marked down meanwhile
        intake.shed("the database failed the last heartbeat batch")
        app[METRICS].heartbeats.labels("failed").inc()
        raise ApiError(503, "coordinator cannot record heartbeats: its database failed "
                       "the last write; retry after the interval", headers=retry)
    app[METRICS].heartbeats.labels("ok").inc()
    # Small on purpose: heartbeats are the hot path; GET /hosts/{name} has the full record.
    return web.json_response({"state": HOST_UP,
                              "heartbeat_interval_s": request.app[CONFIG].heartbeat_interval_s})


@routes.get("/hosts", "List hosts", response=schemas.list_of("hosts", schemas.HOST))
async def list_hosts(request: web.Request) -> web.Response:
    store = request.app[STORE]
    hosts = await store.list_hosts()
    attrs = await load_attrs(store)
    drains = await draining_hosts(store)
    # strict dumps: a load of NaN stored by an older version must not make the list invalid JSON
    return web.json_response({"hosts": [_public(h, attrs.get(h.name), drains.get(h.name))
                                        for h in hosts]}, dumps=httpjson.dumps)


def _public(host: Host, attrs: dict[str, Any] | None, drain: str | None) -> dict[str, Any]:
    maintenance = in_maintenance(attrs)
    return {**host.public(), "maintenance": maintenance, "drain": drain,
            "lifecycle": "draining" if drain else "maintenance" if maintenance else "active"}


async def _public_of(store: Store, host: Host) -> dict[str, Any]:
    return _public(host, await store.get_doc(ATTRS, host.name), await draining(store, host.name))


@routes.get("/hosts/{name}", "One host", response=schemas.HOST)
async def get_host(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    store = request.app[STORE]
    host = await store.get_host(name)
    if host is None:
        raise ApiError(404, f"no host named {name!r}")
    return web.json_response(await _public_of(store, host), dumps=httpjson.dumps)


MAINTENANCE: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["maintenance"],
    "properties": {"maintenance": {"type": "boolean",
                                   "description": "true: take no new VMs (placement or migration)"}},
}


@routes.put("/hosts/{name}/maintenance", "Enter or leave maintenance: a host in maintenance gets "
            "no new VMs and no migrations unless forced; its VMs keep running",
            request=MAINTENANCE, response=schemas.HOST, errors=(404,))
async def put_maintenance(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    store = request.app[STORE]
    host = await store.get_host(name)
    if host is None:
        raise ApiError(404, f"no host named {name!r}")
    on = bool(json_body(request)["maintenance"])
    drain = await draining(store, name)
    if not on and drain is not None:
        raise ApiError(409, f"host {name!r} is being drained ({drain}): maintenance ends "
                       "after the drain (see 'novacron drain show " + drain + "')")
    await set_maintenance(store, name, on)
    log.info("host maintenance " + ("on" if on else "off"), extra={"host": name})
    return web.json_response(await _public_of(store, host), dumps=httpjson.dumps)


@routes.delete("/hosts/{name}", "Forget a host that runs no VMs (retire=true: release its name)",
               query={"retire": {"type": "string", "enum": ["true", "false"]}},
               response={"type": "object", "required": ["deleted"]}, errors=(409,))
async def delete_host(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    store = request.app[STORE]
    retire = query_params(request).get("retire") == "true"
    known = await store.get_host(name) is not None
    if not known and not (retire and await request.app[IDENTITIES].bound(name, fresh=True)):
        raise ApiError(404, f"no host named {name!r}")
    vms = await store.list_vms(host=name)
    if vms:
        raise ApiError(409, f"host {name!r} still runs {len(vms)} VM(s): "
                       + ", ".join(v.name for v in vms[:5]))
    await store.delete_host(name)
    if retire:
        await request.app[IDENTITIES].release(name)
        log.info("host retired: its name may be registered by a new identity", extra={"host": name})
    return web.json_response({"deleted": name, "retired": retire})


MONITOR_LEASE = "heartbeat-monitor"
# Each coordinator that turned heartbeats away (shed them, or kept them waiting in a late
# event loop) says so here, keyed by its instance, at most once per BUSY_MARK_S: the
# monitor runs on one coordinator, and silence from hosts that another coordinator
# turned away proves nothing either.
BUSY = "heartbeat-intake"
BUSY_MARK_S = 1.0
BUSY_FORGET_S = 3600.0  # a mark this old is a coordinator long gone: removed


def busy_hold_s(cfg: Any) -> float:
    """How long after heartbeats were turned away no host is marked down: the down-timeout,
    and at least the two and a half intervals a shed agent may back off before it tries again."""
    return max(cfg.heartbeat_timeout_s, 2.5 * cfg.heartbeat_interval_s)


async def _mark_busy(store: Store, instance: str, intake: Intake) -> None:
    while True:  # the first time at once, then at most once per BUSY_MARK_S
        await intake.turned_away.wait()
        intake.turned_away.clear()
        try:
            await store.put_doc(BUSY, instance, {"busy_at": time.time()})
        except Exception:
            log.exception("could not record that heartbeats were turned away")
        await asyncio.sleep(BUSY_MARK_S)


async def _fleet_busy_within(store: Store, hold_s: float) -> bool:
    """Some coordinator turned heartbeats away within ``hold_s`` (and forget old marks)."""
    now, busy = time.time(), False
    for key, doc in await store.list_docs(BUSY):
        at = doc.get("busy_at", 0.0)
        if now - at < hold_s:
            busy = True
        elif now - at > BUSY_FORGET_S:
            await store.delete_doc(BUSY, key)
    return busy


async def _monitor(app: web.Application) -> AsyncIterator[None]:
    """Mark hosts down when their heartbeats stop: one coordinator of the fleet at a
    time, the holder of the ``heartbeat-monitor`` lease."""
    cfg, store, intake = app[CONFIG], app[STORE], app[INTAKE]
    lease = Lease(store, MONITOR_LEASE, app[INSTANCE], cfg.lease_ttl_s)
    app[LEASES][MONITOR_LEASE] = lease
    hold_s = busy_hold_s(cfg)

    async def loop() -> None:
        period = max(0.05, cfg.heartbeat_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            fence = lease.fence()
            if fence is None:
                continue  # another coordinator watches the fleet
            if intake.late() or time.monotonic() - intake.last_shed < hold_s:
                continue  # we turned heartbeats away, or kept them waiting: silence proves nothing
            try:
                await store.heartbeats.settled()  # heartbeats answered here are written first
                if store.heartbeats.error is not None:
                    continue  # they were not: silence proves nothing
                # marks come at most every BUSY_MARK_S: sheds since the latest may be unrecorded
                if await _fleet_busy_within(store, hold_s + BUSY_MARK_S):
                    continue  # so did another coordinator
                down = await store.mark_down(time.time() - cfg.heartbeat_timeout_s, fence=fence)
            except Exception:
                log.exception("heartbeat check failed")
                continue
            for name in down:
                log.warning("host missed heartbeats; marked down", extra={"host": name})

    lease.start()
    tasks = [asyncio.create_task(loop(), name="heartbeat-monitor"),
             asyncio.create_task(intake.watch_lag(), name="loop-lag-watch"),
             asyncio.create_task(_mark_busy(store, app[INSTANCE], intake), name="heartbeat-busy-mark")]
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
