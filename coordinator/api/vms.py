"""VMs: placed on a host, then created and started through that host's agent."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from novacron.coordinator.agent_client import AgentError, reported_state
from novacron.coordinator.api import schemas
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import AGENTS, METRICS, PLACER, RECONCILER, STORE
from novacron.coordinator.api.openapi import RouteTable, json_body, query_params
from novacron.coordinator.models import HOST_UP, VM, Host

log = logging.getLogger("novacron.coordinator.vms")
routes = RouteTable("vms", "Virtual machines")

# Placement decisions of one coordinator in a row (see create_vm); how often to place
# again when another coordinator claimed the chosen host first.
PLACEMENT_ATTEMPTS = 20
# Serialises placement decisions (see create_vm).
PLACEMENT_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("placement_lock", asyncio.Lock)

_PATH = {"type": "string", "minLength": 1, "maxLength": 4096}
# Placement preferences go to the scheduler, never to the agent.
PLACEMENT: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "description": "placement preferences (see coordinator/scheduler/README.md)",
    "properties": schemas.PLACEMENT_PREFERENCES,
    "dependentRequired": {"max_latency_ms": ["region"]},
}
CREATE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "vcpus", "memory_mb"],
    "properties": {
        "name": schemas.NAME,
        "vcpus": {"type": "integer", "minimum": 1, "maximum": 64},
        "memory_mb": {"type": "integer", "minimum": 16, "maximum": 1024 * 1024},
        "kernel": _PATH,
        "initrd": _PATH,
        "cmdline": {"type": "string", "maxLength": 4096},
        "disk": _PATH,
        "disk_format": {"enum": ["raw", "qcow2"]},
        "accel": {"enum": ["kvm", "tcg", "auto"]},
        # the agent checks NICs fully (novacron.agent.vm.spec); here: the shape, so a bad one is a 400
        "nics": {"type": "array", "maxItems": 8, "items": {
            "type": "object", "additionalProperties": False, "required": ["net"],
            "properties": {"net": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,30}$"},
                           "model": {"enum": ["virtio-net-pci", "e1000", "rtl8139"]},
                           "mac": {"type": "string", "pattern": "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"}}}},
        # data disks: the shape here, the agent checks the rest (novacron.agent.vm.spec)
        "disks": {"type": "array", "maxItems": 8, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"format": {"enum": ["raw", "qcow2"]},
                           "bus": {"enum": ["virtio-blk", "virtio-scsi"]},
                           "storage": {"enum": ["local", "shared"]},
                           "size_gb": {"type": "number", "exclusiveMinimum": 0, "maximum": 64 * 1024},
                           "image": _PATH, "backing": _PATH}}},
        "start": {"type": "boolean", "description": "start it (default true)"},
        "host": {**schemas.NAME, "description": "pin to this host instead of placing"},
        "placement": PLACEMENT,
    },
    "oneOf": [
        {"required": ["kernel"], "not": {"anyOf": [
            {"required": ["disk"]}, {"required": ["disk_format"]}]}},
        {"required": ["disk"], "not": {"anyOf": [
            {"required": ["kernel"]}, {"required": ["initrd"]}, {"required": ["cmdline"]}]}},
    ],
}


async def _vm_and_host(request: web.Request) -> tuple[VM, Host]:
    name = request.match_info["name"]
    store = request.app[STORE]
    vm = await store.get_vm(name)
    if vm is None:
        raise ApiError(404, f"no VM named {name!r}")
    host = await store.get_host(vm.host)
    if host is None:
        raise ApiError(409, f"VM {name!r} is on host {vm.host!r}, which is no longer registered")
    return vm, host


def _agent_failure(exc: AgentError, doing: str) -> ApiError:
    # The agent's own 4xx (e.g. a kernel path it cannot read) is the client's problem: 409;
    # an unreachable or failing agent is a gateway failure: 502.
    status = 409 if 400 <= exc.status < 500 else 502
    return ApiError(status, f"{doing}: {exc}")


async def _place(request: web.Request, body: dict[str, Any], pinned: str | None,
                 placement: dict[str, Any]) -> tuple[Host, VM]:
    """Choose a host on fresh records; the VM record to claim on it."""
    store = request.app[STORE]
    if await store.get_vm(body["name"]) is not None:
        raise ApiError(409, f"a VM named {body['name']!r} already exists")
    hosts = await store.list_hosts()  # before the VMs: a claim in between moves a generation
    if pinned is not None:
        hosts = [h for h in hosts if h.name == pinned]
        if not hosts:
            raise ApiError(404, f"no host named {pinned!r}")
        if hosts[0].state != HOST_UP:
            raise ApiError(409, f"host {pinned!r} is down")
    placer = request.app[PLACER]
    host = await placer({**body, **placement}, hosts, await store.list_vms())
    if host is None:
        # the scheduler explains its refusals; the simple placer only fits by size
        last = getattr(placer, "last", None)
        why = last.explanation.get("why") if last is not None else None
        raise ApiError(409, why or f"no up host has {body['vcpus']} vCPUs and "
                       f"{body['memory_mb']} MiB free for this VM")
    now = time.time()
    return host, VM(name=body["name"], host=host.name, spec=body, state="creating",
                    created_at=now, updated_at=now)


@routes.post("/vms", "Create a VM: place it, then start it on the chosen host's agent",
             request=CREATE, response=schemas.VM, status=201, errors=(404, 409, 502, 503))
async def create_vm(request: web.Request) -> web.Response:
    body: dict[str, Any] = dict(json_body(request))
    store, agents = request.app[STORE], request.app[AGENTS]
    pinned = body.pop("host", None)
    placement = body.pop("placement", {})
    clash = set(placement.get("affinity", ())) & set(placement.get("anti_affinity", ()))
    if clash:
        raise ApiError(400, "placement: VM(s) in both affinity and anti_affinity: "
                       + ", ".join(sorted(clash)))
    # Name check, placement and reservation happen under one lock, so two concurrent
    # requests to this coordinator can neither take the same name nor the same free
    # memory. Other coordinators sharing the database are kept honest by the claim:
    # it stores the VM only if nothing was placed on the chosen host since we read it.
    timing = request.app[METRICS].placement
    async with request.app[PLACEMENT_LOCK]:
        reconciler = request.app[RECONCILER]
        reconciler.creating.add(body["name"])  # not settled by the reconciler while we ask
        try:
            for _attempt in range(PLACEMENT_ATTEMPTS):
                started = time.perf_counter()
                try:
                    host, vm = await _place(request, body, pinned, placement)
                except ApiError:
                    timing.labels("refused").observe(time.perf_counter() - started)
                    raise
                # reserves the name and the capacity while the agent works
                claim = await store.claim_vm(vm, host.generation)
                timing.labels("placed" if claim == "claimed" else "raced" if claim == "stale"
                              else "refused").observe(time.perf_counter() - started)
                if claim == "claimed":
                    break
                if claim == "taken":
                    raise ApiError(409, f"a VM named {body['name']!r} already exists")
                log.info("placement raced another coordinator; placing again",
                         extra={"vm": vm.name, "host": host.name})
            else:
                raise ApiError(503, "placement kept racing other coordinators; try again",
                               headers={"Retry-After": "1"})
        except BaseException:
            reconciler.creating.discard(body["name"])
            raise
    try:
        status = await agents.call(host.name, host.url, host.token, "POST", "/v1/vms", body,
                                   timeout_s=120)
    except AgentError as exc:
        if exc.status != 0 or not exc.sent:  # refused, or never reached: nothing was created
            await store.delete_vm(vm.name)
            raise _agent_failure(exc, f"starting the VM on {host.name}") from None
        # the answer was lost (agent killed, connection cut): the agent may run the VM
        settled = await reconciler.settle_create(vm)
        if settled != "kept":
            raise _agent_failure(exc, f"starting the VM on {host.name}" + (
                "" if settled == "dropped" else
                " (outcome unknown: the record stays 'creating' until the agent answers)")) from None
        status = {"state": vm.state}
    finally:
        reconciler.creating.discard(vm.name)
    vm.state = reported_state(status, "running")
    vm.updated_at = time.time()
    await store.put_vm(vm)
    log.info("vm created", extra={"vm": vm.name, "host": host.name, "state": vm.state})
    return web.json_response(vm.public(), status=201)


def _settle(vm: VM, live: Any) -> bool:
    """Take the agent's state for a settled VM; True if the record changed."""
    if not isinstance(live, str) or live == vm.state or live == "migrating" \
            or vm.state in ("creating", "migrating"):
        return False
    vm.state, vm.updated_at = live, time.time()
    return True


