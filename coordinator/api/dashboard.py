"""The operators' web dashboard: three static files served at ``/dashboard``.

The page carries no data and needs no token; its script calls ``/api/v1`` with
the bearer token the operator pastes in. The files are a fixed allow-list read
once from the package, so no request path ever reaches the file system.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

from novacron.coordinator.api.openapi import RouteTable

# No /api/v1 routes here: an empty table keeps the service's module contract.
routes = RouteTable("dashboard", "No API routes: the web dashboard is served at /dashboard")

PAGE_PATH = "/dashboard"

# Everything from our own origin; no inline script or style, no framing.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

# served name -> content type
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}

_FILES: web.AppKey[dict[str, bytes]] = web.AppKey("dashboard_files", dict)


def load_files() -> dict[str, bytes]:
    root = resources.files("novacron.coordinator.dashboard")
    return {name: root.joinpath(name).read_bytes() for name in ASSETS}


def _file_response(request: web.Request, name: str) -> web.Response:
    body = request.app[_FILES][name]
    return web.Response(body=body, content_type=ASSETS[name], charset="utf-8",
                        headers=SECURITY_HEADERS)


async def page(request: web.Request) -> web.Response:
    return _file_response(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["file"]
    if name not in ASSETS:
        raise web.HTTPNotFound()  # the error middleware turns this into a JSON 404
    return _file_response(request, name)


async def root(request: web.Request) -> web.Response:
    raise web.HTTPFound(PAGE_PATH)


def setup(app: web.Application) -> None:
    app[_FILES] = load_files()
    app.router.add_get("/", root)
    app.router.add_get(PAGE_PATH, page)
    app.router.add_get(PAGE_PATH + "/", page)
    app.router.add_get(PAGE_PATH + "/{file}", asset)
