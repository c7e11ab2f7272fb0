"""Placement API: dry-run decisions with explanations, rebalancing plans, and
the per-host attributes (price, zone, overcommit, latency) the scheduler uses.

Nothing here changes where a VM runs: ``POST /placements`` and
``POST /rebalance/plan`` only compute. VM creation goes through the same
scheduler via ``PLACER`` (set in ``setup`` below).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from novacron.coordinator.api import schemas
from novacron.coordinator.api.drains import DRAIN, DRAINS
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import CONFIG, PLACER, STORE
from novacron.coordinator.api.openapi import RouteTable, json_body
from novacron.coordinator.drains import MAX_PARALLEL
from novacron.coordinator.placement import Placer, most_free_memory
from novacron.coordinator.scheduler import (
    RebalanceOptions,
    Scheduler,
    SchedulerInputError,
    parse_host,
    parse_request,
    parse_weights,
    plan,
)
from novacron.coordinator.scheduler.placer import (
    ATTR_FIELDS,
    ATTRS,
    SchedulerPlacer,
    build_fleet,
    host_in_maintenance,
    load_attrs,
    load_policy,
    save_policy,
)
from novacron.coordinator.scheduler.policy import BanditPolicy
from novacron.coordinator.scheduler.strategies import STRATEGIES

routes = RouteTable("placements", "Placement decisions, rebalancing plans, scheduler host attributes")

_FRACTION = {"type": "number", "exclusiveMinimum": 0, "maximum": 1}

VM_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["vcpus", "memory_mb"],
    "properties": {
        "name": schemas.NAME,
        "vcpus": {"type": "integer", "minimum": 1, "maximum": 256},
        "memory_mb": {"type": "integer", "minimum": 16, "maximum": 4 * 1024 * 1024},
        **schemas.PLACEMENT_PREFERENCES,
    },
}
_WEIGHT = {"type": "number", "minimum": 0, "maximum": 1000}
PLACEMENT_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["vm"],
    "properties": {
        "vm": VM_REQUEST,
        "weights": {"type": "object", "additionalProperties": False,
                    "properties": {"cost": _WEIGHT, "performance": _WEIGHT, "latency": _WEIGHT}},
        "strategy": {"enum": list(STRATEGIES), "default": "balanced"},
    },
}
PLACEMENT_RESPONSE: dict[str, Any] = {
    "type": "object", "required": ["vm", "host", "placed", "strategy", "explanation"],
    "properties": {
        "vm": {"type": "string"}, "host": {"type": ["string", "null"]},
        "placed": {"type": "boolean"}, "strategy": {"type": "string"},
        "explanation": {
            "type": "object", "required": ["hosts_considered", "feasible", "rejected", "why"],
            "properties": {
                "hosts_considered": {"type": "integer"}, "feasible": {"type": "integer"},
                "rejected": {"type": "object"}, "why": {"type": "string"},
                "chosen": {"type": "object"}, "alternatives": {"type": "array"},
                "pareto_front_size": {"type": "integer"}, "weights": {"type": ["object", "null"]},
            },
        },
    },
}
REBALANCE_REQUEST: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "max_migrations": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
        "hot_threshold": _FRACTION,
        "drain_threshold": _FRACTION,
        "bandwidth_mbps": {"type": "number", "exclusiveMinimum": 0, "maximum": 1e7},
        "apply": {"type": "boolean", "default": False,
                  "description": "start the planned moves now (as a drain run, see GET /drains/{id})"},
        "max_parallel": {"type": "integer", "minimum": 1, "maximum": MAX_PARALLEL,
                         "description": "with apply: moves at once (default: the coordinator's "
                         "migration_limit_outbound)"},
        "expect": {"type": "array", "maxItems": 10_000,
                   "description": "with apply: the moves of the plan the caller saw; if the "
                   "plan is different now, 409 and nothing starts",
                   "items": {"type": "object", "additionalProperties": False,
                             "required": ["vm", "source", "target"],
                             "properties": {"vm": schemas.NAME, "source": schemas.NAME,
                                            "target": schemas.NAME}}},
    },
}
REBALANCE_RESPONSE: dict[str, Any] = {
    "type": "object",
    "required": ["moves", "hosts_freed", "hot_relieved", "hourly_saving", "capped"],
    "properties": {
        "moves": {"type": "array", "items": {
            "type": "object",
            "required": ["vm", "source", "target", "reason", "memory_mib", "est_bytes", "est_seconds"],
            "properties": {"vm": {"type": "string"}, "source": {"type": "string"},
                           "target": {"type": "string"}, "reason": {"enum": ["relieve-hot", "free-host"]},
                           "memory_mib": {"type": "integer"}, "est_bytes": {"type": "integer"},
                           "est_seconds": {"type": "number"}}}},
        "hosts_freed": {"type": "array", "items": {"type": "string"}},
        "hot_relieved": {"type": "array", "items": {"type": "string"}},
        "hot_unrelieved": {"type": "array", "items": {"type": "string"}},
        "hourly_saving": {"type": "number"}, "total_bytes": {"type": "integer"},
        "total_seconds": {"type": "number"}, "capped": {"type": "boolean"},
        "drain": {**DRAIN, "description": "with apply: the run moving the plan's VMs"},
    },
}
HOST_ATTRS: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "cost_per_hour": {"type": "number", "minimum": 0, "maximum": 1e6},
        "zone": {"type": "string", "minLength": 1, "maxLength": 64},
        "cpu_overcommit": {"type": "number", "exclusiveMinimum": 0, "maximum": 64},
        "mem_overcommit": {"type": "number", "exclusiveMinimum": 0, "maximum": 64},
        "latency_ms": {"type": "object", "maxProperties": 64,
                       "propertyNames": {"minLength": 1, "maxLength": 64},
                       "additionalProperties": {"type": "number", "minimum": 0, "maximum": 60_000}},
        "enabled": {"type": "boolean", "description": "false: maintenance, takes no new VMs"},
    },
}


async def _fleet(request: web.Request) -> Any:
    store = request.app[STORE]
    return build_fleet(await store.list_hosts(), await store.list_vms(), await load_attrs(store))


@routes.post("/placements", "Dry run: where would this VM go, and why (changes nothing)",
             request=PLACEMENT_REQUEST, response=PLACEMENT_RESPONSE, errors=(400,))
async def dry_run(request: web.Request) -> web.Response:
    body = json_body(request)
    vm = body["vm"]
    doc = {"id": vm.get("name", "(new)"), "vcpus": vm["vcpus"], "memory_mib": vm["memory_mb"],
           **{k: v for k, v in vm.items() if k not in ("name", "vcpus", "memory_mb")}}
    try:
        req = parse_request(doc, "vm")
        weights = parse_weights(body.get("weights"))
        fleet = await _fleet(request)
        if req.id in fleet.vms:
            raise ApiError(400, f"vm.name: a VM named {req.id!r} already exists")
        d = Scheduler(fleet, weights).decide(req, strategy=body.get("strategy", "balanced"))
    except SchedulerInputError as exc:
        raise ApiError(400, str(exc)) from None
    return web.json_response(d.to_dict())


@routes.post("/rebalance/plan", "Propose migrations that free hosts or relieve hot ones "
             "(changes nothing); with apply=true also start them", request=REBALANCE_REQUEST,
             response=REBALANCE_RESPONSE, errors=(400, 409))
async def rebalance_plan(request: web.Request) -> web.Response:
    body = dict(json_body(request) or {})
    apply = bool(body.pop("apply", False))
    expect = body.pop("expect", None)
    max_parallel = int(body.pop("max_parallel", request.app[CONFIG].migration_limit_outbound))
    # the rest is exactly RebalanceOptions' fields; check them before loading the fleet
    try:
        opts = RebalanceOptions(**body).check()
        result = plan(await _fleet(request), opts).to_dict()
    except SchedulerInputError as exc:
        raise ApiError(400, str(exc)) from None
    if expect is not None and not apply:
        raise ApiError(400, "body.expect: only with apply=true")
    if expect is not None and expect != [{k: m[k] for k in ("vm", "source", "target")}
                                         for m in result["moves"]]:
        raise ApiError(409, "the plan changed since it was shown (VMs or hosts changed): "
                       "nothing started; look at the new plan and apply again")
    if apply:  # the same machinery as a drain: limits, queueing, a report per VM
        result["drain"] = await request.app[DRAINS].apply(result["moves"], max_parallel)
    return web.json_response(result)


@routes.put("/placements/hosts/{name}", "Set a host's price, zone, overcommit and latencies",
            request=HOST_ATTRS, response=HOST_ATTRS, errors=(400, 404))
async def put_host_attrs(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    store = request.app[STORE]
    if await store.get_host(name) is None:
        raise ApiError(404, f"no host named {name!r}")
    attrs = {k: v for k, v in json_body(request).items() if k in ATTR_FIELDS}
    if "enabled" not in attrs and await host_in_maintenance(store, name):
        attrs["enabled"] = False  # a price change does not end maintenance (host maintenance off)
    try:
        parse_host({"id": name, "vcpus": 1, "memory_mib": 1, **attrs}, f"host {name}")
    except SchedulerInputError as exc:
        raise ApiError(400, str(exc)) from None
    await store.put_doc(ATTRS, name, attrs)
    return web.json_response(attrs)


@routes.get("/placements/hosts", "Scheduler attributes of every host that has some",
            response={"type": "object", "required": ["hosts"],
                      "properties": {"hosts": {"type": "object",
                                               "additionalProperties": HOST_ATTRS}}})
async def list_host_attrs(request: web.Request) -> web.Response:
    return web.json_response({"hosts": await load_attrs(request.app[STORE])})


POLICY: dict[str, Any] = {
    "type": "object", "required": ["enabled", "contexts", "open_decisions"],
    "properties": {
        "enabled": {"type": "boolean"},
        "contexts": {"type": "object", "description": "context -> arm -> {n, mean reward}"},
        "open_decisions": {"type": "integer"},
    },
}
POLICY_UPDATE: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["enabled"],
    "properties": {"enabled": {"type": "boolean"}},
}


def _policy_doc(enabled: bool, policy: BanditPolicy) -> dict[str, Any]:
    return {"enabled": enabled, "open_decisions": len(policy.pending),
            "contexts": {ctx: {arm: {"n": s.n, "mean": round(s.mean, 4)} for arm, s in t.items()}
                         for ctx, t in policy.stats.items()}}


@routes.get("/placements/policy", "The learned placement policy: on or off, and what it has learned",
            response=POLICY)
async def get_policy(request: web.Request) -> web.Response:
    enabled, policy = await load_policy(request.app[STORE])
    return web.json_response(_policy_doc(enabled, policy))


@routes.put("/placements/policy", "Turn the learned placement policy on or off (off by default)",
            request=POLICY_UPDATE, response=POLICY)
async def put_policy(request: web.Request) -> web.Response:
    store = request.app[STORE]
    _, policy = await load_policy(store)
    enabled = bool(json_body(request)["enabled"])
    await save_policy(store, enabled, policy)
    return web.json_response(_policy_doc(enabled, policy))


def setup(app: web.Application) -> None:
    # VM create places through the scheduler, unless the app was built with its
    # own placer (tests pass one to build_app).
    if app[PLACER] is most_free_memory:
        placer: Placer = SchedulerPlacer(app[STORE])
        app[PLACER] = placer
