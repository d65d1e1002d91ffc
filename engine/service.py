"""The engine as adapters and the CLI use it: one object holding the queue, storage, runner and worker, and the
submit path every request takes (check the limits, validate images, resolve settings, store, enqueue)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from engine.config import Settings
from engine.downloads import Downloader
from engine.events import EventBus
from engine.generate import ModelLocator, PipelineRunner, default_locator, find_model_folder
from engine.images import ImageStore, ValidatedImage, check_mode, validate_image_bytes
from engine.jobs import Actor, EnqueueResult, JobSource
from engine.models import GenerationRequest, model_for_mode, resolve_request
from engine.prompts import PromptLengths
from engine.queue import JobQueue
from engine.supervisor import Supervisor
from engine.worker import Worker

T = TypeVar("T")


@dataclass
class Upload:
    """An attachment as downloaded by an adapter: raw bytes and the name the user gave it (if any)."""

    data: bytes
    filename: str | None = None


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
class Engine:
    settings: Settings
    queue: JobQueue
    store: ImageStore
    runner: PipelineRunner
    worker: Worker
    prompt_lengths: PromptLengths
    # The process's long-lived tasks (worker, relays, clean-up, chat connections) run under it.
    supervisor: Supervisor = field(default_factory=Supervisor)
    # Decoding is where a picture costs memory (up to images.max_decode_bytes): a few at a time, on threads of their
    # own, so a burst of large pictures neither fills memory nor takes the threads of asyncio's default pool.
    _decodes: asyncio.Semaphore = field(init=False, repr=False)
    _decode_pool: ThreadPoolExecutor = field(init=False, repr=False)
    _turns: dict[str, _Turn] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        slots = self.settings.images.max_concurrent_decodes
        self._decodes = asyncio.Semaphore(slots)
        self._decode_pool = ThreadPoolExecutor(slots, thread_name_prefix="wanbot-decode")

    @classmethod
    async def open(cls, settings: Settings, locator: ModelLocator | None = None) -> Engine:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        queue = await JobQueue.open(settings.db_path, EventBus())
        store = ImageStore(settings.images_dir, settings.images.background)
        downloader = Downloader(settings.models_dir, settings.downloads)
        runner = PipelineRunner(settings.generation, locator or default_locator(settings, downloader))
        worker = Worker(queue, runner, store, settings, downloader, write_retry_s=settings.queue.write_retry_s)
        prompt_lengths = PromptLengths(lambda model: find_model_folder(settings, downloader, model))
        return cls(
            settings=settings, queue=queue, store=store, runner=runner, worker=worker, prompt_lengths=prompt_lengths
        )

    async def close(self) -> None:
        await self.supervisor.stop()
        await self.worker.stop()
        await self.worker.close()
        await self.queue.close()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

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
        await self.queue.check_room(source, is_admin=is_admin, **self._limits())

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
        model = model_for_mode(request.mode, self.settings, model_override)
        async with self._turn(source.user_key):
            await self._check_room(source)
            start_image = await self._validate(start, "start")
            end_image = await self._validate(end, "end")
            checked = check_mode(request.mode, start_image, end_image, self.settings.images)
            infos = [image.info for image in checked.images]
            params = resolve_request(
                request,
                model,
                self.settings.generation,
                start=infos[0] if infos else None,
                end=infos[1] if len(infos) > 1 else None,
            )
            too_long = await self.prompt_lengths.warnings(model, params)
            warnings = [*(notes or []), *checked.warnings, *params.warnings, *too_long]
            params = params.model_copy(update={"warnings": warnings})
            stored = [await asyncio.to_thread(self.store.put, image) for image in checked.images]
            result = await self.queue.enqueue(
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

    async def reroll(self, job_id: int, actor: Actor, source: JobSource | None = None) -> EnqueueResult:
        """The same request again with a new seed, as a new job linked to the old one."""
        old = await self.queue.get(job_id)
        params = old.params.model_copy(update={"seed": random.SystemRandom().randrange(2**32), "adjustments": []})
        for image in old.images:
            # Fails with a clear message when the images were already cleaned up.
            await self._decode(self.store.restore, image)
        return await self.queue.retry(
            job_id,
            actor,
            params=params,
            source=source,
            **self._limits(),
        )

    def _limits(self) -> dict[str, int]:
        limits = self.settings.queue
        return {
            "per_user_limit": limits.per_user_limit,
            "global_limit": limits.global_limit,
            "daily_limit": limits.daily_limit,
        }

    async def _validate(self, upload: Upload | None, role: str) -> ValidatedImage | None:
        if upload is None:
            return None
        return await self._decode(validate_image_bytes, upload.data, self.settings.images, role, upload.filename)

    async def _decode(self, decode: Callable[..., T], *args: object) -> T:
        """Run a decode off the event loop (a 40 MP image takes a while), at most max_concurrent_decodes at once.
        The pool's size is the hard bound: a cancelled wait gives its slot back while its decode still runs."""
        async with self._decodes:
            return await asyncio.get_running_loop().run_in_executor(self._decode_pool, decode, *args)