async def _refresh(request: web.Request, vms: list[VM]) -> None:
    """Ask each host with listed VMs for their live states (at once, briefly)."""
    store, agents = request.app[STORE], request.app[AGENTS]
    hosts = {h.name: h for h in await store.list_hosts() if h.state == HOST_UP}

    async def one(host: Host) -> dict[str, Any]:
        try:
            doc = await agents.call(host.name, host.url, host.token, "GET", "/v1/vms",
                                    timeout_s=3)
        except AgentError:
            return {}
        items = doc.get("vms", []) if isinstance(doc, dict) else []
        return {v["name"]: v.get("state") for v in items
                if isinstance(v, dict) and isinstance(v.get("name"), str)}

    wanted = [hosts[n] for n in sorted({v.host for v in vms}) if n in hosts]
    live = dict(zip([h.name for h in wanted], await asyncio.gather(*map(one, wanted)),
                    strict=True))
    for vm in vms:
        if vm.host in live and _settle(vm, live[vm.host].get(vm.name, "missing")):
            await store.put_vm(vm)


@routes.get("/vms", "List VMs", query={"host": schemas.NAME, "refresh": {"type": "boolean"}},
            response=schemas.list_of("vms", schemas.VM))
async def list_vms(request: web.Request) -> web.Response:
    """``refresh=true`` first asks the agents for live states ('missing' if one lost a VM)."""
    q = query_params(request)
    vms = await request.app[STORE].list_vms(host=q.get("host"))
    if q.get("refresh"):
        await _refresh(request, vms)
    return web.json_response({"vms": [v.public() for v in vms]})


