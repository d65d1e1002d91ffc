"""What clean-up may remove: pictures no job needs any more, and videos delivered long enough ago."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from engine.queue.core import (
    SQL_CHUNK,
    QueueCore,
)


class Retention(QueueCore):
    async def images_in_use(self, retention_s: float, last_frames_s: float | None = None) -> set[str]:
        """Hashes of images that active jobs, or jobs finished within the retention time, still refer to: their
        pictures, and the last frames of their videos (an Extend starts from one), kept `last_frames_s` (the
        videos' retention; default `retention_s`)."""
        since = self._clock() - retention_s
        rows = await self._read_all(
            """SELECT DISTINCT i.sha256 FROM job_images i JOIN jobs j ON j.id = i.job_id
               WHERE j.status IN ('queued', 'running') OR j.finished_at >= ?""",
            since,
        )
        videos = await self._read_all(
            "SELECT result_json FROM jobs WHERE status = 'succeeded' AND finished_at >= ?",
            self._clock() - (retention_s if last_frames_s is None else last_frames_s),
        )
        last_frames = {(json.loads(row["result_json"] or "{}").get("last_frame") or {}).get("sha256") for row in videos}
        return {row["sha256"] for row in rows} | (last_frames - {None})

    async def being_extended(self) -> set[int]:
        """The jobs whose videos a waiting or running Extend continues (it reads them when it ends)."""
        rows = await self._read_all("SELECT params_json FROM jobs WHERE status IN ('queued', 'running')")
        named = {json.loads(row["params_json"]).get("extends") for row in rows}
        return {job_id for job_id in named if job_id is not None}

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

    async def ended_jobs(self, job_ids: Collection[int]) -> dict[int, tuple[float, str]]:
        """Of these jobs, those that ended (succeeded, failed, cancelled): when each was asked for, and the name of
        its video ("" without one)."""
        ids = sorted(job_ids)
        found: dict[int, tuple[float, str]] = {}
        for start in range(0, len(ids), SQL_CHUNK):
            chunk = ids[start : start + SQL_CHUNK]
            rows = await self._read_all(
                f"""SELECT id, created_at, result_json FROM jobs WHERE id IN ({",".join("?" * len(chunk))})
                    AND status IN ('succeeded', 'failed', 'cancelled')""",
                *chunk,
            )
            for row in rows:
                video = Path(json.loads(row["result_json"] or "{}").get("path") or "").name
                found[row["id"]] = (row["created_at"], video)
        return found
