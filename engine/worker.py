"""The GPU worker: one coroutine that claims jobs, runs them in an executor thread, and records the outcome.

One job's failure never stops the loop. Shutdown either waits for the running job or asks it to stop and puts it
back in the queue, so a restart picks it up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import av
import numpy as np

from engine.config import Settings
from engine.content_rules import ContentRules
from engine.errors import ClaimLost, ModelUnusable, UserError, model_unusable_text
from engine.hub.downloads import Downloader
from engine.hub.fetcher import ModelFetcher
from engine.jobs import EventKind, Job, PreviewInfo, Progress, ResultInfo, Stage, WorkerRecord, WorkerState
from engine.pipeline.generate import PipelineRunner, RunOutput, device_facts
from engine.pipeline.hooks import GroupBroken, JobCancelled, JobInterrupted, RunHooks
from engine.pipeline.previews import LivePreviews
from engine.pipeline.video import encode_mp4, finish_mp4, read_frames, to_uint8
from engine.queue.bus import Subscription
from engine.queue.claims import UNFETCHABLE_KEEP_S
from engine.queue.core import DATABASE_DOWN, WORKER_STOPPED
from engine.queue.fleet import recover_orphans
from engine.queue.jobqueue import JobQueue
from engine.queue.processes import this_machine
from engine.storage.files import hidden_beside
from engine.storage.images import ImageInfo, ImageStore, Mode, frame_picture
from engine.storage.preview_files import preview_path, remove_preview
from engine.storage.shared_files import local_video, shared_files

log = logging.getLogger(__name__)
RANK_LOST = "a rank of its parallel group was lost"


@dataclass
class LoopState:
    """Where the worker's loop is: what its record in the fleet says (engine.jobs.WorkerRecord), and what it made."""

    paused: bool = False
    current_job: int | None = None
    jobs_done: int = 0


