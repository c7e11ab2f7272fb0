"""VMs: placed on a host, then created and started through that host's agent."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import aiohttp
from aiohttp import web

from novacron.coordinator.agent_client import AgentError, reported_state
from novacron.coordinator.api import schemas
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import AGENTS, METRICS, MIGRATIONS, PLACER, RECONCILER, STORE
from novacron.coordinator.api.openapi import RouteTable, json_body, query_params
from novacron.coordinator.migration_queue import QUEUED
from novacron.coordinator.models import HOST_UP, VM, Host, cpu_model_problem, spec_cpu_model

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
        "cpu_model": {**schemas.CPU_MODEL, "description": "QEMU CPU model (default Nehalem, an "
                      "x86-64-v2 baseline); 'host' passes the host CPU through (KVM only) and "
                      "keeps the VM on hosts with the same CPU"},
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
        "labels": schemas.LABELS,
        "migration_policy": {**schemas.POLICY_NAME,
                             "description": "its migration policy, over any its labels select"},
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
        problem = cpu_model_problem(body, hosts[0])
        if problem:
            raise ApiError(409, problem)
    placer = request.app[PLACER]
    host = await placer({**body, **placement}, hosts, await store.vm_summaries())
    if host is None:
        model = spec_cpu_model(body)
        if not any(cpu_model_problem(body, h) is None for h in hosts if h.state == HOST_UP):
            raise ApiError(409, f"no up host can run CPU model {model!r}")
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
    # the coordinator's own fields, never the agent's spec
    labels, policy = body.pop("labels", {}), body.pop("migration_policy", None)
    if policy is not None:
        request.app[MIGRATIONS].policies.check_name(policy)
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
                    vm.labels, vm.migration_policy = labels, policy
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


# The agent's limits (agent/api/vms.py): 1 MiB of log per read, 1 KiB typed at once.
CONSOLE_OFFSET_MAX = 2**53
CONSOLE_INPUT: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["text"],
    "properties": {"text": {"type": "string", "minLength": 1, "maxLength": 1024,
                            "description": "typed on the guest's serial console as is"}},
}
CONSOLE_OUTPUT: dict[str, Any] = {
    "type": "object", "required": ["offset", "next_offset", "text"],
    "properties": {"offset": {"type": "integer"}, "next_offset": {"type": "integer"},
                   "text": {"type": "string"}},
}


@routes.get("/vms/{name}/console/log", "The VM's serial console log from byte offset "
            "(at most 1 MiB per call; read on from next_offset)",
            query={"offset": {"type": "integer", "minimum": 0, "maximum": CONSOLE_OFFSET_MAX}},
            response=CONSOLE_OUTPUT, errors=(404, 409, 502))
async def console_read(request: web.Request) -> web.Response:
    vm, host = await _vm_and_host(request)
    offset = int(query_params(request).get("offset", 0))
    try:
        doc = await request.app[AGENTS].call(host.name, host.url, host.token, "GET",
                                             f"/v1/vms/{vm.name}/console?offset={offset}",
                                             timeout_s=10)
    except AgentError as exc:
        raise _agent_failure(exc, f"reading the console on {host.name}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) \
            or not isinstance(doc.get("next_offset"), int):
        raise ApiError(502, f"agent {host.name} answered no console text")
    return web.json_response({"offset": offset, "next_offset": doc["next_offset"],
                              "text": doc["text"]})


@routes.post("/vms/{name}/console", "Type text on the VM's serial console",
             request=CONSOLE_INPUT, response={"type": "object", "required": ["sent"]},
             errors=(404, 409, 502))
async def console_write(request: web.Request) -> web.Response:
    vm, host = await _vm_and_host(request)
    text = json_body(request)["text"]
    try:
        doc = await request.app[AGENTS].call(host.name, host.url, host.token, "POST",
                                             f"/v1/vms/{vm.name}/console", {"text": text},
                                             timeout_s=10)
    except AgentError as exc:
        raise _agent_failure(exc, f"typing on the console on {host.name}") from None
    sent = doc.get("sent") if isinstance(doc, dict) else None
    return web.json_response({"sent": sent if isinstance(sent, int) else len(text)})


async def _action(request: web.Request, action: str, new_state: str, query: str = "",
                  timeout_s: float = 60) -> web.Response:
    vm, host = await _vm_and_host(request)
    if vm.state in ("migrating", "creating"):
        raise ApiError(409, f"VM {vm.name!r} is {vm.state}; try again when it is done")
    try:
        status = await request.app[AGENTS].call(host.name, host.url, host.token, "POST",
                                                f"/v1/vms/{vm.name}/{action}{query}",
                                                timeout_s=timeout_s)
    except AgentError as exc:
        raise _agent_failure(exc, f"{action} on {host.name}") from None
    vm.state = reported_state(status, new_state)
    vm.updated_at = time.time()
    await request.app[STORE].put_vm(vm)
    doc = vm.public()
    if isinstance(status, dict) and isinstance(status.get("outcome"), dict):
        doc["outcome"] = status["outcome"]  # stop/reboot: graceful or not, and how long it took
    return web.json_response(doc)


# Graceful stop and reboot: the agent waits up to timeout_s (its stop_timeout_s setting when
# not given) for the guest, then powers off or resets; we wait that long plus this margin.
POWER_QUERY = {
    "force": {"type": "boolean", "description": "stop: power off at once; reboot: reset at once "
              "(default false: the ACPI power button first)"},
    "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 3600,
                  "description": "seconds the guest gets to power off after the power button "
                                 "(default: the agent's stop_timeout_s, 60)"},
}
POWER_MARGIN_S = 30.0
POWER_DEFAULT_WAIT_S = 3600.0  # the agent's own setting decides; it answers well within this


async def _power(request: web.Request, action: str, new_state: str) -> web.Response:
    q = query_params(request)
    params = [f"force={'true' if q.get('force') else 'false'}"]
    wait = POWER_DEFAULT_WAIT_S
    if "timeout_s" in q:
        if not math.isfinite(q["timeout_s"]):
            raise ApiError(400, "query parameter 'timeout_s': expected a finite number of seconds")
        params.append(f"timeout_s={q['timeout_s']!r}")
        wait = float(q["timeout_s"])
    return await _action(request, action, new_state, "?" + "&".join(params),
                         timeout_s=wait + POWER_MARGIN_S)


@routes.post("/vms/{name}/stop", "Stop a VM: the ACPI power button, then power-off after "
             "timeout_s if the guest has not shut down; force=true powers off at once. The "
             "reply's outcome says whether the guest shut down by itself",
             query=POWER_QUERY, response=schemas.VM, errors=(409, 502))
async def stop_vm(request: web.Request) -> web.Response:
    return await _power(request, "stop", "stopped")


@routes.post("/vms/{name}/reboot", "Reboot a running VM: the guest shuts down (ACPI power "
             "button), then the machine is reset; after timeout_s it is reset anyway; "
             "force=true resets at once", query=POWER_QUERY, response=schemas.VM, errors=(409, 502))
async def reboot_vm(request: web.Request) -> web.Response:
    return await _power(request, "reboot", "running")


@routes.post("/vms/{name}/start", "Start a stopped VM", response=schemas.VM, errors=(409, 502))
async def start_vm(request: web.Request) -> web.Response:
    return await _action(request, "start", "running")


IMPORT: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["host"],
    "properties": {"host": {**schemas.NAME, "description": "the host whose agent runs it"}},
}


def imported_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """What the scheduler needs of a VM the agent reports (a libvirt domain's inventory)."""
    spec: dict[str, Any] = {"name": doc["name"], "vcpus": doc["vcpus"], "memory_mb": doc["memory_mb"],
                            "hypervisor": doc.get("hypervisor", "qemu")}
    model = doc.get("cpu_model")
    if model in ("host-passthrough", "host-model"):
        spec["cpu_model"] = "host"
    elif isinstance(model, str) and model and model not in ("default", "maximum"):
        spec["cpu_model"] = model
    return spec


@routes.post("/vms/{name}/import", "Record a VM a host already runs (a libvirt domain defined "
             "outside NovaCron and adopted on its agent), so placement, drain and policies see it",
             request=IMPORT, response=schemas.VM, status=201, errors=(404, 409, 502, 503))
async def import_vm(request: web.Request) -> web.Response:
    name, body = request.match_info["name"], json_body(request)
    store, agents = request.app[STORE], request.app[AGENTS]
    host = await store.get_host(body["host"])
    if host is None:
        raise ApiError(404, f"no host named {body['host']!r}")
    if host.state != HOST_UP:
        raise ApiError(409, f"host {host.name!r} is down")
    try:
        doc = await agents.call(host.name, host.url, host.token, "GET", f"/v1/vms/{name}", timeout_s=10)
    except AgentError as exc:
        if exc.status == 404:
            raise ApiError(404, f"host {host.name!r} runs no VM named {name!r}") from None
        raise _agent_failure(exc, f"asking {host.name} for VM {name}") from None
    if not isinstance(doc, dict) or doc.get("name") != name or not isinstance(doc.get("vcpus"), int) \
            or not isinstance(doc.get("memory_mb"), int):
        raise ApiError(502, f"host {host.name!r} answered no usable description of VM {name!r}")
    if doc.get("adopted") is False:
        raise ApiError(409, f"VM {name!r} is not adopted on {host.name!r} (POST /v1/vms/{name}/adopt there)")
    now = time.time()
    vm = VM(name=name, host=host.name, spec=imported_spec(doc), state=reported_state(doc, "running"),
            created_at=now, updated_at=now)
    async with request.app[PLACEMENT_LOCK]:
        for _attempt in range(PLACEMENT_ATTEMPTS):  # "stale": the host's record moved; read it again
            claim = await store.claim_vm(vm, host.generation)
            if claim == "taken":
                raise ApiError(409, f"a VM named {name!r} already exists")
            if claim == "claimed":
                break
            fresh = await store.get_host(host.name)
            if fresh is None:
                raise ApiError(404, f"no host named {host.name!r}")
            host = fresh
        else:
            raise ApiError(503, "the host's record kept changing; try again", headers={"Retry-After": "1"})
    log.info("vm imported", extra={"vm": name, "host": host.name, "state": vm.state})
    return web.json_response(vm.public(), status=201)


LABELS: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "labels": {**schemas.LABELS, "description": "the VM's labels (replaces them all)"},
        "migration_policy": {"anyOf": [schemas.POLICY_NAME, {"type": "null"}],
                             "description": "its own migration policy; null: none (labels decide)"},
    },
}


