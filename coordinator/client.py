"""Async client of the coordinator's REST API (used by the CLI, the demo and benchmarks)."""

from __future__ import annotations

import json
import ssl as ssl_
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import aiohttp

from novacron.httpjson import (
    HttpError,
    ResponseTooLarge,
    error_message,
    read_json,
    request_json,
    websocket_refusal,
)

MAX_EVENT_BYTES = 1 << 20  # one server-sent event; a migration's state is a few hundred bytes


class ApiClientError(Exception):
    """The coordinator answered an error (``status``) or could not be reached (0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.status, self.message = status, message


class CoordinatorClient:
    def __init__(self, server: str, token: str, *, timeout_s: float = 150.0,
                 ssl: ssl_.SSLContext | None = None) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self.ssl = ssl  # verifies the coordinator (fleet CA); None: the system's CAs
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> CoordinatorClient:
        self._session = aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            connector=aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None,
        )
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use 'async with CoordinatorClient(...)'")
        return self._session

    async def request(self, method: str, path: str, body: Any = None,
                      token: str | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            return await request_json(self.session, method, f"{self.server}/api/v1{path}", body=body,
                                      headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        except HttpError as exc:
            raise ApiClientError(exc.status, exc.message or exc.reason) from None
        except ResponseTooLarge as exc:
            raise ApiClientError(0, f"{self.server}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiClientError(0, f"cannot reach the coordinator at {self.server}: "
                                 f"{type(exc).__name__}: {exc}") from None

    async def console(self, name: str, history: int = 0) -> aiohttp.ClientWebSocketResponse:
        """A WebSocket to VM ``name``'s serial console (``GET /vms/NAME/console``)."""
        url = f"{self.server}/api/v1/vms/{name}/console?history={history}"
        try:
            return await self.session.ws_connect(url, heartbeat=30.0)
        except aiohttp.WSServerHandshakeError as exc:
            why = await websocket_refusal(self.session, url)
            raise ApiClientError(exc.status, why or exc.message) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiClientError(0, f"cannot reach the coordinator at {self.server}: "
                                 f"{type(exc).__name__}: {exc}") from None

    async def health(self) -> dict[str, Any]:
        return dict(await self.request("GET", "/health"))

    async def hosts(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/hosts"))["hosts"])

    async def vms(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/vms"))["vms"])

    async def vm(self, name: str) -> dict[str, Any]:
        return dict(await self.request("GET", f"/vms/{name}"))

    async def create_vm(self, spec: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.request("POST", "/vms", spec))

    async def delete_vm(self, name: str, *, force: bool = False) -> dict[str, Any]:
        return dict(await self.request("DELETE", f"/vms/{name}" + ("?force=true" if force else "")))

    async def migrate(self, vm: str, target: str, options: dict[str, Any] | None = None, *,
                      force: bool = False, policy: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"vm": vm, "target": target}
        if options:
            body["options"] = options
        if policy:
            body["policy"] = policy
        if force:
            body["force"] = True
        return dict(await self.request("POST", "/migrations", body))

    async def migration(self, mig_id: str) -> dict[str, Any]:
        return dict(await self.request("GET", f"/migrations/{mig_id}"))

    async def cancel_migration(self, mig_id: str) -> dict[str, Any]:
        return dict(await self.request("POST", f"/migrations/{mig_id}/cancel"))

    async def change_migration(self, mig_id: str, limits: dict[str, Any]) -> dict[str, Any]:
        return dict(await self.request("PATCH", f"/migrations/{mig_id}", limits))

    async def register_host(self, body: dict[str, Any], agent_token: str) -> dict[str, Any]:
        return dict(await self.request("POST", "/hosts/register", body, token=agent_token))

    async def heartbeat(self, name: str, body: dict[str, Any], host_token: str) -> dict[str, Any]:
        return dict(await self.request("POST", f"/hosts/{name}/heartbeat", body,
                                       token=host_token))

    async def forget_host(self, name: str, *, retire: bool) -> dict[str, Any]:
        retired = "true" if retire else "false"
        return dict(await self.request("DELETE", f"/hosts/{name}?retire={retired}"))

    async def migration_events(self, mig_id: str) -> AsyncIterator[dict[str, Any]]:
        """The migration's state now and each change until it ends (server-sent events)."""
        url = f"{self.server}/api/v1/migrations/{mig_id}/events"
        try:
            async with self.session.get(url) as resp:
                if resp.status >= 400:
                    message = error_message(await read_json(resp))
                    raise ApiClientError(resp.status, message or resp.reason or "")
                data: list[str] = []
                size = 0
                async for raw in resp.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip())
                        size += len(raw)
                        if size > MAX_EVENT_BYTES:
                            raise ValueError(f"an event is over {MAX_EVENT_BYTES} bytes")
                    elif not line and data:
                        yield json.loads("\n".join(data))
                        data, size = [], 0
        except (aiohttp.ClientError, TimeoutError, ResponseTooLarge) as exc:
            raise ApiClientError(0, f"progress stream broke: {type(exc).__name__}: {exc}") \
                from None
        except ValueError as exc:  # bad UTF-8 or JSON, or an endless event
            raise ApiClientError(0, f"progress stream sent a bad event: {exc}") from None
