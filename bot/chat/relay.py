"""From engine events to a chat platform: keep each job's live message current and deliver finished videos, fitted
to the platform's upload limit, retrying failed uploads from the stored file. Each adapter supplies only how to show a
text, how to send a file and its limit, and turns its library's errors into the few kinds below."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bot.chat import texts, transfers
from bot.chat.texts import Buttons
from engine.config import ChatConfig
from engine.errors import UserError
from engine.jobs import DeliveryStatus, EventKind, Job, JobEvent, JobStatus, PreviewInfo, Progress
from engine.service import Engine, Subscription

log = logging.getLogger(__name__)

# The waiting jobs (oldest first) whose place is shown again whenever the queue moves.
POSITION_REFRESH_LIMIT = 100
# While a job runs, the waits behind it are shown again at most once per this many edit intervals (30 s by default).
WAIT_REFRESH_EDITS = 10
REASON_LIMIT = 300
# Each delivery attempt sends the video at most twice: as fitted, then smaller after the platform's 413.
UPLOADS_PER_ATTEMPT = 2
# A stopping relay lets an upload under way finish this long: cut short after the platform has the whole file, it
# would most likely be posted, and posted again after the restart.
STOP_WAITS_FOR_UPLOADS_S = 60.0
# A text, its buttons, and a new preview picture (a JPEG) or None for "keep the picture the message has, if any".
ShowText = Callable[[Job, str, Buttons, bytes | None], Awaitable[None]]
SendVideo = Callable[[Job, Path], Awaitable[None]]


@dataclass(frozen=True)
class _Look:
    """What a job's message shows besides its text: its buttons and the latest preview it should carry."""

    buttons: Buttons
    preview: PreviewInfo | None = None


class TooLarge(Exception):
    """The platform refused the file as too large (a 413): a smaller one may pass."""


class UploadRefused(Exception):
    """The platform will not take the video here, and trying again cannot change that (the bot was blocked or removed,
    the chat is gone); the message is safe to show."""


class AnswerLost(Exception):
    """The whole file went out and the platform did not answer in time. It cannot be asked whether it posted the
    video, and it most likely did: sending again would most likely post it twice."""


class DeliveryFailed(Exception):
    """A video could not be sent; `reason` is safe to store and show (no tokens). `permanent`: trying again cannot
    help (the bot was blocked, the chat is gone, the file cannot be made small enough)."""

    def __init__(self, reason: str, permanent: bool = False, wait_s: float = 0.0) -> None:
        # A proxy's error page can be kilobytes of HTML: the reason is stored and shown in a chat message.
        reason = reason if len(reason) <= REASON_LIMIT else reason[: REASON_LIMIT - 1] + "…"
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
        self.wait_s = wait_s  # the platform's own flood wait, the least time before the next try


