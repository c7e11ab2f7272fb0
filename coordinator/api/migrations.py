"""Live migrations: start, follow (polling or SSE), cancel, history."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from novacron.coordinator.api import schemas
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import CONFIG, EVENTS, MIGRATIONS, STORE
from novacron.coordinator.api.openapi import RouteTable, json_body, query_params
from novacron.coordinator.api.schemas import NULLABLE_STR
from novacron.coordinator.migrations import topic

routes = RouteTable("migrations", "Live migrations between hosts")

START: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["vm", "target"],
    "properties": {
        "vm": schemas.NAME,
        "target": schemas.NAME,
        "force": {"type": "boolean", "description": "move to a host in maintenance all the same"},
        "policy": {**schemas.POLICY_NAME,
                   "description": "migration policy (GET /migration-policies); options override it"},
        "options": {
            "type": "object",
            "additionalProperties": False,
            # The source agent's MigrationOptions (agent/migration/options.py), same bounds.
            "properties": {
                "bandwidth_mbps": {"type": "number", "minimum": 0, "maximum": 1e6,
                                   "description": "MB/s cap on page data, 0 = unlimited"},
                "downtime_ms": {"type": "number", "minimum": 1, "maximum": 60000},
                "max_rounds": {"type": "integer", "minimum": 1, "maximum": 1000},
                "compression_level": {"type": "integer", "minimum": 1, "maximum": 19},
                "throttle": {"type": "boolean",
                             "description": "auto-converge: slow the vCPUs when pre-copy cannot keep up"},
                "dedup": {"type": "boolean"},
                "dest_dedup": {"type": "boolean", "description":
                               "offer pages by digest first; the destination copies those it holds"},
                "disk_dedup": {"type": "boolean", "description":
                               "local disks: clusters of an image the destination holds cross as digests"},
                "adaptive_compression": {"type": "boolean", "description":
                                         "per batch, dedup + zstd only when that moves pages faster"},
                "bounded_pause": {"type": "boolean", "description":
                                  "while paused, scan only pages QEMU may have written (else all RAM)"},
                "test_digest": {"type": "boolean"},
                "batch_pages": {"type": "integer", "minimum": 64, "maximum": 65536},
                "timeout_s": {"type": "number", "minimum": 1, "maximum": 86400},
                "in_doubt_timeout_s": {"type": "number", "minimum": 0.1, "maximum": 3600,
                                       "description": "past 'go' with the channel lost: how long the "
                                       "source asks the destination what became of it (default 120)"},
                "liveness_s": {"type": "number", "minimum": 0.5, "maximum": 60,
                               "description": "a peer silent this long fails the migration"},
                "pause_factor": {"type": "number", "minimum": 1, "maximum": 10000,
                                 "description": "pause ceiling = downtime_ms x this (capped by max_pause_ms)"},
                "max_pause_ms": {"type": "number", "minimum": 10, "maximum": 600000},
                "on_no_converge": {"enum": ["abort", "force", "postcopy"],
                                   "description": "pre-copy cannot reach downtime_ms: abort (the VM stays "
                                   "on its source), force (longer pause, reported as budget_exceeded) or "
                                   "postcopy (QEMU moves the RAM; not converged after max_rounds, the VM "
                                   "runs at the destination while its remaining pages follow on demand). "
                                   "Default: the "
                                   "coordinator's migration_on_no_converge"},
                "postcopy_recover_s": {"type": "number", "minimum": 1, "maximum": 3600,
                                       "description": "post-copy: how long a lost channel is retried "
                                       "before the migration is left in doubt (default 60)"},
                "throttle_final": {"type": "boolean",
                                   "description": "hold the pages sent while paused to bandwidth_mbps "
                                   "too (default false: they go at link speed)"},
                "engine": {"enum": ["novacron", "libvirt"], "description":
                           "novacron (ours; a libvirt domain needs its RAM in a shared file) or "
                           "libvirt (libvirt's own migration; libvirt hosts only). Default novacron"},
            },
        },
    },
}

# What may change while a migration runs (the agent's options.LIVE), same bounds.
CHANGE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "properties": {
        "bandwidth_mbps": START["properties"]["options"]["properties"]["bandwidth_mbps"],
        "downtime_ms": START["properties"]["options"]["properties"]["downtime_ms"],
    },
}

# How long one SSE stream may stay open without news before a keep-alive comment.
KEEPALIVE_S = 15.0


@routes.post("/migrations", "Start a live migration of a VM to a host", request=START,
             response=schemas.MIGRATION, status=202, errors=(404, 409, 502, 503))
async def start(request: web.Request) -> web.Response:
    body = json_body(request)
    mig = await request.app[MIGRATIONS].start(body["vm"], body["target"], body.get("options", {}),
                                              force=bool(body.get("force", False)),
                                              policy=body.get("policy"))
    return web.json_response(mig.public(), status=202)


POLICIES: dict[str, Any] = {
    "type": "object", "required": ["policies", "default"],
    "properties": {
        "policies": {"type": "array", "items": {
            "type": "object", "required": ["name", "options", "selector"],
            "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                           "selector": {"type": "object"}, "options": {"type": "object"}}}},
        "default": NULLABLE_STR,
    },
}


@routes.get("/migration-policies",
            "The configured migration policies and the default (see the README's precedence)",
            response=POLICIES)
async def policies(request: web.Request) -> web.Response:
    return web.json_response(request.app[MIGRATIONS].policies.public())


@routes.get("/migrations", "Migration history, newest first",
            query={"vm": schemas.NAME, "limit": {"type": "integer", "minimum": 1, "maximum": 1000}},
            response=schemas.list_of("migrations", schemas.MIGRATION))
async def history(request: web.Request) -> web.Response:
    q = query_params(request)
    migs = await request.app[STORE].list_migrations(vm=q.get("vm"), limit=q.get("limit", 100))
    return web.json_response({"migrations": [m.public() for m in migs]})


@routes.get("/migrations/{id}", "One migration's progress and metrics",
            response=schemas.MIGRATION)
async def get_migration(request: web.Request) -> web.Response:
    mig_id = request.match_info["id"]
    mig = await request.app[STORE].get_migration(mig_id)
    if mig is None:
        raise ApiError(404, f"no migration {mig_id!r}")
    return web.json_response(mig.public())


@routes.post("/migrations/{id}/cancel", "Cancel a running migration (the VM stays on its source)",
             response=schemas.MIGRATION, status=202, errors=(409, 502))
async def cancel(request: web.Request) -> web.Response:
    mig = await request.app[MIGRATIONS].cancel(request.match_info["id"])
    return web.json_response(mig.public(), status=202)


@routes.patch("/migrations/{id}", "Change a running migration's bandwidth cap or downtime "
              "budget (takes effect within a round)", request=CHANGE, response=schemas.MIGRATION,
              errors=(404, 409, 502))
async def change(request: web.Request) -> web.Response:
    mig = await request.app[MIGRATIONS].change(request.match_info["id"], json_body(request))
    return web.json_response(mig.public())


@routes.get("/migrations/{id}/events",
            "Server-sent events: the migration's state now, then each change until it ends",
            content_type="text/event-stream")
async def events(request: web.Request) -> web.StreamResponse:
    mig_id = request.match_info["id"]
    store = request.app[STORE]
    # Subscribe before reading, so no change between the read and the stream is missed.
    with request.app[EVENTS].subscribe(topic(mig_id)) as sub:
        mig = await store.get_migration(mig_id)
        if mig is None:
            raise ApiError(404, f"no migration {mig_id!r}")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            await _send(resp, mig.public())
            deadline = time.time() + request.app[CONFIG].migration_timeout_s
            done = mig.done
            while not done and time.time() < deadline:
                event = await sub.get(KEEPALIVE_S)
                if event is None:
                    # Nothing new: re-read in case it ended while we were not subscribed.
                    fresh = await store.get_migration(mig_id)
                    if fresh is not None and fresh.done:
                        event = fresh.public()
                    else:
                        await resp.write(b": keep-alive\n\n")
                        continue
                await _send(resp, event)
                done = event.get("phase") in ("completed", "failed", "cancelled")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away; nothing to tell it
        return resp


async def _send(resp: web.StreamResponse, doc: dict[str, Any]) -> None:
    await resp.write(f"event: migration\ndata: {json.dumps(doc)}\n\n".encode())
