"""Publish/subscribe for live progress (SSE streams subscribe here).

Events reach this process's subscribers at once. With a store shared by
several coordinators (PostgreSQL), each event is also sent to the others
(``Store.notify``, LISTEN/NOTIFY), in publishing order, so an SSE client on
one coordinator sees a migration followed by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from novacron.coordinator.store import Store

log = logging.getLogger("novacron.coordinator.events")

CHANNEL = "novacron_events"
OUTBOX = 10_000  # events waiting to go to other coordinators; past that the oldest are dropped


class Subscription:
    def __init__(self, hub: EventHub, topic: str, maxsize: int) -> None:
        self.hub, self.topic = hub, topic
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)

    def put(self, event: dict[str, Any]) -> None:
        # A slow reader loses the oldest updates, never the newest: progress is a snapshot.
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(event)

    async def get(self, timeout: float) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    def close(self) -> None:
        subs = self.hub._subs.get(self.topic)
        if subs is not None:
            subs.discard(self)
            if not subs:  # topics are per migration: drop the empty ones, or they pile up
                del self.hub._subs[self.topic]

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    def __init__(self, store: Store | None = None, origin: str = "") -> None:
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)
        self.store, self.origin = store, origin
        self._outbox: asyncio.Queue[str] | None = None
        self._sender: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Exchange events with other coordinators sharing the (open) store."""
        if self.store is None or not await self.store.listen(CHANNEL, self._received):
            return  # no other coordinators can share this store
        self._outbox = asyncio.Queue(OUTBOX)
        self._sender = asyncio.create_task(self._send(self.store, self._outbox), name="event-sender")

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        self._sender = self._outbox = None

    async def _send(self, store: Store, outbox: asyncio.Queue[str]) -> None:
        while True:
            payload = await outbox.get()
            try:
                if not await store.notify(CHANNEL, payload):
                    continue
            except Exception as exc:  # other coordinators' clients re-read when idle
                log.warning("event not sent to other coordinators", extra={"error": str(exc)})

    def _received(self, _channel: str, payload: str) -> None:
        try:
            doc = json.loads(payload)
            if doc["origin"] == self.origin:
                return  # our own, delivered when published
            topic, event = str(doc["topic"]), doc["event"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable event from another coordinator")
            return
        self._deliver(topic, event)

    def subscribe(self, topic: str, maxsize: int = 64) -> Subscription:
        sub = Subscription(self, topic, maxsize)
        self._subs[topic].add(sub)
        return sub

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        self._deliver(topic, event)
        if self._outbox is not None:
            if self._outbox.full():
                self._outbox.get_nowait()
            self._outbox.put_nowait(json.dumps({"origin": self.origin, "topic": topic,
                                                "event": event}))

    def _deliver(self, topic: str, event: dict[str, Any]) -> None:
        for sub in list(self._subs.get(topic, ())):
            sub.put(event)

    def subscribers(self, topic: str) -> int:
        return len(self._subs.get(topic, ()))
