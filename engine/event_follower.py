"""Job events of other processes (a worker's progress, a serving process's cancel), published in this process as if
they were its own: PostgreSQL's LISTEN/NOTIFY wakes the follower at once, and a SQLite file is polled a few times a
second. The events only say what changed; the state itself is read from the tables."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from engine.queue import JobQueue

# Ids are handed out when a row is inserted but become visible when its transaction commits, so on PostgreSQL an
# event may appear behind one already read. Each look goes back this many ids, and ids already published are skipped.
LOOK_BACK_IDS = 200
SEEN_KEPT = 2000
FORGET_EVERY_S = 60.0


class EventFollower:
    """Run `follow()` as a supervised task; a restart goes on after the last event it published."""

    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue
        self._last: int | None = None
        self._seen: deque[int] = deque(maxlen=SEEN_KEPT)
        self._seen_set: set[int] = set()

    async def follow(self) -> None:
        queue = self._queue
        if self._last is None:
            self._last = await queue.last_shared_event()
        wake = asyncio.Event()
        forgot_at = time.monotonic()
        async with queue.listen(wake.set) as listening:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=queue.event_poll_s)
                wake.clear()
                if not listening():
                    raise ConnectionError("the database connection that listens for events of other processes closed")
                await self._publish_new()
                if time.monotonic() - forgot_at >= FORGET_EVERY_S:
                    forgot_at = time.monotonic()
                    await queue.forget_shared_events()

    async def _publish_new(self) -> None:
        assert self._last is not None
        shared = await self._queue.shared_events_after(self._last - LOOK_BACK_IDS, skip=self._seen_set)
        for event_id, event in shared:
            self._remember(event_id)
            self._last = max(self._last, event_id)
            self._queue.events.publish(event)

    def _remember(self, event_id: int) -> None:
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(event_id)
        self._seen_set.add(event_id)
