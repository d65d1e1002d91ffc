"""GPU time per user and per chat in the last 24 hours: each video's measured run time (start to end, whatever its
outcome: the GPU was busy), plus what the waiting and running ones are expected to take (their model's recent run
time, as the ETA uses). Read in the enqueue's transaction, so two requests never both take the last minute."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import QuotaExceeded, duration_text
from engine.jobs import JobSource
from engine.queue.backend import Row, Tx
from engine.queue.core import DAY_S
from engine.queue.reading import Reading


@dataclass(frozen=True)
class GpuTime:
    """One user's (or chat's) GPU time in the last 24 hours: `used` by runs, `expected` of the ones not yet ended,
    and when the oldest run that counts stops counting (None: none counts)."""

    used_s: float
    expected_s: float
    frees_at: float | None


class Quotas(Reading):
    async def gpu_time(self, user_key: str) -> GpuTime:
        """A user's GPU time in the last 24 hours, for /status."""
        async with self._db.reading() as db:
            return await self._gpu_time(db, user_key=user_key)

    async def _check_gpu_time(
        self, db: Tx, source: JobSource, per_user_s: float, per_chat_s: float, model: str | None
    ) -> None:
        """QuotaExceeded where the user's or the chat's GPU time, with what is waiting and (when `model` is known) the
        new job's expected run, would pass its limit."""
        new_s = (await self._typical_run_s(db, model) or 0.0) if model is not None else 0.0
        if per_user_s:
            mine = await self._gpu_time(db, user_key=source.user_key)
            _check(mine, new_s, per_user_s, "Your videos", "each person", self._clock())
        if per_chat_s and source.place != "private":
            ours = await self._gpu_time(db, chat=(source.platform, source.chat_id))
            _check(ours, new_s, per_chat_s, "The videos asked for in this chat", "this chat", self._clock())

    async def _gpu_time(self, db: Tx, user_key: str | None = None, chat: tuple[str, str] | None = None) -> GpuTime:
        """One user's GPU time (their jobs, through their index), or one chat's (the day's runs and the queue, the
        chat's picked out here: the chat is only in each job's source)."""
        now = self._clock()
        mine = "user_key = ? AND " if user_key else ""
        args = (user_key,) if user_key else ()
        ran = await db.all(
            f"SELECT model, status, source_json, started_at, finished_at FROM jobs WHERE {mine}started_at > ?",
            *args,
            now - DAY_S,
        )
        waiting = await db.all(f"SELECT model, source_json FROM jobs WHERE {mine}status = 'queued'", *args)
        if chat is not None:
            ran, waiting = [_of_chat(rows, chat) for rows in (ran, waiting)]
        typical: dict[str, float] = {}  # each model's usual run, read once
        for row in [*ran, *waiting]:
            if row["model"] not in typical:
                typical[row["model"]] = await self._typical_run_s(db, row["model"]) or 0.0
        used = expected = 0.0
        for row in ran:
            took = max((row["finished_at"] or now) - row["started_at"], 0.0)
            used += took
            if row["status"] == "running":
                expected += max(typical[row["model"]] - took, 0.0)
        expected += sum(typical[row["model"]] for row in waiting)
        oldest = min((row["started_at"] for row in ran), default=None)
        return GpuTime(used, expected, None if oldest is None else oldest + DAY_S)


def _of_chat(rows: list[Row], chat: tuple[str, str]) -> list[Row]:
    sources = (JobSource.model_validate_json(row["source_json"]) for row in rows)
    return [row for row, source in zip(rows, sources, strict=True) if (source.platform, source.chat_id) == chat]


def _check(time: GpuTime, new_s: float, limit_s: float, whose: str, given: str, now: float) -> None:
    if time.used_s + time.expected_s + new_s <= limit_s and time.used_s < limit_s:
        return
    parts = [f"{duration_text(time.used_s)} used in the last 24 hours"]
    if time.expected_s:
        parts.append(f"about {duration_text(time.expected_s)} for the ones waiting")
    if new_s:
        parts.append(f"about {duration_text(new_s)} for this one")
    hint = (
        f"GPU time stops counting 24 hours after it was used: the oldest in {duration_text(time.frees_at - now)}."
        if time.frees_at is not None
        else "Wait for the waiting ones to finish, or cancel one with /cancel."
    )
    raise QuotaExceeded(
        f"{whose} would take more than the {duration_text(limit_s)} of GPU time a day this bot gives {given} "
        f"({', '.join(parts)}).",
        hint,
    )