class JobRelay:
    def __init__(
        self,
        engine: Engine,
        platform: str,
        show: ShowText,
        send_video: SendVideo,
        upload_limit: Callable[[Job], int],
        config: ChatConfig,
        edit_interval_for: Callable[[Job], float] | None = None,
        refresh_per_chat: int | None = None,
    ) -> None:
        """`send_video` sends a file that fits `upload_limit(job)`, raising TooLarge, UploadRefused, AnswerLost or
        texts.RetryLater where its library's error means one of those. `edit_interval_for` paces some chats more
        slowly; `refresh_per_chat` caps how many waiting jobs of one chat have their place shown again each time the
        queue moves (a platform where a chat's messages share a budget)."""
        self._engine = engine
        self._supervisor = engine.supervisor
        self._upload_limit = upload_limit
        self._refresh_per_chat = refresh_per_chat
        self._platform = platform
        self._show = show
        self._send_video = send_video
        self._retry_s = config.delivery_retry_s
        self._max_attempts = config.max_delivery_attempts
        self._edit_interval_s = config.edit_interval_s
        self._edit_interval_for = edit_interval_for
        self._live = texts.LiveMessages(self._show_latest, config.edit_interval_s, interval_for=self._edit_interval)
        self._jobs: dict[int, Job] = {}
        self._delivering: set[int] = set()
        self._no_uploads = asyncio.Event()  # set while nothing is being delivered
        self._no_uploads.set()
        self._closing = False  # stopping: no new delivery starts
        # Videos this process uploaded whose delivery is not recorded yet (the database failed right after): the
        # next round records them without uploading again.
        self._sent_unrecorded: set[int] = set()
        self._retry_at: dict[int, float] = {}  # job id -> loop time of its next upload attempt
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping: set[int] = set()  # running jobs someone cancelled: no more progress, no Cancel button
        self._restarted: set[int] = set()  # running jobs that started again after the process stopped mid-job
        self._previews: dict[int, PreviewInfo] = {}  # each running job's latest preview, for its next edit
        self._progress: dict[int, Progress | None] = {}  # each running job's latest progress, as its events said
        self._previews_shown: dict[int, tuple[int, float]] = {}  # job id -> seq and loop time of the shown preview
        self._preview_interval_s = engine.settings.previews.interval_s
        self._waits_shown_at = float("-inf")  # loop time the waiting jobs' places were last refreshed by progress
        self._new_jobs = False  # jobs were queued since the places were last shown
        self._best_places: dict[int, int] = {}  # waiting job -> the best place its message showed
        self._noted: set[int] = set()  # jobs whose message has shown the notes on their request
        # Set once what the last run left unshown (ended jobs, waiting jobs' places) has been shown.
        self.caught_up = asyncio.Event()
        self._stop_listening: Callable[[], None] | None = None

    def start(self, events: Subscription) -> None:
        """Follow `events` (subscribed before the platform connects, so nothing is missed), retry deliveries, and
        show the end of every job whose message does not show it yet (the process stopped before it could)."""
        self._supervisor.start(f"{self._platform} relay", partial(self._follow, events))
        self._supervisor.start(f"{self._platform} redelivery", self._redeliver_periodically)
        self._spawn(self._show_missed_ends())
        self._stop_listening = self._engine.on_places_changed(lambda: self._spawn(self._show_positions(refresh=True)))

    async def stop(self) -> None:
        self._closing = True
        if self._delivering:
            log.info(
                "waiting up to %.0f s for the upload of job=%s to finish before stopping",
                STOP_WAITS_FOR_UPLOADS_S,
                ",".join(map(str, sorted(self._delivering))),
            )
            # One still going after that stays 'pending' and goes out again after the restart.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_WAITS_FOR_UPLOADS_S):
                    await self._no_uploads.wait()
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        await self._supervisor.cancel(f"{self._platform} relay", f"{self._platform} redelivery")
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._live.close()

    def show(
        self, job: Job, text: str, buttons: Buttons = "none", refresh: bool = False, at_once: bool = False
    ) -> None:
        """Show `text` in the job's live message; a `refresh` (a new place in the queue) goes after every answer and
        progress text waiting to be sent, and a newer text for the job replaces it; an `at_once` text (an end) does
        not wait for the edit pacing."""
        self._jobs[job.id] = job
        look = _Look(buttons, self._previews.get(job.id))
        self._live.update(job.id, text, look, refresh=refresh, at_once=at_once)

    async def show_last(self, job: Job, text: str) -> None:
        """Show the job's final text at once; once it is on screen nothing about the job is kept."""
        self.show(job, text, at_once=True)
        await self._live.settle(job.id)
        self._live.forget(job.id)
        self._jobs.pop(job.id, None)
        for kept in (self._stopping, self._restarted, self._noted):
            kept.discard(job.id)
        for latest in (self._previews, self._previews_shown, self._best_places, self._progress):
            latest.pop(job.id, None)
        try:
            await self._engine.mark_final_shown(job.id)
        except Exception:
            # Only means the end may be shown once more after a restart.
            log.warning("could not record that job=%s shows its end", job.id, exc_info=True)

    async def _show_missed_ends(self) -> None:
        try:
            for job in await self._engine.final_unshown(self._platform, self._max_attempts):
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
            return texts.finished_text(job)
        if job.delivery_status is DeliveryStatus.DELIVERED:
            return texts.delivered_text(job)
        return texts.undeliverable_text(job)

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

    async def _show_latest(self, job_id: int, text: str, look: _Look) -> None:
        """Send the job's newest text; its newest preview goes with it when the message does not carry that yet."""
        picture = None
        if self._preview_due(job_id, look.preview):
            picture = await self._engine.preview_bytes(job_id)  # None: the job has just ended
        job = self._jobs[job_id]
        noted = job_id in self._noted
        await self._show(job, text if noted else texts.with_notes(job, text), look.buttons, picture)
        self._noted.add(job_id)
        if picture is not None and look.preview is not None:
            self._previews_shown[job_id] = (look.preview.seq, asyncio.get_running_loop().time())

    def _preview_due(self, job_id: int, preview: PreviewInfo | None) -> bool:
        """A new preview, and previews.interval_s since the last one went out: one held up by the pacing or a flood
        wait must not go out right before the next one (a later edit carries it)."""
        if preview is None:
            return False
        shown = self._previews_shown.get(job_id)
        if shown is None:
            return True
        seq, at = shown
        return seq != preview.seq and asyncio.get_running_loop().time() - at >= self._preview_interval_s

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        """A spawned task (a delivery, an end shown) never fails unseen: its error is logged with its traceback."""
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("%s relay task failed", self._platform, exc_info=error)

    async def _follow(self, events: Subscription) -> None:
        async for event in events:
            # Places are shown here, in event order, so a job that starts meanwhile has its progress shown after
            # (not before) its last "queued" text.
            if self._places_due(event):
                await self._show_positions(refresh=True)
            if event.job.source.platform == self._platform:
                await self._take(event)
            if self._new_jobs_taken_in(event, events):
                await self._show_positions(refresh=True)

    async def _take(self, event: JobEvent) -> None:
        """Show what `event` means for this platform's job."""
        job = event.job
        if event.kind is EventKind.ENQUEUED:
            # Shown here, in event order, not by the adapter that queued it: a job that starts at once must not
            # have its place drawn over its progress.
            await self._show_positions([job])
        elif event.kind is EventKind.CANCEL_REQUESTED:
            self._stopping.add(job.id)
            self.show(job, texts.cancel_text(job), at_once=True)
        elif event.kind in (EventKind.STARTED, EventKind.PROGRESS):
            await self._show_progress(event)
        elif event.kind is EventKind.REQUEUED and job.status is JobStatus.QUEUED:
            # Its worker stopped (or went silent): said at once, not left showing the last step until it restarts.
            self.show(job, texts.requeued_text(job), waiting_buttons(job), at_once=True)
        elif event.kind is EventKind.PREVIEW:
            await self._take_preview(event)
        elif event.kind is EventKind.SUCCEEDED:
            self.show(job, texts.finished_text(job), at_once=True)
            self._spawn(self.deliver(job))
        elif event.kind in (EventKind.FAILED, EventKind.CANCELLED):
            self._spawn(self.show_last(job, texts.finished_text(job)))

    def _places_due(self, event: JobEvent) -> bool:
        """Whether the waiting jobs' places are to be shown again before `event` is: any platform's claim or cancel
        moves everyone behind it, and while a job runs, the waits behind it change."""
        return event.kind in (EventKind.STARTED, EventKind.CANCELLED) or self._waits_due(event)

    def _new_jobs_taken_in(self, event: JobEvent, events: Subscription) -> bool:
        """Whether new jobs have moved others' places since they were shown (a newcomer's first job goes before
        others' second): shown once a burst of them (messages sent at once) has been taken in, after their own
        answers, so no two jobs show the same place."""
        self._new_jobs |= event.kind is EventKind.ENQUEUED
        if not self._new_jobs or not events.caught_up():
            return False
        self._new_jobs = False
        return True

    def _waits_due(self, event: JobEvent) -> bool:
        """Whether a running job's progress should show the waiting jobs their wait again: it shrinks as the job
        ahead runs (or turns unknown when it overruns), but not every step is worth an edit of every waiting job."""
        if event.kind is not EventKind.PROGRESS:
            return False
        now = asyncio.get_running_loop().time()
        if now - self._waits_shown_at < self._edit_interval_s * WAIT_REFRESH_EDITS:
            return False
        self._waits_shown_at = now
        return True

    async def _show_progress(self, event: JobEvent) -> None:
        """A running job's stage and step, with its Cancel button, until someone cancels it; a job that starts again
        after the process stopped mid-job says so."""
        job = event.job
        if job.id in self._stopping:
            return
        if event.kind is EventKind.STARTED and await self._interrupted_before(job):
            self._restarted.add(job.id)
        self._progress[job.id] = event.progress
        self.show(job, texts.progress_text(job, event.progress, job.id in self._restarted), "cancel")

    async def _take_preview(self, event: JobEvent) -> None:
        """Show a running job's new preview with its progress, in the same edit (so a preview costs no edit of its
        own); while an edit is waiting, a newer preview replaces the one it would carry."""
        job = event.job
        if event.preview is None or job.id in self._stopping or job.status is not JobStatus.RUNNING:
            return
        try:
            wanted = await self._engine.previews_on(self._platform, job.source.chat_id)
        except Exception:
            log.warning("could not read whether chat=%s shows previews", job.source.chat_id, exc_info=True)
            return
        if wanted:
            self._previews[job.id] = event.preview
            # The event's copy of the job is read from the database, up to a second behind the progress events.
            progress = self._progress.get(job.id, job.progress)
            self.show(job, texts.progress_text(job, progress, job.id in self._restarted), "cancel")

    async def _interrupted_before(self, job: Job) -> bool:
        try:
            return await self._engine.was_interrupted(job)
        except Exception:
            log.warning("could not read the history of job=%s", job.id, exc_info=True)
            return False

    async def _show_positions(self, jobs: list[Job] | None = None, refresh: bool = False) -> None:
        """Show waiting jobs their place: `jobs` (a new job: its answer), or else, as a `refresh`, the oldest waiting
        jobs of this platform."""
        try:
            if jobs is None:
                jobs = await self._engine.jobs(
                    (JobStatus.QUEUED,), platform=self._platform, limit=POSITION_REFRESH_LIMIT, oldest_first=True
                )
            shown_in: Counter[str] = Counter()
            paused = await self._engine.is_paused()
            for job in jobs:
                if self._refresh_per_chat is not None and shown_in[job.source.chat_id] >= self._refresh_per_chat:
                    continue
                position = await self._engine.position(job.id)
                if position is not None:
                    shown_in[job.source.chat_id] += 1
                    was = self._best_places.setdefault(job.id, position.position)
                    self._best_places[job.id] = min(was, position.position)
                    text = texts.queued_text(job, position, paused=paused, was=was)
                    self.show(job, text, waiting_buttons(job), refresh=refresh)
        except Exception:
            # Places are a courtesy: a failed read must not stop the progress and results that follow.
            log.warning("could not refresh queue positions", exc_info=True)

    async def deliver(self, job: Job) -> None:
        if self._closing or job.id in self._delivering or job.result is None:
            return
        self._delivering.add(job.id)
        self._no_uploads.clear()
        self._retry_at.pop(job.id, None)  # this is the attempt it waited for; a failure below sets the next one
        try:
            if job.id not in self._sent_unrecorded:
                # The caller's copy may be minutes old (the redelivery round uploads one video after another): a
                # video delivered or given up on meanwhile, or one another process is uploading, must not go out
                # again. (One sent but unrecorded is still this process's claim.)
                limit = self._upload_limit(job)
                claim_s = UPLOADS_PER_ATTEMPT * transfers.upload_timeout_s(limit, limit)
                claimed = await self._engine.claim_delivery(job.id, self._max_attempts, claim_s)
                if claimed is None:
                    return
                job = claimed
                await self._live.settle(job.id)
                if self._engine.video_policy(job) == "block":
                    await self._withhold(job)
                    return
                await self._send(job)
                self._sent_unrecorded.add(job.id)
            try:
                delivered = await self._engine.mark_delivered(job.id)
            except Exception:
                log.exception("job=%s was sent but not recorded as delivered; the next round records it", job.id)
                return
            self._sent_unrecorded.discard(job.id)
            await self.show_last(delivered, texts.delivered_text(delivered))
        except DeliveryFailed as failure:
            # A permanent failure uses up the tries at once, so a restart does not upload into it again either.
            give_up_at = self._max_attempts if failure.permanent else 0
            failed = await self._engine.mark_delivery_failed(job.id, failure.reason, give_up_at)
            if failed.delivery_attempts >= self._max_attempts:
                log.warning(
                    "delivery failed job=%s attempt=%s, giving up: %s", job.id, failed.delivery_attempts, failure.reason
                )
                await self.show_last(failed, texts.undeliverable_text(failed))
            else:
                # Doubling waits ride out an outage of the platform instead of spending every attempt inside it.
                delay = max(self._retry_s * 2 ** (failed.delivery_attempts - 1), failure.wait_s)
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
            if not self._delivering:
                self._no_uploads.set()

    async def _withhold(self, job: Job) -> None:
        """A video the content rules keep out of its place: never sent, its owner told why, its record kept."""
        withheld = await self._engine.mark_delivery_failed(job.id, self._engine.refuse_video(job), self._max_attempts)
        await self.show_last(withheld, texts.withheld_text(withheld))

    async def _send(self, job: Job) -> None:
        """Send the video, re-encoded to fit the upload limit, and once more well under a size the platform refused;
        every failure becomes a DeliveryFailed whose reason is a plain sentence."""
        platform = self._platform.capitalize()
        made = await self._engine.video_file(job)
        if made is None:
            log.error("video file of job=%s is missing: %s", job.id, job.result.path if job.result else None)
            raise DeliveryFailed("the video file is no longer on the server; Reroll makes it again", permanent=True)
        limit = self._upload_limit(job)
        if "upload_limit" in job.source.reply:
            # A 413 left a lower limit in the job (so a restart keeps it): the refused file is never sent again.
            limit = min(limit, int(job.source.reply["upload_limit"]))
        for _ in range(UPLOADS_PER_ATTEMPT):
            try:
                video = await self._engine.fit_video(made, limit)
                await self._send_video(job, video)
                return
            except AnswerLost:
                log.warning("no answer after the whole video of job=%s was sent; counted as delivered", job.id)
                return
            except TooLarge:
                refused = (await asyncio.to_thread(video.stat)).st_size
                limit = transfers.limit_after_413(refused)
                job = await self._engine.update_reply(job.id, upload_limit=str(limit))
                log.warning(
                    "%s refused job=%s's %d-byte video as too large; next: %d bytes", platform, job.id, refused, limit
                )
            except UserError as error:  # no re-encoding makes it small enough
                raise DeliveryFailed(error.message, permanent=True) from error
            except UploadRefused as refused:
                raise DeliveryFailed(str(refused), permanent=True) from refused
            except texts.RetryLater as flood:
                raise DeliveryFailed(f"{platform} asked to wait {flood.seconds:.0f} s", wait_s=flood.seconds) from flood
            except Exception as exc:
                # A dropped connection or anything unexpected: one failed attempt, tried again later.
                log.warning("upload of job=%s failed", job.id, exc_info=True)
                raise DeliveryFailed(f"the upload to {platform} did not go through") from exc
        raise DeliveryFailed(f"{platform} refused the video as too large; the next try sends it smaller")

    async def _redeliver_periodically(self) -> None:
        """Videos finished while we were down, or whose upload failed, go out again (never regenerated)."""
        loop = asyncio.get_running_loop()
        while True:
            for job in await self._engine.undelivered(self._platform, self._max_attempts):
                if loop.time() >= self._retry_at.get(job.id, 0.0):
                    await self.deliver(job)
            await asyncio.sleep(self._retry_s)


def waiting_buttons(job: Job) -> Buttons:
    """A waiting job's buttons: "Use my words" beside Cancel while its prompt is the enhancer's rewrite."""
    return "own_words" if job.params.original_prompt is not None else "cancel"
