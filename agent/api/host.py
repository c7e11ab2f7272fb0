"""``/v1/health`` and ``/v1/host``: who this agent is and what the host offers."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from aiohttp import web

from novacron import __version__
from novacron.agent.api.common import json_error, read_json_object
from novacron.agent.appkeys import ACCEL, CONFIG, VMS


def host_name(configured: str) -> str:
    return configured or socket.gethostname()


def meminfo() -> dict[str, int]:
    """MemTotal and MemAvailable in bytes (from /proc/meminfo)."""
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            out[key] = int(rest.split()[0]) * 1024
    return out


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "name": host_name(request.app[CONFIG].name)})


async def host_document(app: web.Application) -> dict[str, Any]:
    """``GET /v1/host``; also what the agent registers with the coordinator."""
    cfg = app[CONFIG]
    accel = await app[ACCEL].detect()
    mem = meminfo()
    models = await app[VMS].cpus.models(accel.default)
    if cfg.hypervisor == "libvirt":
        from novacron.agent.api.libvirt import LIBVIRT

        vms = [d["name"] for d in await app[LIBVIRT].list()]
    else:
        vms = [vm.name for vm in app[VMS].list()]
    return {
        "name": host_name(cfg.name),
        "cpus": os.cpu_count() or 1,
        "memory_bytes": mem.get("MemTotal", 0),
        "memory_available_bytes": mem.get("MemAvailable", 0),
        "accel": accel.to_dict(),
        "hypervisor": cfg.hypervisor,
        "vms": vms,
        "data_port": cfg.data_port,
        "networks": app[VMS].networks.names,  # fleet networks a VM may join here
        # CPU models VMs may use here (under the default accelerator; null: QEMU not asked)
        "cpu_models": sorted(models) if models is not None else None,
        "cpu_signature": app[VMS].cpus.signature,  # "host" passthrough moves only between equals
        "version": __version__,
        "load": round(os.getloadavg()[0], 2),
        # destination-side dedup: the digest index of pages held here (entries, memory)
        "dedup_index": _dedup_index(app),
        # uncompressed copies of compressed images, for migrations' disk cluster indexes
        "disk_index_copies": expanded.as_dict() if (expanded := app[VMS].disks.expanded) else None,
    }


def _dedup_index(app: web.Application) -> dict[str, Any] | None:
    from novacron.agent.api.migrations import MANAGER_KEY

    manager = app.get(MANAGER_KEY)
    index = None if manager is None else manager.page_index
    return None if index is None else index.stats()


async def host(request: web.Request) -> web.Response:
    return web.json_response(await host_document(request.app))


async def warm_dedup_index(request: web.Request) -> web.Response:
    """``POST /v1/host/dedup-index``: hash the RAM of the VMs running here into the
    destination-side dedup index now rather than when the next migration arrives
    (before a drain to this host); returns the index's figures."""
    from novacron.agent.api.migrations import MANAGER_KEY

    manager = request.app.get(MANAGER_KEY)
    index = None if manager is None else manager.page_index
    if index is None:
        return json_error(409, "destination-side dedup is off on this agent (dedup = false)")
    return web.json_response(await index.warm())


async def warm_disk_index(request: web.Request) -> web.Response:
    """``POST /v1/host/disk-index`` ``{"image": NAME}``: before a drain to this host, make
    its uncompressed copy of a compressed store image now (agent/vm/expanded.py) rather
    than during the first migration of a disk copied from it; also indexes the image.
    202 while the copy is being made (``GET /v1/host`` -> ``disk_index_copies``), 200 when
    it is there or not needed, 409 when none may be made here (and why)."""
    from novacron.agent.migration.diskdedup import index_image
    from novacron.agent.vm.disks import DiskError
    from novacron.agent.vm.spec import SpecError

    body = await read_json_object(request)
    ref = body.get("image")
    if set(body) != {"image"} or not isinstance(ref, str) or not ref:
        return json_error(400, 'request body: expected {"image": NAME}, a store image\'s name')
    disks = request.app[VMS].disks
    try:
        fd, fmt = disks.open_store_image(ref)
    except SpecError as exc:
        return json_error(400, str(exc))
    try:
        index = await index_image(fd, fmt)
        st = os.fstat(fd)
        done = {"image": ref, "clusters_indexed": len(index.keys), "compressed_bytes": index.unmapped}
        if not index.unmapped:
            return web.json_response({**done, "copy": "not needed"})
        if disks.expanded is None:
            return json_error(409, "this agent makes no copies of compressed images")
        if (copy := disks.expanded.open(st)) is not None:
            os.close(copy)
            return web.json_response({**done, "copy": "ready"})
        if disks.expanded.start(fd, fmt, st, index.data_bytes) is None:  # (it keeps its own descriptor)
            return json_error(409, f"no copy of {ref} made here: {disks.expanded.refusal}")
        return web.json_response({**done, "copy": "making"}, status=202)
    except (OSError, DiskError) as exc:
        return json_error(422, f"image {ref}: {exc}")
    finally:
        os.close(fd)


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/host", host)
    app.router.add_post("/v1/host/dedup-index", warm_dedup_index)
    app.router.add_post("/v1/host/disk-index", warm_disk_index)
