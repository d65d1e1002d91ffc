"""Live previews: the latent-to-RGB projection, the clean-latent estimate, and previews of running jobs.

The tiny models' latents mean nothing, so the runs check the mechanics (a preview exists, has the right size, is
replaced, keeps its interval, is removed at the end, cannot hurt the job); the projection itself is checked on
synthetic latents whose colours follow from the factors."""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import PreviewsConfig, Settings
from engine.jobs import EventKind, JobStatus, PreviewInfo
from engine.pipeline.models import GenerationRequest
from engine.pipeline.previews import FRAME_GAP, FRAME_SIDE, WAN21, WAN22, clean_estimate, project, render
from engine.queue.jobqueue import JobQueue
from engine.service import Engine, Upload
from engine.storage.cleanup import remove_stale_previews
from engine.storage.images import Mode
from tests import imagefactory
from tests.factories import params, source

pytestmark = pytest.mark.timeout(120)


# -- the projection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("table", [WAN21, WAN22], ids=["wan2.1-16ch", "wan2.2-48ch"])
def test_each_latent_channel_shows_its_factor_row_plus_the_bias(table):
    channels = len(table.factors)
    # Frame c holds 0.5 in channel c alone; a last frame holds zeros: the bias alone.
    latents = torch.zeros(channels, channels + 1, 2, 3)
    for channel in range(channels):
        latents[channel, channel] = 0.5
    frames = project(latents)
    assert frames.shape == (channels + 1, 2, 3, 3) and frames.dtype == np.uint8
    bias = np.array(table.bias)
    for channel, row in enumerate(table.factors):
        expected = np.clip(np.round((0.5 * np.array(row) + bias + 1) * 127.5), 0, 255)
        assert (frames[channel] == expected).all(), channel
    assert (frames[-1] == np.round((bias + 1) * 127.5)).all()


def test_the_tables_are_comfyuis_numbers():
    assert (len(WAN21.factors), len(WAN22.factors)) == (16, 48)
    assert WAN21.factors[0] == (-0.1299, -0.1692, 0.2932) and WAN21.factors[15] == (0.1984, 0.0913, 0.1861)
    assert WAN21.bias == (-0.1835, -0.0868, -0.3360)
    assert WAN22.factors[39] == (-0.3441, -0.3543, -0.2008) and WAN22.factors[47] == (-0.0837, 0.0168, 0.0055)
    assert WAN22.bias == (0.0317, -0.0878, -0.1388)


def test_latents_of_another_vae_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="no latent-to-RGB factors for 4-channel latents"):
        project(torch.zeros(4, 1, 2, 2))


def test_the_clean_estimate_is_x_minus_sigma_v_per_patch_and_of_the_key_frames():
    noisy = torch.randn(1, 16, 5, 4, 4)
    velocity = torch.randn(1, 16, 5, 4, 4)
    x0 = clean_estimate(noisy, velocity, torch.tensor([750.0]), (1, 2, 2), 1000)
    frames = [0, 2, 4]  # first, middle, last
    assert torch.allclose(x0, noisy[0, :, frames] - 0.75 * velocity[0, :, frames])
    # Expanded timesteps (TI2V-5B with a start image): one t per 1x2x2 patch, 0 on the clean first frame.
    per_patch = torch.full((1, 5, 2, 2), 500.0)
    per_patch[:, 0] = 0
    x0 = clean_estimate(noisy, velocity, per_patch.flatten(1), (1, 2, 2), 1000)
    assert torch.equal(x0[:, 0], noisy[0, :, 0])
    assert torch.allclose(x0[:, 1:], noisy[0, :, [2, 4]] - 0.5 * velocity[0, :, [2, 4]])


