"""JSON over HTTP as NovaCron's services speak it: a document, or ``{"error": ...}`` with a 4xx/5xx.

Shared by the coordinator's client of the agents and the CLI's client of the
coordinator. Bodies are read with a cap, so a broken or hostile peer cannot
make the reader buffer without bound.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

MAX_RESPONSE_BYTES = 64 << 20


class HttpError(Exception):
    """The peer answered ``status`` >= 400; ``message`` is its ``error`` field ('' if none)."""

    def __init__(self, status: int, message: str, reason: str) -> None:
        super().__init__(message or reason or f"HTTP {status}")
        self.status, self.message, self.reason = status, message, reason


class ResponseTooLarge(Exception):
    pass


def error_message(doc: Any) -> str:
    """The ``error`` field of an error document, '' when there is none."""
    msg = doc.get("error") if isinstance(doc, dict) else None
    return str(msg) if msg else ""


async def read_json(resp: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES) -> Any:
    """The body parsed as JSON, or None when it is not JSON; at most ``limit`` bytes are read."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ResponseTooLarge(f"response of {resp.content_length} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in resp.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise ResponseTooLarge(f"response is over the {limit}-byte limit")
    try:
        return json.loads(body) if body else None
    except ValueError:  # also bad UTF-8
        return None


async def request_json(session: aiohttp.ClientSession, method: str, url: str, *, body: Any = None,
                       headers: dict[str, str] | None = None,
                       timeout: aiohttp.ClientTimeout | None = None,
                       limit: int = MAX_RESPONSE_BYTES, server_hostname: str | None = None) -> Any:
    """The answer's JSON document; :class:`HttpError` for a status >= 400.

    ``server_hostname``: over https, the name the server's certificate must be
    for (instead of the URL's host). Connection failures and timeouts propagate
    as aiohttp raises them.
    """
    kwargs: dict[str, Any] = {"json": body, "headers": headers}
    if timeout is not None:
        kwargs["timeout"] = timeout
    if server_hostname is not None:
        kwargs["server_hostname"] = server_hostname
    async with session.request(method, url, **kwargs) as resp:
        doc = await read_json(resp, limit)
        if resp.status >= 400:
            raise HttpError(resp.status, error_message(doc), resp.reason or "")
        return doc
