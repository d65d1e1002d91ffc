"""The engine as adapters and the CLI use it: one object holding the queue, storage, runner and worker, and the
submit path every request takes (check the limits, validate images, resolve settings, store, enqueue).

Importing it costs no torch: the model side (runner, worker, tokenizer, previews) is imported where an engine is
opened, so the chat modules and the CLI's queue and model commands start in a fraction of a second."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from engine.again import Again
from engine.config import Settings
from engine.content_rules import ContentRules
from engine.enhance.enhancer import Enhancer
from engine.errors import QuotaExceeded, UserError
from engine.hub.downloads import Downloader, size_text, warn_missing_models
from engine.jobs import (
    Actor,
    EnqueueResult,
    EventKind,
    GenerationParams,
    Job,
    JobSource,
    JobStatus,
    QueuePosition,
    ServingRecord,
    WorkerRecord,
)
from engine.pipeline.models import GenerationRequest, ModelRef, model_for_mode, resolve_request
from engine.pipeline.video import fit_to_limit
from engine.queue.backend import Backend as Database
from engine.queue.bus import EventBus, Subscription
from engine.queue.core import DATABASE_DOWN, WORKER_STOPPED
from engine.queue.fleet import recover_orphans
from engine.queue.follower import EventFollower
from engine.queue.jobqueue import JobQueue
from engine.queue.processes import pid_alive, this_machine
from engine.queue.quotas import GpuTime
from engine.shaping import ENHANCED_NOTE, Upload, enhanced, loop_end, looped
from engine.storage.cleanup import remove_delivered_videos, remove_stale_previews, remove_unused_images
from engine.storage.images import (
    ImageStore,
    Mode,
    ValidatedImage,
    check_mode,
    give_back_memory,
    jpeg_of,
    validate_image_bytes,
)
from engine.storage.preview_files import preview_path
from engine.storage.shared_files import SharedFiles, local_video, shared_files
from engine.supervisor import Supervisor

if TYPE_CHECKING:
    from engine.pipeline.generate import ModelLocator, PipelineRunner
    from engine.pipeline.prompts import PromptLengths
    from engine.worker import Worker

T = TypeVar("T")
# A delivery record that meets a locked or unreachable database is tried again after these waits, doubling.
RECORD_FIRST_WAIT_S = 0.5
# How soon a pause or resume made by another process shows in this one's waiting places (one read of a flag).
PAUSE_POLL_S = 2.0
RECORD_MAX_WAIT_S = 30.0
log = logging.getLogger(__name__)
# What the facade passes on as it is: the wording of sizes.
__all__ = [
    "Database",
    "Engine",
    "Submission",
    "Subscription",
    "Upload",
    "size_text",
]


@dataclass
class Submission:
    """What the user is told right after asking: the job, where it stands, and every note about the request."""

    result: EnqueueResult
    notes: list[str] = field(default_factory=list)


@dataclass
class _Turn:
    """One user's submissions, one at a time; `users` counts the ones holding or awaiting `lock`."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass
class Engine(Again):
    settings: Settings
    # The machinery stays behind the facade: adapters and the CLI call the methods below, never these.
    _queue: JobQueue = field(repr=False)
    _store: ImageStore = field(repr=False)
    # None in a process that makes no videos (`wanbot serve`): it imports no torch, and workers elsewhere claim.
    _runner: PipelineRunner | None = field(repr=False)
    _worker: Worker | None = field(repr=False)
    _prompt_lengths: PromptLengths | None = field(repr=False)
    # Blocked terms and the picture classifier ([safety]); the worker of this process shares them.
    _rules: ContentRules = field(repr=False)
    # The process's long-lived tasks (worker, relays, clean-up, chat connections) run under it.
    supervisor: Supervisor = field(default_factory=lambda: Supervisor(outage_errors=DATABASE_DOWN))
    # Decoding is where a picture costs memory (up to images.max_decode_bytes): a few at a time, on threads of their
    # own, so a burst of large pictures neither fills memory nor takes the threads of asyncio's default pool.
    _decodes: asyncio.Semaphore = field(init=False, repr=False)
    _decode_pool: ThreadPoolExecutor = field(init=False, repr=False)
    _turns: dict[str, _Turn] = field(init=False, repr=False, default_factory=dict)
    _follower: EventFollower = field(init=False, repr=False)
    # Pictures, videos and previews as every process of this queue sees them (on PostgreSQL, in the database).
    _files: SharedFiles = field(init=False, repr=False)
    # This process's lease as the one that serves the database's chats, once taken (take_serving).
    _serving: ServingRecord | None = field(init=False, repr=False, default=None)
    # Names this process where the database records what it holds: the serving lease, the uploads it makes.
    _process_id: str = field(
        init=False, repr=False, default_factory=lambda: f"{socket.gethostname()}/{os.getpid()}-{secrets.token_hex(2)}"
    )
    _place_listeners: list[Callable[[], None]] = field(init=False, repr=False, default_factory=list)
    _paused_seen: bool | None = field(init=False, repr=False, default=None)  # as the places last showed it
    # The prompt enhancer (prompts.enhancer), or None when it is off.
    _enhancer: Enhancer | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        self._queue.lease_s = self.settings.queue.lease_s
        self._follower = EventFollower(self._queue)
        self._files = shared_files(self._queue)
        slots = self.settings.images.max_concurrent_decodes
        self._decodes = asyncio.Semaphore(slots)
        self._decode_pool = ThreadPoolExecutor(slots, thread_name_prefix="wanbot-decode")
        if self.settings.prompts.enhancer != "off":
            self._enhancer = Enhancer(
                self.settings.prompts, Downloader(self.settings.models_dir, self.settings.downloads)
            )

    @classmethod
    async def open(cls, settings: Settings, locator: ModelLocator | None = None, with_worker: bool = True) -> Engine:
        """The engine of a process; `with_worker=False` for one that only serves chats (no model, no torch)."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = ImageStore(settings.images_dir, settings.images.background)
        if not with_worker and settings.prompts.enhancer == "local":
            raise UserError(
                "prompts.enhancer is local, which runs a model in this process, and a serving process runs none.",
                'Use prompts.enhancer = "openai" with an endpoint (vLLM, llama.cpp\'s server, Ollama), or wanbot run.',
            )
        rules = ContentRules(settings.safety, Downloader(settings.models_dir, settings.downloads))
        if not with_worker:
            queue = await JobQueue.connect(settings.database_url, EventBus())
            await queue.measure_clock_skew()
            return cls(settings, queue, store, None, None, None, rules)
        from engine.pipeline.generate import PipelineRunner, default_locator, device_facts
        from engine.pipeline.libraries import quiet_libraries
        from engine.pipeline.prompts import PromptLengths
        from engine.worker import Worker

        ranks, devices = None, None
        if settings.generation.parallel > 1:
            from engine.parallel.group import group_plan
            from engine.parallel.ranks import LeaderRanks

            plan = group_plan(settings.generation)
            devices = "+".join(plan.devices)  # the fleet shows one worker with its devices
            # This process is rank 0, on the group's first device; the others start with the first job.
            settings = settings.model_copy(
                update={"generation": settings.generation.model_copy(update={"device": plan.devices[0]})}
            )
            ranks = LeaderRanks(plan, settings)
        device_facts(settings.generation)  # a GPU this machine lacks is said in one line, before anything uses it
        quiet_libraries()  # no library progress bars between the log lines of a worker
        downloader = Downloader(settings.models_dir, settings.downloads)
        locator = locator or default_locator(settings, downloader)
        runner = PipelineRunner(settings.generation, locator, ranks=ranks)
        queue = await JobQueue.connect(settings.database_url, EventBus())
        await queue.measure_clock_skew()
        worker = Worker(
            queue,
            runner,
            store,
            settings,
            downloader,
            rules,
            write_retry_s=settings.queue.write_retry_s,
            devices=devices,
        )
        prompt_lengths = PromptLengths(locator.on_disk)
        return cls(settings, queue, store, runner, worker, prompt_lengths, rules)

    @property
    def enhancer_line(self) -> str | None:
        """What the prompt enhancer is, for the start-up lines; None when it is off."""
        return self._enhancer.describe() if self._enhancer is not None else None

    async def load_enhancer(self) -> None:
        """A local enhancer's model downloaded and loaded before the first request needs it (never raises)."""
        if self._enhancer is not None:
            await self._enhancer.load()

    @property
    def rules_line(self) -> str | None:
        """What the content rules are, for the start-up lines; None where there are none."""
        return self._rules.describe()

    async def load_rules(self) -> None:
        """The picture classifier downloaded and loaded before the first picture needs it (never raises)."""
        await self._rules.load()

    def check_prompt(self, prompt: str) -> None:
        """Raise the operator's sentence (a UserError, counted) when `prompt` holds a blocked term: for an adapter
        that can refuse before it answers in public."""
        self._rules.check_prompt(prompt)

    def video_policy(self, job: Job, place: str | None = None) -> str:
        """What `job`'s video gets where it would be sent (its own place, or `place`): "allow", "spoiler" (hidden
        until tapped) or "block"."""
        return self._rules.video_policy(job, place)

    def refuse_video(self, job: Job) -> str:
        """Why `job`'s video is withheld, as its owner reads it; counted as a refusal."""
        return self._rules.refuse_video(job)

    async def close(self) -> None:
        await self.supervisor.stop()
        if self._enhancer is not None:
            await self._enhancer.close()
        await self._rules.close()
        if self._worker is not None:
            await self._worker.stop()
            await self._worker.close()
        await self._release_serving()
        await self._release_deliveries()
        await self._queue.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    def share_events(self) -> None:
        """Other processes (workers, a serving process) share this queue: its events are stored for them, and theirs
        are published here by `follow_events`."""
        self._queue.share_events()

    async def follow_events(self) -> None:
        """Publish the events of other processes here, and re-show every waiting place when another process pauses
        or resumes the queue (`wanbot queue pause`, a second chat's admin), until cancelled (a supervised task)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follower.follow())
            tasks.create_task(self._watch_pause())

    async def _watch_pause(self) -> None:
        """A pause is a flag, not a job event: read it every PAUSE_POLL_S. An outage is the follower's to say."""
        while True:
            try:
                paused = await self._queue.is_paused()
            except DATABASE_DOWN:
                paused = self._paused_seen
            if self._paused_seen is None:
                self._paused_seen = paused
            elif paused is not None and paused != self._paused_seen:
                self._places_changed(paused)
            await asyncio.sleep(PAUSE_POLL_S)

    def check_metrics_port(self) -> None:
        """Raise a UserError (exit 2) when metrics.port cannot be listened on, before the process starts anything."""
        from engine.metrics import check_port

        config = self.settings.metrics
        if config.port is not None:
            check_port(config.host, config.port)

    async def serve_metrics(self) -> None:
        """/metrics and /healthz on metrics.port, until cancelled; healthy while no supervised task has failed."""
        from engine.metrics import Metrics, serve_metrics

        metrics = Metrics(self.settings.queue.lease_s)
        self._rules.on_refused = lambda reason: metrics.refused.labels(reason=reason).inc()
        config = self.settings.metrics
        assert config.port is not None
        tasks = [
            asyncio.ensure_future(metrics.follow(self._queue)),
            asyncio.ensure_future(
                serve_metrics(
                    metrics, self._queue, config.host, config.port, lambda: self.supervisor.failure, self._degraded
                )
            ),
        ]
        try:
            # Either one failing ends both, and the supervisor reports its error as it is (a port in use, say).
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()

    # -- what chat adapters and the relay read and change; a remote worker's serving process answers the same calls --

    def subscribe(self) -> Subscription:
        """Every job event from now on, in order."""
        return self._queue.events.subscribe()

    async def job(self, job_id: int) -> Job:
        return await self._queue.get(job_id)

    async def job_from(self, source: JobSource) -> Job | None:
        """The job a chat message already made (a message handled again after a restart), if any."""
        return await self._queue.find_by_source(source)

    async def jobs(
        self,
        statuses: Collection[JobStatus],
        user_key: str | None = None,
        platform: str | None = None,
        limit: int = 50,
        oldest_first: bool = False,
    ) -> list[Job]:
        return await self._queue.list_jobs(
            statuses, user_key=user_key, platform=platform, limit=limit, oldest_first=oldest_first
        )

    async def position(self, job_id: int) -> QueuePosition | None:
        return await self._queue.position(job_id)

    async def counts(self) -> dict[str, int]:
        return await self._queue.counts()

    async def is_paused(self) -> bool:
        return await self._queue.is_paused()

    def lease_now(self) -> float:
        """Now on the clock the workers' leases are kept on (the database server's), for telling who is online."""
        return self._queue.lease_now()

    async def no_worker_online(self) -> bool:
        """No worker process, on any machine, was heard from within the lease, and no job runs: waiting jobs wait
        for one to start, however long."""
        now, lease_s = self.lease_now(), self.settings.queue.lease_s
        if any(worker.online(now, lease_s) for worker in await self._queue.workers()):
            return False
        return (await self._queue.counts()).get("running", 0) == 0

    async def _degraded(self) -> str | None:
        """What a process that only serves chats lacks to make videos, for /healthz; None when nothing."""
        if self._worker is None and await self.no_worker_online():
            return "no worker is online: queued videos wait until one starts"
        return None

    async def set_paused(self, paused: bool) -> None:
        """Pause or resume the queue; every waiting place this process shows is shown again at once."""
        await self._queue.set_paused(paused)
        self._places_changed(paused)

    def _places_changed(self, paused: bool) -> None:
        self._paused_seen = paused
        self._reshow_places()

    def _reshow_places(self) -> None:
        for listener in list(self._place_listeners):
            listener()

    def on_places_changed(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` when every waiting job's place text changes at once (a pause, a resume from this
        process); returns what stops it."""
        self._place_listeners.append(listener)
        return lambda: self._place_listeners.remove(listener)

    async def cancel(self, job_id: int, actor: Actor) -> Job:
        return await self._queue.cancel(job_id, actor)

    async def was_interrupted(self, job: Job) -> bool:
        """True when the job ran before and a restart (or crash) of the process sent it back to the queue."""
        if job.attempts > 1:  # a crash: the attempt it was on counted
            return True
        history = await self._queue.events_of(job.id)
        return any(kind == EventKind.REQUEUED and detail == WORKER_STOPPED for kind, detail in history)

    async def update_reply(self, job_id: int, **reply: str) -> Job:
        """Store what an adapter needs to answer about the job later (its message ids, a lowered upload limit)."""
        return await self._queue.update_reply(job_id, **reply)

    async def workers(self) -> list[WorkerRecord]:
        """The fleet: every worker process heard from in the last week (this process's too), newest first; whether
        each is online is `record.online(time.time(), settings.queue.lease_s)`."""
        return await self._queue.workers()

    # -- delivery --

    async def undelivered(self, platform: str, max_attempts: int) -> list[Job]:
        return await self._queue.undelivered(platform, max_attempts)

    async def claim_delivery(self, job_id: int, max_attempts: int, claim_s: float) -> Job | None:
        """Upload `job_id`'s video from this process and no other: the job, with this upload counted in
        `upload_starts`; None when it is no longer waiting, or another process began uploading it less than
        `claim_s` ago."""
        return await self._queue.claim_delivery(job_id, self._process_id, max_attempts, claim_s)

    async def _release_deliveries(self) -> None:
        try:
            await self._queue.release_deliveries(self._process_id)
        except DATABASE_DOWN:
            log.warning("could not release this process's uploads; the next one waits for them to run out")

    async def mark_delivered(self, job_id: int) -> Job:
        """Record an upload that went through; retried through a database outage (see `_record_delivery`)."""
        return await self._record_delivery(f"job={job_id} as delivered", partial(self._queue.mark_delivered, job_id))

    async def mark_delivery_failed(self, job_id: int, error: str, attempts_at_least: int = 0) -> Job:
        write = partial(self._queue.mark_delivery_failed, job_id, error, attempts_at_least)
        return await self._record_delivery(f"job={job_id}'s failed upload", write)

    async def _record_delivery(self, what: str, write: Callable[[], Awaitable[Job]]) -> Job:
        """A delivery record, written through a locked, full or unreachable database with doubling waits for up to
        queue.write_retry_s: the upload it records has happened and cannot be taken back. Past that the database's
        error is raised, and the caller keeps what it knows (the relay never uploads a recorded-or-not video twice)."""
        deadline = time.monotonic() + self.settings.queue.write_retry_s
        wait_s = RECORD_FIRST_WAIT_S
        while True:
            try:
                return await write()
            except DATABASE_DOWN as exc:
                if time.monotonic() + wait_s > deadline:
                    raise
                log.warning("recording %s failed (%s); trying again in %.1f s", what, exc, wait_s)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, RECORD_MAX_WAIT_S)

    async def mark_final_shown(self, job_id: int) -> None:
        await self._queue.mark_final_shown(job_id)

    async def final_unshown(self, platform: str, max_attempts: int) -> list[Job]:
        return await self._queue.final_unshown(platform, max_attempts)

    async def video_file(self, job: Job) -> Path | None:
        """The finished video of `job` on this machine: where its worker wrote it, or (a worker on another machine)
        fetched from the database into outputs/; None when it is gone."""
        if job.result is None:
            return None
        try:
            return await local_video(self._files, self.settings.outputs_dir, Path(job.result.path))
        except (UserError, OSError) as exc:
            log.error("video of job=%s cannot be had: %s", job.id, exc)
            return None

    async def cover_picture(self, job: Job) -> bytes | None:
        """The video's last frame as a JPEG, for a platform that shows a chosen frame before the video plays; None
        where it was not kept."""
        frame = job.result.last_frame if job.result is not None else None
        if frame is None:
            return None
        try:
            path = await self._files.ensure_local("image", self._store.path_for(frame.sha256))
            return await asyncio.to_thread(jpeg_of, path)
        except (UserError, OSError, ValueError):
            log.warning("job=%s: its last frame could not be had for a cover", job.id, exc_info=True)
            return None

    async def fit_video(self, video: Path, limit_bytes: int) -> Path:
        """The video itself when it fits `limit_bytes`, else a re-encoded copy that does (UserError if none can)."""
        return await asyncio.to_thread(fit_to_limit, video, limit_bytes)

    # -- the one process that serves the chats of a database --

    async def take_serving(self) -> str | None:
        """Become the one process that acknowledges this database's chat requests and uploads its videos (two would
        do both twice); None, or a sentence naming the live process that already does. One that stopped, or was
        killed on this machine, is replaced at once; one on another machine once its lease (queue.lease_s) ran out."""
        me = ServingRecord(
            id=self._process_id,
            host=socket.gethostname(),
            machine=this_machine(),
            pid=os.getpid(),
            started_at=time.time(),
        )
        other = await self._queue.take_serving(me, self.settings.queue.lease_s, pid_alive)
        if other is None:
            self._serving = me
            return None
        since = datetime.fromtimestamp(other.started_at).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
        holder = f"pid {other.pid} on {other.host}, since {since}"
        return f"another wanbot process already serves the chats of this database: {holder}"

    async def keep_serving(self) -> None:
        """Renew the serving lease every queue.heartbeat_s. A process that lost it (it was silent past the lease and
        another took over) stops, so that the two never both upload."""
        assert self._serving is not None
        while True:
            await asyncio.sleep(self.settings.queue.heartbeat_s)
            try:
                other = await self._queue.renew_serving(self._serving)
            except DATABASE_DOWN:
                log.warning("could not renew the serving lease; trying again", exc_info=True)
                continue
            if other is not None:
                self._serving = None
                self.supervisor.fail(f"pid {other.pid} on {other.host} took over serving this database's chats")
                return

    async def _release_serving(self) -> None:
        if self._serving is None:
            return
        try:
            await self._queue.release_serving(self._serving)
        except DATABASE_DOWN:
            log.warning("could not release the serving lease; the next serve waits for it to run out", exc_info=True)
        self._serving = None

    # -- the worker, in the process that runs it --

    async def recover(self) -> None:
        """Put back (or fail) what a crash left running, and pause if configured to, before anything starts."""
        if self._worker is not None:
            await self._worker.start_up()
        else:
            await recover_orphans(self._queue, self.settings)

    async def recover_periodically(self) -> None:
        """In a process without a worker: put back the jobs of workers that went silent, every heartbeat_s."""
        while True:
            await asyncio.sleep(self.settings.queue.heartbeat_s)
            try:
                await recover_orphans(self._queue, self.settings)
            except DATABASE_DOWN:
                # Nothing to put back while the database is away; the next round looks again.
                log.warning("could not look for jobs of workers that are gone", exc_info=True)

    async def run_worker(self, again: bool = False) -> None:
        """Make videos until stop_worker; `again`: after an earlier run of this process was stopped (a command that
        waits for its jobs twice), never for a supervised restart, which a stop must end."""
        assert self._worker is not None
        if again:
            self._worker.rearm()
        await self._worker.run()

    async def stop_worker(self, requeue_running: bool = True) -> None:
        """Stop making videos; the running job goes back to the queue, first in line (or, without `requeue_running`,
        stops at its next step as a cancelled job does)."""
        if self._worker is not None:
            await self._worker.stop(requeue_running=requeue_running)

    # -- live previews --

    async def preview_bytes(self, job_id: int) -> bytes | None:
        """The running job's latest preview JPEG; None once the job has ended (its preview is removed then)."""
        path = preview_path(self.settings.previews_dir, job_id)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            pass
        # A worker on another machine: its latest preview is in the database while the job runs.
        if (await self._queue.get(job_id)).status is not JobStatus.RUNNING:
            return None
        return await self._files.read("preview", path.name)

    async def set_previews(self, platform: str, chat_id: str, on: bool) -> None:
        await self._queue.set_flag(_previews_flag(platform, chat_id), "on" if on else "off")

    async def previews_on(self, platform: str, chat_id: str) -> bool:
        """Whether a chat shows previews: wherever previews.enabled, unless its admins turned them off."""
        if not self.settings.previews.enabled:
            return False
        return await self._queue.flag(_previews_flag(platform, chat_id)) != "off"

    # -- upkeep --

    async def clean_up(self) -> tuple[int, int]:
        """Remove the images no job needs and the videos past their retention; how many of each went."""
        settings = self.settings
        image_retention_s = settings.images.retention_hours * 3600
        video_retention_s = settings.outputs.retention_hours * 3600
        images = await remove_unused_images(
            self._queue, self._store, image_retention_s, files=self._files, last_frames_s=video_retention_s
        )
        videos = await remove_delivered_videos(self._queue, settings.outputs_dir, video_retention_s, files=self._files)
        await remove_stale_previews(self._queue, settings.previews_dir, files=self._files)
        return images, videos

    def device_text(self) -> str:
        """Where videos are made and with which speed-ups, each with why ("the CPU (no CUDA GPU found); speed-ups:
        attention=native (no CUDA GPU); ...")."""
        from engine.pipeline.generate import describe_device

        assert self._runner is not None
        return f"{describe_device(self.settings.generation)}; speed-ups: {self._runner.speedups.describe()}"

    async def say_plans(self, say: Callable[[str], None]) -> None:
        """Say through `say` the plan each mode's model gets at its default size and preset on this GPU (nothing
        without one); a job of another size gets its own plan, logged when it changes."""
        if self._runner is None:
            return
        for mode in Mode:
            model = model_for_mode(mode, self.settings)
            request = GenerationRequest(mode=mode, prompt="plan")
            params = resolve_request(request, model, self.settings.generation, rng=random.Random(0))
            line = await asyncio.to_thread(self._runner.plan_line, model, params)
            if line is not None:
                size = f"{params.width}x{params.height}, {params.frames} frames, {params.preset.value}"
                say(f"plan for {mode.value} ({size}): {line}")
            refusal = await asyncio.to_thread(self._runner.parallel_line, model)
            if refusal is not None:
                say(f"{mode.value} cannot run on this parallel group: {refusal}")

    async def say_missing_models(self, say: Callable[[str], None]) -> None:
        """Name each mode's model that is not on disk yet (its first job downloads it), through `say`."""
        await warn_missing_models(self.settings, say)

    def database_gone(self) -> str | None:
        """Why the job database can no longer be trusted (deleted or replaced under the running process), or None."""
        if self._queue.file_is_gone():
            return f"the job database {self._queue.path} was deleted or replaced while wanbot ran"
        return None

    # -- the chats' own records, in the same database --

    @property
    def database(self) -> Database:
        """The queue's database, for the chat side's own table (bot/chat/inbox.py): a request and the job it becomes
        are stored, and backed up, together."""
        return self._queue.database

    def is_admin(self, platform: str, user_id: str) -> bool:
        return f"{platform}:{user_id}" in self.settings.access.admins

    def actor(self, platform: str, user_id: str) -> Actor:
        return Actor(platform=platform, user_id=user_id, is_admin=self.is_admin(platform, user_id))

    async def check_room(self, source: JobSource) -> None:
        """Raise QueueFull if the queue's limits (per user, in total, per day; admins are exempt) would refuse a job
        from `source`, queueing nothing: adapters call it before they download a picture. A submission of the same
        user that is still being checked is waited for, so that it counts."""
        async with self._turn(source.user_key):
            await self._check_room(source)

    async def _check_room(self, source: JobSource) -> None:
        is_admin = self.is_admin(source.platform, source.user_id)
        with self._quota_counted():
            await self._queue.check_room(source, is_admin=is_admin, **self._limits())

    @contextmanager
    def _quota_counted(self) -> Iterator[None]:
        try:
            yield
        except QuotaExceeded:
            self._rules.refused("quota", "a request would pass its GPU time a day")
            raise

    async def gpu_time(self, user_key: str) -> GpuTime | None:
        """A user's GPU time in the last 24 hours and their limit, for /status; None where there is no limit."""
        if not self.settings.queue.daily_gpu_seconds:
            return None
        return await self._queue.gpu_time(user_key)

    @asynccontextmanager
    async def _turn(self, user_key: str) -> AsyncIterator[None]:
        """One submission of a user at a time: the next one is checked against the limits once the one before is
        queued or refused, so a burst of pictures from one user is refused before any of it is decoded."""
        turn = self._turns.setdefault(user_key, _Turn())
        turn.users += 1
        try:
            async with turn.lock:
                yield
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[user_key]

    async def submit(
        self,
        request: GenerationRequest,
        source: JobSource,
        start: Upload | None = None,
        end: Upload | None = None,
        model_override: str | None = None,
        priority: int = 0,
        notes: list[str] | None = None,
    ) -> Submission:
        """Check the limits, validate, resolve, store and enqueue; raise a UserError (nothing stored, nothing queued)
        if anything is wrong. The limits come first, so a request over them is refused before its pictures are
        decoded; one user's submissions run one at a time, so each one sees the jobs of the ones before. `notes`
        (what the chat adapter noticed: unknown options, extra pictures) are stored with the job's warnings, so every
        later text about it repeats them."""
        try:
            return await self._submit(request, source, start, end, model_override, priority, notes)
        finally:
            if start is not None or end is not None:
                # Its decoded pictures (tens of MB each) are garbage now: a serving process goes back near its idle
                # size after each request, not only after each decode.
                await asyncio.to_thread(give_back_memory)

    async def _submit(
        self,
        request: GenerationRequest,
        source: JobSource,
        start: Upload | None,
        end: Upload | None,
        model_override: str | None,
        priority: int,
        notes: list[str] | None,
    ) -> Submission:
        model = model_for_mode(request.mode, self.settings, model_override)
        self._rules.check_prompt(request.prompt)
        async with self._turn(source.user_key):
            await self._check_room(source)
            start_image = await self._validate(start, "start")
            end_image = await self._validate(loop_end(request, start, end), "end")
            checked = check_mode(request.mode, start_image, end_image, self.settings.images)
            flagged = await self._rules.picture_flag([image.pixels for image in checked.images], source.place)
            infos = [image.info for image in checked.images]
            params = resolve_request(
                request,
                model,
                self.settings.generation,
                start=infos[0] if infos else None,
                end=infos[1] if len(infos) > 1 else None,
                loras_offered=self.settings.loras,
            )
            params = looped(self.settings, request, params).model_copy(update={"flagged": flagged})
            params = await self._enhanced(request, params, source, has_image=bool(infos))
            await self._check_plan(model, params)
            # A serving process has no tokenizer (no torch): the worker's model cuts a long prompt all the same.
            too_long = await self._prompt_lengths.warnings(model, params) if self._prompt_lengths else []
            warnings = [*(notes or []), *checked.warnings, *params.warnings, *too_long]
            params = params.model_copy(update={"warnings": warnings})
            stored = [await asyncio.to_thread(self._store.put, image) for image in checked.images]
            for info in stored:  # before the job exists, so any worker that claims it finds its pictures
                await self._files.publish("image", self._store.path_for(info.sha256))
            with self._quota_counted():
                result = await self._queue.enqueue(
                    source,
                    request.mode,
                    model.name,
                    params,
                    stored,
                    priority=priority,
                    is_admin=self.is_admin(source.platform, source.user_id),
                    **self._limits(),
                )
        return Submission(result=result, notes=[*params.adjustments, *params.warnings])

    async def _enhanced(
        self, request: GenerationRequest, params: GenerationParams, source: JobSource, has_image: bool
    ) -> GenerationParams:
        """`params` with the enhancer's rewrite, where one is on and neither the request (enhance=no) nor its chat
        (/enhance off) turned it off."""
        if self._enhancer is None or not await self._wants_enhancing(request, source):
            return params
        return await enhanced(self._enhancer, self.settings, self._rules.holds_blocked_term, params, request, has_image)

    async def _wants_enhancing(self, request: GenerationRequest, source: JobSource) -> bool:
        if request.enhance is not None:
            return request.enhance
        return await self.enhance_on(source.platform, source.chat_id)

    async def set_enhance(self, platform: str, chat_id: str, on: bool) -> None:
        await self._queue.set_flag(_enhance_flag(platform, chat_id), "on" if on else "off")

    async def enhance_on(self, platform: str, chat_id: str) -> bool:
        """Whether a chat's requests are enhanced unless they say enhance=no: wherever an enhancer is configured,
        unless the chat's admins turned it off."""
        if self._enhancer is None:
            return False
        return await self._queue.flag(_enhance_flag(platform, chat_id)) != "off"

    async def use_own_words(self, job_id: int, actor: Actor) -> Job:
        """Make a waiting job from its owner's own words instead of the enhancer's rewrite; a UserError when it is
        not theirs, was not rewritten, or has started."""
        job = await self._queue.get(job_id)
        if not actor.is_admin and job.source.user_key != actor.user_key:
            raise UserError(f"Job #{job_id} is not yours.", "Only the person who asked can choose its words.")
        original = job.params.original_prompt
        if original is None:
            raise UserError(f"Job #{job_id} already uses your own words.")
        adjustments = [note for note in job.params.adjustments if not note.startswith(ENHANCED_NOTE)]
        params = job.params.model_copy(update={"prompt": original, "original_prompt": None, "adjustments": adjustments})
        changed = await self._queue.replace_waiting_params(job_id, params)
        if changed is None:
            raise UserError(
                f"Job #{job_id} has started already, with the enhanced prompt.",
                "Ask again with enhance=no for your own words.",
            )
        self._reshow_places()  # its message loses the button
        return changed

    async def _check_plan(self, model: ModelRef, params: GenerationParams) -> None:
        """A job that no placement fits on this process's GPU is refused before it is queued, saying what would.
        (A serving process has no GPU: the worker that claims it fails it with the same sentence.)"""
        if self._runner is not None:
            await asyncio.to_thread(self._runner.check_fits, model, params)

    def _limits(self) -> dict[str, float]:
        limits = self.settings.queue
        return {
            "per_user_limit": limits.per_user_limit,
            "global_limit": limits.global_limit,
            "daily_limit": limits.daily_limit,
            "daily_gpu_seconds": limits.daily_gpu_seconds,
            "daily_chat_gpu_seconds": limits.daily_chat_gpu_seconds,
        }

    async def _validate(self, upload: Upload | None, role: str) -> ValidatedImage | None:
        if upload is None:
            return None
        return await self._decode(validate_image_bytes, upload.data, self.settings.images, role, upload.filename)

    async def _decode(self, decode: Callable[..., T], *args: object) -> T:
        """Run a decode off the event loop (a 40 MP image takes a while), at most max_concurrent_decodes at once.
        The pool's size is the hard bound: a cancelled wait gives its slot back while its decode still runs."""
        async with self._decodes:
            return await asyncio.get_running_loop().run_in_executor(self._decode_pool, _decoded, decode, *args)


def _decoded(decode: Callable[..., T], *args: object) -> T:
    try:
        return decode(*args)
    finally:
        give_back_memory()  # a serving process returns near its idle size after a burst of large pictures


def _previews_flag(platform: str, chat_id: str) -> str:
    return f"previews:{platform}:{chat_id}"


def _enhance_flag(platform: str, chat_id: str) -> str:
    return f"enhance:{platform}:{chat_id}"
