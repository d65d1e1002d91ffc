from __future__ import annotations

import asyncio
import json
import logging
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import WAN_NEGATIVE_PROMPT, OutputsConfig
from engine.errors import UserError
from engine.jobs import EventKind, Job, JobSource, JobStatus, Progress, Stage
from engine.pipeline.generate import cover
from engine.pipeline.hooks import RunHooks
from engine.pipeline.models import GenerationRequest
from engine.pipeline.placement import Placement
from engine.pipeline.planner import Plan, Where
from engine.pipeline.tiny import build_tiny_pipeline
from engine.pipeline.video import probe
from engine.queue.reading import RUN_STAGES
from engine.service import Engine, Upload
from engine.storage.images import Mode
from tests import imagefactory

pytestmark = pytest.mark.timeout(120)


def chat(user: str = "u1", message: str | None = None) -> JobSource:
    return JobSource(platform="cli", chat_id="local", user_id=user, message_id=message)


async def submit(engine: Engine, mode: Mode, *, start: bytes | None = None, end: bytes | None = None, **options):
    request = GenerationRequest(mode=mode, prompt=options.pop("prompt", "w1 w2 a fox"), **options)
    return await engine.submit(request, chat(options.get("user", "u1")), as_upload(start), as_upload(end))


def as_upload(data: bytes | None) -> Upload | None:
    return Upload(data) if data is not None else None


async def run_all(engine: Engine) -> None:
    await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)


async def test_t2v_makes_a_decodable_mp4_with_the_model_defaults(engine: Engine):
    submission = await submit(engine, Mode.T2V, seed=7)
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    video = probe(job.result.path)
    assert (video.width, video.height, video.frames, video.fps) == (64, 64, 9, 16)
    metadata = json.loads(video.comment)
    assert metadata["seed"] == 7 and metadata["prompt"] == "w1 w2 a fox" and metadata["model"] == "tiny-t2v"
    # Wan's default negative prompt is Chinese: written as UTF-8 in the comment, not as \uXXXX escapes.
    assert not metadata["negative_prompt"].isascii() and metadata["negative_prompt"] in video.comment
    assert set(job.result.timings) >= {"load_s", "denoise_s", "decode_s", "generate_s", "encode_s"}
    assert engine._runner.loaded.pipeline.scheduler.config.flow_shift == 12.0  # corrected from the saved 3.0


async def test_i2v_with_start_and_end_follows_the_image_shape(engine: Engine):
    submission = await submit(
        engine, Mode.I2V, start=imagefactory.png(160, 120), end=imagefactory.png(320, 240), frames=12
    )
    # No size was asked for: the note says the shape followed the picture, not that a size "became" another.
    assert any(note.startswith("The video is 80x48 to follow the start image's shape") for note in submission.notes)
    assert not any("became" in note for note in submission.notes)
    assert any("Frames must be 4k+1" in note for note in submission.notes)
    assert any("not trained with end images" in note for note in submission.notes)
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    video = probe(job.result.path)
    assert (video.frames, video.fps) == (9, 16)
    assert video.width > video.height  # 4:3 image, landscape video
    assert [image.role for image in job.images] == ["start", "end"]


async def test_ti2v_runs_at_24_fps_on_multiples_of_32(engine: Engine):
    submission = await submit(engine, Mode.TI2V, start=imagefactory.png(128, 128), end=imagefactory.png(128, 128))
    assert any("does not use an end image" in note for note in submission.notes)
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    video = probe(job.result.path)
    assert (video.width % 32, video.height % 32, video.frames, video.fps) == (0, 0, 9, 24)


