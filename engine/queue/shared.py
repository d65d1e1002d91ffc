"""Events shared between processes: written in the transaction of their state change (core.py), read back
here by every other process (engine/queue/follower.py), and forgotten once nobody can need them."""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager

from engine.errors import JobNotFound
from engine.jobs import (
    EventKind,
    JobEvent,
    PreviewInfo,
    Progress,
)
from engine.queue.backend import Row
from engine.queue.core import (
    EVENTS_CHANNEL,
    SQL_CHUNK,
    QueueCore,
)

SHARED_EVENTS_KEEP_S = 600.0  # a process that was away longer catches up from the tables, not the events


class SharedEvents(QueueCore):
    def share_events(self) -> None:
        """From now on this process's events are stored for other processes (serve, workers) to hear as well."""
        self._sharing = True

    def listen(self, wake: Callable[[], None]) -> AbstractAsyncContextManager[Callable[[], bool]]:
        """Call `wake` when another process has shared events (PostgreSQL's NOTIFY; SQLite polls instead)."""
        return self._db.listen(EVENTS_CHANNEL, wake)

    @property
    def event_poll_s(self) -> float:
        return self._db.event_poll_s

    async def last_shared_event(self) -> int:
        row = await self._read_one("SELECT MAX(id) AS last FROM queue_events")
        return row["last"] or 0

    async def shared_event_rows(self, after: int = 0, ids: Collection[int] = (), limit: int = 500) -> list[Row]:
        """Shared events (of every process, this one's too) with ids above `after`, or with these `ids`; by id."""
        if ids:
            listed = sorted(ids)[:SQL_CHUNK]
            return await self._read_all(
                f"SELECT * FROM queue_events WHERE id IN ({','.join('?' * len(listed))}) ORDER BY id", *listed
            )
        return await self._read_all("SELECT * FROM queue_events WHERE id > ? ORDER BY id LIMIT ?", after, limit)

    async def event_from(self, row: Row) -> JobEvent | None:
        """A shared event as this process's subscribers take it, with its job as it is now; None for one of this
        process (its subscribers had it at once) or of a job that is gone."""
        if row["origin"] == self.origin:
            return None
        kind = EventKind(row["kind"])
        try:
            job = await self.get(row["job_id"])
        except JobNotFound:
            return None
        detail = row["detail"]
        progress = Progress.model_validate_json(detail) if detail and kind is EventKind.PROGRESS else None
        preview = PreviewInfo.model_validate_json(detail) if detail and kind is EventKind.PREVIEW else None
        return JobEvent(kind=kind, job=job, progress=progress, preview=preview)

    async def forget_shared_events(self) -> None:
        """Events older than anyone could still need (a process away longer reads the tables when it is back)."""
        async with self._transaction() as db:
            await db.run("DELETE FROM queue_events WHERE at < ?", self._clock() - SHARED_EVENTS_KEEP_S)