@routes.put("/vms/{name}/labels", "Set a VM's labels and/or its migration policy (for later "
            "migrations)", request=LABELS, response=schemas.VM, errors=(409,))
async def set_labels(request: web.Request) -> web.Response:
    body = json_body(request)
    store = request.app[STORE]
    if body.get("migration_policy") is not None:
        request.app[MIGRATIONS].policies.check_name(body["migration_policy"])
    name = request.match_info["name"]
    vm = await store.get_vm(name)
    if vm is None:
        raise ApiError(404, f"no VM named {name!r}")
    if "labels" in body:
        vm.labels = body["labels"]
    if "migration_policy" in body:
        vm.migration_policy = body["migration_policy"]
    vm.updated_at = time.time()
    if not await store.put_vm_if(vm, vm.state, vm.host):  # not over a change made meanwhile
        raise ApiError(409, f"VM {name!r} changed meanwhile; try again")
    return web.json_response(vm.public())


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
    for mig in await request.app[STORE].active_migrations():  # a VM deleted goes nowhere
        if mig.vm == vm.name and mig.phase == QUEUED:
            await request.app[MIGRATIONS].cancel(mig.id)
    # delete the VM where it really runs, not only where the record says
    reconciler = request.app[RECONCILER]
    vm = await reconciler.reconcile_vm(vm, (await reconciler.store.vms_to_reconcile()).get(vm.name, []))
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


