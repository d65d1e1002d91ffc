"""The persistent job queue: SQLite in WAL mode through aiosqlite, one transaction per state change.

States: queued -> running -> succeeded | failed | cancelled; terminal states never change (a trigger enforces it).
Delivery of a finished video has its own status, so a failed upload is retried without generating again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from engine.errors import InvalidTransition, JobNotFound, NotAllowed, QueueFull, UserError, duration_text
from engine.events import EventBus
from engine.images import ImageInfo, Mode
from engine.jobs import (
    Actor,
    DeliveryStatus,
    EnqueueResult,
    EventKind,
    GenerationParams,
    Job,
    JobEvent,
    JobSource,
    JobStatus,
    Progress,
    QueuePosition,
    ResultInfo,
)
from engine.queue_order import NEXT_SQL, POSITION_SQL

MIGRATIONS: list[str] = [
    # 1: jobs and their states.
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        user_key TEXT NOT NULL,
        source_json TEXT NOT NULL,
        dedup_key TEXT UNIQUE,
        mode TEXT NOT NULL,
        model TEXT NOT NULL,
        params_json TEXT NOT NULL,
        images_json TEXT NOT NULL DEFAULT '[]',
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        priority INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        passed_over INTEGER NOT NULL DEFAULT 0,
        error_user TEXT,
        error_detail TEXT,
        progress_json TEXT,
        result_json TEXT,
        retry_of INTEGER REFERENCES jobs(id),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL
    );
    CREATE INDEX jobs_status ON jobs (status, priority, id);
    CREATE INDEX jobs_user_started ON jobs (user_key, started_at);
    CREATE TRIGGER jobs_terminal_states_are_final
    BEFORE UPDATE OF status ON jobs
    WHEN OLD.status IN ('succeeded', 'failed', 'cancelled') AND NEW.status != OLD.status
    BEGIN
        SELECT RAISE(ABORT, 'terminal job status cannot change');
    END;
    """,
    # 2: delivery tracking, image references for clean-up, an event log and queue-wide flags.
    """
    ALTER TABLE jobs ADD COLUMN delivery_status TEXT
        CHECK (delivery_status IN ('pending', 'delivered', 'delivery_failed'));
    ALTER TABLE jobs ADD COLUMN delivery_attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN delivery_error TEXT;
    ALTER TABLE jobs ADD COLUMN delivered_at REAL;
    CREATE TABLE job_images (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        sha256 TEXT NOT NULL,
        role TEXT NOT NULL,
        PRIMARY KEY (job_id, role)
    );
    CREATE INDEX job_images_sha ON job_images (sha256);
    INSERT INTO job_images (job_id, sha256, role)
        SELECT jobs.id, json_extract(image.value, '$.sha256'), json_extract(image.value, '$.role')
        FROM jobs, json_each(jobs.images_json) AS image;
    CREATE TABLE job_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        kind TEXT NOT NULL,
        at REAL NOT NULL,
        detail TEXT
    );
    CREATE TABLE queue_flags (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 3: indexes for the fair order (per user, queued only) and for the recent durations behind ETAs.
    """
    CREATE INDEX jobs_queued_per_user ON jobs (user_key, priority DESC, id) WHERE status = 'queued';
    CREATE INDEX jobs_succeeded ON jobs (finished_at) WHERE status = 'succeeded';
    """,
    # 4: whether the chat message of an ended job shows how it ended (a restart tells the ones that do not).
    """
    ALTER TABLE jobs ADD COLUMN final_shown INTEGER NOT NULL DEFAULT 0;
    UPDATE jobs SET final_shown = 1 WHERE status IN ('succeeded', 'failed', 'cancelled');
    CREATE INDEX jobs_final_unshown ON jobs (finished_at) WHERE final_shown = 0
        AND status IN ('succeeded', 'failed', 'cancelled');
    """,
    # 5: chat updates stored before the platform is told they arrived, until they have been handled.
    """
    CREATE TABLE chat_inbox (
        platform TEXT NOT NULL,
        key TEXT NOT NULL,
        message_key TEXT,
        payload TEXT NOT NULL,
        reply TEXT,
        received_at REAL NOT NULL,
        done_at REAL,
        PRIMARY KEY (platform, key)
    );
    CREATE INDEX chat_inbox_open ON chat_inbox (platform, received_at) WHERE done_at IS NULL;
    CREATE INDEX chat_inbox_message ON chat_inbox (platform, message_key);
    """,
]
# Handled chat updates are kept this long, so a platform that sends one again is not answered twice.
INBOX_KEEP_S = 86400

ACTIVE = ("queued", "running")
DAY_S = 86400
# Ids per query: well under SQLite's limit on bound parameters.
SQL_CHUNK = 500


class JobQueue:
    """All reads and writes of jobs. Create with `await JobQueue.open(path)`."""

    def __init__(self, db: aiosqlite.Connection, events: EventBus, clock: Callable[[], float]) -> None:
        self._db = db
        self._lock = asyncio.Lock()
        self.path = Path()
        self.identity: tuple[int, int] | None = None
        self.events = events
        self._clock = clock

    @classmethod
    async def open(
        cls,
        path: Path,
        events: EventBus | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 10.0,
    ) -> JobQueue:
        """Open (creating or migrating) the queue at `path`; a damaged file is a UserError that names it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=FULL")
            await db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
            await db.execute("PRAGMA foreign_keys=ON")
            check = await (await db.execute("PRAGMA quick_check(1)")).fetchone()
            if check[0] != "ok":
                raise sqlite3.DatabaseError(check[0])
            queue = cls(db, events or EventBus(), clock)
            await queue._migrate()
        except sqlite3.DatabaseError as exc:
            await db.close()
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise UserError(
                f"The job database {path} cannot be used: {exc}.",
                "Stop wanbot, restore the file from a backup (wanbot backup) or move it aside to start with an empty "
                "queue, then start it again.",
            ) from exc
        queue.path = path
        queue.identity = _file_identity(path)
        return queue

    async def close(self) -> None:
        await self._db.close()

    def file_is_gone(self) -> bool:
        """True once the database file was deleted or replaced under us: writes would go to a file nobody sees."""
        return _file_identity(self.path) != self.identity

    async def backup(self, target: Path) -> None:
        """A consistent copy of the live database (SQLite's online backup), written aside and renamed into place."""
        temp = target.with_name(f".{target.name}.part")
        temp.unlink(missing_ok=True)
        async with self._lock:
            copy = await aiosqlite.connect(temp)
            try:
                await self._db.backup(copy)
            finally:
                await copy.close()
        temp.replace(target)

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            version = (await (await db.execute("PRAGMA user_version")).fetchone())[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _split_sql(script):
                    await db.execute(statement)
                await db.execute(f"PRAGMA user_version={number}")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One IMMEDIATE transaction at a time on this connection; rolled back on any error."""
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.rollback()
                raise
            await self._db.commit()

    async def _log(self, db: aiosqlite.Connection, job_id: int, kind: EventKind, detail: str | None = None) -> None:
        await db.execute(
            "INSERT INTO job_events (job_id, kind, at, detail) VALUES (?, ?, ?, ?)",
            (job_id, kind.value, self._clock(), detail),
        )

    def _publish(self, kind: EventKind, job: Job, progress: Progress | None = None) -> None:
        self.events.publish(JobEvent(kind=kind, job=job, progress=progress))

    # -- adding jobs -------------------------------------------------------------------------------------------

    async def enqueue(
        self,
        source: JobSource,
        mode: Mode,
        model: str,
        params: GenerationParams,
        images: Iterable[ImageInfo] = (),
        *,
        priority: int = 0,
        is_admin: bool = False,
        per_user_limit: int = 3,
        global_limit: int = 100,
        daily_limit: int = 0,
        retry_of: int | None = None,
    ) -> EnqueueResult:
        """Add a job, or return the existing one when the same message was enqueued before."""
        images = list(images)
        async with self._transaction() as db:
            if source.dedup_key is not None:
                row = await _fetch_one(db, "SELECT * FROM jobs WHERE dedup_key = ?", (source.dedup_key,))
                if row is not None:
                    job = _row_to_job(row)
                    return EnqueueResult(job=job, created=False, position=await self._position(db, job.id))
            if not is_admin:
                await self._check_limits(db, source.user_key, per_user_limit, global_limit)
                if daily_limit:
                    await self._check_daily_limit(db, source.user_key, daily_limit)
            cursor = await db.execute(
                """INSERT INTO jobs (user_key, source_json, dedup_key, mode, model, params_json, images_json,
                                     status, priority, retry_of, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)""",
                (
                    source.user_key,
                    source.model_dump_json(),
                    source.dedup_key,
                    mode.value,
                    model,
                    params.model_dump_json(),
                    json.dumps([info.model_dump() for info in images]),
                    priority,
                    retry_of,
                    self._clock(),
                ),
            )
            job_id = cursor.lastrowid
            await db.executemany(
                "INSERT INTO job_images (job_id, sha256, role) VALUES (?, ?, ?)",
                [(job_id, info.sha256, info.role) for info in images],
            )
            await self._log(db, job_id, EventKind.ENQUEUED, None if retry_of is None else f"retry of {retry_of}")
            job = await self._get(db, job_id)
            position = await self._position(db, job_id)
        self._publish(EventKind.ENQUEUED, job)
        return EnqueueResult(job=job, created=True, position=position)

    async def _check_limits(self, db: aiosqlite.Connection, user_key: str, per_user: int, total: int) -> None:
        row = await _fetch_one(
            db,
            """SELECT (SELECT COUNT(*) FROM jobs INDEXED BY jobs_queued_per_user
                       WHERE status = 'queued' AND user_key = ?) AS mine,
                      (SELECT COUNT(*) FROM jobs WHERE status = 'queued') AS total""",
            (user_key,),
        )
        if row["mine"] >= per_user:
            raise QueueFull(
                f"You already have {row['mine']} videos waiting (the limit is {per_user}).",
                "Wait for one to finish, or cancel one with /cancel.",
            )
        if row["total"] >= total:
            raise QueueFull(f"The queue is full ({row['total']} videos waiting).", "Please try again in a few minutes.")

    async def _check_daily_limit(self, db: aiosqlite.Connection, user_key: str, limit: int) -> None:
        """Jobs that started (they used the GPU) or may still start count; ones that ended before starting do not."""
        since = self._clock() - DAY_S
        row = await _fetch_one(
            db,
            """SELECT COUNT(*) AS used, MIN(created_at) AS oldest FROM jobs INDEXED BY jobs_user_started
               WHERE user_key = ? AND created_at > ?
                 AND (status IN ('queued', 'running') OR started_at IS NOT NULL)""",
            (user_key, since),
        )
        if row["used"] >= limit:
            raise QueueFull(
                f"You have asked for {row['used']} videos in the last 24 hours; the limit is {limit} a day.",
                f"You can ask for the next one in {duration_text(row['oldest'] - since)}.",
            )

    async def check_room(
        self,
        source: JobSource,
        *,
        is_admin: bool = False,
        per_user_limit: int = 3,
        global_limit: int = 100,
        daily_limit: int = 0,
    ) -> None:
        """Raise QueueFull where `enqueue` would, adding nothing: lets a caller refuse before it downloads or decodes
        anything. A message enqueued before passes, as `enqueue` returns its job."""
        if is_admin:
            return
        async with self._lock:
            known = "SELECT 1 FROM jobs WHERE dedup_key = ?"
            if source.dedup_key is not None and await _fetch_one(self._db, known, (source.dedup_key,)):
                return
            await self._check_limits(self._db, source.user_key, per_user_limit, global_limit)
            if daily_limit:
                await self._check_daily_limit(self._db, source.user_key, daily_limit)

    async def retry(
        self,
        job_id: int,
        actor: Actor,
        params: GenerationParams | None = None,
        source: JobSource | None = None,
        **limits: int,
    ) -> EnqueueResult:
        """Queue a finished job again as a new job linked to the old one; the old one stays as it was.

        `params` and `source` replace the old job's (a reroll changes the seed; a reply goes to a new message).
        """
        old = await self.get(job_id)
        _check_owner(old, actor, "retry")
        if not old.status.terminal:
            raise InvalidTransition(f"Job {job_id} is still {old.status}.", "Retry it once it has finished.")
        new_source = source or old.source.model_copy(update={"message_id": None})
        return await self.enqueue(
            new_source,
            old.mode,
            old.model,
            params or old.params,
            old.images,
            priority=old.priority,
            is_admin=actor.is_admin,
            retry_of=old.id,
            **limits,
        )

    # -- the worker's side -------------------------------------------------------------------------------------

    async def claim_next(
        self, preferred_model: str | None = None, max_model_skips: int = 3, exclude_models: Iterable[str] = ()
    ) -> Job | None:
        """Atomically move the next queued job to running and return it, or None when nothing waits.

        With `preferred_model` (the one loaded), a job for it may go first, but the job that was next counts each
        time it is passed over this way, and one passed over `max_model_skips` times goes next, so nobody starves.
        Jobs for `exclude_models` (being downloaded) wait where they are.
        """
        args = {
            "excluded": json.dumps(sorted(exclude_models)),
            "preferred": preferred_model,
            "max_skips": max_model_skips,
        }
        async with self._transaction() as db:
            next_up = await _fetch_one(db, NEXT_SQL, args)
            if next_up is None:
                return None
            chosen = next_up["warm_id"] or next_up["id"]
            if chosen != next_up["id"]:
                await db.execute("UPDATE jobs SET passed_over = passed_over + 1 WHERE id = ?", (next_up["id"],))
            row = await _fetch_one(
                db,
                """UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, progress_json = NULL
                   WHERE id = ? AND status = 'queued' RETURNING *""",
                (self._clock(), chosen),
            )
            await self._log(db, chosen, EventKind.STARTED)
            job = _row_to_job(row)
        self._publish(EventKind.STARTED, job)
        return job

    async def update_progress(self, job_id: int, progress: Progress, persist: bool = True) -> None:
        """Publish progress to subscribers; `persist` also stores it (callers throttle that)."""
        if persist:
            async with self._transaction() as db:
                await db.execute(
                    "UPDATE jobs SET progress_json = ? WHERE id = ? AND status = 'running'",
                    (progress.model_dump_json(), job_id),
                )
                job = await self._get(db, job_id)
        else:
            job = await self.get(job_id)
        self._publish(EventKind.PROGRESS, job, progress)

    async def mark_succeeded(self, job_id: int, result: ResultInfo) -> Job:
        return await self._finish(
            job_id,
            JobStatus.SUCCEEDED,
            EventKind.SUCCEEDED,
            "result_json = ?, delivery_status = 'pending'",
            (result.model_dump_json(),),
        )

    async def mark_failed(self, job_id: int, user_message: str, detail: str = "") -> Job:
        return await self._finish(
            job_id,
            JobStatus.FAILED,
            EventKind.FAILED,
            "error_user = ?, error_detail = ?",
            (user_message, detail),
            detail=user_message,
        )

    async def mark_cancelled(self, job_id: int) -> Job:
        return await self._finish(job_id, JobStatus.CANCELLED, EventKind.CANCELLED, "", ())

    async def _finish(
        self,
        job_id: int,
        status: JobStatus,
        kind: EventKind,
        extra_sql: str,
        extra: tuple[Any, ...],
        detail: str | None = None,
    ) -> Job:
        assignments = "status = ?, finished_at = ?" + (f", {extra_sql}" if extra_sql else "")
        async with self._transaction() as db:
            cursor = await db.execute(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status = 'running'",
                (status.value, self._clock(), *extra, job_id),
            )
            job = await self._get(db, job_id)
            if cursor.rowcount != 1:
                raise InvalidTransition(f"Job {job_id} is {job.status}, not running; it cannot become {status}.")
            await self._log(db, job_id, kind, detail)
        self._publish(kind, job)
        return job

    async def requeue(self, job_id: int, reason: str) -> Job:
        """Put a running job back at the head of its turn, not counting the interrupted attempt."""
        async with self._transaction() as db:
            await db.execute(
                """UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), started_at = NULL,
                          progress_json = NULL
                   WHERE id = ? AND status = 'running'""",
                (job_id,),
            )
            await self._log(db, job_id, EventKind.REQUEUED, reason)
            job = await self._get(db, job_id)
        self._publish(EventKind.REQUEUED, job)
        return job

    async def fail_waiting(self, model: str, user_message: str, detail: str) -> list[Job]:
        """Fail every queued job for `model` at once (its download failed for good)."""
        async with self._transaction() as db:
            rows = await (
                await db.execute("SELECT id FROM jobs WHERE status = 'queued' AND model = ?", (model,))
            ).fetchall()
            await db.execute(
                """UPDATE jobs SET status = 'failed', finished_at = ?, error_user = ?, error_detail = ?
                   WHERE status = 'queued' AND model = ?""",
                (self._clock(), user_message, detail, model),
            )
            failed = []
            for row in rows:
                await self._log(db, row["id"], EventKind.FAILED, user_message)
                failed.append(await self._get(db, row["id"]))
        for job in failed:
            self._publish(EventKind.FAILED, job)
        return failed

    async def waiting_for(self, model: str) -> list[Job]:
        rows = await self._read_all("SELECT * FROM jobs WHERE status = 'queued' AND model = ? ORDER BY id", (model,))
        return [_row_to_job(row) for row in rows]

    async def recover_interrupted(self, max_attempts: int) -> list[Job]:
        """At start-up: jobs left running by a crash go back to queued, or fail once they used their attempts."""
        async with self._transaction() as db:
            rows = await (await db.execute("SELECT id, attempts FROM jobs WHERE status = 'running'")).fetchall()
            recovered = []
            for row in rows:
                if row["attempts"] < max_attempts:
                    await db.execute(
                        "UPDATE jobs SET status = 'queued', started_at = NULL, progress_json = NULL WHERE id = ?",
                        (row["id"],),
                    )
                    await self._log(db, row["id"], EventKind.REQUEUED, "the bot restarted while it ran")
                else:
                    await db.execute(
                        """UPDATE jobs SET status = 'failed', finished_at = ?, error_user = ?, error_detail = ?
                           WHERE id = ?""",
                        (
                            self._clock(),
                            f"The bot stopped while making this video {row['attempts']} times, so it was given "
                            "up. Retry it if you like; if it keeps failing, try fewer frames or a lower resolution.",
                            f"interrupted after {row['attempts']} attempts",
                            row["id"],
                        ),
                    )
                    await self._log(db, row["id"], EventKind.FAILED, "too many interrupted attempts")
                recovered.append(await self._get(db, row["id"]))
        return recovered

    # -- cancelling --------------------------------------------------------------------------------------------

    async def cancel(self, job_id: int, actor: Actor) -> Job:
        """Cancel a queued job at once; for a running one set the request the worker acts on."""
        async with self._transaction() as db:
            job = await self._get(db, job_id)
            _check_owner(job, actor, "cancel")
            if job.status is JobStatus.QUEUED:
                await db.execute(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? AND status = 'queued'",
                    (self._clock(), job_id),
                )
                kind = EventKind.CANCELLED
            elif job.status is JobStatus.RUNNING:
                await db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,))
                kind = EventKind.CANCEL_REQUESTED
            else:
                raise InvalidTransition(f"Job {job_id} has already {_finished_verb(job.status)}; nothing to cancel.")
            await self._log(db, job_id, kind, f"by {actor.user_key}")
            job = await self._get(db, job_id)
        self._publish(kind, job)
        return job

    async def is_cancel_requested(self, job_id: int) -> bool:
        row = await self._read_one("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,))
        return bool(row and row["cancel_requested"])

    # -- delivery ----------------------------------------------------------------------------------------------

    async def mark_delivered(self, job_id: int) -> Job:
        return await self._set_delivery(job_id, DeliveryStatus.DELIVERED, None, EventKind.DELIVERED)

    async def mark_delivery_failed(self, job_id: int, error: str, attempts_at_least: int = 0) -> Job:
        """Count a failed upload; `attempts_at_least` lets a failure that cannot go away use up the tries at once."""
        return await self._set_delivery(
            job_id, DeliveryStatus.DELIVERY_FAILED, error, EventKind.DELIVERY_FAILED, attempts_at_least
        )

    async def _set_delivery(
        self, job_id: int, status: DeliveryStatus, error: str | None, kind: EventKind, attempts_at_least: int = 0
    ) -> Job:
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET delivery_status = ?, delivery_error = ?,
                          delivery_attempts = MAX(delivery_attempts + 1, ?),
                          delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END
                   WHERE id = ? AND status = 'succeeded' AND delivery_status != 'delivered'""",
                (status.value, error, attempts_at_least, status.value, self._clock(), job_id),
            )
            job = await self._get(db, job_id)
            if cursor.rowcount != 1:
                raise InvalidTransition(f"Job {job_id} has no video waiting for delivery.")
            await self._log(db, job_id, kind, error)
        self._publish(kind, job)
        return job

    async def redeliver(self, job_id: int) -> Job:
        """Let the bot send a finished video again from its stored file (never regenerated), attempts from zero."""
        job = await self.get(job_id)
        if job.status is not JobStatus.SUCCEEDED or job.delivery_status is DeliveryStatus.DELIVERED:
            raise InvalidTransition(
                f"Job {job_id} has no undelivered video ({job.status.value}, {job.delivery_status or 'no delivery'}).",
                "Only a finished video whose delivery failed can be sent again; `queue retry` makes a new one.",
            )
        if job.result is None or not await asyncio.to_thread(Path(job.result.path).is_file):
            raise InvalidTransition(
                f"The video of job {job_id} is no longer on disk.", f"Make it again with `queue retry {job_id}`."
            )
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET delivery_status = 'pending', delivery_error = NULL, delivery_attempts = 0
                   WHERE id = ? AND status = 'succeeded' AND delivery_status != 'delivered'""",
                (job_id,),
            )
            if cursor.rowcount != 1:
                raise InvalidTransition(f"Job {job_id} was delivered meanwhile.", "Nothing to do.")
            job = await self._get(db, job_id)
            await self._log(db, job_id, EventKind.REDELIVERY)
        self._publish(EventKind.REDELIVERY, job)
        return job

    async def undelivered(self, platform: str, max_attempts: int = 5) -> list[Job]:
        """Finished videos on `platform` whose upload has not succeeded yet, oldest first."""
        rows = await self._read_all(
            """SELECT * FROM jobs WHERE status = 'succeeded' AND delivery_status IN ('pending', 'delivery_failed')
               AND delivery_attempts < ? AND json_extract(source_json, '$.platform') = ? ORDER BY finished_at""",
            (max_attempts, platform),
        )
        return [_row_to_job(row) for row in rows]

    async def mark_final_shown(self, job_id: int) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE jobs SET final_shown = 1 WHERE id = ?", (job_id,))

    async def final_unshown(self, platform: str, max_attempts: int, limit: int = 200) -> list[Job]:
        """Ended jobs on `platform` whose chat message does not show the end yet (the process stopped first, or a
        restart gave the job up): failed and cancelled ones, and videos sent or given up on. Videos still to be
        sent are not here: their delivery shows the end."""
        rows = await self._read_all(
            """SELECT * FROM jobs INDEXED BY jobs_final_unshown
               WHERE final_shown = 0 AND status IN ('succeeded', 'failed', 'cancelled')
               AND json_extract(source_json, '$.platform') = ?
               AND NOT (status = 'succeeded' AND delivery_status IN ('pending', 'delivery_failed')
                        AND delivery_attempts < ?)
               ORDER BY finished_at LIMIT ?""",
            (platform, max_attempts, limit),
        )
        return [_row_to_job(row) for row in rows]

    # -- the chat inbox ----------------------------------------------------------------------------------------

    async def inbox_put(self, platform: str, key: str, payload: str, message_key: str | None = None) -> bool:
        """Store an update before the platform learns it arrived; False if it was stored before (sent again)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                """INSERT OR IGNORE INTO chat_inbox (platform, key, message_key, payload, received_at)
                   VALUES (?, ?, ?, ?, ?)""",
                (platform, key, message_key, payload, self._clock()),
            )
            return cursor.rowcount == 1

    async def inbox_open(self, platform: str) -> list[str]:
        """Payloads of the updates not handled to the end (the process stopped first), oldest first; handled ones
        older than a day are forgotten meanwhile."""
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM chat_inbox WHERE platform = ? AND done_at < ?", (platform, self._clock() - INBOX_KEEP_S)
            )
            rows = await (
                await db.execute(
                    """SELECT payload FROM chat_inbox INDEXED BY chat_inbox_open
                       WHERE platform = ? AND done_at IS NULL ORDER BY received_at""",
                    (platform,),
                )
            ).fetchall()
        return [row["payload"] for row in rows]

    async def inbox_done(self, platform: str, *keys: str) -> None:
        async with self._transaction() as db:
            await db.executemany(
                "UPDATE chat_inbox SET done_at = ? WHERE platform = ? AND key = ?",
                [(self._clock(), platform, key) for key in keys],
            )

    async def inbox_set_reply(self, platform: str, message_key: str, reply: str) -> None:
        """What was already answered to a message (the "Checking" message), so that handling it again edits that."""
        async with self._transaction() as db:
            await db.execute(
                "UPDATE chat_inbox SET reply = ? WHERE platform = ? AND message_key = ?", (reply, platform, message_key)
            )

    async def inbox_reply(self, platform: str, message_key: str) -> str | None:
        row = await self._read_one(
            "SELECT reply FROM chat_inbox WHERE platform = ? AND message_key = ? AND reply IS NOT NULL",
            (platform, message_key),
        )
        return row["reply"] if row else None

    # -- reading -----------------------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job:
        async with self._lock:
            return await self._get(self._db, job_id)

    async def _get(self, db: aiosqlite.Connection, job_id: int) -> Job:
        row = await _fetch_one(db, "SELECT * FROM jobs WHERE id = ?", (job_id,))
        if row is None:
            raise JobNotFound(f"There is no job {job_id}.", "Check the number with /queue.")
        return _row_to_job(row)

    async def update_reply(self, job_id: int, **reply: str) -> Job:
        """Record adapter ids learnt after enqueueing (a message the progress moved to) in the job's source."""
        async with self._transaction() as db:
            job = await self._get(db, job_id)
            source = job.source.model_copy(update={"reply": {**job.source.reply, **reply}})
            await db.execute("UPDATE jobs SET source_json = ? WHERE id = ?", (source.model_dump_json(), job_id))
            return await self._get(db, job_id)

    async def find_by_source(self, source: JobSource) -> Job | None:
        """The job already made from this platform message, if any (a redelivered update)."""
        if source.dedup_key is None:
            return None
        row = await self._read_one("SELECT * FROM jobs WHERE dedup_key = ?", (source.dedup_key,))
        return _row_to_job(row) if row is not None else None

    async def list_jobs(
        self,
        statuses: Iterable[JobStatus] = (),
        user_key: str | None = None,
        limit: int = 50,
        platform: str | None = None,
        oldest_first: bool = False,
    ) -> list[Job]:
        clauses, args = [], []
        wanted = [status.value for status in statuses]
        if wanted:
            clauses.append(f"status IN ({','.join('?' * len(wanted))})")
            args.extend(wanted)
        if user_key is not None:
            clauses.append("user_key = ?")
            args.append(user_key)
        if platform is not None:
            # user_key is "platform:user": a range on it stays an index seek.
            clauses.append("user_key >= ? AND user_key < ?")
            args.extend([f"{platform}:", f"{platform};"])
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "ASC" if oldest_first else "DESC"
        rows = await self._read_all(f"SELECT * FROM jobs {where} ORDER BY id {order} LIMIT ?", (*args, limit))
        return [_row_to_job(row) for row in rows]

    async def position(self, job_id: int) -> QueuePosition | None:
        """Where a queued job stands (1 = next) and a rough ETA from recent job durations; None if not queued."""
        async with self._lock:
            return await self._position(self._db, job_id)

    async def _position(self, db: aiosqlite.Connection, job_id: int) -> QueuePosition | None:
        row = await _fetch_one(db, POSITION_SQL, (job_id,))
        if row is None:
            return None
        stats = await _fetch_one(
            db,
            """SELECT (SELECT AVG(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs
                        WHERE status = 'succeeded' ORDER BY finished_at DESC LIMIT 20)) AS typical,
                      running.started_at AS running_since, running.progress_json AS running_progress
               FROM (SELECT 1) LEFT JOIN (SELECT started_at, progress_json FROM jobs WHERE status = 'running'
                                          ORDER BY started_at LIMIT 1) AS running""",
        )
        typical, position = stats["typical"], row["position"]
        running_left = None
        if stats["running_since"] is not None:
            progress = Progress.model_validate_json(stats["running_progress"]) if stats["running_progress"] else None
            if progress is not None and progress.eta_s is not None:
                # The running job's own step times say more than the average of jobs of other sizes and models.
                running_left = progress.eta_s
            elif typical is not None:
                running_left = max(typical - (self._clock() - stats["running_since"]), 0.0)
        if position == 1:
            return QueuePosition(position=position, eta_s=running_left)
        if typical is None:
            return QueuePosition(position=position, eta_s=None)
        return QueuePosition(position=position, eta_s=(running_left or 0.0) + typical * (position - 1))

    async def stats(self, period_s: float) -> list[dict[str, Any]]:
        """Per model, the jobs created in the last `period_s`: how they ended, were delivered, waited and ran."""
        rows = await self._read_all(
            """SELECT model, COUNT(*) AS jobs,
                      SUM(status = 'succeeded') AS succeeded, SUM(status = 'failed') AS failed,
                      SUM(status = 'cancelled') AS cancelled, SUM(status IN ('queued', 'running')) AS active,
                      SUM(delivery_status = 'delivery_failed') AS undelivered,
                      AVG(started_at - created_at) AS mean_wait_s,
                      AVG(CASE WHEN status = 'succeeded' THEN finished_at - started_at END) AS mean_run_s,
                      MAX(CASE WHEN status = 'succeeded' THEN finished_at - started_at END) AS longest_run_s
               FROM jobs WHERE created_at >= ? GROUP BY model ORDER BY jobs DESC, model""",
            (self._clock() - period_s,),
        )
        return [dict(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._read_all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    async def events_of(self, job_id: int) -> list[tuple[str, str | None]]:
        rows = await self._read_all("SELECT kind, detail FROM job_events WHERE job_id = ? ORDER BY id", (job_id,))
        return [(row["kind"], row["detail"]) for row in rows]

    # -- flags and clean-up ------------------------------------------------------------------------------------

    async def set_paused(self, paused: bool) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO queue_flags (name, value) VALUES ('paused', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                ("1" if paused else "0",),
            )

    async def is_paused(self) -> bool:
        row = await self._read_one("SELECT value FROM queue_flags WHERE name = 'paused'")
        return bool(row and row["value"] == "1")

    async def images_in_use(self, retention_s: float) -> set[str]:
        """Hashes of images that active jobs, or jobs finished within the retention time, still refer to."""
        rows = await self._read_all(
            """SELECT DISTINCT i.sha256 FROM job_images i JOIN jobs j ON j.id = i.job_id
               WHERE j.status IN ('queued', 'running') OR j.finished_at >= ?""",
            (self._clock() - retention_s,),
        )
        return {row["sha256"] for row in rows}

    async def delivered_before(self, job_ids: Collection[int], retention_s: float) -> dict[int, str]:
        """Which of these jobs had their video delivered more than `retention_s` ago, with its file's name."""
        ids = sorted(job_ids)
        found: dict[int, str] = {}
        for start in range(0, len(ids), SQL_CHUNK):
            chunk = ids[start : start + SQL_CHUNK]
            rows = await self._read_all(
                f"""SELECT id, json_extract(result_json, '$.path') AS path FROM jobs
                    WHERE id IN ({",".join("?" * len(chunk))})
                    AND delivery_status = 'delivered' AND delivered_at < ?""",
                (*chunk, self._clock() - retention_s),
            )
            found.update((row["id"], Path(row["path"] or "").name) for row in rows)
        return found

    async def _read_one(self, sql: str, args: tuple[Any, ...] = ()) -> aiosqlite.Row | None:
        async with self._lock:
            return await _fetch_one(self._db, sql, args)

    async def _read_all(self, sql: str, args: tuple[Any, ...] = ()) -> list[aiosqlite.Row]:
        async with self._lock:
            return list(await (await self._db.execute(sql, args)).fetchall())


async def _fetch_one(db: aiosqlite.Connection, sql: str, args: tuple[Any, ...] = ()) -> aiosqlite.Row | None:
    return await (await db.execute(sql, args)).fetchone()


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (which contain ';') whole."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        if joined.endswith(";") and (
            not joined.upper().startswith("CREATE TRIGGER") or joined.upper().endswith("END;")
        ):
            statements.append(joined)
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current).strip())
    return statements


def _check_owner(job: Job, actor: Actor, verb: str) -> None:
    if not actor.is_admin and actor.user_key != job.source.user_key:
        raise NotAllowed(f"Job {job.id} belongs to someone else; only they or an admin can {verb} it.")


def _finished_verb(status: JobStatus) -> str:
    return {"succeeded": "finished", "failed": "failed", "cancelled": "been cancelled"}[status.value]


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _row_to_job(row: aiosqlite.Row) -> Job:
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
    )