@routes.get("/vms/{name}", "One VM, with its agent's live status when reachable",
            response=schemas.VM, errors=(409,))
async def get_vm(request: web.Request) -> web.Response:
    vm, host = await _vm_and_host(request)
    doc = vm.public()
    doc["agent"] = None
    try:
        status = await request.app[AGENTS].call(host.name, host.url, host.token, "GET",
                                                f"/v1/vms/{vm.name}", timeout_s=3)
        if isinstance(status, dict):
            doc["agent"] = status
            # The agent is the truth for a settled VM (e.g. it crashed or was stopped there).
            if _settle(vm, status.get("state")):
                await request.app[STORE].put_vm(vm)
                doc.update(state=vm.state, updated_at=vm.updated_at)
    except AgentError as exc:
        doc["agent_error"] = exc.message
    return web.json_response(doc)


async def _action(request: web.Request, action: str, new_state: str) -> web.Response:
    vm, host = await _vm_and_host(request)
    if vm.state in ("migrating", "creating"):
        raise ApiError(409, f"VM {vm.name!r} is {vm.state}; try again when it is done")
    try:
        status = await request.app[AGENTS].call(host.name, host.url, host.token, "POST",
                                                f"/v1/vms/{vm.name}/{action}", timeout_s=60)
    except AgentError as exc:
        raise _agent_failure(exc, f"{action} on {host.name}") from None
    vm.state = reported_state(status, new_state)
    vm.updated_at = time.time()
    await request.app[STORE].put_vm(vm)
    return web.json_response(vm.public())


@routes.post("/vms/{name}/stop", "Stop a VM", response=schemas.VM, errors=(409, 502))
async def stop_vm(request: web.Request) -> web.Response:
    return await _action(request, "stop", "stopped")


@routes.post("/vms/{name}/start", "Start a stopped VM", response=schemas.VM, errors=(409, 502))
async def start_vm(request: web.Request) -> web.Response:
    return await _action(request, "start", "running")


@routes.delete("/vms/{name}", "Delete a VM (stops it on its agent first)",
               query={"force": {"type": "boolean"}},
               response={"type": "object", "required": ["deleted"]}, errors=(409, 502))
async def delete_vm(request: web.Request) -> web.Response:
    force = bool(query_params(request).get("force"))
    name = request.match_info["name"]
    vm = await request.app[STORE].get_vm(name)
    if vm is not None and force and await request.app[STORE].get_host(vm.host) is None:
        await request.app[STORE].delete_vm(name)  # its host is gone for good: just forget it
        return web.json_response({"deleted": name})
    vm, host = await _vm_and_host(request)
    if vm.state == "migrating":
        active = [m.id for m in await request.app[STORE].active_migrations() if m.vm == vm.name]
        which = active[0] if active else "ID"
        raise ApiError(409, f"VM {vm.name!r} is migrating; cancel the migration first "
                       f"(novacron migration cancel {which})")
    # delete the VM where it really runs, not only where the record says
    reconciler = request.app[RECONCILER]
    vm = await reconciler.reconcile_vm(vm, (await reconciler.reported_by()).get(vm.name, []))
    if vm.host != host.name:
        vm, host = await _vm_and_host(request)
    try:
        await request.app[AGENTS].call(host.name, host.url, host.token, "DELETE",
                                       f"/v1/vms/{vm.name}", timeout_s=60)
    except AgentError as exc:
        # force=true forgets a VM whose host is gone for good.
        if exc.status != 404 and not force:
            raise _agent_failure(exc, f"deleting on {host.name} (force=true, "
                                 "novacron vm delete --force, to forget it)") \
                from None
    await request.app[STORE].delete_vm(vm.name)
    log.info("vm deleted", extra={"vm": vm.name, "host": host.name})
    return web.json_response({"deleted": vm.name})


def setup(app: web.Application) -> None:
    app[PLACEMENT_LOCK] = asyncio.Lock()
