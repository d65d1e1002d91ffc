"""The fast preset: distilled LoRAs fused into both A14B experts, FastWan's 3-step sampler for TI2V, and the exact
schedules they were distilled on, proven by counting the transformer passes a job really makes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from bot.chat.texts import parse_message
from engine.config import GenerationConfig, Settings
from engine.errors import UserError
from engine.hub.hfcache import cached_pipeline
from engine.jobs import EventKind, Job, JobSource, JobStatus
from engine.pipeline.generate import WARMING_UP, PipelineRunner
from engine.pipeline.loras import (
    FusedLoras,
    LoraFiles,
    LoraPair,
    SavedWeights,
    load_pair,
    random_lightx2v_lora,
    write_lora,
)
from engine.pipeline.models import T2V_A14B, GenerationRequest, ModelRef, resolve_request
from engine.pipeline.passes import PassCounter
from engine.pipeline.presets import LIGHTX2V_EULER, Preset
from engine.pipeline.samplers import scheduled
from engine.pipeline.speedups import Choice
from engine.pipeline.tiny import TEXT_DIM, build_tiny_pipeline
from engine.pipeline.video import probe
from engine.service import Engine, Upload
from engine.storage.images import Mode
from tests import imagefactory
from tests.fake_hub import FakeHub
from tests.pipeline.test_generate import pipeline_frames

pytestmark = pytest.mark.timeout(120)

LIGHTX2V_SIGMAS = [1.0, 0.9375, 0.8333, 0.625, 0.0]
CPU_SPEEDUPS = "attention=native (no CUDA GPU); fp8=off (no CUDA GPU); compile=off (no CUDA GPU)"
HIGH = "wan2.2_t2v_A14b_high_noise_lora_rank64_lightx2v_4step_1217.safetensors"
LOW = "wan2.2_t2v_A14b_low_noise_lora_rank64_lightx2v_4step_1217.safetensors"


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights in this machine's own Hugging Face cache must not stand in for what a test serves."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


async def make(engine: Engine, mode: Mode, start: bytes | None = None, **options: object) -> Job:
    request = GenerationRequest(mode=mode, prompt="w1 w2 a fox", **options)
    upload = Upload(start) if start is not None else None
    submission = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="u"), upload)
    await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
    job = await engine._queue.get(submission.result.job.id)
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    return job


async def queued(engine: Engine, mode: Mode, **options: object) -> Job:
    request = GenerationRequest(mode=mode, prompt="w1 w2 a fox", **options)
    submission = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="u"))
    return submission.result.job


def lora_pair(folder: Path, pipeline: object, seed: int = 1) -> tuple[Path, Path]:
    generator = torch.Generator().manual_seed(seed)
    high = write_lora(random_lightx2v_lora(pipeline.transformer, 4, generator), folder / HIGH)
    low = write_lora(random_lightx2v_lora(pipeline.transformer_2, 4, generator), folder / LOW)
    return high, low


def fast_run(pipeline: object, after_step: Callable[[Any, int], None] | None = None) -> tuple[np.ndarray, PassCounter]:
    """Four distilled steps, two on each expert, as the fast preset runs them; `after_step(pipeline, step)` after
    each."""

    def on_step_end(pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if after_step is not None:
            after_step(pipe, step)
        return kwargs

    with scheduled(pipeline, LIGHTX2V_EULER, seed=3), PassCounter(pipeline) as passes:
        output = pipeline(
            prompt="w1 w2",
            num_frames=5,
            height=64,
            width=64,
            num_inference_steps=4,
            guidance_scale=1.0,
            guidance_scale_2=1.0,
            generator=torch.Generator().manual_seed(3),
            output_type="np",
            callback_on_step_end=on_step_end,
        )
    return output.frames[0], passes


# -- the LoRAs ---------------------------------------------------------------------------------------------------


def saved_tiny(folder: Path) -> tuple[object, SavedWeights]:
    """The tiny t2v pipeline, saved to `folder` as a model is: what its fused LoRAs are restored from."""
    pipeline = build_tiny_pipeline(Mode.T2V)
    pipeline.save_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline, SavedWeights(folder)


def pair_files(high: Path, low: Path) -> LoraFiles:
    return LoraFiles(LoraPair("lightx2v/Wan2.2-Distill-Loras", HIGH, LOW), high, low)


def test_a_fused_lora_pair_changes_both_experts_like_the_adapters_and_comes_out_exactly(tmp_path: Path):
    pipeline, saved = saved_tiny(tmp_path / "model")
    high, low = lora_pair(tmp_path, pipeline)
    base, passes = fast_run(pipeline)
    # Two distilled steps per expert: 1000 and 937.5 on the high-noise one, the rest below the 875 boundary.
    low_noise = [pytest.approx(833.333, abs=1e-3), 625.0]
    assert passes.timesteps == {"transformer": [1000.0, 937.5], "transformer_2": low_noise}

    load_pair(pipeline, high, low)
    with_adapters, _ = fast_run(pipeline)
    pipeline.unload_lora_weights()
    fused = FusedLoras(pipeline, pair_files(high, low), saved)
    fused_frames, _ = fast_run(pipeline)
    assert np.abs(fused_frames - base).max() > 0.01  # the LoRAs change the video
    np.testing.assert_allclose(fused_frames, with_adapters, atol=1e-4)  # fused is the adapters' video
    assert not any("lora" in name for name, _ in pipeline.transformer_2.named_modules())  # adapters dropped

    weight = pipeline.transformer.blocks[0].attn1.to_q.weight
    fused.restore()
    assert pipeline.transformer.blocks[0].attn1.to_q.weight is weight  # the same parameter: compiled blocks hold
    restored, _ = fast_run(pipeline)
    np.testing.assert_array_equal(restored, base)  # bit for bit the model's own weights again


def test_a_pair_that_fails_to_load_halfway_leaves_the_model_as_it_was(tmp_path: Path):
    pipeline, saved = saved_tiny(tmp_path / "model")
    high, low = lora_pair(tmp_path, pipeline)
    base, _ = fast_run(pipeline)
    low.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):  # noqa: B017 - whatever safetensors raises; what matters is what is left
        FusedLoras(pipeline, pair_files(high, low), saved)
    assert not any("lora" in name for name, _ in pipeline.transformer.named_modules())
    np.testing.assert_array_equal(fast_run(pipeline)[0], base)


def resident_bytes() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_switching_presets_keeps_no_copy_of_the_weights_in_host_memory(tmp_path: Path):
    """A fused pair restored from the saved files: host memory grows by next to nothing per switch, where a copy
    of the tensors the LoRAs change (the old way) would add all of them."""
    pipeline = build_tiny_pipeline(Mode.T2V)
    wide = {**pipeline.transformer.config, "num_attention_heads": 8, "attention_head_dim": 64, "ffn_dim": 2048}
    wide.update(num_layers=2, text_dim=TEXT_DIM)
    pipeline.transformer = WanTransformer3DModel(**{k: v for k, v in wide.items() if not k.startswith("_")})
    pipeline.transformer_2 = WanTransformer3DModel(**{k: v for k, v in wide.items() if not k.startswith("_")})
    pipeline.save_pretrained(tmp_path / "model")
    high, low = lora_pair(tmp_path, pipeline)
    files = pair_files(high, low)
    saved = SavedWeights(tmp_path / "model")
    changed = sum(
        module.weight.numel() * 4
        for expert in (pipeline.transformer, pipeline.transformer_2)
        for module in expert.blocks.modules()
        if isinstance(module, torch.nn.Linear)
    )
    assert changed > 50 * 2**20  # large enough for resident memory to show a copy
    FusedLoras(pipeline, files, saved).restore()  # the first switch warms up peft and safetensors
    before = resident_bytes()
    for _ in range(2):
        fused = FusedLoras(pipeline, files, saved)
        while_fused = resident_bytes()
        fused.restore()
    after = resident_bytes()
    assert while_fused - before < changed / 10, (while_fused - before, changed)
    assert after - before < changed / 10, (after - before, changed)


@pytest.fixture
async def lora_hub(tmp_path: Path) -> AsyncIterator[FakeHub]:
    """LightX2V's repo with a pair in its key layout, for the tiny t2v's shapes, at the default file names."""
    folder = tmp_path / "lightx2v"
    folder.mkdir()
    lora_pair(folder, build_tiny_pipeline(Mode.T2V))
    (folder / "README.md").write_text("# not downloaded")
    hub = FakeHub("lightx2v/Wan2.2-Distill-Loras", folder)
    await hub.start()
    yield hub
    await hub.stop()


async def test_a_model_from_disk_gets_the_configured_loras_from_the_hub_fused_into_both_experts(
    lora_hub: FakeHub, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    settings = Settings(
        data_dir=tmp_path / "data",
        models={"t2v": str(tiny_models / "tiny-t2v")},  # a local folder: the real A14B spec, so LightX2V's LoRAs
        downloads={"endpoint": lora_hub.url, "reserve_bytes": 0, "retries": 0},
    )
    engine = await Engine.open(settings)
    try:
        job = await make(engine, Mode.T2V, preset="fast", resolution="64x64", frames=5, seed=4)
        pipeline = engine._runner.loaded.pipeline
    finally:
        await engine.close()
    fetched = sorted(path for _, path, _ in lora_hub.requests if path.startswith("cdn:"))
    assert fetched == [f"cdn:{HIGH}", f"cdn:{LOW}"]  # the pair and nothing else from the repo
    repo = "lightx2v/Wan2.2-Distill-Loras"
    assert job.result.run.loras == [f"{repo}/{HIGH}", f"{repo}/{LOW}"]
    assert job.result.run.transformer_calls == {"transformer": 2, "transformer_2": 2}
    original = build_tiny_pipeline(Mode.T2V)
    for expert in ("transformer", "transformer_2"):
        weight = getattr(pipeline, expert).blocks[0].attn1.to_q.weight
        assert not torch.equal(weight, getattr(original, expert).blocks[0].attn1.to_q.weight)


async def test_a_lora_file_the_repo_lacks_fails_the_job_saying_which(
    lora_hub: FakeHub, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    pair = {"repo": "lightx2v/Wan2.2-Distill-Loras", "high": "high.safetensors", "low": LOW}
    settings = Settings(
        data_dir=tmp_path / "data",
        models={"t2v": str(tiny_models / "tiny-t2v"), "fast_loras": {"t2v": pair}},
        downloads={"endpoint": lora_hub.url, "reserve_bytes": 0, "retries": 0},
    )
    engine = await Engine.open(settings)
    try:
        request = GenerationRequest(mode=Mode.T2V, prompt="w1", preset="fast", resolution="64x64", frames=5)
        submission = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="u"))
        await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
        job = await engine._queue.get(submission.result.job.id)
    finally:
        await engine.close()
    assert job.status is JobStatus.FAILED
    assert "has no file high.safetensors" in job.error_user


# -- weights people already have -------------------------------------------------------------------------------


def hf_cache_snapshot(cache: Path, repo_id: str, source: Path) -> Path:
    """`source`'s files as huggingface_hub caches a repo: blobs by hash, a snapshot of links, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "c0ffee"
    for path in sorted(source.rglob("*")):
        if path.is_file():
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, blob)
            link = snapshot / path.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    return repo


