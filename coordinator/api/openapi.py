"""One declaration per route: the aiohttp registration, request validation and
the OpenAPI 3 document are all generated from it, so they cannot disagree.

A route module builds a :class:`RouteTable` and decorates its handlers::

    routes = RouteTable("hosts")

    @routes.post("/hosts/register", "Register an agent", auth="agent",
                 request=REGISTER_SCHEMA, response=HOST_SCHEMA)
    async def register(request: web.Request) -> web.Response:
        body = json_body(request)          # already parsed and schema-checked
        ...

Paths are relative to ``/api/v1``. ``{name}`` segments become string path
parameters. ``query`` declares query parameters as JSON schemas; their values
are converted (integer/number/boolean) and checked before the handler runs and
are available as ``query_params(request)``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import jsonschema
from aiohttp import web

from novacron import httpjson
from novacron.coordinator.api.errors import ApiError

API_PREFIX = "/api/v1"
Auth = Literal["public", "admin", "agent", "host"]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_BODY_KEY: web.RequestKey[Any] = web.RequestKey("novacron_body")
_QUERY_KEY: web.RequestKey[dict[str, Any]] = web.RequestKey("novacron_query", dict)

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
}

# Names are identifiers of hosts, VMs and migrations: safe in URLs, logs and file names.
NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$",
}


@lru_cache(maxsize=256)
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` with ECMA-262's ``$`` (end of string only), as JSON Schema means it.

    Python's ``$`` also matches before a trailing newline, so ``^[a-z]+$`` would
    accept ``"vm1\\n"``: a name that can never be addressed again.
    """
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "$":
            ch = r"\Z"
        out.append(ch)
        i += 1
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: Any, _schema: Any) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


# Draft 2020-12 with ECMA ``pattern`` semantics: every schema check of the coordinator uses it.
SchemaValidator: Any = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern})


@dataclass
class Route:
    method: str
    path: str  # relative to API_PREFIX
    summary: str
    handler: Handler
    auth: Auth
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    status: int
    query: dict[str, dict[str, Any]]
    required_query: tuple[str, ...]
    errors: tuple[int, ...]
    content_type: str
    tag: str
    validator: Any = field(default=None, repr=False)
    # optional hot-path shortcut: True only for bodies the schema certainly accepts;
    # anything else goes through jsonschema (which also words the error)
    fast_valid: Callable[[Any], bool] | None = field(default=None, repr=False)

    @property
    def full_path(self) -> str:
        return API_PREFIX + self.path

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"{(\w+)}", self.path)

    @property
    def operation_id(self) -> str:
        return f"{self.tag}_{self.handler.__name__}"


class RouteTable:
    """The routes of one feature module (its ``tag`` in the OpenAPI document)."""

    def __init__(self, tag: str, description: str = "") -> None:
        self.tag = tag
        self.description = description
        self.routes: list[Route] = []

    def route(
        self,
        method: str,
        path: str,
        summary: str,
        *,
        auth: Auth = "admin",
        request: dict[str, Any] | None = None,
        response: dict[str, Any] | None = None,
        status: int = 200,
        query: dict[str, dict[str, Any]] | None = None,
        required_query: tuple[str, ...] = (),
        errors: tuple[int, ...] = (),
        content_type: str = "application/json",
        fast_valid: Callable[[Any], bool] | None = None,
    ) -> Callable[[Handler], Handler]:
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")

        def decorate(handler: Handler) -> Handler:
            validator = None
            if request is not None:
                jsonschema.Draft202012Validator.check_schema(request)
                validator = SchemaValidator(request)
            self.routes.append(Route(
                method=method.upper(), path=path, summary=summary, handler=handler, auth=auth,
                request=request, response=response, status=status, query=query or {},
                required_query=required_query, errors=errors, content_type=content_type,
                tag=self.tag, validator=validator, fast_valid=fast_valid,
            ))
            return handler

        return decorate

    def get(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, summary, **kw)

    def post(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, summary, **kw)

    def put(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, summary, **kw)

    def delete(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, summary, **kw)

    def patch(self, path: str, summary: str, **kw: Any) -> Callable[[Handler], Handler]:
        return self.route("PATCH", path, summary, **kw)


# -- request handling -------------------------------------------------------------------------

def json_body(request: web.Request) -> Any:
    """The request's JSON body, already validated against the route's schema."""
    return request.get(_BODY_KEY)


def query_params(request: web.Request) -> dict[str, Any]:
    """The declared query parameters, converted to their schema types."""
    return request.get(_QUERY_KEY, {})


def _describe(err: jsonschema.ValidationError, where: str) -> str:
    path = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return f"{where}{path}: {err.message}"


