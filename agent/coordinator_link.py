"""The agent side of registration: register with the coordinator, then heartbeat.

An agent (or anything speaking for one) runs ``CoordinatorLink.run()``: it
registers with ``POST /api/v1/hosts/register`` (the shared bootstrap agent token),
heartbeats with its own credential (its TLS certificate, or its own API token) at
the interval the coordinator answers, learns the coordinator's grant key, re-registers when the coordinator has
forgotten the host (404), and backs off while the coordinator is unreachable.

``host_info()`` returns the agent's ``GET /v1/host`` document; the link adds
the agent's own API URL and token, which the coordinator needs to drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl as ssl_
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter

from novacron.coordinator.client import ApiClientError, CoordinatorClient

log = logging.getLogger("novacron.agent.coordinator_link")

REGISTER_FIELDS = ("name", "cpus", "memory_bytes", "memory_available_bytes", "accel",
                   "data_port", "networks", "cpu_models", "cpu_signature", "version", "vms")
HEARTBEAT_FIELDS = ("memory_available_bytes", "vms", "load")
INTERVAL_RANGE_S = (0.05, 300.0)  # a 0 or absurd answer must neither spin nor silence the link


def _interval(reply: Any, current: float) -> float:
    """The heartbeat interval the coordinator asked for, kept within INTERVAL_RANGE_S."""
    raw = reply.get("heartbeat_interval_s", current) if isinstance(reply, dict) else current
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return current
    if value != value:  # NaN
        return current
    low, high = INTERVAL_RANGE_S
    return min(max(value, low), high)


class CoordinatorLink:
    def __init__(self, coordinator_url: str, coordinator_token: str, agent_url: str,
                 agent_token: str, host_info: Callable[[], Awaitable[dict[str, Any]]], *,
                 ssl: ssl_.SSLContext | None = None,
                 on_registered: Callable[[dict[str, Any]], None] | None = None,
                 heartbeats: Counter | None = None) -> None:
        self.coordinator_url, self.coordinator_token = coordinator_url, coordinator_token
        self.heartbeats = heartbeats  # novacron_agent_heartbeats_total{result}
        self.agent_url, self.agent_token = agent_url, agent_token
        self.host_info = host_info
        self.ssl = ssl  # fleet CA + this host's certificate: the coordinator knows us by it
        self.on_registered = on_registered
        self.interval_s = 5.0
        self.registered = asyncio.Event()
        self.beats = 0
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Heartbeat now rather than at the next interval (a VM changed; libvirt domain
        events). Pokes that come while a heartbeat is on its way fold into the next one."""
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def register(self, client: CoordinatorClient) -> None:
        info = await self.host_info()
        body = {k: info[k] for k in REGISTER_FIELDS if info.get(k) is not None}
        body.update(url=self.agent_url, token=self.agent_token)
        reply = await client.register_host(body, self.coordinator_token)
        if self.on_registered is not None and isinstance(reply, dict):
            self.on_registered(reply)
        self.interval_s = _interval(reply, self.interval_s)
        self.registered.set()
        log.info("registered with the coordinator",
                 extra={"coordinator": self.coordinator_url, "host": body["name"]})

    async def heartbeat(self, client: CoordinatorClient) -> None:
        info = await self.host_info()
        body = {k: info[k] for k in HEARTBEAT_FIELDS if info.get(k) is not None}
        try:
            # the bootstrap token only registers; heartbeats carry this host's own credential
            reply = await client.heartbeat(str(info["name"]), body, self.agent_token)
        except ApiClientError as exc:
            if exc.status == 404:  # the coordinator lost us (new database): register again
                await self.register(client)
                return
            raise
        self.interval_s = _interval(reply, self.interval_s)
        self.beats += 1

    def _count(self, result: str) -> None:
        if self.heartbeats is not None:
            self.heartbeats.labels(result).inc()

    async def run(self) -> None:
        """Register, then heartbeat until cancelled."""
        backoff = 0.5
        async with CoordinatorClient(self.coordinator_url, self.coordinator_token,
                                     timeout_s=10, ssl=self.ssl) as client:
            while True:
                try:
                    if not self.registered.is_set():
                        await self.register(client)
                    else:
                        await self.heartbeat(client)
                        self._count("ok")
                    backoff = 0.5
                    await self._pause(self.interval_s)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the link outlives any one failure (agent or coordinator)
                    status = exc.status if isinstance(exc, ApiClientError) else 0
                    if self.registered.is_set():
                        self._count("shed" if status == 503 else "error")
                    log.warning("coordinator link failed; retrying",
                                extra={"error": str(exc), "status": status})
                    if status in (400, 401):
                        self.registered.clear()
                    if status == 503:  # shedding load: come back in an interval or two, spread out
                        await asyncio.sleep(self.interval_s * random.uniform(1.0, 2.0))
                        continue
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
