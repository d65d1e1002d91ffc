"""Adding jobs: the limits counted and the job inserted in one transaction, a retry as a new job, and what an
adapter learns about a job after adding it."""

from __future__ import annotations

import json
from collections.abc import Iterable

from engine.errors import InvalidTransition, QueueFull, counted, duration_text
from engine.jobs import (
    Actor,
    EnqueueResult,
    EventKind,
    GenerationParams,
    Job,
    JobSource,
)
from engine.queue.backend import Tx
from engine.queue.core import (
    DAY_S,
    check_owner,
    row_to_job,
)
from engine.queue.quotas import Quotas
from engine.storage.images import ImageInfo, Mode


class Enqueueing(Quotas):
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
        daily_gpu_seconds: float = 0,
        daily_chat_gpu_seconds: float = 0,
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
                    job = row_to_job(row)
                    return EnqueueResult(job=job, created=False, position=await self._position(db, job.id))
            if not is_admin:
                await self._check_limits(db, source.user_key, per_user_limit, global_limit)
                if daily_limit:
                    await self._check_daily_limit(db, source.user_key, daily_limit)
                await self._check_gpu_time(db, source, daily_gpu_seconds, daily_chat_gpu_seconds, model)
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
            job = row_to_job(row)
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
        daily_gpu_seconds: float = 0,
        daily_chat_gpu_seconds: float = 0,
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
            await self._check_gpu_time(db, source, daily_gpu_seconds, daily_chat_gpu_seconds, None)

    async def retry(
        self,
        job_id: int,
        actor: Actor,
        params: GenerationParams | None = None,
        source: JobSource | None = None,
        **limits: float,
    ) -> EnqueueResult:
        """Queue a finished job again as a new job linked to the old one; the old one stays as it was.

        `params` and `source` replace the old job's (a reroll changes the seed; a reply goes to a new message).
        """
        old = await self.get(job_id)
        check_owner(old, actor, "retry")
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

    async def update_reply(self, job_id: int, **reply: str) -> Job:
        """Record adapter ids learnt after enqueueing (a message the progress moved to) in the job's source."""
        async with self._transaction() as db:
            job = await self._get(db, job_id, lock=True)
            source = job.source.model_copy(update={"reply": {**job.source.reply, **reply}})
            await db.run("UPDATE jobs SET source_json = ? WHERE id = ?", source.model_dump_json(), job_id)
            return await self._get(db, job_id)

    async def replace_waiting_params(self, job_id: int, params: GenerationParams) -> Job | None:
        """Store new settings for a job that still waits (the user chose their own words over the enhancer's); None,
        changing nothing, once it has been claimed."""
        async with self._transaction() as db:
            changed = await db.run(
                "UPDATE jobs SET params_json = ? WHERE id = ? AND status = 'queued'", params.model_dump_json(), job_id
            )
            return await self._get(db, job_id) if changed else None