def _convert_query(name: str, raw: str, schema: dict[str, Any]) -> Any:
    kind = schema.get("type")
    try:
        if kind == "integer":
            return int(raw)
        if kind == "number":
            return float(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name!r}: expected {kind}, got {raw!r}") from None
    if kind == "boolean":
        low = raw.lower()
        if low in ("true", "1"):
            return True
        if low in ("false", "0"):
            return False
        raise ApiError(400, f"query parameter {name!r}: expected true or false, got {raw!r}")
    return raw


def _wrap(route: Route) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        query: dict[str, Any] = {}
        for name, schema in route.query.items():
            if name not in request.query:
                if name in route.required_query:
                    raise ApiError(400, f"query parameter {name!r} is required")
                continue
            value = _convert_query(name, request.query[name], schema)
            errs = sorted(SchemaValidator(schema).iter_errors(value), key=str)
            if errs:
                raise ApiError(400, f"query parameter {name!r}: {errs[0].message}")
            query[name] = value
        request[_QUERY_KEY] = query
        for name in route.path_params:
            value = request.match_info.get(name, "")
            if not re.fullmatch(NAME_SCHEMA["pattern"], value):
                raise ApiError(400, f"path parameter {name!r}: not a valid name: {value!r}")
        if route.validator is not None:
            raw = await request.read()  # raises 413 beyond client_max_size
            if not raw:
                raise ApiError(400, "request body is required (JSON)")
            try:
                body = httpjson.loads(raw)
            except ValueError as exc:
                raise ApiError(400, f"request body is not valid JSON: {exc}") from None
            if route.fast_valid is None or not route.fast_valid(body):
                errors = sorted(route.validator.iter_errors(body),
                                key=lambda e: list(e.absolute_path))
                if errors:
                    raise ApiError(400, _describe(errors[0], "body"))
            request[_BODY_KEY] = body
        return await route.handler(request)

    handler.__name__ = route.handler.__name__
    return handler


def add_routes(app: web.Application, tables: list[RouteTable]) -> None:
    seen: set[tuple[str, str]] = set()
    for table in tables:
        for route in table.routes:
            key = (route.method, route.full_path)
            if key in seen:
                raise ValueError(f"route declared twice: {route.method} {route.full_path}")
            seen.add(key)
            app.router.add_route(route.method, route.full_path, _wrap(route))


# -- the document ----------------------------------------------------------------------------

_REASONS = {
    400: "Bad request: the error says which field is wrong",
    401: "Missing or wrong token",
    404: "No such resource",
    409: "Conflicts with the current state",
    413: "Request body too large",
    502: "An agent refused or could not be reached",
}


def build_document(tables: list[RouteTable], *, version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for table in tables:
        for route in table.routes:
            op: dict[str, Any] = {
                "summary": route.summary,
                "operationId": route.operation_id,
                "tags": [route.tag],
            }
            params: list[dict[str, Any]] = [
                {"name": p, "in": "path", "required": True, "schema": NAME_SCHEMA}
                for p in route.path_params
            ]
            params += [
                {"name": n, "in": "query", "required": n in route.required_query, "schema": s}
                for n, s in route.query.items()
            ]
            if params:
                op["parameters"] = params
            if route.request is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": route.request}},
                }
            ok: dict[str, Any] = {"description": "Success"}
            if route.response is not None:
                ok["content"] = {route.content_type: {"schema": route.response}}
            elif route.content_type != "application/json":
                ok["content"] = {route.content_type: {"schema": {"type": "string"}}}
            responses: dict[str, Any] = {str(route.status): ok}
            codes = set(route.errors)
            if route.request is not None or route.query or route.path_params:
                codes.add(400)
            if route.request is not None:
                codes.add(413)
            if route.auth != "public":
                codes.add(401)
                op["security"] = [{"bearer": []}]
            else:
                op["security"] = []
            if route.path_params:
                codes.add(404)
            for code in sorted(codes):
                responses[str(code)] = {
                    "description": _REASONS.get(code, "Error"),
                    "content": {"application/json": {"schema": ERROR_SCHEMA}},
                }
            op["responses"] = responses
            if route.auth == "agent":
                op["description"] = ("Authenticated with the agent (bootstrap) token; the host's "
                                     "identity is its TLS client certificate or its own token.")
            elif route.auth == "host":
                op["description"] = ("Authenticated with the host's own credential: its TLS "
                                     "client certificate, or its own API token as bearer.")
            paths.setdefault(route.full_path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "NovaCron coordinator API",
            "version": version,
            "description": "Fleet state, placement and live migration. Every route except "
            "health needs 'Authorization: Bearer <token>'.",
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": t.tag, "description": t.description} for t in tables],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": ERROR_SCHEMA},
        },
        "paths": paths,
    }
