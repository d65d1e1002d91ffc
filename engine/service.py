"""The engine as adapters and the CLI use it: one object holding the queue, storage, runner and worker, and the
submit path every request takes (validate images, resolve settings, store, enqueue)."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

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
class Engine:
    settings: Settings
    queue: JobQueue
    store: ImageStore
    runner: PipelineRunner
    worker: Worker
    prompt_lengths: PromptLengths
    # The process's long-lived tasks (worker, relays, clean-up, chat connections) run under it.
    supervisor: Supervisor = field(default_factory=Supervisor)

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

    def is_admin(self, platform: str, user_id: str) -> bool:
        return f"{platform}:{user_id}" in self.settings.access.admins

    def actor(self, platform: str, user_id: str) -> Actor:
        return Actor(platform=platform, user_id=user_id, is_admin=self.is_admin(platform, user_id))

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
        """Validate, resolve, store and enqueue; raise a UserError (nothing stored, nothing queued) if anything is
        wrong. `notes` (what the chat adapter noticed: unknown options, extra pictures) are stored with the job's
        warnings, so every later text about it repeats them."""
        model = model_for_mode(request.mode, self.settings, model_override)
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
            await asyncio.to_thread(self.store.restore, image)
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
        # Decoding a 40 MP image takes a while: keep the event loop free for other chats.
        return await asyncio.to_thread(validate_image_bytes, upload.data, self.settings.images, role, upload.filename)