def test_a_preview_is_the_key_frames_side_by_side_and_fits_the_byte_cap():
    # 720p A14B latents (90x160), three key frames of noise: the hardest case for JPEG.
    jpeg, image = render(torch.randn(16, 3, 90, 160), 100_000)
    scaled = round(90 * FRAME_SIDE / 160)
    assert image.size == (3 * FRAME_SIDE + 2 * FRAME_GAP, scaled)
    assert len(jpeg) <= 100_000 and Image.open(io.BytesIO(jpeg)).size == image.size
    # Louder noise under a tenth of the cap: no quality is low enough, so it is made smaller.
    small, shrunk = render(torch.randn(48, 3, 44, 80) * 4, 10_000)
    assert len(small) <= 10_000 and Image.open(io.BytesIO(small)).size == shrunk.size
    assert shrunk.width < 3 * FRAME_SIDE


# -- previews of running jobs -----------------------------------------------------------------------------------


@pytest.fixture
async def engine(tiny_settings: Settings) -> AsyncIterator[Engine]:
    """The engine with previews on, as they are by default (tiny_settings turns them off for the chat tests)."""
    opened = await Engine.open(tiny_settings.model_copy(update={"previews": PreviewsConfig()}))
    yield opened
    await opened.close()


@pytest.fixture
async def slow_engine(tiny_settings: Settings) -> AsyncIterator[Engine]:
    """An engine whose tiny model is warm and takes 0.1 s per transformer call, as a real step would take longer."""
    settings = tiny_settings.model_copy(update={"previews": PreviewsConfig(interval_s=1.0)})
    engine = await Engine.open(settings)
    await _run(engine, Mode.T2V, steps=2)  # loads the model
    for expert in (engine._runner.loaded.pipeline.transformer, engine._runner.loaded.pipeline.transformer_2):
        expert.register_forward_pre_hook(lambda module, inputs: time.sleep(0.1))
    yield engine
    await engine.close()


@dataclass
class Watched:
    """One job as its events showed it: each new preview, with when its file was written and its bytes, and the
    previews stored with the job."""

    job_id: int
    previews: list[tuple[PreviewInfo, float, bytes]]
    stored: set[int]  # seqs


async def _run(engine: Engine, mode: Mode, **options: object) -> Watched:
    inbox = engine._queue.events.subscribe()
    start = Upload(imagefactory.png(64, 64)) if mode is not Mode.T2V else None
    request = GenerationRequest(mode=mode, prompt="w1 w2 a fox", **options)
    submission = await engine.submit(request, source(user=f"u-{time.monotonic_ns()}"), start)
    watched = Watched(submission.result.job.id, [], set())
    worker = asyncio.create_task(engine._worker.run(stop_after=1))
    try:
        async for event in inbox:
            if event.kind is EventKind.PREVIEW:
                watched.previews.append((event.preview, *await asyncio.to_thread(_written, Path(event.preview.path))))
            elif event.job.progress is not None and event.job.progress.preview is not None:
                watched.stored.add(event.job.progress.preview.seq)
            if event.kind in (EventKind.SUCCEEDED, EventKind.FAILED) and event.job.id == watched.job_id:
                break
    finally:
        inbox.close()
        await asyncio.wait_for(worker, 60)
    return watched


def _written(path: Path) -> tuple[float, bytes]:
    return path.stat().st_mtime, path.read_bytes()


async def test_a_running_job_shows_previews_at_the_interval_and_they_go_when_it_ends(slow_engine: Engine):
    watched = await _run(slow_engine, Mode.T2V, steps=12)  # 24 transformer calls: about 2.5 s
    job = await slow_engine._queue.get(watched.job_id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    previews = watched.previews
    assert len(previews) >= 2
    assert [info.seq for info, _, _ in previews] == list(range(1, len(previews) + 1))
    assert previews[0][0].step == 1  # the first step is shown at once
    for info, _, jpeg in previews:
        assert info.path == str(slow_engine.settings.previews_dir / f"job-{job.id}.jpg")
        # 64x64 video: 8x8 latent frames, 9 frames: 3 latent frames, each scaled to FRAME_SIDE.
        assert (info.width, info.height) == (3 * FRAME_SIDE + 2 * FRAME_GAP, FRAME_SIDE)
        assert Image.open(io.BytesIO(jpeg)).size == (info.width, info.height)
        assert len(jpeg) <= slow_engine.settings.previews.max_bytes
    written = [at for _, at, _ in previews]
    assert min(later - earlier for earlier, later in itertools.pairwise(written)) >= 1.0
    assert watched.stored == {info.seq for info, _, _ in previews}  # with the job, for other processes
    assert not (slow_engine.settings.previews_dir / f"job-{job.id}.jpg").exists()


async def test_a_preview_that_fails_is_logged_once_and_the_job_succeeds(
    slow_engine: Engine, caplog: pytest.LogCaptureFixture
):
    slow_engine.settings.previews.interval_s = 0.2
    slow_engine.settings.previews_dir.rmdir()
    slow_engine.settings.previews_dir.write_text("a file where the previews folder should be")
    caplog.set_level(logging.DEBUG, logger="engine.pipeline.previews")
    watched = await _run(slow_engine, Mode.T2V, steps=6)
    assert (await slow_engine._queue.get(watched.job_id)).status is JobStatus.SUCCEEDED
    assert watched.previews == []
    failures = [record for record in caplog.records if record.getMessage().startswith("preview failed")]
    assert [record.levelno for record in failures].count(logging.WARNING) == 1
    assert len(failures) >= 2  # it was tried again, quietly


@pytest.mark.parametrize(
    ("mode", "preset"), [(Mode.I2V, "quality"), (Mode.TI2V, "quality"), (Mode.T2V, "fast"), (Mode.TI2V, "fast")]
)
async def test_every_mode_and_sampler_shows_a_preview_from_the_first_step(engine: Engine, mode: Mode, preset: str):
    # I2V: 36 input channels (the noisy latent first); TI2V-5B: 48-channel Wan 2.2 latents, one timestep per patch;
    # fast: Euler on LightX2V's schedule (A14B) or DMD (TI2V-5B) instead of UniPC.
    watched = await _run(engine, mode, preset=preset, **({"steps": 2} if preset == "quality" else {}))
    assert (await engine._queue.get(watched.job_id)).status is JobStatus.SUCCEEDED
    first, _, jpeg = watched.previews[0]
    assert first.seq == 1 and first.step == 1
    assert Image.open(io.BytesIO(jpeg)).size == (3 * FRAME_SIDE + 2 * FRAME_GAP, FRAME_SIDE)


async def test_previews_off_makes_none(tiny_settings: Settings):
    engine = await Engine.open(tiny_settings.model_copy(update={"previews": PreviewsConfig(enabled=False)}))
    try:
        watched = await _run(engine, Mode.T2V, steps=2)
        assert (await engine._queue.get(watched.job_id)).status is JobStatus.SUCCEEDED
        assert watched.previews == [] and not engine.settings.previews_dir.exists()
    finally:
        await engine.close()


async def test_the_sweep_removes_previews_of_jobs_not_running_and_old_temporary_files(queue: JobQueue, tmp_path: Path):
    running = (await queue.enqueue(source("a"), Mode.T2V, "tiny", params())).job.id
    await queue.claim_next()
    ended = (await queue.enqueue(source("b"), Mode.T2V, "tiny", params())).job.id
    claimed = await queue.claim_next()
    await queue.mark_failed(claimed.id, "no", token=claimed.claim_token)
    folder = tmp_path / "previews"
    folder.mkdir()
    for name in (f"job-{running}.jpg", f"job-{ended}.jpg", "job-999.jpg", ".job-3.x1y2.jpg", ".job-4.new.jpg"):
        (folder / name).write_bytes(b"jpeg")
    hour_ago = time.time() - 3700
    os.utime(folder / ".job-3.x1y2.jpg", (hour_ago, hour_ago))
    assert await remove_stale_previews(queue, folder) == 3
    assert sorted(path.name for path in folder.iterdir()) == [".job-4.new.jpg", f"job-{running}.jpg"]
    assert await remove_stale_previews(queue, tmp_path / "never-made") == 0
