"""In-process publish/subscribe for live progress (SSE streams subscribe here)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any


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
    def __init__(self) -> None:
        self._subs: defaultdict[str, set[Subscription]] = defaultdict(set)

    def subscribe(self, topic: str, maxsize: int = 64) -> Subscription:
        sub = Subscription(self, topic, maxsize)
        self._subs[topic].add(sub)
        return sub

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        for sub in list(self._subs.get(topic, ())):
            sub.put(event)

    def subscribers(self, topic: str) -> int:
        return len(self._subs.get(topic, ()))
