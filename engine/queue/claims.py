"""Claiming and running jobs: the fair-order claim with its claim token, progress and previews, the end of a
run (succeeded, failed, cancelled, or back to the queue), and cancelling."""

from __future__ import annotations

import json
import secrets
from collections.abc import Collection, Iterable
from typing import Any

from engine.errors import InvalidTransition
from engine.jobs import (
    Actor,
    EventKind,
    GenerationParams,
    Job,
    JobStatus,
    PreviewInfo,
    Progress,
    ResultInfo,
)
from engine.queue.backend import Row, Tx
from engine.queue.core import (
    CLAIMED_SQL,
    QueueCore,
    check_owner,
    claim_held,
    claim_lost,
    row_to_job,
)
from engine.queue.order import WARM_SQL, next_sql

# A claim tries each user's next job, up to CLAIM_CANDIDATES of them in the fair order. Only when all of those are
# being claimed by other processes at that moment does it look this deep into each user's jobs, so that many
# workers can claim at once even from a single user, never waiting for each other.
# A worker that could not get a model is not counted on for it again for this long (a full disk, a lost network).
UNFETCHABLE_KEEP_S = 1800.0
CLAIM_DEPTH = 4

CLAIM_CANDIDATES = 16


class Claims(QueueCore):
    async def claim_next(
        self,
        preferred_model: str | None = None,
        max_model_skips: int = 3,
        exclude_models: Iterable[str] = (),
        worker_id: str | None = None,
        held_loras: Collection[str] = (),
    ) -> Job | None:
        """Atomically move the next queued job to running and return it, or None when nothing waits.

        Each claim gets a new `claim_token` that every write to the job must carry. With `worker_id` the job is that
        worker's while it heartbeats (a worker silent past the lease loses the job to the queue, and its late writes
        are refused).

        With `preferred_model` (the one loaded), a job for it may go first, but the job that was next counts each
        time it is passed over this way, and one passed over `max_model_skips` times goes next, so nobody starves.
        Jobs for `exclude_models` (being downloaded) wait where they are. Jobs another process is claiming at this
        moment are passed by, never waited for.

        `held_loras` (the style LoRAs the worker holds loaded, by LoraUse.key) extend the warm preference: when the
        next job is for the loaded model but needs a LoRA the worker lacks, the first of the users' next jobs that
        needs only LoRAs it holds may go first, passing the next job over as above.
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
            elif held_loras and head["model"] == preferred_model and head["passed_over"] < max_model_skips:
                warm_id = await _first_holding(db, candidates, preferred_model, set(held_loras))
                if warm_id is not None:
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
            job = row_to_job(row)
        self._publish(EventKind.STARTED, job)
        return job

    async def _start_first_free(self, db: Tx, job_ids: list[int], worker_id: str | None) -> Row | None:
        """Start the first of these jobs still queued and not being claimed by another process; its row."""
        token = secrets.token_hex(16)
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

    async def update_progress(self, job_id: int, progress: Progress, persist: bool = True, *, token: str) -> None:
        """Publish a running job's progress to subscribers; `persist` also stores it (callers throttle that). A job
        that is no longer the claim `token`'s raises ClaimLost: nobody hears a late worker's steps."""
        share = self._progress_worth_sharing(job_id, progress)
        if persist or share:
            async with self._transaction() as db:
                if persist:
                    changed = await db.run(
                        f"UPDATE jobs SET progress_json = ? WHERE id = ? AND status = 'running'{CLAIMED_SQL}",
                        progress.model_dump_json(),
                        job_id,
                        token,
                    )
                    if changed != 1:
                        raise claim_lost(await self._get(db, job_id))
                elif not await claim_held(db, job_id, token):
                    raise claim_lost(await self._get(db, job_id))
                if share:
                    await self._share(db, EventKind.PROGRESS, job_id, progress.model_dump_json())
                job = await self._get(db, job_id)
        else:
            job = await self.get(job_id)
        self._publish(EventKind.PROGRESS, job, progress)

    async def show_waiting_progress(self, job_id: int, progress: Progress) -> None:
        """What a waiting job waits for (its model's download), shown to subscribers here and elsewhere; not stored,
        since no claim runs the job yet."""
        if self._progress_worth_sharing(job_id, progress):
            async with self._transaction() as db:
                await self._share(db, EventKind.PROGRESS, job_id, progress.model_dump_json())
                job = await self._get(db, job_id)
        else:
            job = await self.get(job_id)
        self._publish(EventKind.PROGRESS, job, progress)

    async def holds_claim(self, job_id: int, token: str) -> bool:
        async with self._db.reading() as db:
            return await claim_held(db, job_id, token)

    async def announce_preview(self, job_id: int, preview: PreviewInfo, *, token: str) -> None:
        """A running job has a new live preview: subscribers here and in other processes show it. A job that is no
        longer the claim `token`'s raises ClaimLost, and nobody hears of the preview."""
        async with self._transaction() as db:
            if not await claim_held(db, job_id, token):
                raise claim_lost(await self._get(db, job_id))
            if self._sharing:
                await self._share(db, EventKind.PREVIEW, job_id, preview.model_dump_json())
            job = await self._get(db, job_id)
        self._publish(EventKind.PREVIEW, job, preview=preview)

    async def mark_succeeded(self, job_id: int, result: ResultInfo, *, token: str) -> Job:
        return await self._finish(
            job_id,
            JobStatus.SUCCEEDED,
            EventKind.SUCCEEDED,
            "result_json = ?, delivery_status = 'pending'",
            (result.model_dump_json(),),
            token=token,
        )

    async def mark_failed(self, job_id: int, user_message: str, detail: str = "", *, token: str) -> Job:
        return await self._finish(
            job_id,
            JobStatus.FAILED,
            EventKind.FAILED,
            "error_user = ?, error_detail = ?",
            (user_message, detail),
            detail=user_message,
            token=token,
        )

    async def mark_cancelled(self, job_id: int, *, token: str) -> Job:
        return await self._finish(job_id, JobStatus.CANCELLED, EventKind.CANCELLED, "", (), token=token)

    async def _finish(
        self,
        job_id: int,
        status: JobStatus,
        kind: EventKind,
        extra_sql: str,
        extra: tuple[Any, ...],
        detail: str | None = None,
        *,
        token: str,
    ) -> Job:
        """End a running job, only while the claim `token` still runs it (else ClaimLost)."""
        assignments = "status = ?, finished_at = ?" + (f", {extra_sql}" if extra_sql else "")
        async with self._transaction() as db:
            changed = await db.run(
                f"UPDATE jobs SET {assignments} WHERE id = ? AND status = 'running'{CLAIMED_SQL}",
                status.value,
                self._clock(),
                *extra,
                job_id,
                token,
            )
            job = await self._get(db, job_id)
            if changed != 1:
                raise claim_lost(job)
            await self._log(db, job_id, kind, detail)
        self._publish(kind, job)
        return job

    async def requeue(self, job_id: int, reason: str, *, token: str) -> Job:
        """Put a running job back at the head of its turn, not counting the interrupted attempt, while the claim
        `token` still runs it (else ClaimLost). A job not running is left as it is, unannounced."""
        async with self._transaction() as db:
            changed = await db.run(
                f"""UPDATE jobs SET status = 'queued', started_at = NULL, progress_json = NULL, claim_token = NULL,
                           attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END
                    WHERE id = ? AND status = 'running'{CLAIMED_SQL}""",
                job_id,
                token,
            )
            job = await self._get(db, job_id)
            if changed != 1 and job.status is JobStatus.RUNNING:
                raise claim_lost(job)
            if changed != 1:
                return job
            await self._log(db, job_id, EventKind.REQUEUED, reason)
        self._publish(EventKind.REQUEUED, job)
        return job

    async def fail_waiting(self, model: str, user_message: str, detail: str) -> list[Job]:
        """Fail every queued job for `model` at once (its download failed for good)."""
        async with self._transaction() as db:
            failed = await self._fail_queued(db, model, user_message, detail)
        for job in failed:
            self._publish(EventKind.FAILED, job)
        return failed

    async def _fail_queued(self, db: Tx, model: str, user_message: str, detail: str) -> list[Job]:
        rows = await db.all(
            """UPDATE jobs SET status = 'failed', finished_at = ?, error_user = ?, error_detail = ?
               WHERE status = 'queued' AND model = ? RETURNING *""",
            self._clock(),
            user_message,
            detail,
            model,
        )
        failed = sorted((row_to_job(row) for row in rows), key=lambda job: job.id)
        for job in failed:
            await self._log(db, job.id, EventKind.FAILED, user_message)
        return failed

    async def fail_waiting_unless_another_can(
        self, model: str, worker_id: str, user_message: str, detail: str
    ) -> list[Job] | None:
        """Worker `worker_id` could not get `model`: note that (in a queue flag, for UNFETCHABLE_KEEP_S), and fail the
        queued jobs for it only when no other online worker is left that has not failed to get it too; None when
        one is, and the jobs wait for it. One transaction: two workers failing at once cannot each leave the jobs
        to the other."""
        name = f"unfetchable:{model}"
        now = self.lease_now()
        async with self._transaction() as db:
            await db.run("INSERT INTO queue_flags (name, value) VALUES (?, '{}') ON CONFLICT (name) DO NOTHING", name)
            row = await db.one(f"SELECT value FROM queue_flags WHERE name = ?{db.for_update}", name)
            failed_at = {
                worker: at
                for worker, at in json.loads(row["value"] if row else "{}").items()
                if now - at < UNFETCHABLE_KEEP_S
            }
            failed_at[worker_id] = now
            await db.run("UPDATE queue_flags SET value = ? WHERE name = ?", json.dumps(failed_at), name)
            online = await db.all(
                "SELECT id FROM workers WHERE state <> 'stopped' AND heartbeat_at >= ?", now - self.lease_s
            )
            if any(worker["id"] not in failed_at for worker in online):
                return None
            failed = await self._fail_queued(db, model, user_message, detail)
        for job in failed:
            self._publish(EventKind.FAILED, job)
        return failed

    async def waiting_for(self, model: str) -> list[Job]:
        rows = await self._read_all("SELECT * FROM jobs WHERE status = 'queued' AND model = ? ORDER BY id", model)
        return [row_to_job(row) for row in rows]

    async def cancel(self, job_id: int, actor: Actor) -> Job:
        """Cancel a queued job at once; for a running one set the request the worker acts on."""
        async with self._transaction() as db:
            # Locked as read: a claim in another process either came first (the job runs) or waits for this.
            job = await self._get(db, job_id, lock=True)
            check_owner(job, actor, "cancel")
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


async def _first_holding(db: Tx, candidates: list[Row], model: str, held: set[str]) -> int | None:
    """The first candidate for `model` whose LoRAs the worker holds, all of them (and at least one), when the first
    candidate needs one it lacks; None otherwise."""
    ids = [row["id"] for row in candidates if row["model"] == model]
    rows = await db.all(f"SELECT id, params_json FROM jobs WHERE id IN ({', '.join('?' * len(ids))})", *ids)
    needs = {
        row["id"]: {use.key for use in GenerationParams.from_stored(json.loads(row["params_json"])).loras}
        for row in rows
    }
    if needs.get(candidates[0]["id"], set()) <= held:
        return None
    return next((job_id for job_id in ids if needs.get(job_id) and needs[job_id] <= held), None)


async def _candidates(db: Tx, depth: int, excluded: list[str]) -> list[Row]:
    """The next jobs in the fair order, looking `depth` jobs deep into each user's; id, model and passed_over."""
    return await db.all(next_sql(depth, len(excluded)), *(excluded * depth), CLAIM_CANDIDATES)


def _finished_verb(status: JobStatus) -> str:
    return {"succeeded": "finished", "failed": "failed", "cancelled": "been cancelled"}[status.value]
