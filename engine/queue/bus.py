"""In-process publish/subscribe of job events, so adapters learn of progress without polling the database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from engine.jobs import JobEvent


class Subscription:
    """One subscriber's inbox; iterate it, close it when done."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._inbox: asyncio.Queue[JobEvent] = asyncio.Queue()

    def deliver(self, event: JobEvent) -> None:
        self._inbox.put_nowait(event)

    async def get(self) -> JobEvent:
        return await self._inbox.get()

    def caught_up(self) -> bool:
        """Every event delivered so far has been taken: the end of a burst (requests sent at once, say)."""
        return self._inbox.empty()

    def close(self) -> None:
        self._bus.unsubscribe(self)

    async def __aiter__(self) -> AsyncIterator[JobEvent]:
        while True:
            yield await self._inbox.get()


class EventBus:
    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []

    def subscribe(self) -> Subscription:
        subscription = Subscription(self)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def publish(self, event: JobEvent) -> None:
        for subscription in list(self._subscriptions):
            subscription.deliver(event)
