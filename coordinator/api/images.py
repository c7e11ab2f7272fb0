"""``GET /api/v1/hosts/{name}/images``: the images a VM spec may name on that host.

The agent lists the regular files inside its image dirs (``GET /v1/images``); a VM
spec names one by its relative ``name`` (``kernel``, ``initrd`` or ``disk``). The
coordinator passes the listing on and never turns a name into a path itself.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from novacron.coordinator.agent_client import AgentError
from novacron.coordinator.api.errors import ApiError
from novacron.coordinator.api.keys import AGENTS, STORE
from novacron.coordinator.api.openapi import RouteTable
from novacron.coordinator.models import HOST_UP

routes = RouteTable("images", "Images the hosts offer to VM specs")

IMAGE: dict[str, Any] = {
    "type": "object", "required": ["name", "size"],
    "properties": {"name": {"type": "string", "description": "what a spec's kernel/initrd/disk names"},
                   "size": {"type": "integer", "description": "bytes"}},
}
LISTING: dict[str, Any] = {
    "type": "object", "required": ["host", "images"],
    "properties": {"host": {"type": "string"}, "images": {"type": "array", "items": IMAGE}},
}
MAX_IMAGES = 10_000  # more than an agent lists (agent.vm.images.MAX_LISTED)


def _clean(items: Any) -> list[dict[str, Any]]:
    """The agent's entries reduced to what a spec needs; anything malformed is dropped."""
    out = []
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str) \
                and isinstance(item.get("size"), int):
            out.append({"name": item["name"], "size": item["size"]})
    return out[:MAX_IMAGES]


@routes.get("/hosts/{name}/images", "Images this host offers: names a VM spec's kernel, "
            "initrd or disk may use", response=LISTING, errors=(404, 409, 502))
async def list_images(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    host = await request.app[STORE].get_host(name)
    if host is None:
        raise ApiError(404, f"no host named {name!r}")
    if host.state != HOST_UP:
        raise ApiError(409, f"host {name!r} is {host.state}; its images cannot be listed")
    try:
        doc = await request.app[AGENTS].call(host.name, host.url, host.token, "GET", "/v1/images",
                                             timeout_s=10)
    except AgentError as exc:
        raise ApiError(502, f"listing the images of {host.name}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise ApiError(502, f"agent {host.name} answered no image list")
    return web.json_response({"host": host.name, "images": _clean(doc["images"])})
