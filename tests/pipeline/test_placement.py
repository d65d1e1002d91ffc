"""wanbot's own placements, run on a CPU standing in for the GPU (engine/pipeline/placement.py's Copier makes plain
copies where CUDA streams would run): swapped experts make the same frames with one expert loaded at a time, the
next expert is prefetched into the room the budget leaves, LoRAs are fused into swapped experts' host copies and
taken out exactly, and the runner re-plans, re-places and retries on a leaner plan."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from engine.jobs import Progress
from engine.pipeline import generate
from engine.pipeline.footprint import GIB
from engine.pipeline.hooks import RunHooks
from engine.pipeline.loras import LoraFiles, LoraPair, LoraSlot, SavedWeights, random_lightx2v_lora, write_lora
from engine.pipeline.placement import Copier, Placement, expert_order
from engine.pipeline.planner import Machine, Plan, Where
from engine.pipeline.tiny import build_tiny_pipeline
from engine.service import Engine
from engine.storage.images import Mode
from tests.pipeline.test_generate import pipeline_frames, run_all, submit
from tests.pipeline.test_presets import fast_run

CPU = torch.device("cpu")
SWAP = Plan("model_offload", Where.SWAPPED, Where.SWAPPED, False, 0, 0, None)
TEXT_SWAPPED = Plan("gpu", Where.SWAPPED, Where.GPU, False, 0, 0, None)


def tiny() -> Any:
    pipeline = build_tiny_pipeline(Mode.T2V)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def fast_frames(pipeline: Any, after_step: Callable[[Any, int], None] | None = None) -> np.ndarray:
    return fast_run(pipeline, after_step)[0]


def part_bytes(pipeline: Any, name: str) -> int:
    module = getattr(pipeline, name)
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_swapped_experts_make_the_same_frames_with_one_part_on_the_device_at_a_time():
    base = fast_frames(tiny())
    pipeline = tiny()
    placement = Placement(pipeline, SWAP, CPU)
    frames = fast_frames(pipeline)
    np.testing.assert_array_equal(frames, base)
    sizes = {name: part_bytes(pipeline, name) for name in ("text_encoder", "transformer", "transformer_2")}
    assert placement.peak_loaded == max(sizes.values())  # never two parts at once
    assert placement.copied_bytes == sum(sizes.values())  # each part came in once
    assert placement.loaded_bytes == 0  # the decode made them all leave
    assert all(not placement.is_loaded(name) for name in sizes)


def test_the_text_encoder_leaves_once_the_experts_run_where_only_it_is_swapped():
    pipeline = tiny()
    placement = Placement(pipeline, TEXT_SWAPPED, CPU)
    during_steps: list[bool] = []
    fast_frames(pipeline, lambda _pipe, _step: during_steps.append(placement.is_loaded("text_encoder")))
    assert during_steps == [False] * 4  # gone before the first step, to leave the experts their room
    assert placement.copied_bytes == part_bytes(pipeline, "text_encoder")


@pytest.mark.parametrize("share", [1.0, 0.9])
def test_the_next_expert_is_prefetched_into_the_room_the_budget_leaves(share: float):
    base = fast_frames(tiny())
    pipeline = tiny()
    fixed = part_bytes(pipeline, "vae")
    high, low = part_bytes(pipeline, "transformer"), part_bytes(pipeline, "transformer_2")
    room = int(low * share)
    placement = Placement(pipeline, SWAP, CPU, budget=fixed + high + room)
    seen: list[tuple[int, int]] = []  # after each step: the low-noise expert's bytes already on the device

    def after_step(pipe: Any, step: int) -> None:
        placement.on_step_end(step, expert_order(pipe, 0.875), activations=0)
        seen.append((step, placement._parts["transformer_2"].loaded_bytes))

    np.testing.assert_array_equal(fast_frames(pipeline, after_step), base)
    # The steps run high, high, low, low: after step 0 the next step is the high expert's last, so the low one's
    # first blocks start then, within the room.
    assert 0 < seen[0][1] <= room
    assert placement.peak_loaded <= high + room
    if share == 1.0:
        assert seen[0][1] == low and placement.peak_loaded == high + low


def saved_with_loras(folder: Path) -> tuple[Any, LoraFiles]:
    """The tiny t2v pipeline saved to `folder`/model (what fused LoRAs are restored from), and a random pair."""
    reference = tiny()
    reference.save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(1)
    high = write_lora(random_lightx2v_lora(reference.transformer, 4, generator), folder / "high.safetensors")
    low = write_lora(random_lightx2v_lora(reference.transformer_2, 4, generator), folder / "low.safetensors")
    return reference, LoraFiles(LoraPair("lightx2v/test", "high.safetensors", "low.safetensors"), high, low)


def test_a_lora_fused_into_swapped_experts_goes_into_their_host_copies_and_comes_out_exactly(tmp_path: Path):
    reference, files = saved_with_loras(tmp_path)
    saved = SavedWeights(tmp_path / "model")
    base = fast_frames(reference)
    LoraSlot(reference, saved).switch(files)
    fused_in_place = fast_frames(reference)

    pipeline = WanPipeline.from_pretrained(tmp_path / "model")
    pipeline.set_progress_bar_config(disable=True)
    placement = Placement(pipeline, SWAP, CPU)
    slot = LoraSlot(pipeline, saved, placement.editing)
    slot.switch(files)
    assert placement.loaded_bytes == part_bytes(pipeline, "transformer_2")  # the last one edited stays
    np.testing.assert_array_equal(fast_frames(pipeline), fused_in_place)
    slot.switch(None)
    np.testing.assert_array_equal(fast_frames(pipeline), base)


# -- the runner ---------------------------------------------------------------------------------------------------


def a_gpu_machine(monkeypatch: pytest.MonkeyPatch, vram_gib: float = 40.0) -> None:
    """Plans made as if for a GPU of `vram_gib`; the CPU runs them."""
    machine = Machine(vram=int(vram_gib * GIB), ram=64 * GIB)
    monkeypatch.setattr(generate, "this_machine", lambda config, device, fp8: machine)


async def test_a_job_that_runs_out_of_gpu_memory_is_made_once_more_on_a_leaner_plan(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    a_gpu_machine(monkeypatch)
    calls = []
    real_call = WanPipeline.__call__

    def out_of_memory_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(self)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(WanPipeline, "__call__", out_of_memory_once)
    job = (await submit(engine, Mode.T2V, frames=5)).result.job
    said: list[Progress] = []
    output = await asyncio.to_thread(engine._runner.run, job, [], RunHooks(on_progress=said.append))
    assert output.frames.shape == (5, 64, 64, 3)
    assert len(calls) == 2 and calls[0] is not calls[1]  # reloaded for the new plan
    retry = [progress.detail for progress in said if "ran out of memory" in progress.detail]
    assert retry == ["the GPU ran out of memory (gpu); trying once more with model_offload"]
    assert engine._runner.loaded.plan.memory == "model_offload"


async def test_running_out_of_memory_while_loading_is_tried_once_more_on_a_leaner_plan(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    a_gpu_machine(monkeypatch)
    loads: list[str] = []
    real_load = generate._load

    def out_of_memory_once(pipeline_class: Any, folder: Path, device: Any, plan: Plan, vae_bf16: bool) -> Any:
        loads.append(plan.memory)
        if len(loads) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory while loading")
        return real_load(pipeline_class, folder, device, plan, vae_bf16)

    monkeypatch.setattr(generate, "_load", out_of_memory_once)
    job = (await submit(engine, Mode.T2V, frames=5)).result.job
    output = await asyncio.to_thread(engine._runner.run, job, [], RunHooks())
    assert output.frames.shape == (5, 64, 64, 3) and loads == ["gpu", "model_offload"]


async def test_a_job_that_runs_out_of_memory_twice_fails_saying_what_to_lower(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    a_gpu_machine(monkeypatch)

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(WanPipeline, "__call__", out_of_memory)
    job = (await submit(engine, Mode.T2V, frames=5)).result.job
    with pytest.raises(generate.OutOfMemory, match="ran out of memory making 64x64, 5 frames"):
        await asyncio.to_thread(engine._runner.run, job, [], RunHooks())
    assert engine._runner.loaded is None


async def test_a_plan_that_changes_with_the_jobs_size_places_the_pipeline_again_without_reloading(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
):
    a_gpu_machine(monkeypatch)

    def by_width(model: Any, params: Any, *_args: Any, **_kwargs: Any) -> Plan:
        return TEXT_SWAPPED if params.width == 64 else SWAP

    monkeypatch.setattr(generate, "plan_job", by_width)
    await submit(engine, Mode.T2V, frames=5, user="a")
    await run_all(engine)
    pipeline = engine._runner.loaded.pipeline
    first = engine._runner.loaded.placement
    await submit(engine, Mode.T2V, frames=5, resolution="128x64", user="b")
    await run_all(engine)
    assert engine._runner.loaded.pipeline is pipeline  # not loaded again
    assert engine._runner.loaded.placement is not first and engine._runner.loaded.plan.memory == "model_offload"
    # The LoRAs fused under the first placement come out through the second, exactly.
    quality = (await submit(engine, Mode.T2V, frames=5, preset="quality", seed=9, user="c")).result.job
    await pipeline_frames(engine, quality)
    assert engine._runner.loaded.pipeline is pipeline and engine._runner.loaded.loras.names == []
    fresh = WanPipeline.from_pretrained(engine._runner.loaded.folder)
    for expert in ("transformer", "transformer_2"):
        restored = dict(getattr(pipeline, expert).named_parameters())
        for name, parameter in getattr(fresh, expert).named_parameters():
            assert torch.equal(restored[name], parameter), name  # bit for bit the model's own weights


async def test_a_worker_on_a_gpu_says_each_modes_plan_at_start(engine: Engine, monkeypatch: pytest.MonkeyPatch):
    said: list[str] = []
    await engine.say_plans(said.append)
    assert said == []  # no GPU: everything runs on the CPU, and the device line said so
    a_gpu_machine(monkeypatch)
    for mode in Mode:  # built, as a first job would
        engine._runner._locate(generate.resolve_model("tiny", mode), RunHooks())
    await engine.say_plans(said.append)
    assert [line.split(":")[0] for line in said] == [
        "plan for t2v (64x64, 9 frames, fast)",
        "plan for i2v (64x64, 9 frames, fast)",
        "plan for ti2v (64x64, 9 frames, fast)",
    ]
    assert all("text encoder GPU, transformers GPU, VAE decoding whole; peak" in line for line in said), said


def test_host_copies_are_packed_into_a_few_power_of_two_buffers_with_their_values():
    """torch's pinned allocator rounds each allocation up to a power of two: packed, little is lost to it."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(count, generator=generator) for count in (1000, 700, 300, 100, 90, 9)]
    tensors.append(torch.tensor(3.0))  # a 0-d tensor too
    before = [tensor.clone() for tensor in tensors]
    Copier(CPU).pin_in_place(tensors, slab_bytes=4096)
    for tensor, value in zip(tensors, before, strict=True):
        assert torch.equal(tensor, value) and tensor.shape == value.shape
    storages = {tensor.untyped_storage().data_ptr(): tensor.untyped_storage().nbytes() for tensor in tensors}
    assert len(storages) < len(tensors)
    assert all(size & (size - 1) == 0 for size in storages.values())  # what the allocator gives exactly
    assert sum(storages.values()) < 2 * sum(value.numel() * 4 for value in before)


def test_an_fp8_plan_quantizes_each_expert_on_the_device_after_its_lora_is_fused(tmp_path: Path):
    reference, files = saved_with_loras(tmp_path)
    base = reference.transformer.blocks[0].attn1.to_q.weight.clone()
    quantized: list[torch.Tensor] = []
    fp8 = Plan("gpu", Where.SWAPPED, Where.GPU_FP8, False, 0, 0, None)
    placement = Placement(
        reference, fp8, CPU, quantize=lambda expert: quantized.append(expert.blocks[0].attn1.to_q.weight.clone())
    )
    assert quantized == []  # not before the LoRA is in
    LoraSlot(reference, SavedWeights(tmp_path / "model"), placement.editing).switch(files)
    placement.settle()
    assert len(quantized) == 2  # once each, one after the other
    assert not torch.equal(quantized[0], base)  # with the LoRA fused


def test_the_first_steps_time_left_leaves_out_what_came_before_the_first_pass():
    """Encoding the prompt (and an image, a swap) before the first pass must not count as a step: the time left
    after step 1 was up to 25 times too long."""
    from engine.pipeline.generate import StepTracker
    from engine.pipeline.models import TINY_SPECS

    now = [0.0]
    said: list[Progress] = []
    pipeline = tiny()
    # The text encoder takes 100 s, each transformer pass 1 s.
    pipeline.text_encoder.register_forward_hook(lambda *_: now.__setitem__(0, now[0] + 100))
    for expert in (pipeline.transformer, pipeline.transformer_2):
        expert.register_forward_hook(lambda *_: now.__setitem__(0, now[0] + 1))
    tracker = StepTracker(TINY_SPECS[Mode.T2V], 4, RunHooks(on_progress=said.append, clock=lambda: now[0]))
    tracker.start()
    with tracker.watching(pipeline):
        fast_run(pipeline, lambda pipe, step: tracker.on_step_end(pipe, step, pipe.scheduler.timesteps[step], {}))
    after_first = next(progress for progress in said if progress.step == 1)
    assert after_first.eta_s == pytest.approx(3.0)  # three steps of 1 s, not three of 101
