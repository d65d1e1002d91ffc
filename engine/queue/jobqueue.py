"""The persistent job queue: one transaction per state change, in SQLite or PostgreSQL (`database.url`).

States: queued -> running -> succeeded | failed | cancelled; terminal states never change (a trigger enforces it).
Delivery of a finished video has its own status, so a failed upload is retried without generating again. The SQL
is written once for both databases (engine/queue/backend.py); engine/queue/order.py holds the fair order.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Iterable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import asyncpg

from engine.errors import ClaimLost, InvalidTransition, JobNotFound, NotAllowed, QueueFull, counted, duration_text
from engine.jobs import (
    Actor,
    DeliveryStatus,
    EnqueueResult,
    EventKind,
    FinishTimes,
    GenerationParams,
    Job,
    JobEvent,
    JobSource,
    JobStatus,
    PreviewInfo,
    Progress,
    QueuePosition,
    ResultInfo,
    Stage,
    WorkerRecord,
    WorkerState,
)
from engine.queue.backend import Backend, Row, Tx
from engine.queue.bus import EventBus
from engine.queue.order import POSITION_SQL, WARM_SQL, next_sql
from engine.queue.postgres import PostgresBackend
from engine.queue.sqlite import SqliteBackend
from engine.queue.url import SqliteUrl, parse_database_url
from engine.storage.images import ImageInfo, Mode

# Handled chat updates are kept this long, so a platform that sends one again is not answered twice.
INBOX_KEEP_S = 86400

DAY_S = 86400
# Ids per query: well under SQLite's limit on bound parameters.
SQL_CHUNK = 500
RECENT_RUNS = 20  # a model's latest videos, whose times predict its next ones
RUN_STAGES = (Stage.DENOISING, Stage.DECODING, Stage.ENCODING)  # a running job's eta_s is then its whole rest
# A claim tries each user's next job, up to CLAIM_CANDIDATES of them in the fair order. Only when all of those are
# being claimed by other processes at that moment does it look this deep into each user's jobs, so that many
# workers can claim at once even from a single user, never waiting for each other.
CLAIM_DEPTH = 4
CLAIM_CANDIDATES = 16
# What a database that is locked, read-only, full or out of reach raises: a writer waits and tries again.
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)
WORKER_STOPPED = "the worker stopped"  # why a running job went back to the queue when its process stopped
EVENTS_CHANNEL = "wanbot_events"  # PostgreSQL's NOTIFY channel: "there are new rows in queue_events"
# A running job's progress reaches other processes at most this often (every stage change at once): a chat edit is
# paced far slower, and a row a step would be a write a step.
SHARED_PROGRESS_EVERY_S = 0.25
SHARED_EVENTS_KEEP_S = 600.0  # a process that was away longer catches up from the tables, not the events
WORKER_RECORDS_KEEP_S = 7 * DAY_S  # a stopped or silent worker stays listed this long


class JobQueue:
    """All reads and writes of jobs. Create with `await JobQueue.connect(url)` or `await JobQueue.open(path)`."""

    def __init__(self, db: Backend, events: EventBus, clock: Callable[[], float]) -> None:
        self._db = db
        self.events = events
        self._clock = clock
        # Names this process's shared events, so that it does not hear its own again.
        self.origin = secrets.token_hex(8)
        self._sharing = False
        self._progress_shared_at: dict[int, tuple[float, Stage]] = {}

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
        """Tell this process's subscribers (other processes heard of it from `_log` or `_share`)."""
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
            # The limits are counted, then the job added: one enqueue at a time, so two never both take the last place.
            await db.serialize("enqueue")
            if source.dedup_key is not None:
                row = await db.one("SELECT * FROM jobs WHERE dedup_key = ?", source.dedup_key)
                if row is not None:
                    job = _row_to_job(row)
                    return EnqueueResult(job=job, created=False, position=await self._position(db, job.id))
            if not is_admin:
                await self._check_limits(db, source.user_key, per_user_limit, global_limit)
                if daily_limit:
                    await self._check_daily_limit(db, source.user_key, daily_limit)
            row = await db.one(
                """INSERT INTO jobs (user_key, source_json, dedup_key, mode, model, params_json, images_json,
                                     status, priority, retry_of, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?) RETURNING *""",
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
            )
            job = _row_to_job(row)
            await db.run_many(
                "INSERT INTO job_images (job_id, sha256, role) VALUES (?, ?, ?)",
                [(job.id, info.sha256, info.role) for info in images],
            )
            await self._log(db, job.id, EventKind.ENQUEUED, None if retry_of is None else f"retry of {retry_of}")
            position = await self._position(db, job.id)
        self._publish(EventKind.ENQUEUED, job)
        return EnqueueResult(job=job, created=True, position=position)

    async def _check_limits(self, db: Tx, user_key: str, per_user: int, total: int) -> None:
        row = await db.one(
            """SELECT (SELECT COUNT(*) FROM jobs INDEXED BY jobs_queued_per_user
                       WHERE status = 'queued' AND user_key = ?) AS mine,
                      (SELECT COUNT(*) FROM jobs WHERE status = 'queued') AS total""",
            user_key,
        )
        if row["mine"] >= per_user:
            raise QueueFull(
                f"You already have {counted(row['mine'], 'video')} waiting (the limit is {per_user}).",
                "Wait for one to finish, or cancel one with /cancel.",
            )
        if row["total"] >= total:
            waiting = counted(row["total"], "video")
            raise QueueFull(f"The queue is full ({waiting} waiting).", "Please try again in a few minutes.")

    async def _check_daily_limit(self, db: Tx, user_key: str, limit: int) -> None:
        """Jobs that started (they used the GPU) or may still start count; ones that ended before starting do not."""
        since = self._clock() - DAY_S
        row = await db.one(
            """SELECT COUNT(*) AS used, MIN(created_at) AS oldest FROM jobs INDEXED BY jobs_user_started
               WHERE user_key = ? AND created_at > ?
                 AND (status IN ('queued', 'running') OR started_at IS NOT NULL)""",
            user_key,
            since,
        )
        if row["used"] >= limit:
            raise QueueFull(
                f"You have asked for {counted(row['used'], 'video')} in the last 24 hours; the limit is {limit} a day.",
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
        async with self._db.reading() as db:
            known = "SELECT 1 FROM jobs WHERE dedup_key = ?"
            if source.dedup_key is not None and await db.one(known, source.dedup_key):
                return
            await self._check_limits(db, source.user_key, per_user_limit, global_limit)
            if daily_limit:
                await self._check_daily_limit(db, source.user_key, daily_limit)

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
            raise InvalidTransition(f"Job #{job_id} is still {old.status}.", "Retry it once it has finished.")
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
        self,
        preferred_model: str | None = None,
        max_model_skips: int = 3,
        exclude_models: Iterable[str] = (),
        worker_id: str | None = None,
    ) -> Job | None:
        """Atomically move the next queued job to running and return it, or None when nothing waits.

        With `worker_id` the job is that worker's while it heartbeats, and gets a new `claim_token` that its writes
        must carry (a worker silent past the lease loses the job to the queue, and its late writes are refused).

        With `preferred_model` (the one loaded), a job for it may go first, but the job that was next counts each
        time it is passed over this way, and one passed over `max_model_skips` times goes next, so nobody starves.
        Jobs for `exclude_models` (being downloaded) wait where they are. Jobs another process is claiming at this
        moment are passed by, never waited for.
        """
        excluded = sorted(set(exclude_models))
        async with self._transaction() as db:
            candidates = await _candidates(db, 1, excluded)
            if not candidates:
                return None
            head, warm_id = candidates[0], None
            order = [row["id"] for row in candidates]
            if preferred_model and head["model"] != preferred_model and head["passed_over"] < max_model_skips:
                # The candidates are the users' next jobs in the fair order, and every one of those comes before
                # anyone's second: the first of them for the model is its first job in the fair order. Only when
                # none is, the longer search of the users' later jobs.
                warm = next((row for row in candidates if row["model"] == preferred_model), None)
                if warm is None:
                    warm = await db.one(WARM_SQL, preferred_model)
                if warm is not None:
                    warm_id = warm["id"]
                    order.insert(0, warm_id)
            row = await self._start_first_free(db, order, worker_id)
            if row is None:  # every user's next job is being claimed by another process right now
                deeper = await _candidates(db, CLAIM_DEPTH, excluded)
                row = await self._start_first_free(db, [candidate["id"] for candidate in deeper], worker_id)
            if row is None:
                return None
            job_id = row["id"]
            if job_id == warm_id:
                await db.run(
                    f"""UPDATE jobs SET passed_over = passed_over + 1
                        WHERE id = (SELECT id FROM jobs WHERE id = ? AND status = 'queued'{db.skip_locked})""",
                    head["id"],
                )
            await self._log(db, job_id, EventKind.STARTED)
            job = _row_to_job(row)
        self._publish(EventKind.STARTED, job)
        return job

    async def _start_first_free(self, db: Tx, job_ids: list[int], worker_id: str | None) -> Row | None:
        """Start the first of these jobs still queued and not being claimed by another process; its row."""
        token = secrets.token_hex(16) if worker_id is not None else None
        for job_id in job_ids:
            row = await db.one(
                f"""UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, progress_json = NULL,
                           worker_id = ?, claim_token = ?
                    WHERE id = (SELECT id FROM jobs WHERE id = ? AND status = 'queued'{db.skip_locked})
                      AND status = 'queued'
                    RETURNING *""",
                self._clock(),
                worker_id,
                token,
                job_id,
            )
            if row is not None:
                return row
        return None

    async def update_progress(
        self, job_id: int, progress: Progress, persist: bool = True, token: str | None = None
    ) -> None:
        """Publish progress to subscribers; `persist` also stores it (callers throttle that). With the claim's
        `token`, a job that is no longer this claim's raises ClaimLost."""
        share = self._progress_worth_sharing(job_id, progress)
        if persist or share:
            async with self._transaction() as db:
                if persist:
                    changed = await db.run(
                        f"UPDATE jobs SET progress_json = ? WHERE id = ? AND status = 'running'{_CLAIMED}",
                        progress.model_dump_json(),
                        job_id,
                        token,
                        token,
                    )
                    if changed != 1 and token is not None:
                        raise _claim_lost(await self._get(db, job_id))
                elif token is not None and not await db.one(
                    "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND claim_token = ?", job_id, token
                ):
                    raise _claim_lost(await self._get(db, job_id))  # nobody else hears a late worker's steps
                if share:
                    await self._share(db, EventKind.PROGRESS, job_id, progress.model_dump_json())
                job = await self._get(db, job_id)
        else:
            job = await self.get(job_id)
        self._publish(EventKind.PROGRESS, job, progress)

    async def announce_preview(self, job_id: int, preview: PreviewInfo) -> None:
        """A running job has a new live preview: subscribers here and in other processes show it."""
        if self._sharing:
            async with self._transaction() as db:
                await self._share(db, EventKind.PREVIEW, job_id, preview.model_dump_json())
        self._publish(EventKind.PREVIEW, await self.get(job_id), preview=preview)

    async def mark_succeeded(self, job_id: int, result: ResultInfo, token: str | None = None) -> Job:
        return await self._finish(
            job_id,
            JobStatus.SUCCEEDED,
            EventKind.SUCCEEDED,
            "result_json = ?, delivery_status = 'pending'",
            (result.model_dump_json(),),
            token=token,
        )

    async def mark_failed(self, job_id: int, user_message: str, detail: str = "", token: str | None = None) -> Job:
        return await self._finish(
            job_id,
            JobStatus.FAILED,
            EventKind.FAILED,
            "error_user = ?, error_detail = ?",
            (user_message, detail),
            detail=user_message,
            token=token,
        )

    async def mark_cancelled(self, job_id: int, token: str | None = None) -> Job:
        return await self._finish(job_id, JobStatus.CANCELLED, EventKind.CANCELLED, "", (), token=token)

    async def _finish(
        self,
        job_id: int,
        status: JobStatus,
        kind: EventKind,
        extra_sql: str,
        extra: tuple[Any, ...],
        detail: str | None = None,
        token: str | None = None,
    ) -> Job:
        """End a running job; with the claim's `token`, only if this claim still runs it (else ClaimLost)."""
        assignments = "status = ?, finished_at = ?" + (f", {extra_sql}" if extra_sql else "")
        async with self._transaction() as db:
            changed = await db.run(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status = 'running'{_CLAIMED}",
                status.value,
                self._clock(),
                *extra,
                job_id,
                token,
                token,
            )
            job = await self._get(db, job_id)
            if changed != 1 and token is not None:
                raise _claim_lost(job)
            if changed != 1:
                raise InvalidTransition(f"Job #{job_id} is {job.status}, not running; it cannot become {status}.")
            await self._log(db, job_id, kind, detail)
        self._publish(kind, job)
        return job

    async def requeue(self, job_id: int, reason: str, token: str | None = None) -> Job:
        """Put a running job back at the head of its turn, not counting the interrupted attempt (with the claim's
        `token`: only if this claim still runs it, else ClaimLost)."""
        async with self._transaction() as db:
            changed = await db.run(
                f"""UPDATE jobs SET status = 'queued', started_at = NULL, progress_json = NULL, claim_token = NULL,
                           attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END
                    WHERE id = ? AND status = 'running'{_CLAIMED}""",
                job_id,
                token,
                token,
            )
            job = await self._get(db, job_id)
            if changed != 1 and token is not None:
                raise _claim_lost(job)
            await self._log(db, job_id, EventKind.REQUEUED, reason)
        self._publish(EventKind.REQUEUED, job)
        return job

    async def fail_waiting(self, model: str, user_message: str, detail: str) -> list[Job]:
        """Fail every queued job for `model` at once (its download failed for good)."""
        async with self._transaction() as db:
            rows = await db.all(
                """UPDATE jobs SET status = 'failed', finished_at = ?, error_user = ?, error_detail = ?
                   WHERE status = 'queued' AND model = ? RETURNING *""",
                self._clock(),
                user_message,
                detail,
                model,
            )
            failed = sorted((_row_to_job(row) for row in rows), key=lambda job: job.id)
            for job in failed:
                await self._log(db, job.id, EventKind.FAILED, user_message)
        for job in failed:
            self._publish(EventKind.FAILED, job)
        return failed

    async def waiting_for(self, model: str) -> list[Job]:
        rows = await self._read_all("SELECT * FROM jobs WHERE status = 'queued' AND model = ? ORDER BY id", model)
        return [_row_to_job(row) for row in rows]

    async def recover_interrupted(
        self,
        max_attempts: int,
        lease_s: float = 60.0,
        machine: str | None = None,
        is_alive: Callable[[int], bool] = lambda pid: True,
    ) -> list[Job]:
        """Running jobs whose worker is gone go back to the queue, or fail once they used their attempts (the attempt
        they were on counts). Gone: stopped, not heard from for `lease_s`, unknown (a claim made without a worker, by
        an older wanbot), or on `machine` (this one: WorkerRecord.machine) with a process that `is_alive` says has ended
        (a crash seen at once, without waiting out the lease). Any live process may call it, as often as it likes."""
        now = self._clock()
        # Looked for without locks first: every live process asks every few seconds, and mostly nothing is gone.
        async with self._db.reading() as db:
            running = await db.all("SELECT id, worker_id FROM jobs WHERE status = 'running' ORDER BY id")
            gone = {}
            for row in running:
                worker = await db.one("SELECT * FROM workers WHERE id = ?", row["worker_id"])
                why = _why_gone(worker, now, lease_s, machine, is_alive)
                if why is not None:
                    gone[row["id"]] = (row["worker_id"], why)
        if not gone:
            return []
        recovered = []
        async with self._transaction() as db:
            for job_id, (worker_id, why) in gone.items():
                # Still running for the same claim: a job that ended, or moved on, meanwhile is left alone.
                row = await db.one(
                    f"""SELECT id, attempts FROM jobs WHERE id = ? AND status = 'running'
                        AND (worker_id = ? OR (worker_id IS NULL AND CAST(? AS TEXT) IS NULL)){db.skip_locked}""",
                    job_id,
                    worker_id,
                    worker_id,
                )
                worker = await db.one("SELECT * FROM workers WHERE id = ?", worker_id)
                if row is None or _why_gone(worker, now, lease_s, machine, is_alive) is None:
                    continue  # ended meanwhile, or its worker was heard from again
                if row["attempts"] < max_attempts:
                    await db.run(
                        """UPDATE jobs SET status = 'queued', started_at = NULL, progress_json = NULL,
                                  claim_token = NULL WHERE id = ?""",
                        row["id"],
                    )
                    await self._log(db, row["id"], EventKind.REQUEUED, why)
                else:
                    await db.run(
                        """UPDATE jobs SET status = 'failed', finished_at = ?, error_user = ?, error_detail = ?,
                                  claim_token = NULL WHERE id = ?""",
                        now,
                        f"The bot stopped while making this video {row['attempts']} times, so it was given "
                        "up. Retry it if you like; if it keeps failing, try fewer frames or a lower resolution.",
                        f"interrupted after {row['attempts']} attempts ({why})",
                        row["id"],
                    )
                    await self._log(db, row["id"], EventKind.FAILED, "too many interrupted attempts")
                recovered.append(await self._get(db, row["id"]))
        for job in recovered:
            self._publish(EventKind.REQUEUED if job.status is JobStatus.QUEUED else EventKind.FAILED, job)
        return recovered

    # -- workers -----------------------------------------------------------------------------------------------

    async def heartbeat(self, worker: WorkerRecord, token: str | None = None) -> bool:
        """Store the worker's state as of now. False when the job it runs (`worker.current_job`, claimed with
        `token`) is no longer its own: it was silent past the lease and the job went back to the queue."""
        async with self._transaction() as db:
            await db.run(
                """INSERT INTO workers (id, host, machine, pid, device, gpu_name, free_memory_bytes, loaded_model,
                                        downloading_json, current_job, state, started_at, heartbeat_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET gpu_name = excluded.gpu_name,
                       free_memory_bytes = excluded.free_memory_bytes, loaded_model = excluded.loaded_model,
                       downloading_json = excluded.downloading_json, current_job = excluded.current_job,
                       state = excluded.state, heartbeat_at = excluded.heartbeat_at""",
                worker.id,
                worker.host,
                worker.machine,
                worker.pid,
                worker.device,
                worker.gpu_name,
                worker.free_memory_bytes,
                worker.loaded_model,
                json.dumps(worker.downloading),
                worker.current_job,
                worker.state.value,
                worker.started_at,
                self._clock(),
            )
            if worker.current_job is None or token is None:
                return True
            row = await db.one(
                "SELECT 1 FROM jobs WHERE id = ? AND status = 'running' AND claim_token = ?", worker.current_job, token
            )
            return row is not None

    async def workers(self) -> list[WorkerRecord]:
        """Every worker heard from in the last week, the most recently started first."""
        rows = await self._read_all(
            "SELECT * FROM workers WHERE heartbeat_at >= ? ORDER BY started_at DESC, id",
            self._clock() - WORKER_RECORDS_KEEP_S,
        )
        return [_row_to_worker(row) for row in rows]

    # -- events shared between processes -----------------------------------------------------------------------

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

    # -- cancelling --------------------------------------------------------------------------------------------

    async def cancel(self, job_id: int, actor: Actor) -> Job:
        """Cancel a queued job at once; for a running one set the request the worker acts on."""
        async with self._transaction() as db:
            # Locked as read: a claim in another process either came first (the job runs) or waits for this.
            job = await self._get(db, job_id, lock=True)
            _check_owner(job, actor, "cancel")
            if job.status is JobStatus.QUEUED:
                await db.run(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? AND status = 'queued'",
                    self._clock(),
                    job_id,
                )
                kind = EventKind.CANCELLED
            elif job.status is JobStatus.RUNNING:
                await db.run("UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", job_id)
                kind = EventKind.CANCEL_REQUESTED
            else:
                raise InvalidTransition(f"Job #{job_id} has already {_finished_verb(job.status)}; nothing to cancel.")
            await self._log(db, job_id, kind, f"by {actor.user_key}")
            job = await self._get(db, job_id)
        self._publish(kind, job)
        return job

    async def is_cancel_requested(self, job_id: int) -> bool:
        row = await self._read_one("SELECT cancel_requested FROM jobs WHERE id = ?", job_id)
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
        delivered_at = self._clock() if status is DeliveryStatus.DELIVERED else None
        async with self._transaction() as db:
            changed = await db.run(
                """UPDATE jobs SET delivery_status = ?, delivery_error = ?,
                          delivery_attempts = CASE WHEN delivery_attempts + 1 > ? THEN delivery_attempts + 1
                                                   ELSE ? END,
                          delivered_at = COALESCE(?, delivered_at)
                   WHERE id = ? AND status = 'succeeded' AND delivery_status != 'delivered'""",
                status.value,
                error,
                attempts_at_least,
                attempts_at_least,
                delivered_at,
                job_id,
            )
            job = await self._get(db, job_id)
            if changed != 1:
                raise InvalidTransition(f"Job #{job_id} has no video waiting for delivery.")
            await self._log(db, job_id, kind, error)
        self._publish(kind, job)
        return job

    async def redeliver(self, job_id: int) -> Job:
        """Let the bot send a finished video again from its stored file (never regenerated), attempts from zero."""
        job = await self.get(job_id)
        if job.status is not JobStatus.SUCCEEDED or job.delivery_status is DeliveryStatus.DELIVERED:
            raise InvalidTransition(
                f"Job #{job_id} has no undelivered video ({job.status.value}, {job.delivery_status or 'no delivery'}).",
                "Only a finished video whose delivery failed can be sent again; `queue retry` makes a new one.",
            )
        if job.result is None or not await self._video_kept(Path(job.result.path)):
            raise InvalidTransition(
                f"The video of job #{job_id} is no longer on disk.", f"Make it again with `queue retry {job_id}`."
            )
        async with self._transaction() as db:
            changed = await db.run(
                """UPDATE jobs SET delivery_status = 'pending', delivery_error = NULL, delivery_attempts = 0
                   WHERE id = ? AND status = 'succeeded' AND delivery_status != 'delivered'""",
                job_id,
            )
            if changed != 1:
                raise InvalidTransition(f"Job #{job_id} was delivered meanwhile.", "Nothing to do.")
            job = await self._get(db, job_id)
            await self._log(db, job_id, EventKind.REDELIVERY)
        self._publish(EventKind.REDELIVERY, job)
        return job

    async def _video_kept(self, video: Path) -> bool:
        """On this machine, or (PostgreSQL) in the database, where workers on other machines put their videos."""
        if await asyncio.to_thread(video.is_file):
            return True
        if self.path is not None:
            return False
        return await self._read_one("SELECT 1 FROM stored_files WHERE name = ?", f"video/{video.name}") is not None

    async def undelivered(self, platform: str, max_attempts: int = 5) -> list[Job]:
        """Finished videos on `platform` whose upload has not succeeded yet, oldest first."""
        rows = await self._read_all(
            """SELECT * FROM jobs WHERE status = 'succeeded' AND delivery_status IN ('pending', 'delivery_failed')
               AND delivery_attempts < ? AND user_key >= ? AND user_key < ? ORDER BY finished_at""",
            max_attempts,
            *_platform_range(platform),
        )
        return [_row_to_job(row) for row in rows]

    async def mark_final_shown(self, job_id: int) -> None:
        async with self._transaction() as db:
            await db.run("UPDATE jobs SET final_shown = 1 WHERE id = ?", job_id)

    async def final_unshown(self, platform: str, max_attempts: int, limit: int = 200) -> list[Job]:
        """Ended jobs on `platform` whose chat message does not show the end yet (the process stopped first, or a
        restart gave the job up): failed and cancelled ones, and videos sent or given up on. Videos still to be
        sent are not here: their delivery shows the end."""
        rows = await self._read_all(
            """SELECT * FROM jobs INDEXED BY jobs_final_unshown
               WHERE final_shown = 0 AND status IN ('succeeded', 'failed', 'cancelled')
               AND user_key >= ? AND user_key < ?
               AND NOT (status = 'succeeded' AND delivery_status IN ('pending', 'delivery_failed')
                        AND delivery_attempts < ?)
               ORDER BY finished_at LIMIT ?""",
            *_platform_range(platform),
            max_attempts,
            limit,
        )
        return [_row_to_job(row) for row in rows]

    # -- the chat inbox ----------------------------------------------------------------------------------------

    async def inbox_put(self, platform: str, key: str, payload: str, message_key: str | None = None) -> bool:
        """Store an update before the platform learns it arrived; False if it was stored before (sent again)."""
        async with self._transaction() as db:
            added = await db.run(
                """INSERT INTO chat_inbox (platform, key, message_key, payload, received_at) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (platform, key) DO NOTHING""",
                platform,
                key,
                message_key,
                payload,
                self._clock(),
            )
            return added == 1

    async def inbox_open(self, platform: str) -> list[str]:
        """Payloads of the updates not handled to the end (the process stopped first), oldest first; handled ones
        older than a day are forgotten meanwhile."""
        async with self._transaction() as db:
            await db.run(
                "DELETE FROM chat_inbox WHERE platform = ? AND done_at < ?", platform, self._clock() - INBOX_KEEP_S
            )
            rows = await db.all(
                """SELECT payload FROM chat_inbox INDEXED BY chat_inbox_open
                   WHERE platform = ? AND done_at IS NULL ORDER BY received_at""",
                platform,
            )
        return [row["payload"] for row in rows]

    async def inbox_done(self, platform: str, *keys: str) -> None:
        async with self._transaction() as db:
            await db.run_many(
                "UPDATE chat_inbox SET done_at = ? WHERE platform = ? AND key = ?",
                [(self._clock(), platform, key) for key in keys],
            )

    async def inbox_set_reply(self, platform: str, message_key: str, reply: str) -> None:
        """What was already answered to a message (the "Checking" message), so that handling it again edits that."""
        async with self._transaction() as db:
            await db.run(
                "UPDATE chat_inbox SET reply = ? WHERE platform = ? AND message_key = ?", reply, platform, message_key
            )

    async def inbox_reply(self, platform: str, message_key: str) -> str | None:
        row = await self._read_one(
            "SELECT reply FROM chat_inbox WHERE platform = ? AND message_key = ? AND reply IS NOT NULL",
            platform,
            message_key,
        )
        return row["reply"] if row else None

    # -- reading -----------------------------------------------------------------------------------------------

    async def get(self, job_id: int) -> Job:
        async with self._db.reading() as db:
            return await self._get(db, job_id)

    async def _get(self, db: Tx, job_id: int, lock: bool = False) -> Job:
        row = await db.one(f"SELECT * FROM jobs WHERE id = ?{db.for_update if lock else ''}", job_id)
        if row is None:
            raise JobNotFound(f"There is no job #{job_id}.", "Check the number with /queue.")
        return _row_to_job(row)

    async def update_reply(self, job_id: int, **reply: str) -> Job:
        """Record adapter ids learnt after enqueueing (a message the progress moved to) in the job's source."""
        async with self._transaction() as db:
            job = await self._get(db, job_id, lock=True)
            source = job.source.model_copy(update={"reply": {**job.source.reply, **reply}})
            await db.run("UPDATE jobs SET source_json = ? WHERE id = ?", source.model_dump_json(), job_id)
            return await self._get(db, job_id)

    async def find_by_source(self, source: JobSource) -> Job | None:
        """The job already made from this platform message, if any (a redelivered update)."""
        if source.dedup_key is None:
            return None
        row = await self._read_one("SELECT * FROM jobs WHERE dedup_key = ?", source.dedup_key)
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
            clauses.append("user_key >= ? AND user_key < ?")
            args.extend(_platform_range(platform))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "ASC" if oldest_first else "DESC"
        rows = await self._read_all(f"SELECT * FROM jobs {where} ORDER BY id {order} LIMIT ?", *args, limit)
        return [_row_to_job(row) for row in rows]

    async def position(self, job_id: int) -> QueuePosition | None:
        """Where a queued job stands (1 = next) and a rough ETA from recent job durations; None if not queued."""
        async with self._db.reading() as db:
            return await self._position(db, job_id)

    async def _position(self, db: Tx, job_id: int) -> QueuePosition | None:
        """The wait: what the running job has left, then a usual run of this job's model for each job ahead (their
        models may differ, but a model's own videos say more than an average over tiny and real ones); None when
        either is not known."""
        row = await db.one(POSITION_SQL, job_id)
        if row is None:
            return None
        position = row["position"]
        running_left = await self._running_left(db)
        if position == 1 or running_left is None:
            return QueuePosition(position=position, eta_s=running_left)
        typical = await self._typical_run_s(db, row["model"])
        eta_s = running_left + typical * (position - 1) if typical is not None else None
        return QueuePosition(position=position, eta_s=eta_s)

    async def _running_left(self, db: Tx) -> float | None:
        """Seconds until the running job ends (0 when none runs): its own estimate once it denoises (steps, decode
        and encode), else its model's usual run time less the time it has run; None when neither is known (no video
        of its model yet, or it has overrun the usual time: no number is better than "0s")."""
        running = await db.one(
            "SELECT model, started_at, progress_json FROM jobs WHERE status = 'running' ORDER BY started_at LIMIT 1"
        )
        if running is None:
            return 0.0
        progress = Progress.model_validate_json(running["progress_json"]) if running["progress_json"] else None
        if progress is not None and (own := _eta_to_the_end(progress)) is not None:
            return own
        typical = await self._typical_run_s(db, running["model"])
        if typical is None:
            return None
        left = typical - (self._clock() - running["started_at"])
        return left if left > 0 else None

    async def _typical_run_s(self, db: Tx, model: str) -> float | None:
        row = await db.one(
            """SELECT AVG(finished_at - started_at) AS typical FROM (SELECT finished_at, started_at FROM jobs
               WHERE status = 'succeeded' AND model = ? ORDER BY finished_at DESC LIMIT ?) AS recent""",
            model,
            RECENT_RUNS,
        )
        return row["typical"]

    async def finish_times(self, model: str, pixels: int) -> FinishTimes | None:
        """The decode and encode time of a video of `pixels` (width x height x frames) from `model`, scaled from its
        latest videos (both grow with the pixels); None before its first video."""
        rows = await self._read_all(
            """SELECT result_json FROM jobs WHERE status = 'succeeded' AND model = ?
               ORDER BY finished_at DESC LIMIT ?""",
            model,
            RECENT_RUNS,
        )
        results = [ResultInfo.model_validate_json(row["result_json"]) for row in rows if row["result_json"]]
        known = [rate for result in results if (rate := _finish_rates(result)) is not None]
        if not known:
            return None
        return FinishTimes(
            decode_s=pixels * sum(decode for decode, _ in known) / len(known),
            encode_s=pixels * sum(encode for _, encode in known) / len(known),
        )

    async def stats(self, period_s: float) -> list[dict[str, Any]]:
        """Per model, the jobs created in the last `period_s`: how they ended, were delivered, waited and ran."""
        rows = await self._read_all(
            """SELECT model, COUNT(*) AS jobs,
                      COUNT(*) FILTER (WHERE status = 'succeeded') AS succeeded,
                      COUNT(*) FILTER (WHERE status = 'failed') AS failed,
                      COUNT(*) FILTER (WHERE status = 'cancelled') AS cancelled,
                      COUNT(*) FILTER (WHERE status IN ('queued', 'running')) AS active,
                      COUNT(*) FILTER (WHERE delivery_status = 'delivery_failed') AS undelivered,
                      AVG(started_at - created_at) AS mean_wait_s,
                      AVG(CASE WHEN status = 'succeeded' THEN finished_at - started_at END) AS mean_run_s,
                      MAX(CASE WHEN status = 'succeeded' THEN finished_at - started_at END) AS longest_run_s
               FROM jobs WHERE created_at >= ? GROUP BY model ORDER BY jobs DESC, model""",
            self._clock() - period_s,
        )
        return [dict(row) for row in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._read_all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    async def events_of(self, job_id: int) -> list[tuple[str, str | None]]:
        rows = await self._read_all("SELECT kind, detail FROM job_events WHERE job_id = ? ORDER BY id", job_id)
        return [(row["kind"], row["detail"]) for row in rows]

    # -- flags and clean-up ------------------------------------------------------------------------------------

    async def set_paused(self, paused: bool) -> None:
        await self.set_flag("paused", "1" if paused else "0")

    async def is_paused(self) -> bool:
        return await self.flag("paused") == "1"

    async def set_flag(self, name: str, value: str) -> None:
        """A setting that outlives the process and is the same for every process (a pause, a chat's choices)."""
        async with self._transaction() as db:
            await db.run(
                "INSERT INTO queue_flags (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                name,
                value,
            )

    async def flag(self, name: str) -> str | None:
        row = await self._read_one("SELECT value FROM queue_flags WHERE name = ?", name)
        return row["value"] if row else None

    async def images_in_use(self, retention_s: float) -> set[str]:
        """Hashes of images that active jobs, or jobs finished within the retention time, still refer to."""
        rows = await self._read_all(
            """SELECT DISTINCT i.sha256 FROM job_images i JOIN jobs j ON j.id = i.job_id
               WHERE j.status IN ('queued', 'running') OR j.finished_at >= ?""",
            self._clock() - retention_s,
        )
        return {row["sha256"] for row in rows}

    async def delivered_before(self, job_ids: Collection[int], retention_s: float) -> dict[int, str]:
        """Which of these jobs had their video delivered more than `retention_s` ago, with its file's name."""
        ids = sorted(job_ids)
        found: dict[int, str] = {}
        for start in range(0, len(ids), SQL_CHUNK):
            chunk = ids[start : start + SQL_CHUNK]
            rows = await self._read_all(
                f"""SELECT id, result_json FROM jobs WHERE id IN ({",".join("?" * len(chunk))})
                    AND delivery_status = 'delivered' AND delivered_at < ?""",
                *chunk,
                self._clock() - retention_s,
            )
            found.update(
                (row["id"], Path(json.loads(row["result_json"] or "{}").get("path") or "").name) for row in rows
            )
        return found

    async def _read_one(self, sql: str, *args: Any) -> Row | None:
        async with self._db.reading() as db:
            return await db.one(sql, *args)

    async def _read_all(self, sql: str, *args: Any) -> list[Row]:
        async with self._db.reading() as db:
            return await db.all(sql, *args)


async def _candidates(db: Tx, depth: int, excluded: list[str]) -> list[Row]:
    """The next jobs in the fair order, looking `depth` jobs deep into each user's; id, model and passed_over."""
    return await db.all(next_sql(depth, len(excluded)), *(excluded * depth), CLAIM_CANDIDATES)


# Appended to a job's WHERE: the claim token matches, unless the caller gave none (it does not hold a claim).
_CLAIMED = " AND (CAST(? AS TEXT) IS NULL OR claim_token = ?)"


def _claim_lost(job: Job) -> ClaimLost:
    return ClaimLost(
        f"Job #{job.id} is no longer this worker's ({job.status.value}): it was silent longer than the lease, and the "
        "job went back to the queue."
    )


def _why_gone(
    worker: Row | None, now: float, lease_s: float, machine: str | None, is_alive: Callable[[int], bool]
) -> str | None:
    """Why a running job's worker is gone (its job is to be queued again), or None while it runs."""
    if worker is None:
        return "the bot restarted while it ran"
    if worker["state"] == WorkerState.STOPPED.value:
        return f"its worker {worker['id']} stopped"
    if now - worker["heartbeat_at"] > lease_s:
        return f"its worker {worker['id']} was not heard from for {duration_text(now - worker['heartbeat_at'])}"
    if machine and worker["machine"] == machine and not is_alive(worker["pid"]):
        return f"its worker {worker['id']} ended"
    return None


def _row_to_worker(row: Row) -> WorkerRecord:
    stored = set(WorkerRecord.model_fields) - {"downloading"}
    return WorkerRecord(**{name: row[name] for name in stored}, downloading=json.loads(row["downloading_json"]))


def _platform_range(platform: str) -> tuple[str, str]:
    """user_key is "platform:user": a range on it finds one platform's jobs, and stays an index seek."""
    return f"{platform}:", f"{platform};"


def _check_owner(job: Job, actor: Actor, verb: str) -> None:
    if not actor.is_admin and actor.user_key != job.source.user_key:
        raise NotAllowed(f"Job #{job.id} belongs to someone else; only they or an admin can {verb} it.")


def _finished_verb(status: JobStatus) -> str:
    return {"succeeded": "finished", "failed": "failed", "cancelled": "been cancelled"}[status.value]


def _eta_to_the_end(progress: Progress) -> float | None:
    """A running job's own estimate of its time left, when it covers the whole rest (not a download's, not one
    without the decode and encode after the steps)."""
    return progress.eta_s if progress.stage in RUN_STAGES and not progress.eta_steps_only else None


def _finish_rates(result: ResultInfo) -> tuple[float, float] | None:
    """Seconds of decode and of encode per pixel of a finished video; None for one made before both were timed."""
    pixels = result.width * result.height * result.frames
    if "decode_s" not in result.timings or "encode_s" not in result.timings or pixels == 0:
        return None
    return result.timings["decode_s"] / pixels, result.timings["encode_s"] / pixels


def _row_to_job(row: Row) -> Job:
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
    )
