"""The job queue's facade: one object with every state change of a job, put together from the parts that each own
one concern (see engine/queue/__init__.py). States: queued -> running -> succeeded | failed | cancelled; terminal
states never change (a trigger enforces it). Delivery of a finished video has its own status, so a failed upload is
retried without generating again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from engine.queue.bus import EventBus
from engine.queue.claims import Claims
from engine.queue.delivery import Delivery
from engine.queue.enqueue import Enqueueing
from engine.queue.flags import Flags
from engine.queue.leases import Leases, Serving
from engine.queue.postgres import PostgresBackend
from engine.queue.retention import Retention
from engine.queue.shared import SharedEvents
from engine.queue.sqlite import SqliteBackend
from engine.queue.url import SqliteUrl, parse_database_url


class JobQueue(Enqueueing, Claims, Leases, Serving, SharedEvents, Delivery, Flags, Retention):
    """All reads and writes of jobs. Create with `await JobQueue.connect(url)` or `await JobQueue.open(path)`."""

    @classmethod
    async def open(
        cls,
        path: Path,
        events: EventBus | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 10.0,
    ) -> JobQueue:
        """Open (creating or migrating) the SQLite queue at `path`; a damaged file is a UserError that names it."""
        return cls(await SqliteBackend.open(path, busy_timeout_s), events or EventBus(), clock)

    @classmethod
    async def connect(
        cls, url: str, events: EventBus | None = None, clock: Callable[[], float] = time.time
    ) -> JobQueue:
        """Open the queue a `database.url` names: a SQLite file or a PostgreSQL database (created tables, migrated)."""
        where = parse_database_url(url)
        if isinstance(where, SqliteUrl):
            return await cls.open(where.path, events, clock)
        return cls(await PostgresBackend.open(where), events or EventBus(), clock)