async def test_a_prompt_longer_than_the_text_encoder_reads_is_run_with_a_note_naming_the_unread_words(
    engine: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # its own handler otherwise
    words = [f"w{index % 30}" for index in range(520)]
    submission = await submit(engine, Mode.T2V, prompt=" ".join([*words, "w7 the very end of a long prompt"]))
    [note] = [note for note in submission.notes if "tokens long" in note]
    # The note says it; the tokenizer's own "(528 > 512)" warning would say it again in the operator's log.
    assert "Token indices sequence length" not in caplog.text
    # The tiny tokenizer has one token per word and no end-of-text token: 528 words, the last 16 unread.
    assert note == (
        "The prompt is 528 tokens long and the model reads 512: it will not see the last 16, "
        "from “w2 w3 w4 w5 w6 w7 w8 w9 w7 the very end…” on. Shorten it to keep them."
    )
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    assert note in job.params.warnings
    metadata = json.loads(probe(job.result.path).comment)
    assert metadata["negative_prompt"] == WAN_NEGATIVE_PROMPT  # the request named none

    short = await submit(engine, Mode.T2V, prompt=" ".join(words[:500]), negative_prompt=" ".join(words))
    assert [note for note in short.notes if "tokens long" in note] == [
        "The negative prompt is 520 tokens long and the model reads 512: it will not see the last 8, "
        "from “w2 w3 w4 w5 w6 w7 w8 w9” on. Shorten it to keep them."
    ]
    not_downloaded = await engine.submit(
        GenerationRequest(mode=Mode.T2V, prompt=" ".join(words)), chat("u2"), model_override="Wan-AI/not-here"
    )
    assert not [note for note in not_downloaded.notes if "tokens long" in note]  # no tokenizer yet: not counted


async def test_bad_requests_are_refused_before_anything_is_stored(engine: Engine):
    with pytest.raises(UserError, match="ti2v needs a start image"):
        await submit(engine, Mode.TI2V)
    with pytest.raises(UserError, match="t2v needs a prompt"):
        await submit(engine, Mode.T2V, prompt="  ")
    with pytest.raises(UserError, match="not a resolution this model knows"):
        await submit(engine, Mode.T2V, resolution="huge")
    with pytest.raises(UserError, match=r"damaged or incomplete|not an image"):
        await submit(engine, Mode.I2V, start=imagefactory.png()[:300])
    assert await engine._queue.counts() == {}
    assert engine._store.stored_hashes() == set()


async def test_progress_events_arrive_in_order(engine: Engine):
    inbox = engine._queue.events.subscribe()
    # Flow shift 12 spends most steps in the high-noise range; 12 steps reach the low-noise expert too.
    await submit(engine, Mode.T2V, steps=12)
    await run_all(engine)
    events = []
    while not inbox._inbox.empty():
        events.append(inbox._inbox.get_nowait())
    kinds = [event.kind for event in events]
    assert kinds[0] is EventKind.ENQUEUED and kinds[1] is EventKind.STARTED and kinds[-1] is EventKind.SUCCEEDED
    stages = [event.progress.stage for event in events if event.kind is EventKind.PROGRESS]
    assert stages[0] is Stage.LOADING
    assert stages[-2:] == [Stage.DECODING, Stage.ENCODING]
    steps = [event.progress.step for event in events if event.progress and event.progress.stage is Stage.DENOISING]
    assert steps == list(range(12))
    experts = {event.progress.detail for event in events if event.progress and event.progress.stage is Stage.DENOISING}
    assert experts == {"part 1 of 2", "part 2 of 2"}  # the high- and low-noise experts, in words users know
    assert all(
        event.progress.eta_s is not None
        for event in events
        if event.progress and event.progress.stage is Stage.DENOISING and event.progress.step > 0
    )


async def test_the_time_left_includes_decode_and_encode_once_a_video_of_the_model_has_timed_them(engine: Engine):
    inbox = engine._queue.events.subscribe()
    for seed in (1, 2):
        await submit(engine, Mode.T2V, steps=3, seed=seed)
        await run_all(engine)
    progress: dict[int, list[Progress]] = {}
    while not inbox._inbox.empty():
        event = inbox._inbox.get_nowait()
        if event.kind is EventKind.PROGRESS and event.progress.stage in RUN_STAGES:
            progress.setdefault(event.job.id, []).append(event.progress)
    first, second = progress.values()
    # The model's first video: the steps' time is known, the decode and encode after them are not (and say so).
    denoising = [shown for shown in first if shown.stage is Stage.DENOISING and shown.step > 0]
    assert denoising and all(shown.eta_steps_only for shown in denoising)
    assert [shown.eta_s for shown in first if shown.stage is not Stage.DENOISING] == [None, None]
    # The next one expects the decode and encode the first one took: never a time left of 0 before they are done.
    timed = (await engine._queue.get(1)).result.timings  # the same size: no scaling
    finish_s = timed["decode_s"] + timed["encode_s"]
    after_first_step = [shown for shown in second if shown.stage is Stage.DENOISING and shown.step > 0]
    assert after_first_step and all(not shown.eta_steps_only and shown.eta_s >= finish_s for shown in after_first_step)
    decoding, encoding = (shown for shown in second if shown.stage is not Stage.DENOISING)
    assert (decoding.eta_s, encoding.eta_s) == (pytest.approx(finish_s), pytest.approx(timed["encode_s"]))


async def wait_for_step(inbox, job_id: int, step: int) -> None:
    async for event in inbox:
        progress = event.progress
        if event.job.id == job_id and progress and progress.stage is Stage.DENOISING and progress.step >= step:
            return


async def test_cancel_during_generation_stops_within_a_step(engine: Engine):
    inbox = engine._queue.events.subscribe()
    submission = await submit(engine, Mode.T2V, steps=60)
    job_id = submission.result.job.id
    worker = asyncio.create_task(engine._worker.run(stop_after=1))
    await asyncio.wait_for(wait_for_step(inbox, job_id, 2), timeout=60)
    await engine._queue.cancel(job_id, engine.actor("cli", "u1"))
    await asyncio.wait_for(worker, timeout=60)
    job = await engine._queue.get(job_id)
    assert job.status is JobStatus.CANCELLED
    assert job.progress.step < 60
    assert not (engine.settings.outputs_dir / f"job-{job_id}.mp4").exists()


async def test_generation_timeout_fails_the_job_with_a_clear_message(engine: Engine):
    engine.settings.generation.timeout_s = 1e-6
    submission = await submit(engine, Mode.T2V)
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.FAILED
    assert "took longer than the limit" in job.error_user
    assert "fewer steps" in job.error_user


async def test_out_of_memory_fails_the_job_and_the_worker_lives_on(engine: Engine):
    first = await submit(engine, Mode.T2V)
    await run_all(engine)
    assert (await engine._queue.get(first.result.job.id)).status is JobStatus.SUCCEEDED

    def exhaust_memory(module, inputs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    engine._runner.loaded.pipeline.transformer.register_forward_pre_hook(exhaust_memory)
    failing = await submit(engine, Mode.T2V, user="u2")
    await run_all(engine)
    failed = await engine._queue.get(failing.result.job.id)
    assert failed.status is JobStatus.FAILED
    assert "ran out of memory" in failed.error_user and "lower resolution" in failed.error_user
    assert engine._runner.loaded is None  # the broken pipeline was dropped
    after = await submit(engine, Mode.T2V, user="u3")
    await run_all(engine)
    assert (await engine._queue.get(after.result.job.id)).status is JobStatus.SUCCEEDED


async def test_a_job_left_running_by_a_crash_runs_again_after_restart(tiny_settings):
    crashed = await Engine.open(tiny_settings)
    submission = await submit(crashed, Mode.T2V)
    claimed = await crashed._queue.claim_next()
    assert claimed.id == submission.result.job.id
    await crashed._queue.close()  # the process died here: the job stays 'running'

    restarted = await Engine.open(tiny_settings)
    await restarted._worker.start_up()
    await run_all(restarted)
    job = await restarted._queue.get(claimed.id)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
    assert [kind for kind, _ in await restarted._queue.events_of(job.id)].count("requeued") == 1
    await restarted.close()


@pytest.mark.parametrize(("requeue", "status"), [(True, JobStatus.QUEUED), (False, JobStatus.SUCCEEDED)])
async def test_shutdown_requeues_or_waits_for_the_running_job(engine: Engine, requeue: bool, status: JobStatus):
    inbox = engine._queue.events.subscribe()
    submission = await submit(engine, Mode.T2V, steps=30)
    worker = asyncio.create_task(engine._worker.run())
    await asyncio.wait_for(wait_for_step(inbox, submission.result.job.id, 1), timeout=60)
    await engine._worker.stop(requeue_running=requeue)
    await asyncio.wait_for(worker, timeout=60)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is status
    assert job.attempts == (0 if requeue else 1)


async def pipeline_frames(engine: Engine, job: Job) -> np.ndarray:
    """The frames the worker's runner makes for `job`, before the MP4 encode: x264 does not give the same bytes for
    the same frames every time (about one encode in eight differs in half its pixels, by up to 16 levels)."""
    images = [engine._store.restore(info).pixels for info in job.images]
    return (await asyncio.to_thread(engine._runner.run, job, images, RunHooks())).frames


async def test_same_seed_gives_the_same_frames(engine: Engine):
    first = (await submit(engine, Mode.T2V, seed=42, user="a")).result.job
    second = (await submit(engine, Mode.T2V, seed=42, user="b")).result.job
    other = (await submit(engine, Mode.T2V, seed=43, user="c")).result.job
    frames = [await pipeline_frames(engine, job) for job in (first, second, other)]
    assert np.array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])


async def test_switching_models_keeps_one_pipeline_in_memory(engine: Engine):
    await submit(engine, Mode.T2V)
    await run_all(engine)
    first_pipeline = weakref.ref(engine._runner.loaded.pipeline)
    assert engine._runner.loaded_model == "tiny-t2v"
    await submit(engine, Mode.I2V, start=imagefactory.png())
    await run_all(engine)
    assert engine._runner.loaded_model == "tiny-i2v"
    assert first_pipeline() is None


async def test_a_warm_model_is_not_reloaded(engine: Engine):
    await submit(engine, Mode.T2V, user="a")
    await run_all(engine)
    pipeline = engine._runner.loaded.pipeline
    again = await submit(engine, Mode.T2V, user="b")
    await run_all(engine)
    assert engine._runner.loaded.pipeline is pipeline
    assert (await engine._queue.get(again.result.job.id)).result.timings["load_s"] < 0.5


@pytest.mark.parametrize("mode", [Mode.T2V, Mode.I2V])
def test_group_offload_hooks_run_the_pipelines_and_change_no_pixel(mode: Mode):
    # CPU stands in for both devices: this checks the hook wiring on Wan's components (two experts, the image path),
    # which a GPU machine would otherwise be the first to try.
    def frames(strategy: str | None) -> np.ndarray:
        pipeline = build_tiny_pipeline(mode)
        pipeline.set_progress_bar_config(disable=True)
        if strategy:
            plan = Plan(strategy, Where.STREAMED, Where.STREAMED, False, 0, 0, None)
            Placement(pipeline, plan, torch.device("cpu"))
        image = {"image": imagefactory.gradient(64, 64)} if mode is Mode.I2V else {}
        generator = torch.Generator().manual_seed(3)
        arguments = {"num_frames": 5, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np"}
        return pipeline(prompt="w1 w2", generator=generator, **arguments, **image).frames[0]

    np.testing.assert_allclose(frames("group_offload"), frames(None), atol=1e-6)


def test_cover_crops_the_middle_to_the_video_shape_instead_of_stretching():
    red, green, blue = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    picture = Image.new("RGB", (300, 100), green)
    picture.paste(red, (0, 0, 100, 100))
    picture.paste(blue, (200, 0, 300, 100))
    covered = cover(picture, 48, 48)
    pixels = np.asarray(covered)
    assert covered.size == (48, 48)
    # All green but for a little filter ringing at the edges; stretched, a third would be red and a third blue.
    assert pixels[..., 1].min() > 200 and pixels[..., 0].max() < 40 and pixels[..., 2].max() < 40


async def test_the_bot_clean_up_round_removes_delivered_videos_and_keeps_waiting_ones(engine: Engine):
    from bot.roles.runtime import _clean_up_periodically

    delivered, waiting = [await submit(engine, Mode.T2V, user=user) for user in ("u1", "u2")]
    await run_all(engine)
    await engine._queue.mark_delivered(delivered.result.job.id)
    paths = [Path((await engine._queue.get(s.result.job.id)).result.path) for s in (delivered, waiting)]
    settings = engine.settings.model_copy(update={"outputs": OutputsConfig(retention_hours=0)})
    cleaner = asyncio.create_task(_clean_up_periodically(replace(engine, settings=settings), every_s=3600))
    for _ in range(100):
        if not paths[0].exists():
            break
        await asyncio.sleep(0.05)
    cleaner.cancel()
    assert [path.exists() for path in paths] == [False, True]


async def test_the_daily_limit_from_the_configuration_refuses_a_second_video(tiny_settings):
    limited = tiny_settings.model_copy(update={"queue": tiny_settings.queue.model_copy(update={"daily_limit": 1})})
    engine = await Engine.open(limited)
    try:
        await submit(engine, Mode.T2V)
        with pytest.raises(UserError, match="the limit is 1 a day"):
            await submit(engine, Mode.T2V)
    finally:
        await engine.close()


async def test_the_tiny_model_makes_any_size_a_request_may_ask_for(engine: Engine):
    # Its positional table used to stop at 512 px a side: a larger size crashed the job instead of running.
    submission = await submit(engine, Mode.T2V, resolution="544x544", steps=1, frames=5)
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    assert (probe(job.result.path).width, probe(job.result.path).height) == (544, 544)
