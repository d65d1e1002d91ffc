"""What every part of the job queue shares: the database, this process's event bus and clock, the one
transaction a state change is, its history row (shared with other processes when they listen), and reading a job."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import asyncpg

from engine.errors import ClaimLost, JobNotFound, NotAllowed
from engine.jobs import (
    Actor,
    DeliveryStatus,
    EventKind,
    GenerationParams,
    Job,
    JobEvent,
    JobSource,
    JobStatus,
    PreviewInfo,
    Progress,
    ResultInfo,
    Stage,
)
from engine.queue.backend import Backend, Row, Tx
from engine.queue.bus import EventBus
from engine.storage.images import ImageInfo, Mode

log = logging.getLogger(__name__)

DAY_S = 86400

# Ids per query: well under SQLite's limit on bound parameters.
SQL_CHUNK = 500

# What a database that is locked, read-only, full or out of reach raises: a writer waits and tries again.
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)

CLOCK_SKEW_SAID_S = 2.0  # a clock further than this from the database server's is said, and corrected for
WORKER_STOPPED = "the worker stopped"  # why a running job went back to the queue when its process stopped

EVENTS_CHANNEL = "wanbot_events"  # PostgreSQL's NOTIFY channel: "there are new rows in queue_events"

# A running job's progress reaches other processes at most this often (every stage change at once): a chat edit is
# paced far slower, and a row a step would be a write a step.
SHARED_PROGRESS_EVERY_S = 0.25

# Appended to a job's WHERE: only the claim that runs the job (its token) writes to it.
CLAIMED_SQL = " AND claim_token = ?"


class QueueCore:
    """The database, the event bus and the clock every part of the queue works with."""

    def __init__(self, db: Backend, events: EventBus, clock: Callable[[], float]) -> None:
        self._db = db
        self.events = events
        self._clock = clock
        # Names this process's shared events, so that it does not hear its own again.
        self.origin = secrets.token_hex(8)
        self._sharing = False
        self._progress_shared_at: dict[int, tuple[float, Stage]] = {}
        # How long a worker counts as online after its last heartbeat (queue.lease_s): the wait shown to a waiting
        # job counts the workers that will take the jobs ahead.
        self.lease_s = 60.0
        # The database server's clock less this machine's (measure_clock_skew): leases are kept on the server's.
        self.clock_skew_s = 0.0

    def lease_now(self) -> float:
        """Now on the clock every process measures leases with: the database server's (this machine's, on SQLite,
        whose processes all share it)."""
        return self._clock() + self.clock_skew_s

    async def measure_clock_skew(self) -> float:
        """Compare this machine's clock with the database server's; a difference over CLOCK_SKEW_SAID_S is logged
        once with its size and used from then on, so that a worker whose clock is behind is not taken for gone."""
        if self._db.path is not None:
            return 0.0  # SQLite: one machine, one clock
        before = self._clock()
        async with self._db.reading() as db:
            row = await db.one("SELECT EXTRACT(EPOCH FROM clock_timestamp()) AS now")
        after = self._clock()
        skew = float(row["now"]) - (before + after) / 2 if row is not None else 0.0
        if abs(skew) > CLOCK_SKEW_SAID_S:
            ahead = "behind" if skew > 0 else "ahead of"
            log.warning(
                "this machine's clock is %.1f s %s the database server's: leases are measured on the server's "
                "clock (run NTP on both)",
                abs(skew),
                ahead,
            )
            self.clock_skew_s = skew
        else:
            self.clock_skew_s = 0.0
        return self.clock_skew_s

    @property
    def database(self) -> Backend:
        """The database the queue lives in, for the stores that share it (files, the chats' inbox)."""
        return self._db

    @property
    def path(self) -> Path | None:
        """The database file (SQLite); None for a database on a server."""
        return self._db.path

    async def close(self) -> None:
        await self._db.close()

    def file_is_gone(self) -> bool:
        """True once the database file was deleted or replaced under us: writes would go to a file nobody sees."""
        return self._db.file_is_gone()

    async def backup(self, target: Path) -> None:
        """A consistent copy of the live SQLite database; on PostgreSQL a UserError that points to pg_dump."""
        await self._db.backup(target)

    def _transaction(self) -> AbstractAsyncContextManager[Tx]:
        return self._db.transaction()

    async def _log(self, db: Tx, job_id: int, kind: EventKind, detail: str | None = None) -> None:
        """Record a state change in the job's history, and (events shared) tell other processes of it, in the
        transaction of the change: it is heard exactly when it happened, never when it did not."""
        await db.run(
            "INSERT INTO job_events (job_id, kind, at, detail) VALUES (?, ?, ?, ?)",
            job_id,
            kind.value,
            self._clock(),
            detail,
        )
        if self._sharing:
            self._progress_shared_at.pop(job_id, None)
            await self._share(db, kind, job_id)

    async def _share(self, db: Tx, kind: EventKind, job_id: int, detail: str | None = None) -> None:
        await db.run(
            "INSERT INTO queue_events (origin, kind, job_id, detail, at) VALUES (?, ?, ?, ?, ?)",
            self.origin,
            kind.value,
            job_id,
            detail,
            self._clock(),
        )
        await db.notify(EVENTS_CHANNEL)

    def _publish(
        self, kind: EventKind, job: Job, progress: Progress | None = None, preview: PreviewInfo | None = None
    ) -> None:
        """Tell this process's subscribers (other processes heard of it from `_log` or `_share`); a state change is
        also one INFO line for the operator."""
        if kind not in (EventKind.PROGRESS, EventKind.PREVIEW):
            log.info("job=%s %s%s", job.id, kind.value, _state_details(job, kind))
        self.events.publish(JobEvent(kind=kind, job=job, progress=progress, preview=preview))

    def _progress_worth_sharing(self, job_id: int, progress: Progress) -> bool:
        """A job's progress at its stage changes, and at most every SHARED_PROGRESS_EVERY_S in between."""
        if not self._sharing:
            return False
        now = self._clock()
        last = self._progress_shared_at.get(job_id)
        if last is not None and last[1] == progress.stage and now - last[0] < SHARED_PROGRESS_EVERY_S:
            return False
        self._progress_shared_at[job_id] = (now, progress.stage)
        return True

    async def get(self, job_id: int) -> Job:
        async with self._db.reading() as db:
            return await self._get(db, job_id)

    async def _get(self, db: Tx, job_id: int, lock: bool = False) -> Job:
        row = await db.one(f"SELECT * FROM jobs WHERE id = ?{db.for_update if lock else ''}", job_id)
        if row is None:
            raise JobNotFound(f"There is no job #{job_id}.", "Check the number with /queue.")
        return row_to_job(row)

    async def _read_one(self, sql: str, *args: Any) -> Row | None:
        async with self._db.reading() as db:
            return await db.one(sql, *args)

    async def _read_all(self, sql: str, *args: Any) -> list[Row]:
        async with self._db.reading() as db:
            return await db.all(sql, *args)


async def claim_held(db: Tx, job_id: int, token: str) -> bool:
    """Whether the claim `token` still runs the job (its worker was not silent past the lease)."""
    held = "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND claim_token = ?"
    return await db.one(held, job_id, token) is not None


def _state_details(job: Job, kind: EventKind) -> str:
    """Who and how long, as far as the state change knows: the worker, the wait, the run, the delivery."""
    details = [f"user={job.source.user_key}", f"model={job.model}"] if kind is EventKind.ENQUEUED else []
    if job.worker_id is not None and kind is not EventKind.ENQUEUED:
        details.append(f"worker={job.worker_id}")
    if kind is EventKind.STARTED and job.started_at is not None:
        details.append(f"waited={job.started_at - job.created_at:.1f}s attempt={job.attempts}")
    if job.status.terminal and job.finished_at is not None and kind in (EventKind.SUCCEEDED, EventKind.FAILED):
        details.append(f"ran={job.finished_at - (job.started_at or job.finished_at):.1f}s")
    if kind is EventKind.DELIVERED and job.delivered_at is not None and job.finished_at is not None:
        details.append(f"after={job.delivered_at - job.finished_at:.1f}s attempts={job.delivery_attempts}")
    return "".join(f" {detail}" for detail in details)


def claim_lost(job: Job) -> ClaimLost:
    return ClaimLost(
        f"Job #{job.id} is no longer this worker's ({job.status.value}): it was silent longer than the lease, and the "
        "job went back to the queue."
    )


def platform_range(platform: str) -> tuple[str, str]:
    """user_key is "platform:user": a range on it finds one platform's jobs, and stays an index seek."""
    return f"{platform}:", f"{platform};"


def check_owner(job: Job, actor: Actor, verb: str) -> None:
    if not actor.is_admin and actor.user_key != job.source.user_key:
        raise NotAllowed(f"Job #{job.id} belongs to someone else; only they or an admin can {verb} it.")


def row_to_job(row: Row) -> Job:
    return Job(
        id=row["id"],
        source=JobSource.model_validate_json(row["source_json"]),
        mode=Mode(row["mode"]),
        model=row["model"],
        params=GenerationParams.from_stored(json.loads(row["params_json"])),
        images=[ImageInfo.model_validate(item) for item in json.loads(row["images_json"])],
        status=JobStatus(row["status"]),
        priority=row["priority"],
        attempts=row["attempts"],
        cancel_requested=bool(row["cancel_requested"]),
        error_user=row["error_user"],
        error_detail=row["error_detail"],
        progress=Progress.model_validate_json(row["progress_json"]) if row["progress_json"] else None,
        result=ResultInfo.model_validate_json(row["result_json"]) if row["result_json"] else None,
        delivery_status=DeliveryStatus(row["delivery_status"]) if row["delivery_status"] else None,
        delivery_attempts=row["delivery_attempts"],
        delivery_error=row["delivery_error"],
        retry_of=row["retry_of"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        delivered_at=row["delivered_at"],
        worker_id=row["worker_id"],
        claim_token=row["claim_token"],
        upload_starts=row["upload_starts"],
    )
