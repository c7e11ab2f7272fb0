"""JSON over HTTP as NovaCron's services speak it: a document, or ``{"error": ...}`` with a 4xx/5xx.

Shared by the coordinator's client of the agents and the CLI's client of the
coordinator. Bodies are read with a cap, so a broken or hostile peer cannot
make the reader buffer without bound.

:func:`loads` is the one strict parser every service uses for what a peer sends
(request bodies, answers, control messages): standard JSON only (no ``NaN`` or
``Infinity``, no number that overflows to one) and nesting at most
``MAX_DEPTH`` deep. :func:`dumps` never emits a non-finite number.
"""

from __future__ import annotations

import base64
import json
import math
import os
from typing import Any

import aiohttp

MAX_RESPONSE_BYTES = 64 << 20
MAX_DEPTH = 64  # arrays/objects inside each other; none of our documents comes close


class BadJson(ValueError):
    """Not JSON we accept; the message says why (for a 400)."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999
        raise BadJson(f"number {text[:32]} is out of range")
    return value


def _non_standard(name: str) -> Any:
    raise BadJson(f"{name} is not a JSON number")


def _check_depth(doc: Any) -> None:
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= MAX_DEPTH:
                    raise BadJson(f"nested deeper than {MAX_DEPTH} levels")
                stack.append((child, depth + 1))


def loads(raw: str | bytes | bytearray) -> Any:
    """Parse ``raw`` strictly; :class:`BadJson` (a ValueError) says what is wrong."""
    try:
        doc = json.loads(raw, parse_float=_finite, parse_constant=_non_standard)
    except BadJson:
        raise
    except RecursionError:  # the C scanner's own limit, far beyond MAX_DEPTH
        raise BadJson(f"nested deeper than {MAX_DEPTH} levels") from None
    except UnicodeDecodeError as exc:
        raise BadJson(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise BadJson(str(exc)) from None
    _check_depth(doc)
    return doc


def _finite_only(doc: Any) -> Any:
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: _finite_only(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_finite_only(v) for v in doc]
    return doc


def dumps(doc: Any, *, separators: tuple[str, str] | None = None) -> str:
    """``doc`` as standard JSON: a non-finite float (from older records) becomes null."""
    try:
        return json.dumps(doc, allow_nan=False, separators=separators)
    except ValueError:  # rare: only then pay for the copy
        return json.dumps(_finite_only(doc), allow_nan=False, separators=separators)


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
        return loads(body) if body else None
    except ValueError:  # also bad UTF-8, NaN or nesting
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


async def websocket_refusal(session: aiohttp.ClientSession, url: str, *,
                            headers: dict[str, str] | None = None, server_hostname: str | None = None) -> str:
    """Why a WebSocket handshake to ``url`` was refused: aiohttp keeps the refusal's body
    from us, so the upgrade is asked again as a plain request and its error read ('' if none)."""
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), **(headers or {})}
    kwargs: dict[str, Any] = {"headers": upgrade, "timeout": aiohttp.ClientTimeout(total=30)}
    if server_hostname is not None:
        kwargs["server_hostname"] = server_hostname
    try:
        async with session.get(url, **kwargs) as resp:
            if resp.status < 400:
                return ""
            return error_message(await read_json(resp))
    except (aiohttp.ClientError, TimeoutError, ResponseTooLarge):
        return ""
