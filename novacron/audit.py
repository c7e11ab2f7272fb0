"""The audit log shared by coordinator and agents: who changed what, from where, with what result.

One JSON object per line in an append-only file::

    {"time": "2026-11-30T11:40:41.123+00:00", "actor": "admin", "remote": "10.0.0.5",
     "action": "POST /api/v1/vms/{name}/stop", "target": "web", "result": "ok", "status": 200,
     "duration_ms": 3.1}

What is recorded (by :func:`audit_middleware`): every request that is not GET, HEAD or
OPTIONS, after it completed; and every refused authentication (401/403, any method), at
most ``REFUSED_PER_WINDOW`` per remote address per ``REFUSED_WINDOW_S``, then one
``"action": "auth refused (suppressed)"`` line counting the rest. Request bodies are never
written, only the names they target; every line goes through the log redactor
(``novacron.logs.redact``) so a registered secret cannot reach the file.

Durability: each line is a single ``write(2)`` of at most ``MAX_LINE`` bytes (below
PIPE_BUF) on a descriptor opened ``O_APPEND``, so lines never interleave or tear, even
with several writers, and a line is in the kernel once the request is answered: a
``kill -9`` loses nothing already recorded. ``fsync`` (config ``audit_fsync``) also waits
for the disk before the reply, which survives power loss at the price of a disk flush per
state-changing request.

Rotation is left to the operator. Use logrotate's default mode (rename, then ``create
0600``): before each line the writer checks whether the path still names its open file
and reopens it if not, so no signal is needed. ``copytruncate`` also works with
``O_APPEND`` (writes land at the new end, no hole), but loses the lines written between
its copy and its truncate: avoid it. Queries read only the current file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from novacron.logs import redact

log = logging.getLogger("novacron.audit")

MAX_LINE = 4000  # bytes, newline included: below PIPE_BUF (4096), one atomic append
FIELD_LIMITS = {"actor": 128, "remote": 64, "action": 256, "target": 256}
REFUSED_PER_WINDOW = 10  # refused authentications recorded per address per window ...
REFUSED_WINDOW_S = 60.0  # ... the rest are counted in one summary line
MAX_TRACKED_ADDRESSES = 4096  # beyond this, new addresses share one bucket ("*")
MAX_QUERY_LIMIT = 1000
MAX_SCAN_BYTES = 32 << 20  # a query reads at most this much of the file's tail
READ_CHUNK = 64 << 10
UNCHANGING = frozenset({"GET", "HEAD", "OPTIONS"})
REFUSED_STATUSES = frozenset({401, 403})
SUPPRESSED_ACTION = "auth refused (suppressed)"

ACTOR: web.RequestKey[str] = web.RequestKey("novacron_audit_actor", str)
SKIP: web.RequestKey[bool] = web.RequestKey("novacron_audit_skip", bool)
AUDIT: web.AppKey[AuditLog] = web.AppKey("novacron_audit")

BodyOf = Callable[[web.Request], Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def iso_now(now: float | None = None) -> str:
    """ISO 8601 in UTC with its zone and milliseconds, e.g. 2026-11-30T11:40:41.123+00:00."""
    return datetime.fromtimestamp(time.time() if now is None else now, UTC).isoformat(timespec="milliseconds")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; one without a zone is taken as UTC. ValueError when it is not one."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def set_actor(request: web.Request, actor: str) -> None:
    """Which credential authenticated this request (called by the daemons' auth middleware)."""
    request[ACTOR] = actor


def skip(request: web.Request) -> None:
    """Leave this request out of the audit (high-rate telemetry such as heartbeats)."""
    request[SKIP] = True


def _clip(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _encode(entry: dict[str, Any]) -> bytes:
    """One redacted JSON line of at most MAX_LINE bytes (long strings are cut to fit)."""
    # Redact the values, not the JSON text: there a secret with a quote, backslash or
    # non-ASCII character is escaped and would no longer match.
    doc = {k: redact(v) if isinstance(v, str) else v for k, v in entry.items()}
    doc = {k: _clip(v, FIELD_LIMITS[k]) if k in FIELD_LIMITS and isinstance(v, str) else v
           for k, v in doc.items()}
    for _ in range(12):  # each pass halves the longest string: bounded
        line = (json.dumps(doc, default=str) + "\n").encode()
        if len(line) <= MAX_LINE:
            return line
        key = max((k for k, v in doc.items() if isinstance(v, str)), key=lambda k: len(doc[k]))
        doc[key] = _clip(doc[key], max(8, len(doc[key]) // 2))
        doc["truncated"] = True
    raise ValueError("audit entry cannot be made to fit one line")


@dataclass
class _Refusals:
    window_start: float
    recorded: int = 0
    suppressed: int = 0


class AuditLog:
    """The append-only audit file of one daemon.

    ``clock`` is injectable so tests can move rate-limit windows without waiting.
    """

    def __init__(self, path: Path, *, fsync: bool = False,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.fsync = fsync
        self.clock = clock
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._refusals: OrderedDict[str, _Refusals] = OrderedDict()
        self._last_error = 0.0

    # -- the file --------------------------------------------------------------------------

    def open(self) -> None:
        """Open (or create, mode 0600) the file for appending; raises OSError when it cannot."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise OSError(f"audit file {self.path} is not a regular file")
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)  # it names who did what from where: owner only
        self.close()
        self._fd, self._identity = fd, (info.st_dev, info.st_ino)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = self._identity = None

    def _current_fd(self) -> int:
        """The open descriptor, reopened when the path was rotated away or removed."""
        try:
            info = os.stat(self.path)
            moved = (info.st_dev, info.st_ino) != self._identity
        except FileNotFoundError:
            moved = True
        if self._fd is None or moved:
            self.open()
        assert self._fd is not None
        return self._fd

    def write(self, entry: dict[str, Any]) -> int | None:
        """Append one line now; returns the descriptor to fsync (when asked to), or None.

        A failing disk must not take the API down with it: the error goes to the log,
        at most once a minute, and the request is answered anyway.
        """
        try:
            line = _encode(entry)
            fd = self._current_fd()
            os.write(fd, line)  # O_APPEND: one write is one whole line at the end
            return fd if self.fsync else None
        except (OSError, ValueError) as exc:
            now = time.monotonic()
            if now - self._last_error >= 60:
                self._last_error = now
                log.error("cannot write the audit log", extra={"path": str(self.path), "error": str(exc)})
            return None

    async def record(self, **entry: Any) -> None:
        """Append an entry stamped with the current time (and flush expired refusal counts)."""
        now = self.clock()
        self._flush_suppressed(now)
        fd = self.write({"time": iso_now(now), **entry})
        if fd is not None:
            try:
                await asyncio.to_thread(os.fsync, fd)
            except OSError as exc:
                log.error("cannot fsync the audit log", extra={"path": str(self.path), "error": str(exc)})

    # -- refused authentications, rate-limited per address -----------------------------------

    async def refused(self, **entry: Any) -> None:
        """Record a refused authentication unless its address used up its window's quota."""
        now = self.clock()
        self._flush_suppressed(now)
        remote = str(entry.get("remote") or "-")
        key = remote if remote in self._refusals or len(self._refusals) < MAX_TRACKED_ADDRESSES else "*"
        state = self._refusals.get(key)
        if state is None:
            state = self._refusals[key] = _Refusals(window_start=now)
        if state.recorded >= REFUSED_PER_WINDOW:
            state.suppressed += 1
            return
        state.recorded += 1
        await self.record(**entry)

    def _flush_suppressed(self, now: float) -> None:
        """Write the summary of every window that ended; forget addresses that went quiet."""
        while self._refusals:
            key, state = next(iter(self._refusals.items()))
            if now - state.window_start < REFUSED_WINDOW_S:
                break  # ordered by window start: the rest are younger
            del self._refusals[key]
            if state.suppressed:
                self._write_summary(key, state, now)

    def _write_summary(self, key: str, state: _Refusals, now: float) -> None:
        self.write({"time": iso_now(now), "actor": "-", "remote": key, "action": SUPPRESSED_ACTION,
                    "target": "-", "result": "refused", "suppressed": state.suppressed,
                    "since": iso_now(state.window_start)})

    def flush_all(self) -> None:
        """Write every pending summary now (at shutdown)."""
        now = self.clock()
        for key, state in self._refusals.items():
            if state.suppressed:
                self._write_summary(key, state, now)
        self._refusals.clear()

    # -- queries -----------------------------------------------------------------------------

    async def query(self, **filters: Any) -> list[dict[str, Any]]:
        """Newest entries first that match ``filters`` (see :func:`query_file`), off the event loop."""
        return await asyncio.to_thread(query_file, self.path, **filters)


def _lines_backwards(path: Path, max_bytes: int) -> Iterator[bytes]:
    """The file's complete lines, last first, reading at most ``max_bytes`` of its tail."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return
    with f:
        end = f.seek(0, os.SEEK_END)
        floor = max(0, end - max_bytes)
        pos, rest = end, b""
        while pos > floor:
            size = min(READ_CHUNK, pos - floor)
            pos -= size
            f.seek(pos)
            chunk = f.read(size) + rest
            parts = chunk.split(b"\n")
            rest = parts[0]  # may be the tail of an earlier line: completed by the next chunk
            for line in reversed(parts[1:]):
                if line:
                    yield line
        if rest and floor == 0:
            yield rest  # the file's first line (a cut one at the scan limit is dropped)


def query_file(path: Path, *, since: datetime | None = None, until: datetime | None = None,
               actor: str | None = None, action: str | None = None, target: str | None = None,
               result: str | None = None, limit: int = 100,
               max_bytes: int = MAX_SCAN_BYTES) -> list[dict[str, Any]]:
    """Entries newest first. ``actor``, ``target`` and ``result`` match exactly; ``action``
    is a case-insensitive substring (``migrate`` finds ``POST /api/v1/migrations``)."""
    limit = max(1, min(limit, MAX_QUERY_LIMIT))
    needle = action.lower() if action else None
    found: list[dict[str, Any]] = []
    for raw in _lines_backwards(path, max_bytes):
        try:
            entry = json.loads(raw)
            when = parse_time(entry["time"])
        except (ValueError, KeyError, TypeError):
            continue  # not ours (an operator's edit, a cut line): skip rather than fail
        if since is not None and when < since:
            break  # appended in time order: everything further back is older still
        if until is not None and when > until:
            continue
        if actor is not None and entry.get("actor") != actor:
            continue
        if target is not None and entry.get("target") != target:
            continue
        if result is not None and entry.get("result") != result:
            continue
        if needle is not None and needle not in str(entry.get("action", "")).lower():
            continue
        found.append(entry)
        if len(found) >= limit:
            break
    return found


# -- the middleware --------------------------------------------------------------------------

def result_of(status: int) -> str:
    if status in REFUSED_STATUSES:
        return "refused"
    return "ok" if status < 400 else "error"


def _action_and_target(request: web.Request, body_of: BodyOf | None) -> tuple[str, str]:
    """``POST /api/v1/vms/{name}/stop`` and ``web``: the route template, the names it acts on."""
    info = request.match_info
    resource = info.route.resource  # None when no route matched
    template = resource.canonical if resource is not None else request.path
    params = dict(info)
    if "action" in params:  # a verb in the path (agent: /v1/vms/{name}/{action}) belongs to the action
        template = template.replace("{action}", params.pop("action"))
    names = [v for v in params.values() if v]
    body = body_of(request) if body_of is not None and resource is not None else None
    if not names and isinstance(body, dict):
        names = [v for k in ("name", "vm") if isinstance(v := body.get(k), str)][:1]
    if isinstance(body, dict) and isinstance(body.get("target"), str):
        names.append("-> " + body["target"])  # a migration's destination host
    return f"{request.method} {template}", " ".join(names) or "-"


def audit_middleware(audit: AuditLog, *, body_of: BodyOf | None = None) -> Any:
    """Record state-changing requests and refused authentications; put it outermost so it
    sees the final status of every reply (also the errors other middlewares make)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            if status in REFUSED_STATUSES or (request.method not in UNCHANGING and not request.get(SKIP)):
                action, target = _action_and_target(request, body_of)
                entry = {"actor": request.get(ACTOR, "-"), "remote": request.remote or "-",
                         "action": action, "target": target, "result": result_of(status),
                         "status": status, "duration_ms": round((time.monotonic() - started) * 1000, 1)}
                if status in REFUSED_STATUSES:
                    await audit.refused(**entry)
                else:
                    await audit.record(**entry)

    return middleware


def install(app: web.Application, audit: AuditLog) -> None:
    """Put ``audit`` on the app, opened at start-up and closed (pending summaries written) at exit."""
    app[AUDIT] = audit

    async def lifecycle(_app: web.Application) -> Any:
        try:
            audit.open()
        except OSError as exc:  # a daemon that cannot audit does not start
            reason = exc.strerror or str(exc)
            raise SystemExit(f"cannot open the audit file {audit.path}: {reason}") from None
        yield
        audit.flush_all()
        audit.close()

    app.cleanup_ctx.append(lifecycle)


# -- the query endpoints' shared parsing -----------------------------------------------------

QUERY_KEYS = ("since", "until", "actor", "action", "target", "result", "limit")


def parse_query(query: Any) -> dict[str, Any]:
    """Filters from ``?since=&until=&actor=&action=&target=&result=&limit=``; ValueError naming
    the bad one. Strings are bounded, limit is 1..MAX_QUERY_LIMIT (default 100)."""
    out: dict[str, Any] = {}
    for key in ("since", "until"):
        if key in query:
            try:
                out[key] = parse_time(query[key])
            except ValueError:
                raise ValueError(f"{key}: expected an ISO 8601 time, got {query[key]!r}") from None
    for key in ("actor", "action", "target", "result"):
        if key in query:
            if len(query[key]) > 256:
                raise ValueError(f"{key}: at most 256 characters")
            out[key] = query[key]
    if "limit" in query:
        try:
            limit = int(query["limit"])
        except ValueError:
            raise ValueError(f"limit: expected an integer, got {query['limit']!r}") from None
        if not 1 <= limit <= MAX_QUERY_LIMIT:
            raise ValueError(f"limit: expected 1..{MAX_QUERY_LIMIT}")
        out["limit"] = limit
    return out
