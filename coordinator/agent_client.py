"""HTTP client for the agents' API (``/v1/...`` with the agent's bearer token)."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp

log = logging.getLogger("novacron.coordinator.agents")


class AgentError(Exception):
    """An agent refused a request (``status`` is its HTTP status) or was unreachable (0)."""

    def __init__(self, host: str, message: str, status: int = 0) -> None:
        super().__init__(f"agent {host}: {message}")
        self.host, self.message, self.status = host, message, status


class AgentClient:
    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self, host: str, url: str, token: str, method: str, path: str,
        body: dict[str, Any] | None = None, timeout_s: float | None = None,
    ) -> Any:
        if self._session is None:
            raise RuntimeError("agent client is not started")
        headers = {"Authorization": f"Bearer {token}"}
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s else None
        try:
            async with self._session.request(
                method, url.rstrip("/") + path, json=body, headers=headers, timeout=timeout,
            ) as resp:
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    doc = None
                if resp.status >= 400:
                    msg = doc.get("error") if isinstance(doc, dict) else None
                    raise AgentError(host, str(msg or f"HTTP {resp.status}"), resp.status)
                return doc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise AgentError(host, f"unreachable: {type(exc).__name__}: {exc}") from None
