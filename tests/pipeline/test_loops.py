"""loop=yes: a video that returns to its first frame. i2v ends on its own start picture; t2v is made in two passes,
a short t2v video for its first frame, then the i2v model from that frame back to it."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from diffusers import WanImageToVideoPipeline, WanPipeline

from engine.errors import UserError
from engine.jobs import JobSource, JobStatus, Progress, Stage
from engine.pipeline.generate import LOOP_FIRST_FRAMES, LOOP_FIRST_PASS, LOOP_SECOND_PASS
from engine.pipeline.hooks import RunHooks
from engine.pipeline.models import GenerationRequest
from engine.service import Engine, Upload
from tests import imagefactory

SOURCE = JobSource(platform="cli", chat_id="c", user_id="u")


async def submit(engine: Engine, start: bytes | None = None, end: bytes | None = None, **options: Any):
    request = GenerationRequest(prompt="w1 a fox", resolution="64x64", frames=9, loop=True, seed=5, **options)
    pictures = [Upload(picture, "p.png") if picture else None for picture in (start, end)]
    return (await engine.submit(request, SOURCE, *pictures)).result.job


def recorded(monkeypatch: pytest.MonkeyPatch, pipeline_class: type) -> list[dict[str, Any]]:
    """The arguments (and, as "frames", the output) of every call of a pipeline class."""
    calls: list[dict[str, Any]] = []
    original = pipeline_class.__call__

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        calls.append({**kwargs, "frames": output.frames[0]})
        return output

    monkeypatch.setattr(pipeline_class, "__call__", recording)
    return calls


@pytest.fixture
def i2v_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    return recorded(monkeypatch, WanImageToVideoPipeline)


@pytest.fixture
def t2v_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    return recorded(monkeypatch, WanPipeline)


async def test_a_t2v_loop_is_a_short_t2v_pass_then_i2v_from_its_first_frame_back_to_it(
    engine: Engine, i2v_calls, t2v_calls
):
    job = await submit(engine, mode="t2v")
    said: list[Progress] = []
    output = await asyncio.to_thread(engine._runner.run, job, [], RunHooks(on_progress=said.append))
    assert job.params.loop and job.params.loop_model == "tiny-i2v"
    assert any(note.startswith("Loop: made in two passes") for note in job.params.adjustments)
    [call] = i2v_calls
    assert np.array_equal(np.asarray(call["image"]), np.asarray(call["last_image"]))  # back to where it began
    assert call["num_frames"] == 9 and output.frames.shape[0] == 9
    steps = [progress.detail for progress in said if progress.stage is Stage.DENOISING]
    assert steps[0].startswith(LOOP_FIRST_PASS) and steps[-1].startswith(LOOP_SECOND_PASS)
    assert engine._runner.loaded_model == "tiny-i2v"
    assert set(output.timings) >= {"first_pass_s", "load_s", "generate_s"}
    [first_pass] = t2v_calls
    assert first_pass["num_frames"] == LOOP_FIRST_FRAMES == 5  # the fewest frames Wan makes: only the first is used
    first_frame = np.round(first_pass["frames"][0] * 255)
    assert np.abs(np.asarray(call["image"], dtype=float) - first_frame).mean() < 2  # the loop starts there


async def test_an_i2v_loop_ends_on_its_start_picture(engine: Engine, i2v_calls):
    job = await submit(engine, imagefactory.png(96, 64), mode="i2v")
    await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
    done = await engine._queue.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error_detail
    assert [image.role for image in done.images] == ["start", "end"]
    assert done.images[0].sha256 == done.images[1].sha256
    assert done.result.last_frame is not None  # kept for an Extend, though its sides are under images.min_side
    assert np.array_equal(np.asarray(i2v_calls[0]["image"]), np.asarray(i2v_calls[0]["last_image"]))
    assert (
        done.params.warnings.count("i2v was not trained with end images: the end frame is a best effort and may drift.")
        == 1
    )


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"mode": "ti2v"}, "TI2V-5B cannot aim at an end frame, so it makes no loops."),
        ({"mode": "i2v", "end": True}, "A loop ends on its start picture, so it takes no end picture."),
    ],
)
async def test_a_loop_that_cannot_be_made_is_refused_before_anything_is_queued(engine: Engine, options, said):
    end = imagefactory.png(96, 64) if options.pop("end", False) else None
    with pytest.raises(UserError, match=said):
        await submit(engine, imagefactory.png(96, 64), end, **options)
    assert await engine._queue.counts() == {}


def test_loop_is_yes_or_no():
    assert GenerationRequest(mode="t2v", loop="yes").loop is True
    with pytest.raises(UserError, match="loop must be yes or no, not 'maybe'"):
        GenerationRequest(mode="t2v", loop="maybe")


async def test_a_t2v_loop_whose_i2v_model_is_not_here_fails_before_its_first_pass_saying_which(
    tiny_settings, monkeypatch: pytest.MonkeyPatch, t2v_calls
):
    monkeypatch.setenv("HF_HUB_CACHE", str(tiny_settings.data_dir / "empty-hf-cache"))
    models = tiny_settings.models.model_copy(update={"i2v": "Wan-AI/Wan2.2-I2V-A14B-Diffusers"})
    engine = await Engine.open(tiny_settings.model_copy(update={"models": models}))
    try:
        job = await submit(engine, mode="t2v")
        await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
        failed = await engine._queue.get(job.id)
    finally:
        await engine.close()
    assert failed.status is JobStatus.FAILED and t2v_calls == []
    assert (
        failed.error_user
        == f"Sorry, video #{job.id} could not be made: this bot's i2v model is not ready. The admin has been told."
    )
    assert "wanbot models download i2v" in failed.error_detail
