"""Job events of other processes (a worker's progress, a serving process's cancel), published in this process as if
they were its own: PostgreSQL's LISTEN/NOTIFY wakes the follower at once, and a SQLite file is polled a few times a
second. The events only say what changed; the state itself is read from the tables."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from engine.queue.core import DATABASE_DOWN
from engine.queue.jobqueue import JobQueue

log = logging.getLogger(__name__)

# On PostgreSQL an id is handed out when a row is inserted but seen when its transaction commits, so an event can
# appear behind ones already read. Each id skipped over is looked for again for this long; one whose transaction
# rolled back never comes, and is forgotten then.
GAP_WAIT_S = 30.0
MAX_GAP = 1000  # a jump this large is not transactions in flight (the sequence moved on): not waited for
FORGET_EVERY_S = 60.0
FIRST_RETRY_S = 1.0
MAX_RETRY_S = 30.0


class EventFollower:
    """Run `follow()` as a long-lived task: it outlives a lost database (it waits and connects again), and goes on
    after the last event it published; events from before it first started are not published."""

    def __init__(self, queue: JobQueue) -> None:
        self._queue = queue
        self._last: int | None = None
        self._gaps: dict[int, float] = {}  # id skipped over -> when
        self._retry_s = FIRST_RETRY_S

    async def follow(self) -> None:
        while True:
            try:
                await self._follow_while_connected()
            except DATABASE_DOWN:
                wait_s = self._retry_s
                log.warning("cannot read the events of other processes; trying again in %.0f s", wait_s, exc_info=True)
                await asyncio.sleep(wait_s)
                self._retry_s = min(wait_s * 2, MAX_RETRY_S)

    async def _follow_while_connected(self) -> None:
        queue = self._queue
        if self._last is None:
            self._last = (await queue.last_shared_event()) or 0
        wake = asyncio.Event()
        forgot_at = time.monotonic()
        async with queue.listen(wake.set) as listening:
            while True:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel that comes as the
                # event is set, and a follower that misses its cancel never stops (a stop hangs on it).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(queue.event_poll_s):
                        await wake.wait()
                wake.clear()
                if not listening():
                    raise ConnectionError("the database connection that listens for events of other processes closed")
                await self._publish_new()
                if time.monotonic() - forgot_at >= FORGET_EVERY_S:
                    forgot_at = time.monotonic()
                    await queue.forget_shared_events()

    async def _publish_new(self) -> None:
        assert self._last is not None
        queue = self._queue
        rows = await queue.shared_event_rows(after=self._last)
        if self._gaps:
            rows = [*await queue.shared_event_rows(ids=self._gaps), *rows]
        now = time.monotonic()
        for row in rows:
            event_id = row["id"]
            if event_id > self._last:
                if event_id - self._last <= MAX_GAP:
                    self._gaps.update(dict.fromkeys(range(self._last + 1, event_id), now))
                self._last = event_id
            else:
                self._gaps.pop(event_id, None)
            event = await queue.event_from(row)
            if event is not None:
                queue.events.publish(event)
        self._gaps = {event_id: seen for event_id, seen in self._gaps.items() if now - seen < GAP_WAIT_S}
        self._retry_s = FIRST_RETRY_S