@dataclass
class _Flags:
    cancel: threading.Event = field(default_factory=threading.Event)
    interrupt: threading.Event = field(default_factory=threading.Event)
    # The job went back to the queue while this worker was silent: stop, and write nothing more about it.
    lost: threading.Event = field(default_factory=threading.Event)


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        runner: PipelineRunner,
        store: ImageStore,
        settings: Settings,
        downloader: Downloader,
        rules: ContentRules,
        poll_s: float = 1.0,
        progress_persist_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        error_wait_s: float = 1.0,
        write_retry_s: float = 300.0,
        devices: str | None = None,
    ) -> None:
        self._queue = queue
        self._rules = rules
        self._runner = runner
        self._store = store
        self._settings = settings
        self._poll_s = poll_s
        self._persist_s = progress_persist_s
        self._clock = clock
        self._error_wait_s = error_wait_s
        self._write_retry_s = write_retry_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanbot-gpu")
        # Previews are rendered beside the GPU thread, never on it.
        self._preview_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wanbot-preview")
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._flags: _Flags | None = None
        self._claim_token: str | None = None
        self._announced = False  # this worker has a record in the fleet (it said it is here)
        self._files = shared_files(queue)
        self.state = LoopState()
        self._host = socket.gethostname()
        self._devices = devices  # a parallel group's devices ("cuda:0+cuda:1"), which the fleet shows as one worker
        self._started_at = time.time()
        # Never the id of an earlier process: a container started again may have the same host name and pid.
        self.id = f"{self._host}/{devices or settings.generation.device}/{os.getpid()}-{secrets.token_hex(2)}"
        # Models this worker failed to download, and until when it leaves their jobs to the others.
        self._unfetchable: dict[str, float] = {}
        self._fetcher = ModelFetcher(
            queue, downloader, self._wake.set, worker_id=self.id, on_unfetchable=self._leave_to_others
        )
        self._machine = this_machine()

    @property
    def loaded_model(self) -> str | None:
        return self._runner.loaded_model

    @property
    def downloading(self) -> set[str]:
        """Models being downloaded in the background for waiting jobs."""
        return self._fetcher.busy_models

    async def start_up(self) -> None:
        """Say this worker is here, recover jobs whose worker is gone (a crash of this machine's last process is seen
        at once; another machine's after the lease), and pause if configured to."""
        await self._queue.heartbeat(self.record())
        self._announced = True
        await self._recover()
        if self._settings.queue.pause_on_start:
            await self._queue.set_paused(True)

    async def _recover(self) -> None:
        await recover_orphans(self._queue, self._settings)

    def record(self, state: WorkerState | None = None) -> WorkerRecord:
        """This worker as the fleet sees it."""
        device, gpu_name, free_bytes = device_facts(self._settings.generation)
        if state is None:
            if self.state.current_job is not None:
                state = WorkerState.WORKING
            else:
                state = WorkerState.PAUSED if self.state.paused else WorkerState.IDLE
        return WorkerRecord(
            id=self.id,
            host=self._host,
            machine=self._machine,
            pid=os.getpid(),
            device=self._devices or device,
            gpu_name=gpu_name,
            free_memory_bytes=free_bytes,
            loaded_model=self._runner.loaded_model,
            downloading=sorted(self._fetcher.busy_models),
            current_job=self.state.current_job,
            state=state,
            started_at=self._started_at,
        )

    async def _heartbeat_forever(self) -> None:
        """Every heartbeat_s: say this worker is alive, and put back the jobs of workers that are gone. A database
        that cannot be reached is logged and tried again; the running job goes on meanwhile, and once the database
        is back the worker either still holds its job or learns that it was given to another and drops it."""
        while True:
            try:
                flags, token = self._flags, self._claim_token
                held = await self._queue.heartbeat(self.record(), token)
                self._announced = True
                if not held and flags is not None and token == self._claim_token:
                    log.error(
                        "job=%s was queued again while this worker was silent; dropping it", self.state.current_job
                    )
                    flags.lost.set()
                await self._recover()
            except Exception:
                log.warning("heartbeat failed; trying again in %.0f s", self._settings.queue.heartbeat_s, exc_info=True)
            await asyncio.sleep(self._settings.queue.heartbeat_s)

    async def _say_stopped(self) -> None:
        if not self._announced:
            return  # never in the fleet (a CLI run, say): nothing to take back
        try:
            await self._queue.heartbeat(self.record(WorkerState.STOPPED))
        except Exception:
            log.warning("could not record this worker as stopped", exc_info=True)

    async def run(self, stop_after: int | None = None) -> None:
        """Process jobs until `stop()` (or, for the CLI, until `stop_after` jobs are done and nothing waits).

        Nothing outside a job stops the loop either: a failed claim or a database that refuses writes is logged, and
        the loop waits (doubling, up to a minute) and goes on once the disk or the lock is back."""
        inbox = self._queue.events.subscribe()
        wake_task = asyncio.create_task(self._wake_on_events(inbox))
        heartbeat = asyncio.create_task(self._heartbeat_forever())
        wait_s = self._error_wait_s
        try:
            while not self._stop.is_set():
                try:
                    if not await self._step(stop_after):
                        break
                    wait_s = self._error_wait_s
                except Exception:
                    log.exception("worker loop error; going on in %.1f s", wait_s)
                    await self._pause(wait_s)
                    wait_s = min(wait_s * 2, 60.0)
        finally:
            wake_task.cancel()
            heartbeat.cancel()
            inbox.close()

    async def _step(self, stop_after: int | None) -> bool:
        """Claim and process one job, or wait a poll interval; False once `stop_after` jobs are done."""
        # Cleared before the claim, so a job enqueued right after an empty claim still wakes us.
        self._wake.clear()
        self.state.paused = await self._queue.is_paused()
        job = None
        if not self.state.paused:
            job = await self._queue.claim_next(
                self._runner.loaded_model,
                self._settings.queue.max_model_skips,
                self._not_claimed(),
                self.id,
                held_loras=self._runner.held_loras,
            )
        if job is None:
            done = stop_after is not None and self.state.jobs_done >= stop_after
            if done and not self._fetcher.busy_models:
                return False
            await self._idle(self._poll_s)
            return True
        try:
            missing = self._fetcher.missing(job.model, job.mode)
        except UserError as exc:
            # The job's model cannot be found or read here (its folder went away while it waited, or serve names a
            # model this worker's machine lacks): the loop goes on.
            await self._fail_unusable_model(job, job.claim_token, exc, job.mode)
            return True
        try:
            self._check_loop_model(job)
        except UserError as exc:
            await self._fail_unusable_model(job, job.claim_token, exc, Mode.I2V)
            return True
        if missing:
            # Back to the queue until its model is here; jobs for other models go on meanwhile.
            requeue = partial(self._queue.requeue, job.id, "waiting for the model download", token=job.claim_token)
            await self._finish(job.id, "requeue", requeue)
            self._fetcher.start(job.model)
            return True
        await self._process(job)
        self.state.jobs_done += 1
        return True

    def _leave_to_others(self, model: str) -> None:
        self._unfetchable[model] = time.monotonic() + UNFETCHABLE_KEEP_S

    def _not_claimed(self) -> set[str]:
        """Models whose jobs wait where they are: being downloaded here, or that this worker could not get lately."""
        now = time.monotonic()
        self._unfetchable = {model: until for model, until in self._unfetchable.items() if until > now}
        return self._fetcher.busy_models | set(self._unfetchable)

    def rearm(self) -> None:
        """Claim again after a stop: a command that waits for its jobs twice (`wanbot demo`'s extend)."""
        self._stop.clear()

    async def stop(self, requeue_running: bool = True) -> None:
        """Stop claiming; with `requeue_running` the running job stops at its next step and goes back to the queue."""
        self._stop.set()
        self._wake.set()
        if requeue_running and self._flags is not None:
            self._flags.interrupt.set()

    async def close(self) -> None:
        """Release the threads and say this worker stopped (its record stays, for `wanbot workers`)."""
        await self._say_stopped()
        await self._fetcher.close()
        # On the GPU thread, after any job it runs: a parallel group's other ranks are stopped there too.
        await asyncio.get_running_loop().run_in_executor(self._executor, self._runner.close)
        self._executor.shutdown(wait=True)
        self._preview_executor.shutdown(wait=True)

    async def _pause(self, seconds: float) -> None:
        """Wait after an error; only `stop()` cuts it short (new jobs do not: the database is the problem)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # not wait_for, which can swallow a cancel (engine/queue/follower.py)
                await self._stop.wait()

    async def _idle(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    async def _wake_on_events(self, inbox: Subscription) -> None:
        async for event in inbox:
            if event.kind in (EventKind.ENQUEUED, EventKind.REQUEUED):
                self._wake.set()
            elif event.kind is EventKind.CANCEL_REQUESTED and self._flags and event.job.id == self.state.current_job:
                self._flags.cancel.set()

    async def _watch_cancel(self, job_id: int, flags: _Flags) -> None:
        """Cancel requests from another process (the CLI) only reach us through the database."""
        while not flags.cancel.is_set():
            await asyncio.sleep(self._poll_s)
            try:
                if await self._queue.is_cancel_requested(job_id):
                    flags.cancel.set()
            except DATABASE_DOWN:
                pass  # asked again at the next poll; the heartbeat says what is wrong with the database

    async def _process(self, job: Job) -> None:
        flags = _Flags()
        if job.cancel_requested:
            flags.cancel.set()
        self._flags = flags
        self._claim_token = job.claim_token
        self.state.current_job = job.id
        watcher = asyncio.create_task(self._watch_cancel(job.id, flags))
        reporter = _ProgressReporter(
            self._queue, job, self._persist_s, self._clock, flags.lost.set, self._share_preview
        )
        token = job.claim_token
        try:
            await self._generate(job, flags, reporter)
        except GroupBroken:
            # The group is started again for the next job (the loop's error wait spaces the tries); this one goes
            # back to the queue, as after a crash.
            await reporter.drain()
            requeue = partial(self._queue.requeue, job.id, RANK_LOST, token=token)
            await self._finish(job.id, "requeue", requeue)
            raise
        except JobInterrupted:
            await reporter.drain()
            if flags.lost.is_set():
                log.error("dropped job=%s: another worker has it now", job.id)
            else:
                requeue = partial(self._queue.requeue, job.id, WORKER_STOPPED, token=token)
                await self._finish(job.id, "requeue", requeue)
        except JobCancelled:
            await reporter.drain()
            await self._finish(job.id, "cancel", partial(self._queue.mark_cancelled, job.id, token=token))
        except ModelUnusable as exc:
            await reporter.drain()
            await self._fail_unusable_model(job, token, exc, job.mode)
        except UserError as exc:
            await reporter.drain()
            detail = f"{type(exc).__name__}: {exc}"
            await self._finish(job.id, "fail", partial(self._queue.mark_failed, job.id, str(exc), detail, token=token))
        except Exception as exc:
            await reporter.drain()
            log.exception("job failed job=%s user=%s model=%s", job.id, job.source.user_key, job.model)
            message, trace = _failure_message(job.id, exc), traceback.format_exc()
            await self._finish(job.id, "fail", partial(self._queue.mark_failed, job.id, message, trace, token=token))
        finally:
            watcher.cancel()
            self._flags = None
            self._claim_token = None
            self.state.current_job = None
            if not flags.lost.is_set():  # else the preview is the new owner's
                await asyncio.to_thread(remove_preview, self._settings.previews_dir, job.id)
                await self._forget_shared_preview(job.id)

    def _check_loop_model(self, job: Job) -> None:
        """A t2v loop's second pass needs the i2v model here before its first pass runs. (It is not fetched for the
        loop: a download serves the jobs queued for its model, and this job is a t2v one.)"""
        second = job.params.loop_model
        if second is not None and self._fetcher.missing(second, Mode.I2V):
            raise ModelUnusable(
                f"The i2v model {second}, which a t2v loop's second pass runs, is not on this machine.",
                "Run: wanbot models download i2v",
            )

    async def _fail_unusable_model(self, job: Job, token: str | None, error: UserError, mode: Mode) -> None:
        """The operator reads what is wrong with the model and what to do in the log (and `queue show`); the job's
        owner a plain sentence."""
        log.error("job=%s cannot use its model %s on this machine: %s", job.id, job.model, error)
        message = model_unusable_text(job.id, mode.value)
        fail = partial(self._queue.mark_failed, job.id, message, f"{type(error).__name__}: {error}", token=token)
        await self._finish(job.id, "fail", fail)

    async def _finish(self, job_id: int, what: str, write: Callable[[], Awaitable[object]]) -> None:
        """A job's last database write, retried while the database is locked, read-only or its disk full.

        After `write_retry_s` a success or cancel that still cannot be written is recorded as a failure, so the
        owner is told; that failure is retried until it is written or the worker stops (the job is then running in
        the database, and the next start puts it back in the queue)."""
        deadline = self._clock() + self._write_retry_s
        wait_s = self._error_wait_s
        while True:
            try:
                await write()
                return
            except ClaimLost as exc:
                # Another worker runs it now (this one was silent past the lease): its result is that one's.
                log.error("could not record job=%s as %s: %s", job_id, what, exc)
                if self._flags is not None:
                    self._flags.lost.set()
                return
            except DATABASE_DOWN as exc:
                if self._stop.is_set():
                    # Left running in the database: the next start puts it back in the queue.
                    log.error("could not record job=%s as %s before stopping: %s", job_id, what, exc)
                    return
                if what != "fail" and self._clock() >= deadline:
                    log.error("could not record job=%s as %s in %.0f s: %s", job_id, what, self._write_retry_s, exc)
                    message = f"Video #{job_id} could not be saved: the server's database refused the write."
                    write = partial(
                        self._queue.mark_failed, job_id, message, f"{what} not recorded: {exc}", token=self._claim_token
                    )
                    what = "fail"
                    continue
                log.warning("recording job=%s as %s failed (%s); trying again in %.1f s", job_id, what, exc, wait_s)
                await self._pause(wait_s)
                wait_s = min(wait_s * 2, 30.0)

    def _live_previews(self, job: Job, reporter: _ProgressReporter) -> LivePreviews | None:
        config = self._settings.previews
        if not config.enabled:
            return None
        loop = asyncio.get_running_loop()
        return LivePreviews(
            job.id,
            config,
            preview_path(self._settings.previews_dir, job.id),
            self._preview_executor,
            publish=lambda preview: loop.call_soon_threadsafe(reporter.show_preview, preview),
            clock=self._clock,
        )

    async def _generate(self, job: Job, flags: _Flags, reporter: _ProgressReporter) -> None:
        loop = asyncio.get_running_loop()
        for info in job.images:  # from the database when the job was asked for on another machine
            await self._files.ensure_local("image", self._store.path_for(info.sha256))
        earlier = await self._earlier_video(job)
        images = [await asyncio.to_thread(self._store.restore, info) for info in job.images]
        hooks = RunHooks(
            on_progress=lambda progress: loop.call_soon_threadsafe(reporter.report, progress),
            should_cancel=flags.cancel.is_set,
            should_interrupt=lambda: flags.interrupt.is_set() or flags.lost.is_set(),
            timeout_s=self._settings.generation.timeout_s,
            clock=self._clock,
            previews=self._live_previews(job, reporter),
            finish=await self._queue.finish_times(job.model, job.params.width * job.params.height * job.params.frames),
        )
        target = self._settings.outputs_dir / output_name(job.id)
        # Encoded as the VAE decodes, under a hidden temporary name the clean-up removes if the process dies first.
        # (Not an Extend: its video is the one it continues, then the new frames.)
        encode_to = await asyncio.to_thread(hidden_beside, target)
        hooks.encode_to = encode_to if job.params.extends is None else None
        try:
            output: RunOutput = await loop.run_in_executor(
                self._executor, self._runner.run, job, [image.pixels for image in images], hooks
            )
        except BaseException:
            encode_to.unlink(missing_ok=True)
            raise
        finally:
            if hooks.previews is not None:
                await hooks.previews.finish()
        encode_s = hooks.finish.encode_s if hooks.finish else None
        reporter.report(Progress(stage=Stage.ENCODING, step=job.params.steps, total=job.params.steps, eta_s=encode_s))
        started = self._clock()
        metadata = {
            "job": job.id,
            "prompt": job.params.prompt,
            "original_prompt": job.params.original_prompt,
            "loop": job.params.loop,
            "extends": job.params.extends,
            "negative_prompt": job.params.negative_prompt,
            "seed": job.params.seed,
            "model": job.model,
            "mode": job.mode.value,
            "steps": job.params.steps,
            "guidance": job.params.guidance,
            "guidance_2": job.params.guidance_2,
            "width": job.params.width,
            "height": job.params.height,
            "frames": job.params.frames,
            "fps": job.params.fps,
            "timings": {key: round(value, 3) for key, value in output.timings.items()},
            # preset, loras, scheduler, sigmas, transformer_calls and speedups: how the video was really made
            **(output.info.model_dump(mode="json") if output.info else {}),
        }
        try:
            video = None
            if output.encoded:
                try:
                    video = await loop.run_in_executor(self._executor, finish_mp4, hooks.encode_to, target, metadata)
                except (OSError, av.error.FFmpegError):
                    log.warning("job=%s: the video encoded while decoding could not be finished", job.id, exc_info=True)
            if video is None:  # encoded from the frames: a tiled decode, the streamed one failed, or an Extend
                frames = await self._joined(earlier, output.frames)
                video = await loop.run_in_executor(self._executor, encode_mp4, frames, job.params.fps, target, metadata)
        finally:
            encode_to.unlink(missing_ok=True)
        last_frame = await self._keep_last_frame(job, output.frames)
        output.timings["encode_s"] = self._clock() - started
        flagged = await self._flagged(job, output.frames)
        await reporter.drain()
        result = ResultInfo(
            path=str(Path(video.path)),
            bytes=video.bytes,
            width=video.width,
            height=video.height,
            frames=video.frames,
            fps=job.params.fps,
            duration_s=video.duration_s,
            model=job.model,
            seed=job.params.seed,
            timings=output.timings,
            run=output.info,
            last_frame=last_frame,
            flagged=flagged,
        )

        async def record() -> None:
            # The video first: a serving process on another machine fetches it as soon as the job has succeeded.
            await self._files.publish("video", Path(video.path))
            try:
                await self._queue.mark_succeeded(job.id, result, token=job.claim_token)
            except ClaimLost:
                # Another worker makes this job now: this video is nobody's, here or in the database.
                await self._files.remove("video", [Path(video.path).name])
                await asyncio.to_thread(Path(video.path).unlink, missing_ok=True)
                raise

        await self._finish(job.id, "succeed", record)

    async def _flagged(self, job: Job, frames: np.ndarray) -> str | None:
        """What the content check flags in a few of the new frames (an Extend's earlier part was checked before), or
        in the job's pictures; None where nothing was, or no classifier is on."""
        if not self._rules.checks_videos:
            return job.params.flagged
        started = self._clock()
        flagged = await self._rules.video_flag(frames, self._rules.frames_to_check(len(frames)))
        took = self._clock() - started
        log.info("job=%s content check of its video: %s in %.2fs", job.id, flagged or "nothing flagged", took)
        return flagged or job.params.flagged

    async def _earlier_video(self, job: Job) -> Path | None:
        """The video an Extend continues, on this machine (fetched where another made it), before anything is made:
        a video cleaned up meanwhile fails the job with a sentence, not after the generation."""
        if job.params.extends is None:
            return None
        earlier = await self._queue.get(job.params.extends)
        gone = UserError(
            f"Job #{earlier.id}'s video was cleaned up before this extend could run.", "Ask for a new video."
        )
        if earlier.result is None:
            raise gone
        try:
            return await local_video(self._files, self._settings.outputs_dir, Path(earlier.result.path))
        except (UserError, OSError):
            raise gone from None

    async def _joined(self, earlier: Path | None, frames: np.ndarray) -> np.ndarray:
        """An Extend's video: the frames of the video it continues, then its own but the first (that video's last,
        the picture it started from)."""
        if earlier is None:
            return frames
        before = await asyncio.to_thread(read_frames, earlier)
        return np.concatenate([before, to_uint8(frames)[1:]])

    async def _keep_last_frame(self, job: Job, frames: np.ndarray) -> ImageInfo | None:
        """The video's last frame, as decoded, stored like a picture (and shared with the other processes): the
        start of an Extend of this video. None when it cannot be kept: the video is delivered all the same, and an
        Extend of it is refused with a sentence."""
        try:
            picture = await asyncio.to_thread(frame_picture, to_uint8(frames[-1:])[0], self._settings.images)
            info = await asyncio.to_thread(self._store.put, picture)
            await self._files.publish("image", self._store.path_for(info.sha256))
        except (UserError, *DATABASE_DOWN):
            log.warning("job=%s: its last frame could not be kept; it cannot be extended", job.id, exc_info=True)
            return None
        return info

    async def _share_preview(self, job_id: int) -> None:
        await self._files.publish("preview", preview_path(self._settings.previews_dir, job_id))

    async def _forget_shared_preview(self, job_id: int) -> None:
        try:
            await self._files.remove("preview", [preview_path(self._settings.previews_dir, job_id).name])
        except DATABASE_DOWN:
            log.warning("could not remove the shared preview of job=%s; the clean-up will", job_id, exc_info=True)


def output_name(job_id: int) -> str:
    """Unique even when job numbers start again (a new database beside the old videos): never overwrite a video."""
    return f"job-{job_id}-{secrets.token_hex(4)}.mp4"


def _failure_message(job_id: int, error: Exception) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return (
            f"Video #{job_id} could not be saved: the server's disk is full. It has been logged; send the request "
            "again once an admin has made room."
        )
    # No Retry button under a failed job: the way to try again is to ask again.
    return f"Sorry, something went wrong while making video #{job_id}. It has been logged; send the request again."


class _ProgressReporter:
    """Publishes every progress update in order; writes it to the database at most every `persist_s`.

    A new live preview is announced at once (a PREVIEW event); every later update carries it, and the next one
    stores it with the job, so another process finds it too."""

    def __init__(
        self,
        queue: JobQueue,
        job: Job,
        persist_s: float,
        clock: Callable[[], float],
        on_lost: Callable[[], None],
        share_preview: Callable[[int], Awaitable[None]],
    ) -> None:
        self._queue = queue
        self._share_preview = share_preview
        self._job_id = job.id
        self._token = job.claim_token
        self._on_lost = on_lost
        self._persist_s = persist_s
        self._clock = clock
        self._last_persist = float("-inf")
        self._last_stage: Stage | None = None
        self._preview: PreviewInfo | None = None
        self._preview_stored = True
        self._pending: list[asyncio.Future[None]] = []

    def report(self, progress: Progress) -> None:
        if self._preview is not None:
            progress = progress.model_copy(update={"preview": self._preview})
        now = self._clock()
        persist = (
            not self._preview_stored
            or progress.stage != self._last_stage
            or now - self._last_persist >= self._persist_s
        )
        if persist:
            self._last_persist = now
            self._preview_stored = True
        self._last_stage = progress.stage
        self._track(self._queue.update_progress(self._job_id, progress, persist, token=self._token))

    def show_preview(self, preview: PreviewInfo) -> None:
        self._preview = preview
        self._preview_stored = False
        self._track(self._announce(preview))

    async def _announce(self, preview: PreviewInfo) -> None:
        # A worker whose claim is gone shares no preview file: the job's new owner makes its own.
        if not await self._queue.holds_claim(self._job_id, self._token):
            raise ClaimLost(f"Job #{self._job_id} is no longer this worker's; its preview is not shared.")
        await self._share_preview(self._job_id)
        await self._queue.announce_preview(self._job_id, preview, token=self._token)

    def _track(self, work: Awaitable[None]) -> None:
        self._pending = [task for task in self._pending if not task.done()]
        task = asyncio.ensure_future(work)
        task.add_done_callback(self._log_failure)
        self._pending.append(task)

    def _log_failure(self, task: asyncio.Future[None]) -> None:
        # A lost progress report only leaves the chat a step behind; the job goes on, but the fault is not hidden.
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), ClaimLost):
            self._on_lost()
        else:
            log.warning("progress report of job=%s failed", self._job_id, exc_info=task.exception())

    async def drain(self) -> None:
        """Wait for reports already made, so no progress event arrives after the job's final event."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending = []
