"""Making a finished job's video again: a Reroll (the same request, a new seed) and an Extend (the video continued
from its last frame), each a new job of the video's owner, refused with one sentence where it cannot be made.

A part of the facade: engine/service.py's Engine inherits it, and these methods use its queue, files, limits and
content rules (as JobQueue's parts share its connection)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from engine.config import StyleLoraConfig
from engine.errors import UserError
from engine.jobs import Actor, EnqueueResult, Job, JobSource, JobStatus
from engine.pipeline.models import ModelRef, model_for_mode, with_triggers
from engine.storage.images import ImageInfo, Mode

_NO_LORA = StyleLoraConfig(repo="", file="none.safetensors", modes=[])  # a LoRA no longer offered: used in no mode


class Again:
    async def reroll(self, job_id: int, actor: Actor, source: JobSource | None = None) -> EnqueueResult:
        """The same request again with a new seed, as a new job linked to the old one; while one such job waits or
        runs, that one (a double tap makes one job, not two)."""
        old = await self._queue.get(job_id)
        async with self._turn(old.source.user_key):
            waiting = await self.active_reroll(old)
            if waiting is not None:
                return EnqueueResult(job=waiting, created=False, position=await self._queue.position(waiting.id))
            params = old.params.model_copy(update={"seed": random.SystemRandom().randrange(2**32), "adjustments": []})
            for image in old.images:
                # Fails with a clear message when the images were already cleaned up.
                await self._decode(self._store.restore, image)
            with self._quota_counted():
                return await self._queue.retry(job_id, actor, params=params, source=source, **self._limits())

    async def extend(
        self, job_id: int, actor: Actor, source: JobSource | None = None, prompt: str | None = None
    ) -> EnqueueResult:
        """The job's video continued from its last frame (generation.extend_mode's model, the same size, fps and
        preset; `prompt` or the job's own), as a new job of its owner whose video is the two joined; while one such
        job waits or runs, that one."""
        old = await self._queue.get(job_id)
        self._rules.check_prompt(prompt)
        async with self._turn(old.source.user_key):
            waiting = await self.active_extend(old)
            if waiting is not None:
                return EnqueueResult(job=waiting, created=False, position=await self._queue.position(waiting.id))
            model, last_frame = await self._extend_start(old)
            mode = Mode(self.settings.generation.extend_mode)
            kept = [use for use in old.params.loras if mode.value in self.settings.loras.get(use.name, _NO_LORA).modes]
            params = old.params.model_copy(
                update={
                    "prompt": with_triggers(prompt, kept, self.settings.loras, []) if prompt else old.params.prompt,
                    "original_prompt": None if prompt else old.params.original_prompt,
                    "seed": random.SystemRandom().randrange(2**32),
                    "extends": old.id,
                    "loop": False,
                    "loop_model": None,
                    "loras": kept,
                    "adjustments": [f"Continues job #{old.id}'s video from its last frame."],
                    "warnings": [],
                }
            )
            with self._quota_counted():
                return await self._queue.enqueue(
                    source or old.source.model_copy(update={"message_id": None}),
                    mode,
                    model.name,
                    params,
                    [last_frame],
                    priority=old.priority,
                    is_admin=actor.is_admin,
                    **self._limits(),
                )

    async def check_extend(self, old: Job) -> None:
        """Raise the UserError an Extend of `old` would meet (no video, cleaned up, too long, another fps, the
        owner's limits), before anything is posted about it."""
        async with self._turn(old.source.user_key):
            await self._extend_start(old)

    async def _extend_start(self, old: Job) -> tuple[ModelRef, ImageInfo]:
        """The model an Extend of `old` runs and the frame it starts from, or the UserError it meets."""
        await self._check_room(old.source.model_copy(update={"message_id": None}))
        result = old.result
        if old.status is not JobStatus.SUCCEEDED or result is None:
            raise UserError(f"Job #{old.id} has no video that can be extended.", "Extend one of the bot's videos.")
        if result.last_frame is None:
            raise UserError(
                f"Job #{old.id}'s video was made before videos kept their last frame, so it cannot be extended.",
                "Ask for a new video; every video made since can be extended.",
            )
        gone = UserError(
            f"Job #{old.id}'s video is no longer kept, so it cannot be extended.",
            "Ask for a new video; videos are kept for a while after they are sent, then cleaned up.",
        )
        # Whether both are kept, not fetched: a chat answers within seconds, and the worker that runs it fetches them.
        made = Path(result.path)
        has_video = await self._files.has("video", made) or await self._files.has(
            "video", self.settings.outputs_dir / made.name
        )
        if not (has_video and await self._files.has("image", self._store.path_for(result.last_frame.sha256))):
            raise gone
        model = model_for_mode(Mode(self.settings.generation.extend_mode), self.settings)
        if model.spec.fps != result.fps:
            raise UserError(
                f"Job #{old.id}'s video runs at {result.fps} fps, and this bot extends videos at {model.spec.fps}.",
                "Ask for a new video instead.",
            )
        seconds = (result.frames + old.params.frames - 1) / result.fps
        most = self.settings.generation.max_seconds
        if seconds > most:
            raise UserError(
                f"Extended, job #{old.id}'s video would be {seconds:.1f} s long; this bot makes at most {most:g} s.",
                "Ask for a new video instead.",
            )
        return model, result.last_frame

    async def active_extend(self, old: Job) -> Job | None:
        """The waiting or running job that continues `old`'s video, if any."""
        active = await self._queue.list_jobs((JobStatus.QUEUED, JobStatus.RUNNING), user_key=old.source.user_key)
        return next((job for job in active if job.params.extends == old.id), None)

    async def check_reroll(self, old: Job) -> None:
        """Raise the UserError a reroll of the job would meet (the owner's limits, its pictures cleaned up), before
        anything is posted about it."""
        await self.check_room(old.source.model_copy(update={"message_id": None}))  # a new job, not the old one again
        for image in old.images:
            if not await asyncio.to_thread(self._store.path_for(image.sha256).is_file):
                raise UserError(
                    f"The {image.role} image of job #{old.id} is no longer stored, so it cannot be made again.",
                    "Send the picture again with a new request.",
                )

    async def active_reroll(self, old: Job) -> Job | None:
        """The waiting or running job made again from `old`, if any."""
        active = await self._queue.list_jobs((JobStatus.QUEUED, JobStatus.RUNNING), user_key=old.source.user_key)
        return next((job for job in active if job.retry_of == old.id), None)