async def test_loras_in_the_hugging_face_cache_are_used_where_they_are(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    pair = tmp_path / "pair"
    pair.mkdir()
    lora_pair(pair, build_tiny_pipeline(Mode.T2V))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    hf_cache_snapshot(tmp_path / "hf", "lightx2v/Wan2.2-Distill-Loras", pair)
    settings = Settings(
        data_dir=tmp_path / "data",
        models={"t2v": str(tiny_models / "tiny-t2v")},
        downloads={"endpoint": "http://127.0.0.1:9", "offline": True},  # nothing may be downloaded
    )
    engine = await Engine.open(settings)
    try:
        job = await make(engine, Mode.T2V, preset="fast", resolution="64x64", frames=5)
        used = engine._runner.loaded.loras.files.high
    finally:
        await engine.close()
    assert job.result.run.transformer_calls == {"transformer": 2, "transformer_2": 2}
    assert used.parent == tmp_path / "hf" / "models--lightx2v--Wan2.2-Distill-Loras" / "snapshots" / "c0ffee"


def test_a_cached_pipeline_counts_only_when_every_component_is_there(tiny_models: Path, tmp_path: Path):
    environ = {"HF_HOME": str(tmp_path / "home")}
    repo = hf_cache_snapshot(tmp_path / "home" / "hub", "FastVideo/FastWan", tiny_models / "tiny-ti2v")
    assert cached_pipeline("FastVideo/FastWan", environ) == repo / "snapshots" / "c0ffee"
    assert cached_pipeline("FastVideo/Other", environ) is None
    weights = repo / "snapshots" / "c0ffee" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.resolve().unlink()  # a download stopped before this blob: its link leads nowhere
    assert cached_pipeline("FastVideo/FastWan", environ) is None


# -- passes and schedules through the whole engine ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [Mode.T2V, Mode.I2V])
async def test_a_fast_a14b_job_makes_two_passes_per_expert_on_the_distilled_sigmas(
    engine: Engine, mode: Mode, caplog: pytest.LogCaptureFixture
):
    start = imagefactory.png(64, 64) if mode is Mode.I2V else None
    with caplog.at_level(logging.INFO, logger="engine.pipeline.generate"):
        job = await make(engine, mode, start, preset="fast", seed=5)
    assert f"speed-ups: {CPU_SPEEDUPS}" in caplog.text  # what was chosen, and why, with the model's load
    run = job.result.run
    assert (job.params.preset, job.params.steps, job.params.guidance, job.params.guidance_2) == ("fast", 4, 1.0, 1.0)
    assert run.transformer_calls == {"transformer": 2, "transformer_2": 2}  # no unconditional pass at all
    assert run.sigmas == LIGHTX2V_SIGMAS and run.scheduler == "euler-flow-shift5-4step"
    assert run.loras == [f"wanbot/tiny-loras/{name}_noise_lora.safetensors" for name in ("high", "low")]
    comment = json.loads(probe(job.result.path).comment)
    assert comment["preset"] == "fast" and comment["transformer_calls"] == run.transformer_calls
    assert comment["sigmas"] == LIGHTX2V_SIGMAS and comment["loras"] == run.loras
    assert comment["speedups"] == {"attention": "native", "fp8": "off", "compile": "off"}  # a CPU


async def test_a_quality_job_makes_two_passes_a_step_with_the_models_own_scheduler(engine: Engine):
    job = await make(engine, Mode.T2V, preset="quality", steps=3)
    run = job.result.run
    assert sum(run.transformer_calls.values()) == 2 * 3  # prompt and negative prompt each step
    assert run.loras == [] and run.scheduler == "UniPCMultistepScheduler(flow_shift=12)"


async def test_a_fast_ti2v_job_makes_three_dmd_passes_and_repeats_from_its_seed(engine: Engine):
    picture = imagefactory.png(64, 64)
    first = await make(engine, Mode.TI2V, picture, preset="fast", seed=11)
    run = first.result.run
    assert run.transformer_calls == {"transformer": 3} and run.scheduler == "dmd-3step"
    assert run.sigmas == [1.0, 0.757, 0.522, 0.0]
    assert engine._runner.loaded.source == "tiny-ti2v-fast"  # FastWan's stand-in, not the quality weights
    torch.manual_seed(1)
    once = await pipeline_frames(engine, first)
    torch.manual_seed(2)  # the re-noising must not depend on the global generator
    np.testing.assert_array_equal(await pipeline_frames(engine, first), once)
    other_seed = first.model_copy(update={"params": first.params.model_copy(update={"seed": 12})})
    assert not np.array_equal(await pipeline_frames(engine, other_seed), once)


async def test_quality_after_fast_is_the_fresh_quality_video_without_a_reload(engine: Engine):
    quality = await queued(engine, Mode.T2V, preset="quality", steps=2, seed=9)
    fast = await queued(engine, Mode.T2V, preset="fast", seed=9)
    fresh = await pipeline_frames(engine, quality)
    pipeline = engine._runner.loaded.pipeline
    await pipeline_frames(engine, fast)
    assert engine._runner.loaded.loras.names  # fused in
    after_fast = await pipeline_frames(engine, quality)
    assert engine._runner.loaded.pipeline is pipeline  # switched in place, never read from disk again
    assert engine._runner.loaded.loras.names == []
    np.testing.assert_array_equal(after_fast, fresh)


# -- what a request resolves to ----------------------------------------------------------------------------------


def resolve(limits: GenerationConfig | None = None, spec=T2V_A14B, **asked: object):
    request = GenerationRequest(mode=Mode.T2V, prompt="a fox", **asked)
    model = ModelRef(name="m", mode=Mode.T2V, spec=spec)
    return resolve_request(request, model, limits or GenerationConfig(), rng=random.Random(1))


def test_fast_is_the_default_and_replaces_steps_and_guidance_with_a_note_when_named():
    plain = resolve()
    assert (plain.preset, plain.steps, plain.guidance, plain.guidance_2, plain.adjustments) == ("fast", 4, 1.0, 1.0, [])
    named = resolve(preset="fast", steps=30, guidance=5)
    assert (named.steps, named.guidance, named.guidance_2) == (4, 1.0, 1.0)
    assert any("runs exactly 4 steps" in note and "steps=30 was not used" in note for note in named.adjustments)
    assert any("without guidance" in note and "guidance=5 was not used" in note for note in named.adjustments)
    assert resolve(preset="fast", steps=4, guidance=1).adjustments == []  # what fast runs anyway: nothing to say


def test_own_steps_or_guidance_without_a_preset_make_a_quality_video_and_say_so():
    params = resolve(steps=30)
    assert (params.preset, params.steps, params.guidance, params.guidance_2) == ("quality", 30, 4.0, 3.0)
    assert params.adjustments == [
        "steps=30 made this a quality video: the fast preset runs a fixed schedule without guidance. Add preset=fast "
        "to get a fast one instead."
    ]
    quality_default = GenerationConfig(default_preset="quality")
    assert (resolve(quality_default).preset, resolve(quality_default).steps) == ("quality", 40)


def test_a_model_without_a_fast_version_refuses_a_named_fast_preset():
    from dataclasses import replace

    single_expert = replace(T2V_A14B, boundary_ratio=None, guidance_2=None, fast=None)
    with pytest.raises(UserError, match="has no fast version") as caught:
        resolve(spec=single_expert, preset="fast")
    assert caught.value.hint == "Use preset=quality."
    unnamed = resolve(spec=single_expert)
    assert unnamed.preset is Preset.QUALITY and "has no fast version" in unnamed.adjustments[0]


def test_speed_ups_are_off_on_a_cpu_whatever_the_config_asks_and_the_log_says_why():
    config = GenerationConfig(device="cpu", attention="on", fp8="on", compile="on")
    runner = PipelineRunner(config, locator=None)
    assert runner.speedups.metadata() == {"attention": "native", "fp8": "off", "compile": "off"}
    assert runner.speedups.describe() == CPU_SPEEDUPS


def test_chats_take_preset_as_an_option():
    assert parse_message("a fox preset=quality", None, has_image=False).request.preset is Preset.QUALITY
    with pytest.raises(UserError, match="preset must be fast or quality"):
        parse_message("a fox preset=turbo", None, has_image=False)


def test_generate_on_the_command_line_makes_a_fast_tiny_video(tmp_path: Path):
    picture = tmp_path / "start.png"
    picture.write_bytes(imagefactory.png(64, 64))
    args = ["generate", "--mode", "ti2v", "--start", str(picture), "--model", "tiny", "--preset", "fast"]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("WANBOT_")}
    done = subprocess.run(
        [sys.executable, "-c", "from bot.cli import main; main()", *args, "--frames", "5", "--seed", "3"],
        capture_output=True,
        text=True,
        env={**environment, "WANBOT_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"},
        cwd=Path(__file__).resolve().parents[2],
        timeout=110,
    )
    assert done.returncode == 0, done.stderr
    assert "3 steps, seed 3, model tiny-ti2v, fast preset" in done.stderr
    video = done.stdout.split()[0]
    comment = json.loads(probe(video).comment)
    assert (comment["preset"], comment["scheduler"]) == ("fast", "dmd-3step")
    assert comment["transformer_calls"] == {"transformer": 3}


