"""JSON errors: every failure a client sees is ``{"error": "..."}`` with a status code."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("novacron.coordinator.api")


class ApiError(Exception):
    """Raise from a handler to answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers  # e.g. Retry-After on a 503


def error_response(status: int, message: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.headers)
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, f"request body too large: {exc.text}")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = {404: "no such route", 405: f"method {request.method} not allowed here"}
        return error_response(exc.status, reason.get(exc.status, exc.reason))
    except Exception:
        # The client gets a generic line; the trace goes to the log (tokens scrubbed there).
        log.exception("unhandled error", extra={"method": request.method, "path": request.path})
        return error_response(500, "internal error")
