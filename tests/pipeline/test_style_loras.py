"""Style and character LoRAs per request ([loras], `lora=NAME[:WEIGHT]`): resolved against the configuration, loaded
as adapters beside the fast preset's fused pair, and gone without a trace from the next job's frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from engine.config import GenerationConfig, Settings, StyleLoraConfig
from engine.errors import UserError
from engine.jobs import Job, JobSource, JobStatus
from engine.pipeline.models import GenerationRequest, resolve_model, resolve_request
from engine.pipeline.tiny import make_tiny_style_lora
from engine.service import Engine
from engine.storage.images import Mode
from tests.fake_hub import FakeHub
from tests.pipeline.test_generate import pipeline_frames

OFFERED = {
    "grain": StyleLoraConfig(repo="tiny", file="grain.safetensors", weight=0.8, description="film grain"),
    "glow": StyleLoraConfig(repo="tiny", file="glow.safetensors", trigger="glowing", modes=["t2v"]),
    "pair": StyleLoraConfig(repo="tiny", high="pair_high.safetensors", low="pair_low.safetensors"),
}


def resolved(mode: Mode = Mode.T2V, model: str = "tiny", most: int = 2, **options: object):
    request = GenerationRequest(mode=mode, prompt="a fox in snow", **options)
    return resolve_request(request, resolve_model(model, mode), GenerationConfig(max_loras=most), loras_offered=OFFERED)


def test_a_request_names_loras_with_or_without_a_weight_and_gets_their_trigger_words():
    params = resolved(loras=["grain:0.5", "glow"])
    assert [(use.name, use.weight, use.files) for use in params.loras] == [
        ("grain", 0.5, ["grain.safetensors"]),
        ("glow", 0.8, ["glow.safetensors"]),  # [loras]'s weight
    ]
    assert params.prompt == "glowing, a fox in snow"
    assert "The LoRA glow's trigger words were put before the prompt: glowing." in params.adjustments
    assert resolved(loras=["grain, glow:1.5"]).loras[1].weight == 1.5  # commas join several
    assert resolved(loras=["GRAIN", "grain:0.3"]).loras[0].weight == 0.3  # one name once, the last weight


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"loras": ["sepia"]}, "There is no LoRA called 'sepia' here. /loras lists them: grain, glow, pair."),
        ({"loras": ["grain:strong"]}, "The weight of the LoRA grain must be a number from 0 to 2, not 'strong'."),
        ({"loras": ["grain:3"]}, "For example lora=grain:0.8."),
        ({"loras": ["grain", "glow", "pair"]}, "A request may use at most 2 LoRAs; this one names 3."),
    ],
)
def test_a_lora_request_that_cannot_be_met_is_refused_saying_what_to_write(options, said):
    with pytest.raises(UserError) as refused:
        resolved(**options)
    assert said in str(refused.value)


def test_a_lora_is_refused_in_a_mode_or_on_a_model_it_is_not_for():
    with pytest.raises(UserError, match=r"The LoRA glow is not for ti2v\. It is for t2v\."):
        resolved(Mode.TI2V, loras=["glow"])
    with pytest.raises(UserError, match="made for the two experts of an A14B model; this bot's ti2v model has one"):
        resolved(Mode.TI2V, loras=["pair"])
    with pytest.raises(UserError, match=r"This bot offers no LoRAs\."):
        resolved(most=0, loras=["grain"])


def test_the_configuration_names_each_lora_and_its_files_once():
    with pytest.raises(ValueError, match="give either file, or both high and low"):
        StyleLoraConfig(repo="tiny", high="a.safetensors")
    with pytest.raises(ValueError, match="is no LoRA name"):
        Settings(loras={"Film Grain": {"repo": "tiny", "file": "a.safetensors"}})
    with pytest.raises(ValueError, match=r"must name a \.safetensors file"):
        StyleLoraConfig(repo="tiny", file="a.ckpt")


# -- on the tiny models ------------------------------------------------------------------------------------------


@pytest.fixture
async def styled(tiny_settings: Settings):
    settings = tiny_settings.model_copy(update={"loras": OFFERED})
    engine = await Engine.open(settings)
    yield engine
    await engine.close()


async def queued(engine: Engine, user: str, **options: object) -> Job:
    request = GenerationRequest(mode=Mode.T2V, prompt="w1 w2 a fox", seed=7, resolution="64x64", frames=5, **options)
    source = JobSource(platform="cli", chat_id="c", user_id=user)
    return (await engine.submit(request, source)).result.job


@pytest.mark.parametrize("preset", ["fast", "quality"])
async def test_a_lora_changes_the_video_and_the_next_job_without_it_is_the_baseline_bit_for_bit(styled, preset):
    plain = await queued(styled, "a", preset=preset)
    with_grain = await queued(styled, "b", preset=preset, loras=["grain"])
    lighter = await queued(styled, "c", preset=preset, loras=["grain:0.3"])
    baseline = await pipeline_frames(styled, plain)
    grained = await pipeline_frames(styled, with_grain)
    assert styled._runner.loaded.styles.loaded  # kept loaded (inactive) for the next job naming it
    again = await pipeline_frames(styled, plain)
    light = await pipeline_frames(styled, lighter)
    assert not np.array_equal(grained, baseline)
    assert np.array_equal(again, baseline)  # nothing of the LoRA reaches a job without it
    assert not np.array_equal(light, grained)  # the weight is the job's own
    assert bool(styled._runner.loaded.loras.names) == (preset == "fast")  # the fast pair stays fused beside it


async def test_with_no_cache_a_lora_is_unloaded_after_its_job(tiny_settings: Settings):
    generation = tiny_settings.generation.model_copy(update={"lora_cache": 0})
    settings = tiny_settings.model_copy(update={"loras": OFFERED, "generation": generation})
    engine = await Engine.open(settings)
    try:
        await pipeline_frames(engine, await queued(engine, "a", loras=["grain", "glow"]))
        assert len(engine._runner.loaded.styles.loaded) == 2  # the job's own stay while it is the latest
        await pipeline_frames(engine, await queued(engine, "b"))
        assert engine._runner.loaded.styles.loaded == []
    finally:
        await engine.close()


async def test_a_lora_that_fails_to_load_fails_its_job_alone_and_leaves_the_pipeline_clean(
    tiny_settings: Settings, tmp_path: Path
):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.safetensors").write_bytes(b"not a safetensors file")
    offered = {**OFFERED, "bad": StyleLoraConfig(repo=str(broken), file="bad.safetensors")}
    engine = await Engine.open(tiny_settings.model_copy(update={"loras": offered}))
    try:
        plain = await queued(engine, "a")
        baseline = await pipeline_frames(engine, plain)
        await pipeline_frames(engine, await queued(engine, "b", loras=["grain"]))
        doomed = await queued(engine, "c", loras=["bad"])
        after = await queued(engine, "d")
        await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
        failed, done = await engine._queue.get(doomed.id), await engine._queue.get(after.id)
        again = await pipeline_frames(engine, plain)
        loaded = engine._runner.loaded
    finally:
        await engine.close()
    assert failed.status is JobStatus.FAILED and done.status is JobStatus.SUCCEEDED
    assert failed.error_user == (
        "The LoRA bad could not be loaded, so this video was not made. Ask again without it; the admin can see why "
        "in the log."
    )
    assert np.array_equal(again, baseline)
    adapters = loaded.pipeline.get_list_adapters()
    assert loaded.styles.loaded == [] and not adapters.get("transformer") and not adapters.get("transformer_2")


async def test_the_videos_metadata_names_each_lora_and_its_weight(styled):
    job = await queued(styled, "a", loras=["grain:0.6"])
    await asyncio.wait_for(styled._worker.run(stop_after=0), timeout=90)
    done = await styled._queue.get(job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error_detail
    assert done.result.run.styles == ["grain:0.6 (tiny/grain.safetensors)"]
    assert [use.label for use in done.params.loras] == ["grain:0.6"]


@pytest.fixture
async def styles_hub(tmp_path: Path) -> AsyncIterator[FakeHub]:
    """A repo of style LoRAs on a Hub, of which a job needs one file."""
    folder = tmp_path / "styles"
    make_tiny_style_lora(folder, "grain.safetensors")
    make_tiny_style_lora(folder, "other.safetensors")
    (folder / "README.md").write_text("# styles")
    hub = FakeHub("someone/wan-styles", folder)
    await hub.start()
    yield hub
    await hub.stop()


async def test_a_lora_on_the_hub_is_fetched_file_by_file_through_the_downloader(
    styles_hub: FakeHub, tiny_settings: Settings
):
    offered = {"grain": StyleLoraConfig(repo="someone/wan-styles", file="grain.safetensors")}
    downloads = tiny_settings.downloads.model_copy(update={"endpoint": styles_hub.url, "reserve_bytes": 0})
    engine = await Engine.open(tiny_settings.model_copy(update={"loras": offered, "downloads": downloads}))
    try:
        job = await queued(engine, "a", loras=["grain"])
        await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
        done = await engine._queue.get(job.id)
    finally:
        await engine.close()
    assert done.status is JobStatus.SUCCEEDED, done.error_detail
    fetched = sorted(path for _, path, _ in styles_hub.requests if path.startswith("cdn:"))
    assert fetched == ["cdn:grain.safetensors"]  # its file, nothing else of the repo
    assert done.result.run.styles == ["grain:0.8 (someone/wan-styles/grain.safetensors)"]