def test_an_unknown_preset_says_what_to_write():
    with pytest.raises(UserError, match="preset must be fast or quality, not 'turbo'"):
        GenerationRequest(mode=Mode.T2V, prompt="a fox", preset="turbo")
    assert GenerationRequest(mode=Mode.T2V, preset="Fast ").preset is Preset.FAST


async def test_with_compiled_blocks_the_first_job_of_each_size_says_it_warms_up(engine: Engine):
    await make(engine, Mode.T2V)  # the model is loaded (and would be compiled) once
    # Compiling needs a GPU build of torch: the choice is made as a GPU machine would make it, the model stays as it is.
    engine._runner._speedups = dataclasses.replace(engine._runner.speedups, compile=Choice("on", "asked for"))
    events = engine.subscribe()
    jobs = [await make(engine, Mode.T2V, resolution=size) for size in ("64x64", "64x64", "96x64")]
    firsts: dict[int, str] = {}  # each job's first denoising text
    with contextlib.suppress(TimeoutError):
        while True:  # every event is in the subscription already: read until none is left
            event = await asyncio.wait_for(events.get(), timeout=0.2)
            if event.kind is EventKind.PROGRESS and event.progress is not None:
                firsts.setdefault(event.job.id, event.progress.detail)
    events.close()
    assert [WARMING_UP in firsts[job.id] for job in jobs] == [True, False, True]


