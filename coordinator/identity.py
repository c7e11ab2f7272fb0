"""One identity per host: who an agent is, and the name it is bound to.

An agent's identity is its TLS client certificate's common name when it
connects over TLS (``cert:<CN>``, verified against the fleet CA by the TLS
layer), otherwise a digest of its own per-host API token (``token:<sha256>``).
The shared bootstrap ``agent_token`` only lets an agent register; the first
registration of a name binds the name to the registering identity, and from
then on only that identity may register or heartbeat the name. An admin
releases a name by retiring the host (``DELETE /api/v1/hosts/{name}?retire=true``).

Bindings live in the store; this process caches them so heartbeats (the hot
path) cost no extra query. A mismatch is re-read from the store before it is
refused, so a retire done by another coordinator is seen.
"""

from __future__ import annotations

import hashlib
import logging

from aiohttp import web

from novacron import tls
from novacron.coordinator.store import Store

log = logging.getLogger("novacron.coordinator.identity")

MIN_TOKEN_CHARS = 16


def request_identity(request: web.Request, host_token: str | None) -> str | None:
    """The caller's host identity: its certificate if it showed one, else its token."""
    cn = tls.peer_common_name(request.transport)
    if cn:
        return f"cert:{cn}"
    if host_token and len(host_token) >= MIN_TOKEN_CHARS:
        return "token:" + hashlib.sha256(host_token.encode()).hexdigest()
    return None


def describe(identity: str) -> str:
    """For logs and errors: a certificate's name, never a token's digest."""
    return identity if identity.startswith("cert:") else "a per-host token"


class HostIdentities:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cache: dict[str, str] = {}

    async def bound(self, name: str, *, fresh: bool = False) -> str | None:
        if not fresh and name in self._cache:
            return self._cache[name]
        identity = await self.store.get_host_identity(name)
        if identity is None:
            self._cache.pop(name, None)
        else:
            self._cache[name] = identity
        return identity

    async def claim(self, name: str, identity: str, now: float) -> bool:
        """Bind ``name`` to ``identity`` if it is free; True if it is bound to it now.
        Always asks the store (registrations are rare; the store decides races)."""
        holder = await self.store.bind_host_identity(name, identity, now)
        self._cache[name] = holder
        return holder == identity

    async def matches(self, name: str, identity: str) -> bool | None:
        """True/False: ``name`` is bound to ``identity`` or to another; None: not bound."""
        holder = await self.bound(name)
        if holder != identity:
            holder = await self.bound(name, fresh=True)
        return None if holder is None else holder == identity

    async def release(self, name: str) -> bool:
        self._cache.pop(name, None)
        return await self.store.release_host_identity(name)
