"""HTTP client for the agents' API (``/v1/...`` with the agent's bearer token)."""

from __future__ import annotations

import logging
import ssl as ssl_
from typing import Any

import aiohttp

from novacron.httpjson import HttpError, ResponseTooLarge, request_json, websocket_refusal

log = logging.getLogger("novacron.coordinator.agents")


class AgentError(Exception):
    """An agent refused a request (``status`` is its HTTP status) or was unreachable (0).
    ``sent`` is False when the request certainly never reached the agent (no connection)."""

    def __init__(self, host: str, message: str, status: int = 0, *, sent: bool = True) -> None:
        super().__init__(f"agent {host}: {message}")
        self.host, self.message, self.status, self.sent = host, message, status, sent


def reported_state(status: Any, default: str) -> str:
    """The VM state an agent's reply reports, ``default`` when it reports none."""
    state = status.get("state") if isinstance(status, dict) else None
    return state if isinstance(state, str) and state else default


class AgentClient:
    def __init__(self, timeout_s: float = 30.0, ssl: ssl_.SSLContext | None = None) -> None:
        self.timeout_s = timeout_s
        self.ssl = ssl  # fleet CA + the coordinator's certificate: mutual TLS to https agents
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(ssl=self.ssl) if self.ssl is not None else None
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                                              connector=connector)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ws_connect(self, host: str, url: str, token: str, path: str) -> aiohttp.ClientWebSocketResponse:
        """A WebSocket to an agent (the console); AgentError as for ``call``."""
        if self._session is None:
            raise RuntimeError("agent client is not started")
        headers = {"Authorization": f"Bearer {token}"}
        server_hostname = host if self.ssl is not None else None
        try:
            return await self._session.ws_connect(
                url.rstrip("/") + path, headers=headers, heartbeat=30.0,
                timeout=aiohttp.ClientWSTimeout(ws_close=10.0), server_hostname=server_hostname)
        except aiohttp.WSServerHandshakeError as exc:
            why = await websocket_refusal(self._session, url.rstrip("/") + path, headers=headers,
                                          server_hostname=server_hostname)
            raise AgentError(host, why or exc.message or f"HTTP {exc.status}", exc.status) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise AgentError(host, f"unreachable: {type(exc).__name__}: {exc}") from None

    async def call(
        self, host: str, url: str, token: str, method: str, path: str,
        body: dict[str, Any] | None = None, timeout_s: float | None = None,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("agent client is not started")
        # no timeout_s: the session's (without it aiohttp would wait for ever)
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            # With TLS the agent must show the certificate of the host we mean, not just any
            # fleet certificate: the token below is that host's alone.
            return await request_json(self._session, method, url.rstrip("/") + path, body=body,
                                      headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                                      server_hostname=host if self.ssl is not None else None)
        except HttpError as exc:
            raise AgentError(host, exc.message or f"HTTP {exc.status}", exc.status) from None
        except ResponseTooLarge as exc:
            raise AgentError(host, str(exc)) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # no connection, no request; any later failure may have lost an answer
            sent = not isinstance(exc, (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
            raise AgentError(host, f"unreachable: {type(exc).__name__}: {exc}", sent=sent) from None
