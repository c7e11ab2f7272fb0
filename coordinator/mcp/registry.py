"""Swarms, agents and tasks the bridge created, kept in the coordinator's store.

They live as feature documents (collections ``mcp.swarms``, ``mcp.agents``,
``mcp.tasks``) so they survive a coordinator restart and a claude-flow
restart alike. Without a store (the benchmark, a bare client) they are held in
memory only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from novacron.coordinator.store import Store

Kind = Literal["swarm", "agent", "task"]
KINDS: tuple[Kind, ...] = ("swarm", "agent", "task")
FINISHED = {"completed", "failed", "cancelled", "terminated", "shutdown", "stopped", "not_found"}


def collection(kind: Kind) -> str:
    return f"mcp.{kind}s"


class BridgeRegistry:
    def __init__(self, store: Store | None = None) -> None:
        self.store = store
        self._memory: dict[Kind, dict[str, dict[str, Any]]] = {k: {} for k in KINDS}

    async def record(self, kind: Kind, key: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Merge ``fields`` into the entity's document (creating it) and return it."""
        now = time.time()
        doc = await self.get(kind, key) or {"id": key, "created_at": now}
        doc.update({k: v for k, v in fields.items() if v is not None})
        doc["updated_at"] = now
        if self.store is not None:
            await self.store.put_doc(collection(kind), key, doc)
        else:
            self._memory[kind][key] = doc
        return doc

    async def get(self, kind: Kind, key: str) -> dict[str, Any] | None:
        if self.store is not None:
            return await self.store.get_doc(collection(kind), key)
        doc = self._memory[kind].get(key)
        return dict(doc) if doc is not None else None

    async def list(self, kind: Kind, *, active_only: bool = False) -> list[dict[str, Any]]:
        if self.store is not None:
            docs = [doc for _key, doc in await self.store.list_docs(collection(kind))]
        else:
            docs = [dict(d) for d in self._memory[kind].values()]
        if active_only:
            docs = [d for d in docs if str(d.get("status", "")).lower() not in FINISHED]
        return sorted(docs, key=lambda d: d.get("created_at", 0))