def test_models_list_shows_the_fast_presets_weights_beside_each_model(tmp_path: Path):
    """The default preset needs the LoRA pair too: `models list` says whether it is here, and its size."""
    from typer.testing import CliRunner

    from bot.cli import app

    pair = tmp_path / "pair"
    pair.mkdir()
    lora_pair(pair, build_tiny_pipeline(Mode.T2V))
    hf_cache_snapshot(tmp_path / "hf", "lightx2v/Wan2.2-Distill-Loras", pair)
    config = tmp_path / "wanbot.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[downloads]\noffline = true\n')
    env = {"HF_HUB_CACHE": str(tmp_path / "hf"), "COLUMNS": "200"}
    listed = CliRunner().invoke(app, ["models", "list", "--json", "--config", str(config)], env=env)
    rows = {row["mode"]: row for row in json.loads(listed.stdout)}
    assert list(rows) == ["t2v", "t2v fast", "i2v", "i2v fast", "ti2v", "ti2v fast"]
    fast = rows["t2v fast"]
    assert fast["model"] == f"lightx2v/Wan2.2-Distill-Loras: {HIGH}, {LOW}"
    assert (fast["on_disk"], fast["bytes_to_download"]) == (True, 0)
    assert fast["bytes_on_disk"] == (pair / HIGH).stat().st_size + (pair / LOW).stat().st_size
    assert rows["i2v fast"]["on_disk"] is False  # the i2v pair has other file names
    assert rows["i2v fast"]["not_checked"] == "downloads are off (offline mode)"
    assert rows["ti2v fast"]["model"] == "FastVideo/FastWan2.2-TI2V-5B-FullAttn-Diffusers"
