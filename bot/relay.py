"""From engine events to a chat platform: keep each job's live message current and deliver finished videos, retrying
failed uploads from the stored file. Each adapter supplies only how to show a text and how to send a video."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Literal

from bot import chat
from engine.config import ChatConfig
from engine.events import Subscription
from engine.jobs import DeliveryStatus, EventKind, Job, JobStatus
from engine.queue import JobQueue
from engine.supervisor import Supervisor

log = logging.getLogger(__name__)

Buttons = Literal["cancel", "none"]
# The waiting jobs (oldest first) whose place is shown again whenever the queue moves.
POSITION_REFRESH_LIMIT = 100
REASON_LIMIT = 300
ShowText = Callable[[Job, str, Buttons], Awaitable[None]]
SendVideo = Callable[[Job], Awaitable[None]]


class DeliveryFailed(Exception):
    """A video could not be sent; `reason` is safe to store and show (no tokens). `permanent`: trying again cannot
    help (the bot was blocked, the chat is gone, the file cannot be made small enough)."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        # A proxy's error page can be kilobytes of HTML: the reason is stored and shown in a chat message.
        reason = reason if len(reason) <= REASON_LIMIT else reason[: REASON_LIMIT - 1] + "…"
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


class JobRelay:
    def __init__(
        self,
        queue: JobQueue,
        supervisor: Supervisor,
        platform: str,
        show: ShowText,
        send_video: SendVideo,
        config: ChatConfig,
        edit_interval_for: Callable[[Job], float] | None = None,
        refresh_per_chat: int | None = None,
    ) -> None:
        """`edit_interval_for` paces some chats more slowly; `refresh_per_chat` caps how many waiting jobs of one chat
        have their place shown again each time the queue moves (a platform where a chat's messages share a budget)."""
        self._queue = queue
        self._supervisor = supervisor
        self._refresh_per_chat = refresh_per_chat
        self._platform = platform
        self._show = show
        self._send_video = send_video
        self._retry_s = config.delivery_retry_s
        self._max_attempts = config.max_delivery_attempts
        self._edit_interval_s = config.edit_interval_s
        self._edit_interval_for = edit_interval_for
        self._live = chat.LiveMessages(self._show_latest, config.edit_interval_s, interval_for=self._edit_interval)
        self._jobs: dict[int, Job] = {}
        self._delivering: set[int] = set()
        self._retry_at: dict[int, float] = {}  # job id -> loop time of its next upload attempt
        self._tasks: set[asyncio.Task[None]] = set()
        # Set once what the last run left unshown (ended jobs, waiting jobs' places) has been shown.
        self.caught_up = asyncio.Event()

    def start(self, events: Subscription) -> None:
        """Follow `events` (subscribed before the platform connects, so nothing is missed), retry deliveries, and
        show the end of every job whose message does not show it yet (the process stopped before it could)."""
        self._supervisor.start(f"{self._platform} relay", partial(self._follow, events))
        self._supervisor.start(f"{self._platform} redelivery", self._redeliver_periodically)
        self._spawn(self._show_missed_ends())

    async def stop(self) -> None:
        # An upload cut short here stays 'pending' and goes out again after the restart.
        await self._supervisor.cancel(f"{self._platform} relay", f"{self._platform} redelivery")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._live.close()

    def show(self, job: Job, text: str, buttons: Buttons = "none", refresh: bool = False) -> None:
        """Show `text` in the job's live message; a `refresh` (a new place in the queue) goes after every answer and
        progress text waiting to be sent, and a newer text for the job replaces it."""
        self._jobs[job.id] = job
        self._live.update(job.id, text, buttons, refresh=refresh)

    async def show_last(self, job: Job, text: str) -> None:
        """Show the job's final text; once it is on screen nothing about the job is kept."""
        self.show(job, text)
        await self._live.settle(job.id)
        self._live.forget(job.id)
        self._jobs.pop(job.id, None)
        try:
            await self._queue.mark_final_shown(job.id)
        except Exception:
            # Only means the end may be shown once more after a restart.
            log.warning("could not record that job=%s shows its end", job.id, exc_info=True)

    async def _show_missed_ends(self) -> None:
        try:
            for job in await self._queue.final_unshown(self._platform, self._max_attempts):
                await self.show_last(job, self._end_text(job))
            # A request queued just before a stop may not have shown its answer yet: every waiting job shows its
            # place.
            await self._show_positions(refresh=True)
        except Exception:
            log.warning("could not show what the last run left unshown", exc_info=True)
        finally:
            self.caught_up.set()

    def _end_text(self, job: Job) -> str:
        if job.status is not JobStatus.SUCCEEDED:
            return chat.finished_text(job)
        if job.delivery_status is DeliveryStatus.DELIVERED:
            return chat.delivered_text(job)
        return chat.undeliverable_text(job)

    @property
    def tracked(self) -> int:
        """Jobs whose live message is still followed."""
        return max(len(self._jobs), len(self._live))

    def _edit_interval(self, job_id: int) -> float:
        """The platform may pace some chats more slowly (Telegram groups share one budget for all messages)."""
        job = self._jobs.get(job_id)
        if job is None or self._edit_interval_for is None:
            return self._edit_interval_s
        return self._edit_interval_for(job)

    async def _show_latest(self, job_id: int, text: str, buttons: Buttons) -> None:
        await self._show(self._jobs[job_id], text, buttons)

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, events: Subscription) -> None:
        async for event in events:
            job = event.job
            if event.kind in (EventKind.STARTED, EventKind.CANCELLED):
                # Any platform's claim or cancel moves everyone behind it. Done here, in event order, so a job that
                # starts meanwhile has its progress shown after (not before) its last "queued" text.
                await self._show_positions(refresh=True)
            if job.source.platform != self._platform:
                continue
            if event.kind is EventKind.ENQUEUED:
                # Shown here, in event order, not by the adapter that queued it: a job that starts at once must not
                # have its place drawn over its progress.
                await self._show_positions([job])
            elif event.kind in (EventKind.STARTED, EventKind.PROGRESS):
                self.show(job, chat.progress_text(job, event.progress), "cancel")
            elif event.kind is EventKind.SUCCEEDED:
                self.show(job, chat.finished_text(job))
                self._spawn(self.deliver(job))
            elif event.kind in (EventKind.FAILED, EventKind.CANCELLED):
                self._spawn(self.show_last(job, chat.finished_text(job)))

    async def _show_positions(self, jobs: list[Job] | None = None, refresh: bool = False) -> None:
        """Show waiting jobs their place: `jobs` (a new job: its answer), or else, as a `refresh`, the oldest waiting
        jobs of this platform."""
        try:
            if jobs is None:
                jobs = await self._queue.list_jobs(
                    (JobStatus.QUEUED,), platform=self._platform, limit=POSITION_REFRESH_LIMIT, oldest_first=True
                )
            shown_in: Counter[str] = Counter()
            paused = await self._queue.is_paused()
            for job in jobs:
                if self._refresh_per_chat is not None and shown_in[job.source.chat_id] >= self._refresh_per_chat:
                    continue
                position = await self._queue.position(job.id)
                if position is not None:
                    shown_in[job.source.chat_id] += 1
                    self.show(job, chat.queued_text(job, position, paused=paused), "cancel", refresh=refresh)
        except Exception:
            # Places are a courtesy: a failed read must not stop the progress and results that follow.
            log.warning("could not refresh queue positions", exc_info=True)

    async def deliver(self, job: Job) -> None:
        if job.id in self._delivering or job.result is None:
            return
        self._delivering.add(job.id)
        self._retry_at.pop(job.id, None)  # this is the attempt it waited for; a failure below sets the next one
        try:
            await self._live.settle(job.id)
            await self._send(job)
            delivered = await self._queue.mark_delivered(job.id)
            await self.show_last(delivered, chat.delivered_text(delivered))
        except DeliveryFailed as failure:
            # A permanent failure uses up the tries at once, so a restart does not upload into it again either.
            give_up_at = self._max_attempts if failure.permanent else 0
            failed = await self._queue.mark_delivery_failed(job.id, failure.reason, give_up_at)
            if failed.delivery_attempts >= self._max_attempts:
                log.warning(
                    "delivery failed job=%s attempt=%s, giving up: %s", job.id, failed.delivery_attempts, failure.reason
                )
                await self.show_last(failed, chat.undeliverable_text(failed))
            else:
                # Doubling waits ride out an outage of the platform instead of spending every attempt inside it.
                delay = self._retry_s * 2 ** (failed.delivery_attempts - 1)
                self._retry_at[job.id] = asyncio.get_running_loop().time() + delay
                log.warning(
                    "delivery failed job=%s attempt=%s, next in %.1f s: %s",
                    job.id,
                    failed.delivery_attempts,
                    delay,
                    failure.reason,
                )
        finally:
            self._delivering.discard(job.id)

    async def _send(self, job: Job) -> None:
        """Send the video; every failure becomes a DeliveryFailed whose reason is a plain sentence."""
        if job.result is None or not await asyncio.to_thread(Path(job.result.path).is_file):
            log.error("video file of job=%s is missing: %s", job.id, job.result.path if job.result else None)
            raise DeliveryFailed("the video file is no longer on the server; Reroll makes it again", permanent=True)
        try:
            await self._send_video(job)
        except DeliveryFailed:
            raise
        except Exception as exc:
            # A dropped connection or anything else unexpected: one failed attempt, tried again later.
            log.warning("upload of job=%s failed", job.id, exc_info=True)
            raise DeliveryFailed(f"the upload to {self._platform.capitalize()} did not go through") from exc

    async def _redeliver_periodically(self) -> None:
        """Videos finished while we were down, or whose upload failed, go out again (never regenerated)."""
        loop = asyncio.get_running_loop()
        while True:
            for job in await self._queue.undelivered(self._platform, self._max_attempts):
                if loop.time() >= self._retry_at.get(job.id, 0.0):
                    await self.deliver(job)
            await asyncio.sleep(self._retry_s)