CONSOLE_HISTORY_MAX = 64 * 1024


@routes.get("/vms/{name}/console", "Attach to the VM's serial console: a WebSocket (send the "
            "Upgrade headers); binary frames carry the console's bytes both ways, text frames "
            "are typed as UTF-8. The coordinator relays it to the VM's agent; one session per "
            "VM at a time (409 while another is attached). `novacron vm console NAME` is a "
            "client (escape: Ctrl-])", query={"history": {
                "type": "integer", "minimum": 0, "maximum": CONSOLE_HISTORY_MAX,
                "description": "bytes of recent output to send first (default 0)"}},
            status=101, content_type="application/octet-stream", errors=(400, 409, 502))
async def console(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
    if not ws.can_prepare(request).ok:
        raise ApiError(400, "this is a WebSocket: connect with the Upgrade headers "
                            "(or use `novacron vm console NAME`)")
    vm, host = await _vm_and_host(request)
    history = query_params(request).get("history", 0)
    try:  # before answering the client: a refusal is a plain HTTP error it can show
        agent = await request.app[AGENTS].ws_connect(
            host.name, host.url, host.token, f"/v1/vms/{vm.name}/console/ws?history={history}")
    except AgentError as exc:
        raise _agent_failure(exc, f"console of {vm.name} on {host.name}") from None
    try:
        await ws.prepare(request)
        log.info("console attached", extra={"vm": vm.name, "host": host.name, "remote": request.remote})

        async def agent_to_client() -> None:
            async for msg in agent:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)

        async def client_to_agent() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    await agent.send_bytes(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    await agent.send_bytes(msg.data.encode())

        pumps = [asyncio.create_task(agent_to_client()), asyncio.create_task(client_to_agent())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
    finally:
        await agent.close()
        await ws.close()
        log.info("console detached", extra={"vm": vm.name, "host": host.name})
    return ws


def setup(app: web.Application) -> None:
    app[PLACEMENT_LOCK] = asyncio.Lock()
