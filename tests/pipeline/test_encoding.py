"""The MP4 encoded while the VAE decodes: every chunk the decoder makes reaches the encoder as it is made, the
frames are exactly the pipeline's own, and the worker's video carries its metadata."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.jobs import JobStatus
from engine.pipeline import encoding
from engine.pipeline.encoding import EncodeWhileDecoding
from engine.pipeline.tiny import build_tiny_pipeline
from engine.pipeline.video import Mp4Stream, probe, to_uint8
from engine.service import Engine
from engine.storage.images import Mode
from tests.pipeline.test_generate import run_all, submit


@pytest.mark.parametrize("mode", [Mode.T2V, Mode.TI2V])
def test_each_decoded_chunk_is_encoded_as_it_is_made_and_matches_the_pipelines_frames(
    mode: Mode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    pipeline = build_tiny_pipeline(mode)
    pipeline.set_progress_bar_config(disable=True)
    chunks: list[np.ndarray] = []
    decoder_calls: list[int] = []
    real_add = Mp4Stream.add

    def add(self: Mp4Stream, frames: np.ndarray) -> None:
        chunks.append(frames)
        real_add(self, frames)

    monkeypatch.setattr(encoding.Mp4Stream, "add", add)
    pipeline.vae.decoder.register_forward_hook(lambda *_: decoder_calls.append(len(chunks)))
    with EncodeWhileDecoding(pipeline, 16, tmp_path / "part.mp4"):
        output = pipeline(
            prompt="w1 w2",
            num_frames=9,
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
    assert [len(chunk) for chunk in chunks] == [1, 4, 4]  # a latent frame at a time: 1, then 4 video frames each
    assert decoder_calls[-1] < 3  # the first chunks were being encoded before the decode ended
    np.testing.assert_array_equal(np.concatenate(chunks), to_uint8(output.frames[0]))
    assert probe(tmp_path / "part.mp4").frames == 9


async def test_the_workers_video_was_encoded_during_the_decode_and_carries_its_metadata(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    streams: list[Any] = []
    real_init = Mp4Stream.__init__

    def init(self: Mp4Stream, *args: Any, **kwargs: Any) -> None:
        streams.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(encoding.Mp4Stream, "__init__", init)
    submission = await submit(engine, Mode.T2V, frames=9, seed=5)
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED
    assert len(streams) == 1  # encoded once, while decoding; the worker only copied the packets
    info = probe(job.result.path)
    assert info.frames == 9 and json.loads(info.comment)["seed"] == 5
    leftovers = [path.name for path in engine.settings.outputs_dir.iterdir() if path.name.startswith(".")]
    assert leftovers == []


async def test_a_cancelled_job_leaves_no_partial_video(engine: Engine):
    inbox = engine._queue.events.subscribe()
    submission = await submit(engine, Mode.T2V, steps=30)
    job_id = submission.result.job.id
    worker = asyncio.create_task(engine._worker.run(stop_after=1))
    async for event in inbox:
        if event.job.id == job_id and event.progress and event.progress.step >= 1:
            break
    await engine._queue.cancel(job_id, engine.actor("cli", "u1"))
    await asyncio.wait_for(worker, timeout=60)
    assert list(engine.settings.outputs_dir.iterdir()) == []


def test_an_encode_that_fails_during_the_decode_leaves_the_video_to_be_encoded_afterwards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    pipeline = build_tiny_pipeline(Mode.T2V)
    pipeline.set_progress_bar_config(disable=True)

    def full(self: Mp4Stream, frames: np.ndarray) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(encoding.Mp4Stream, "add", full)
    with EncodeWhileDecoding(pipeline, 16, tmp_path / "part.mp4") as encoder:
        output = pipeline(prompt="w1", num_frames=9, height=64, width=64, num_inference_steps=2, output_type="np")
    assert not encoder.encoded and output.frames[0].shape == (9, 64, 64, 3)
    assert "encoding while decoding failed; encoding afterwards: [Errno 28] No space left on device" in caplog.text


async def test_a_streamed_video_that_cannot_be_finished_is_encoded_from_the_frames(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    from engine import worker

    def broken(part: Path, target: Path, metadata: dict[str, Any]) -> Any:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(worker, "finish_mp4", broken)
    submission = await submit(engine, Mode.T2V, frames=9, seed=6)
    await run_all(engine)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED
    info = probe(job.result.path)
    assert info.frames == 9 and json.loads(info.comment)["seed"] == 6
    assert [path.name for path in engine.settings.outputs_dir.iterdir() if path.name.startswith(".")] == []
