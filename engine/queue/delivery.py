"""Delivery records: whether a finished video reached its chat, how often its upload failed, a redelivery, and
whether the chat message shows the end."""

from __future__ import annotations

import asyncio
from pathlib import Path

from engine.errors import InvalidTransition
from engine.jobs import (
    DeliveryStatus,
    EventKind,
    Job,
    JobStatus,
)
from engine.queue.core import (
    QueueCore,
    platform_range,
    row_to_job,
)


class Delivery(QueueCore):
    async def claim_delivery(self, job_id: int, holder: str, max_attempts: int, claim_s: float) -> Job | None:
        """Make `holder` (a process) the one that uploads `job_id`'s video now, counting the upload it starts; the
        job as it stands, or None when the video is no longer waiting or another process claimed it less than
        `claim_s` ago (its upload may still be going: two serves in a race never both send)."""
        now = self.lease_now()
        async with self._transaction() as db:
            changed = await db.run(
                """UPDATE jobs SET delivery_holder = ?, delivery_claimed_at = ?, upload_starts = upload_starts + 1
                   WHERE id = ? AND status = 'succeeded' AND delivery_status IN ('pending', 'delivery_failed')
                   AND delivery_attempts < ?
                   AND (delivery_holder IS NULL OR delivery_holder = ? OR delivery_claimed_at < ?)""",
                holder,
                now,
                job_id,
                max_attempts,
                holder,
                now - claim_s,
            )
            return await self._get(db, job_id) if changed == 1 else None

    async def release_deliveries(self, holder: str) -> None:
        """`holder` uploads nothing any more (it stopped, or it was found gone): others may send its videos."""
        async with self._transaction() as db:
            await db.run("UPDATE jobs SET delivery_holder = NULL WHERE delivery_holder = ?", holder)

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
                          delivered_at = COALESCE(?, delivered_at), delivery_holder = NULL
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
            *platform_range(platform),
        )
        return [row_to_job(row) for row in rows]

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
            *platform_range(platform),
            max_attempts,
            limit,
        )
        return [row_to_job(row) for row in rows]
