"""``GET /v1/images``: the images a VM spec may name on this host."""

from __future__ import annotations

import asyncio

from aiohttp import web

from novacron.agent.appkeys import VMS


async def list_images(request: web.Request) -> web.Response:
    images = request.app[VMS].images
    found = await asyncio.to_thread(images.listing)  # walks folders: keep it off the loop
    return web.json_response({"dirs": [str(d) for d in images.dirs], "images": found})


def setup(app: web.Application) -> None:
    app.router.add_get("/v1/images", list_images)
