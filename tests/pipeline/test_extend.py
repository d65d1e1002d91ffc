"""Extend: a delivered video continued from its last frame (as decoded, kept with the job) by the i2v model, as one
joined video: the original's frames, then the new ones but the shared frame."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from engine.config import Settings
from engine.errors import UserError
from engine.jobs import Job, JobSource, JobStatus
from engine.pipeline.models import GenerationRequest
from engine.pipeline.video import probe, read_frames
from engine.service import Engine
from engine.storage.images import Mode
from tests.factories import ADMIN

SOURCE = JobSource(platform="cli", chat_id="c", user_id="u")


async def made(engine: Engine, job_id: int) -> Job:
    await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
    job = await engine._queue.get(job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    return job


async def original(engine: Engine) -> Job:
    request = GenerationRequest(mode=Mode.T2V, prompt="w1 a fox", resolution="64x64", frames=9, seed=3)
    return await made(engine, (await engine.submit(request, SOURCE)).result.job.id)


async def test_an_extend_joins_the_original_frames_and_the_new_ones_sharing_one(engine: Engine):
    first = await original(engine)
    queued = await engine.extend(first.id, ADMIN, prompt="w2 the fox jumps")
    again = await engine.extend(first.id, ADMIN)  # a second press while it waits: the same job
    second = await made(engine, queued.job.id)
    assert again.job.id == queued.job.id and not again.created
    assert second.mode is Mode.I2V and second.model == "tiny-i2v" and second.params.extends == first.id
    assert second.params.prompt == "w2 the fox jumps"
    assert second.images[0].sha256 == first.result.last_frame.sha256  # the decoded last frame, not the MP4's
    joined, before = read_frames(second.result.path), read_frames(first.result.path)
    assert joined.shape[0] == 9 + 9 - 1 == second.result.frames
    # The original's frames come back through one more encode: within a few levels of what was delivered.
    difference = np.abs(joined[:9].astype(int) - before.astype(int))
    assert difference.mean() < 4, difference.mean()
    assert '"extends": ' + str(first.id) in probe(second.result.path).comment
    chained = await made(engine, (await engine.extend(second.id, ADMIN)).job.id)  # an extended video extends too
    assert chained.result.frames == 17 + 9 - 1


async def test_an_extend_past_max_seconds_or_of_a_cleaned_up_video_is_refused_in_one_sentence(tiny_settings: Settings):
    generation = tiny_settings.generation.model_copy(update={"max_seconds": 1.5})  # 24 frames at 16 fps
    engine = await Engine.open(tiny_settings.model_copy(update={"generation": generation}))
    try:
        first = await original(engine)
        second = await made(engine, (await engine.extend(first.id, ADMIN)).job.id)  # 17 frames: 1.06 s, refused next
        with pytest.raises(UserError, match=r"would be 1\.6 s long; this bot makes at most 1\.5 s"):
            await engine.extend(second.id, ADMIN)
        await asyncio.to_thread(Path(first.result.path).unlink)
        with pytest.raises(UserError, match="video is no longer kept, so it cannot be extended"):
            await engine.extend(first.id, ADMIN)
    finally:
        await engine.close()


async def test_a_video_of_another_fps_than_the_extend_model_is_refused(tiny_settings: Settings):
    generation = tiny_settings.generation.model_copy(update={"extend_mode": "ti2v"})  # 24 fps, the video 16
    engine = await Engine.open(tiny_settings.model_copy(update={"generation": generation}))
    try:
        first = await original(engine)
        with pytest.raises(UserError, match="runs at 16 fps, and this bot extends videos at 24"):
            await engine.extend(first.id, ADMIN)
        assert await engine._queue.counts() == {"succeeded": 1}
    finally:
        await engine.close()


async def test_clean_up_keeps_a_delivered_video_while_an_extend_of_it_waits(tiny_settings: Settings):
    outputs = tiny_settings.outputs.model_copy(update={"retention_hours": 0})
    engine = await Engine.open(tiny_settings.model_copy(update={"outputs": outputs}))
    try:
        first = await original(engine)
        await engine._queue.mark_delivered(first.id)
        await engine._queue.set_paused(True)
        waiting = await engine.extend(first.id, ADMIN)
        await engine.clean_up()
        kept = await asyncio.to_thread(Path(first.result.path).exists)
        await engine.cancel(waiting.job.id, ADMIN)
        await engine.clean_up()
        gone = not await asyncio.to_thread(Path(first.result.path).exists)
    finally:
        await engine.close()
    assert kept and gone  # kept while the extend waited, removed once nothing needs it
