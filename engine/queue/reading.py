"""Reading jobs: one, a list, a job's history, the counts, a queued job's place and wait, and the statistics."""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from typing import Any

from engine.jobs import (
    FinishTimes,
    Job,
    JobSource,
    JobStatus,
    Progress,
    QueuePosition,
    ResultInfo,
    Stage,
)
from engine.queue.backend import Tx
from engine.queue.core import (
    QueueCore,
    platform_range,
    row_to_job,
)
from engine.queue.order import POSITION_SQL

RECENT_RUNS = 20  # a model's latest videos, whose times predict its next ones

RUN_STAGES = (Stage.DENOISING, Stage.DECODING, Stage.ENCODING)  # a running job's eta_s is then its whole rest


class Reading(QueueCore):
    async def find_by_source(self, source: JobSource) -> Job | None:
        """The job already made from this platform message, if any (a redelivered update)."""
        if source.dedup_key is None:
            return None
        row = await self._read_one("SELECT * FROM jobs WHERE dedup_key = ?", source.dedup_key)
        return row_to_job(row) if row is not None else None

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
            args.extend(platform_range(platform))
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        order = "ASC" if oldest_first else "DESC"
        rows = await self._read_all(f"SELECT * FROM jobs {where} ORDER BY id {order} LIMIT ?", *args, limit)
        return [row_to_job(row) for row in rows]

    async def events_of(self, job_id: int) -> list[tuple[str, str | None]]:
        rows = await self._read_all("SELECT kind, detail FROM job_events WHERE job_id = ? ORDER BY id", job_id)
        return [(row["kind"], row["detail"]) for row in rows]

    async def counts(self) -> dict[str, int]:
        rows = await self._read_all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        return {row["status"]: row["n"] for row in rows}

    async def position(self, job_id: int) -> QueuePosition | None:
        """Where a queued job stands (1 = next) and a rough ETA from recent job durations; None if not queued."""
        async with self._db.reading() as db:
            return await self._position(db, job_id)

    async def _position(self, db: Tx, job_id: int) -> QueuePosition | None:
        """The wait: each online worker takes the next job as it becomes free (an idle one at once, a busy one when
        its job ends), each job ahead a usual run of this job's model (their models may differ, but a model's own
        videos say more than an average over tiny and real ones); None when that cannot be told."""
        row = await db.one(POSITION_SQL, job_id)
        if row is None:
            return None
        position = row["position"]
        lefts = await self._running_lefts(db)
        online = await db.one(
            "SELECT COUNT(*) AS n FROM workers WHERE state <> 'stopped' AND heartbeat_at >= ?",
            self.lease_now() - self.lease_s,
        )
        workers = int(online["n"]) if online else 0
        no_worker = not workers and not lefts  # nothing starts until a worker does
        idle = max(workers - len(lefts), 0)
        # When each worker is free next: now for an idle one, at its job's end for a busy one (unknown: left out).
        free_at = [0.0] * idle + [left for left in lefts if left is not None]
        if no_worker:
            free_at = [0.0]  # no worker heard from: the first to start takes the first job
        heapq.heapify(free_at)
        typical = None if position == 1 else await self._typical_run_s(db, row["model"])
        for _ahead in range(position - 1):
            if not free_at or typical is None:
                return QueuePosition(position=position, eta_s=None, no_worker=no_worker)
            heapq.heappush(free_at, heapq.heappop(free_at) + typical)
        return QueuePosition(position=position, eta_s=free_at[0] if free_at else None, no_worker=no_worker)

    async def _running_lefts(self, db: Tx) -> list[float | None]:
        """Seconds until each running job ends: its own estimate once it denoises (steps, decode and encode), else
        its model's usual run time less the time it has run; None where neither is known (no video of its model
        yet, or it has overrun the usual time: no number is better than "0s")."""
        rows = await db.all("SELECT model, started_at, progress_json FROM jobs WHERE status = 'running'")
        lefts: list[float | None] = []
        for running in rows:
            progress = Progress.model_validate_json(running["progress_json"]) if running["progress_json"] else None
            if progress is not None and (own := _eta_to_the_end(progress)) is not None:
                lefts.append(own)
                continue
            typical = await self._typical_run_s(db, running["model"])
            left = typical - (self._clock() - running["started_at"]) if typical is not None else None
            lefts.append(left if left is not None and left > 0 else None)
        return lefts

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
