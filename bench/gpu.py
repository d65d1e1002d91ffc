"""The real Wan 2.2 models' speed and memory: whole videos per planned placement, per step and per expert, text
encode, VAE decode, MP4 encode, MFU, LoRA switches.

With a CUDA GPU (`--size real`, the default there) the models are built at their real configurations
(engine/pipeline/footprint.py) with random bf16 weights (nothing is downloaded: UMT5-XXL, the TI2V-5B transformer
and Wan 2.2 VAE, the two 14B experts of T2V-A14B and of I2V-A14B with the Wan 2.1 VAE) and run through the real
diffusers pipelines with wanbot's own placement: a plan from the planner (engine/pipeline/planner.py) put into effect
by `Placement` (engine/pipeline/placement.py), the plan's VAE tiling, the flow-shift correction. On a CPU
(`--size tiny`, the default there) the same parts run the tiny pipelines at 64x64x9, to show the script works; those
figures say nothing about a GPU.

The parts run in the order given and skip what the time budget (`--budget-s`) cannot fit, so one call on a lent
machine returns every figure it had time for. Each figure is printed and, with `--out`, appended as a JSON line.

- `passes` (no GPU needed): the transformer passes of one video per mode and preset, counted on the tiny pipelines
  with each preset's real schedule (the count does not depend on the size), times the FLOPs of one pass of the real
  model at its real size, and the H100 seconds that makes at the MFU measured on the H200.
- `text`: UMT5-XXL encoding a prompt and a negative prompt of 512 tokens.
- `plans`: WHOLE fast T2V-A14B 480p videos as wanbot makes them, for the plan the planner picks on cards of 80, 48,
  32 and 24 GiB (a smaller card is simulated with `torch.cuda.set_per_process_memory_fraction`; the 80 GiB card is
  the whole device where it has less): prompt encoded by a real-size UMT5-XXL (swapped in where the plan says so),
  LightX2V's 4 steps with any expert swaps and prefetches, VAE decode to numpy, MP4 encode. Each figure puts the
  planner's prediction (`predicted_s`, `predicted_peak_gib`) beside the measurement (`total_s` = `text_s` +
  `denoise_s` + `decode_s` + `mp4_encode_s`, `peak_gib`, `copied_gib` moved by swaps). wanbot's default speed-ups
  are on (fp8 where the plan keeps the experts on the GPU); then once more compiled, on the 80 GiB card.
- `ti2v`, `t2v`, `i2v`, `t2v-720p`: steps of the `quality` setting (the official one: classifier-free guidance,
  two transformer passes a step) and of `fast` (the fast preset's sampling, engine/pipeline/samplers.py: LightX2V's
  4 sigmas, 2 steps per expert, or FastWan's 3 DMD steps; guidance 1, one pass a step), with random prompt
  embeddings of the real shape, each on the planner's plan of the placement named in `memory` for this card;
  `i2v` also with model and group offload, `t2v-720p` also compiled.
- `fast-preset`: T2V-A14B's fast preset end to end. A LoRA pair of LightX2V's rank (64) and key layout is fused into
  both experts (timed) and taken out again by reading the original weights back from the model's saved files
  (timed), then fused once more; the first 4 blocks (all blocks on the tiny model) and the head are saved and the
  LoRAs cover just those, so both the measured times and the times scaled to all blocks (`*_scaled_all_blocks`)
  are given, with the host RSS before and after each switch (`rss_growth_mib`: near zero, as no host copy is
  kept). Then each speed-up alone and together (engine/pipeline/speedups.py: the attention kernel wanbot would pick,
  fp8 with torchao, compiled blocks; the first compiled run includes the compilation).

    .venv/bin/python bench/gpu.py [--size real|tiny] [--budget-s 520] [--peak-tflops N]
        [--only passes,text,plans,ti2v,t2v,fast-preset,i2v,t2v-720p] [--out figures.jsonl]

`--only` defaults to text,plans,ti2v,t2v,fast-preset,i2v,t2v-720p.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from PIL import Image
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

from engine.config import GenerationConfig, Settings
from engine.pipeline.footprint import (
    A14B_TRANSFORMER,
    A14B_VAE,
    GIB,
    I2V_TRANSFORMER,
    TEXT_TOKENS,
    TI2V_TRANSFORMER,
    TI2V_VAE,
    UMT5_XXL,
    Footprint,
    footprint,
)
from engine.pipeline.generate import correct_flow_shift
from engine.pipeline.loras import (
    EXPERTS,
    FusedLoras,
    LoraFiles,
    LoraPair,
    SavedWeights,
    random_lightx2v_lora,
    write_lora,
)
from engine.pipeline.machine import host_available
from engine.pipeline.models import I2V_A14B, T2V_A14B, TI2V_5B, TINY_SPECS, ModelSpec
from engine.pipeline.passes import PassCounter
from engine.pipeline.placement import Placement, expert_order
from engine.pipeline.planner import (
    H100_BF16_TFLOPS,
    PEAK_BF16_TFLOPS,
    JobSize,
    Machine,
    NoPlanFits,
    Plan,
    Where,
    choose,
    margin,
)
from engine.pipeline.presets import FASTWAN_DMD, LIGHTX2V_EULER, Sampling
from engine.pipeline.samplers import scheduled
from engine.pipeline.speedups import Choice, Speedups, apply_speedups, choose_speedups
from engine.pipeline.tiny import build_tiny_pipeline, make_tiny_model
from engine.pipeline.video import encode_mp4
from engine.storage.images import Mode

LIGHTX2V_RANK = 64
LORA_BLOCKS = 4  # blocks of each real expert the fast-preset LoRAs cover; the figures are scaled to all of them
CARDS_GIB = (80, 48, 32, 24)  # the cards the plans part simulates
# Any words of the tiny tokenizer: its ids are valid for UMT5-XXL too, and the pipeline pads to 512 tokens.
PROMPT = " ".join(f"w{index}" for index in range(40))
# A plan of the named placement for the tiny pipelines, nothing costed: their footprint says nothing about a card.
TINY_WHERE = {
    "gpu": (Where.GPU, Where.GPU),
    "model_offload": (Where.SWAPPED, Where.SWAPPED),
    "group_offload": (Where.STREAMED, Where.STREAMED),
    "sequential_offload": (Where.LAYERS, Where.LAYERS),
}
DIFFUSERS_OFFLOAD = ("group_offload", "sequential_offload")  # their hooks take the parts from host memory


@dataclass
class Model:
    name: str
    kind: Mode
    spec: ModelSpec
    transformer: dict[str, Any]
    vae: dict[str, Any]

    @property
    def footprint(self) -> Footprint:
        """The real model's, whatever size runs: for its FLOPs and the placement plans."""
        return footprint(self.spec.family, None)


TI2V = Model("TI2V-5B", Mode.TI2V, TI2V_5B, TI2V_TRANSFORMER, TI2V_VAE)
T2V = Model("T2V-A14B", Mode.T2V, T2V_A14B, A14B_TRANSFORMER, A14B_VAE)
I2V = Model("I2V-A14B", Mode.I2V, I2V_A14B, I2V_TRANSFORMER, A14B_VAE)


@dataclass
class Run:
    """One pipeline call: which setting, at what size, what to time besides the steps."""

    label: str
    size: tuple[int, int, int]  # height, width, frames
    steps: int  # a fast run takes its preset's schedule instead
    fast: bool = False
    decode: bool = False
    mp4: bool = False
    text: bool = False  # encode a prompt with the pipeline's text encoder, not random embeddings


@dataclass
class Bench:
    device: str
    dtype: torch.dtype
    real: bool
    deadline: float
    out: Path | None
    peak_tflops: float | None
    card: str = "CPU"
    vram: int | None = None  # the device's whole memory, bytes; None on a CPU
    results: list[dict[str, Any]] = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, label: str, need_s: float) -> bool:
        if self.real and self.left_s() < need_s:
            self.report({"what": label, "skipped": f"needs about {need_s:.0f} s, {self.left_s():.0f} s left"})
            return False
        return True

    def report(self, figures: dict[str, Any]) -> None:
        self.results.append(figures)
        print(" | ".join(f"{key}={_fmt(value)}" for key, value in figures.items()), flush=True)
        if self.out:
            with self.out.open("a") as file:
                file.write(json.dumps(figures) + "\n")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()  # offload hooks keep reference cycles
        if self.cuda:
            torch.cuda.empty_cache()

    def allocated_gib(self) -> float:
        return torch.cuda.memory_allocated() / GIB if self.cuda else 0.0


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def host_rss_mib() -> float:
    """This process's resident host memory (VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def real_size_defaults(bench: Bench) -> Iterator[None]:
    """Parameters made straight on the GPU in bf16: initialising 14B parameters on the CPU takes many minutes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(bench.dtype)
    try:
        with torch.device(bench.device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build(model: Model, bench: Bench) -> Any:
    """The tiny pipeline for the mode with real-size transformers and VAE, as wanbot loads it (VAE in fp32)."""
    pipeline = build_tiny_pipeline(model.kind)
    if bench.real:
        with real_size_defaults(bench):
            pipeline.transformer = WanTransformer3DModel(**model.transformer).eval()
            if model.spec.two_experts:
                pipeline.transformer_2 = WanTransformer3DModel(**model.transformer).eval()
            pipeline.vae = AutoencoderKLWan(**model.vae).eval()
        pipeline.vae.to(torch.float32)
    correct_flow_shift(pipeline, model.spec)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def named_plan(bench: Bench, model: Model, memory: str, run: Run) -> Plan:
    """The planner's plan with placement `memory` for `run` on this device (its whole memory, no fp8: the parts
    that measure fp8 apply it themselves); for the tiny pipelines, that placement with nothing costed."""
    height, width, frames = run.size
    if not bench.real:
        return Plan(memory, *TINY_WHERE[memory], False, 0, 0, None, "the tiny pipeline: nothing costed")
    size = JobSize(width, height, frames, video_passes(model.spec, run.fast))
    machine = Machine(vram=bench.vram, ram=host_available(), card=bench.card)
    return choose(model.footprint, size, machine, memory=memory)


def place(pipeline: Any, plan: Plan, bench: Bench, vram: int | None = None, per_block: bool = True) -> Placement:
    """Put `plan` into effect, prefetching within a card of `vram` bytes (default: this device's) less its margin."""
    vram = bench.vram if vram is None else vram
    budget = None if vram is None else vram - margin(vram)
    if plan.memory in DIFFUSERS_OFFLOAD:
        pipeline.to("cpu")  # diffusers' hooks keep the parts' host copies; built on the GPU, they come off it
        bench.free()
    return Placement(pipeline, plan, torch.device(bench.device), budget, per_block)


def video_passes(spec: ModelSpec, fast: bool) -> int:
    return fast_sampling(spec).steps if fast else spec.steps * 2


def tokens(pipeline: Any, height: int, width: int, frames: int) -> int:
    spatial = pipeline.vae_scale_factor_spatial * pipeline.transformer.config.patch_size[1]
    latent_frames = (frames - 1) // pipeline.vae_scale_factor_temporal + 1
    return latent_frames * (height // spatial) * (width // spatial)


def fast_sampling(spec: ModelSpec) -> Sampling:
    return LIGHTX2V_EULER if spec.two_experts else FASTWAN_DMD


def run_pipeline(pipeline: Any, model: Model, run: Run, bench: Bench, placement: Placement) -> dict[str, Any]:
    """One call of the pipeline as placed, timed: steps per expert, the prompt's encode, the decode, the MP4."""
    height, width, frames = run.size
    spec = model.spec
    plan = placement.plan
    sampling = fast_sampling(spec) if run.fast else None
    steps = sampling.steps if sampling else run.steps
    arguments: dict[str, Any] = {
        "height": height,
        "width": width,
        "num_frames": frames,
        "num_inference_steps": steps,
        "guidance_scale": 1.0 if run.fast else spec.guidance,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np" if run.decode else "latent",
    }
    if run.text:
        arguments.update(prompt=PROMPT, negative_prompt="w1 w2")  # the negative is encoded only with guidance
    else:
        text_dim = pipeline.transformer.config.text_dim
        embeds = torch.randn(1, TEXT_TOKENS, text_dim, dtype=pipeline.transformer.dtype, device=bench.device)
        arguments.update(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))
    if spec.two_experts:
        arguments["guidance_scale_2"] = 1.0 if run.fast else spec.guidance_2
    if model.kind is Mode.I2V:
        arguments["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8))
    boundary = (spec.boundary_ratio or 0) * 1000
    marks: list[tuple[float, str]] = []
    encoded: list[float] = []

    def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        bench.sync()
        expert = "high" if not spec.two_experts or float(timestep) >= boundary else "low"
        marks.append((time.perf_counter(), expert))
        placement.on_step_end(step, expert_order(pipe, spec.boundary_ratio), plan.activations)
        return kwargs

    def on_encoded(_module: Any, _args: Any, _output: Any) -> None:
        bench.sync()
        encoded.append(time.perf_counter())

    arguments["callback_on_step_end"] = on_step
    if plan.vae_tiled:
        pipeline.vae.enable_tiling()
    else:
        pipeline.vae.disable_tiling()
    hook = pipeline.text_encoder.register_forward_hook(on_encoded)
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = bench.allocated_gib()
    copied = placement.copied_bytes
    started = time.perf_counter()
    try:
        with scheduled(pipeline, sampling, seed=0), PassCounter(pipeline) as passes:
            output = pipeline(**arguments)
        bench.sync()
    finally:
        hook.remove()
    finished = time.perf_counter()
    sequence = tokens(pipeline, height, width, frames)
    cfg = not run.fast
    figures: dict[str, Any] = {
        "what": f"{model.name} {run.label}",
        "memory": plan.memory,
        "tiled": plan.vae_tiled,
        "size": f"{width}x{height}x{frames}",
        "steps": steps,
        "passes_per_step": 2 if cfg else 1,
        "transformer_calls": passes.calls,
        "tokens": sequence,
        # The first step also holds the prompt's encode (with `text`), the scheduler set-up, the image's VAE encode
        # (i2v) and, offloading, the first transfer; each expert's first step after the switch holds the swap:
        # steady means leave both out.
        "first_step_s": marks[0][0] - started,
    }
    pairs = list(itertools.pairwise(marks))
    for expert in ("high", "low"):
        steady = [later - earlier for (earlier, before), (later, name) in pairs if before == name == expert]
        if steady:
            figures[f"{expert}_step_s"] = sum(steady) / len(steady)
    switch = [later - earlier for (earlier, before), (later, name) in pairs if before != name]
    if switch:
        figures["switch_step_s"] = switch[0]
    step_s = figures.get("high_step_s") or figures.get("low_step_s")
    if step_s and bench.real:
        flops = model.footprint.pass_flops(sequence) * (2 if cfg else 1)
        figures["tflop_per_step"] = flops / 1e12
        if bench.peak_tflops:
            figures["mfu"] = f"{flops / step_s / (bench.peak_tflops * 1e12):.0%}"
    if step_s:
        # Denoising one whole video: the official step count, or the fast preset's whole schedule.
        figures["denoise_video_s"] = step_s * (sampling.steps if sampling else spec.steps)
    if encoded:
        figures["text_s"] = encoded[-1] - started  # from the call: tokenizing, any swap in, the encode
    figures["denoise_s"] = marks[-1][0] - (encoded[-1] if encoded else started)
    if run.decode:
        figures["decode_s"] = finished - marks[-1][0]  # the experts leaving, the VAE decode, to numpy
    if run.mp4:
        with tempfile.TemporaryDirectory() as folder:
            encode_started = time.perf_counter()
            encode_mp4(output.frames[0], model.spec.fps, Path(folder) / "video.mp4")
            figures["mp4_encode_s"] = time.perf_counter() - encode_started
    figures["total_s"] = finished - started + figures.get("mp4_encode_s", 0.0)
    figures["copied_gib"] = (placement.copied_bytes - copied) / GIB
    if bench.cuda:
        figures["resident_gib"] = resident
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    return figures


def measure(pipeline: Any, model: Model, run: Run, bench: Bench, placement: Placement, need_s: float) -> None:
    memory = placement.plan.memory
    if not bench.fits(f"{model.name} {run.label} {memory}", need_s):
        return
    try:
        bench.report(run_pipeline(pipeline, model, run, bench, placement))
    except Exception as exc:  # a failure on the GPU is a finding to record, not the end of the plan
        bench.report({"what": f"{model.name} {run.label}", "memory": memory, "failed": repr(exc)[:300]})
        if hasattr(pipeline, "maybe_free_model_hooks"):
            pipeline.maybe_free_model_hooks()
        bench.free()


@contextlib.contextmanager
def attention_backend(pipeline: Any, backend: str) -> Iterator[None]:
    experts = [pipeline.transformer] + ([pipeline.transformer_2] if pipeline.transformer_2 is not None else [])
    try:
        for expert in experts:
            expert.set_attention_backend(backend)
        yield
    finally:
        for expert in experts:
            expert.reset_attention_backend()


def text_encoder(bench: Bench) -> None:
    if not bench.fits("UMT5-XXL text encode", 30):
        return
    started = time.perf_counter()
    tiny = {"vocab_size": 64, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 2}
    config = UMT5_XXL if bench.real else {**UMT5_XXL, **tiny}
    with real_size_defaults(bench):
        encoder = UMT5EncoderModel(UMT5Config(**config)).eval()
    bench.sync()
    built = time.perf_counter() - started
    ids = torch.randint(0, config["vocab_size"], (2, TEXT_TOKENS), device=bench.device)  # prompt and negative
    mask = torch.ones_like(ids)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            begun = time.perf_counter()
            encoder(input_ids=ids, attention_mask=mask)
            bench.sync()
            times.append(time.perf_counter() - begun)
    params = sum(parameter.numel() for parameter in encoder.parameters())
    bench.report(
        {
            "what": "UMT5-XXL text encode, prompt + negative, 512 tokens each",
            "params_b": params / 1e9,
            "build_s": built,
            "first_s": times[0],
            "encode_s": sum(times[1:]) / 3,
            "resident_gib": bench.allocated_gib(),
        }
    )
    del encoder
    bench.free()


def plans(bench: Bench, size: tuple[int, int, int]) -> None:
    """Whole fast T2V-A14B videos for the plan the planner picks on each card, then compiled on the largest."""
    speedups = choose_speedups(GenerationConfig(), torch.device(bench.device))  # wanbot's defaults on this device
    bench.report({"what": "speed-ups wanbot picks here", "fp8": speedups.fp8.value, "why": speedups.describe()})
    height, width, frames = size
    job = JobSize(width, height, frames, video_passes(T2V_A14B, fast=True))
    if bench.real:
        model_size = T2V.footprint
    else:
        with tempfile.TemporaryDirectory() as folder:
            model_size = footprint(TINY_SPECS[Mode.T2V].family, make_tiny_model(Path(folder) / "tiny-t2v", Mode.T2V))
    runs = [(card, speedups, ("whole video",)) for card in CARDS_GIB]
    if bench.cuda:
        compiled = replace(speedups, compile=Choice("on", "measured"))
        runs.append((CARDS_GIB[0], compiled, ("whole video compiled, first run", "whole video compiled")))
    for card, chosen, labels in runs:
        label = f"T2V-A14B fast {labels[-1]}, {card} GiB card"
        if not bench.fits(label, 90 * len(labels) + (120 if chosen.compile.value == "on" else 0)):
            continue
        machine = Machine(vram=card * GIB, ram=host_available(), fp8=chosen.fp8.value == "on", card=bench.card)
        try:
            plan = choose(model_size, job, machine)
        except NoPlanFits as exc:
            bench.report({"what": label, "card_gib": card, "failed": repr(exc)[:300]})
            continue
        whole_videos(bench, plan, card, chosen, labels, size)


def whole_videos(
    bench: Bench, plan: Plan, card: int, speedups: Speedups, labels: tuple[str, ...], size: tuple[int, int, int]
) -> None:
    """T2V-A14B built afresh, placed by `plan` with a real-size text encoder, on a card of `card` GiB: a fast video
    per label, every figure beside the planner's prediction."""
    vram = card * GIB
    planned = {
        "card_gib": card,
        "memory": plan.memory,
        "text_encoder": plan.text_encoder.short,
        "experts": plan.experts.short,
        "tiled": plan.vae_tiled,
        "predicted_s": plan.seconds,
        "predicted_peak_gib": plan.vram / GIB,
    }
    measured = ("total_s", "text_s", "denoise_s", "decode_s", "mp4_encode_s", "peak_gib", "copied_gib")
    steps = ("first_step_s", "high_step_s", "low_step_s", "switch_step_s")
    pipeline: Any = None
    placement: Placement | None = None
    label = labels[0]
    try:
        pipeline = build(T2V, bench)
        if bench.real:
            with real_size_defaults(bench):
                pipeline.text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval()
        compiled = speedups.compile.value == "on"
        placement = place(pipeline, plan, bench, vram, per_block=not compiled)
        apply_speedups(pipeline, speedups, quantize=plan.fp8)
        bench.free()
        if bench.cuda:
            total = torch.cuda.get_device_properties(bench.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, vram / total))
        for label in labels:
            run = Run(label, size, 0, fast=True, decode=True, mp4=True, text=True)
            figures = run_pipeline(pipeline, T2V, run, bench, placement)
            picked = {key: figures[key] for key in (*measured, *steps) if key in figures}
            bench.report({"what": f"T2V-A14B fast {label}", **planned, **picked})
    except Exception as exc:  # a plan that fails on its card is a finding; the next card still runs
        bench.report({"what": f"T2V-A14B fast {label}", **planned, "failed": repr(exc)[:300]})
    finally:
        if bench.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
        if placement is not None:
            placement.remove()
        del pipeline, placement
        bench.free()


def ti2v(bench: Bench, size: tuple[int, int, int]) -> None:
    if not bench.fits("TI2V-5B", 90):
        return
    pipeline = build(TI2V, bench)
    quality = Run("quality", size, 3, decode=True, mp4=True)
    placement = place(pipeline, named_plan(bench, TI2V, "gpu", quality), bench)
    measure(pipeline, TI2V, quality, bench, placement, 60)
    measure(pipeline, TI2V, Run("fast (3 passes)", size, 3, fast=True), bench, placement, 20)
    del pipeline, placement
    bench.free()


def t2v(bench: Bench, size: tuple[int, int, int]) -> None:
    if not bench.fits("T2V-A14B", 120):
        return
    pipeline = build(T2V, bench)
    quality = Run("quality", size, 6, decode=True, mp4=True)
    placement = place(pipeline, named_plan(bench, T2V, "gpu", quality), bench)
    measure(pipeline, T2V, quality, bench, placement, 90)
    measure(pipeline, T2V, Run("fast (4 passes)", size, 4, fast=True), bench, placement, 30)
    if bench.cuda:
        for backend in ("_native_cudnn", "_native_flash"):
            with attention_backend(pipeline, backend):
                run = Run(f"fast attention={backend}", size, 3, fast=True)
                measure(pipeline, T2V, run, bench, placement, 30)
    del pipeline, placement
    bench.free()


def fast_preset(bench: Bench, size: tuple[int, int, int]) -> None:
    """T2V-A14B's fast preset as wanbot runs it: a LoRA pair fused into both experts, then each speed-up alone and
    together. fp8 comes last: its weights can be neither fused into nor restored."""
    if not bench.fits("T2V-A14B fast preset", 240):
        return
    pipeline = build(T2V, bench)
    fused_run = Run("fast, LoRAs fused", size, 0, fast=True, decode=True, mp4=True)
    placement = place(pipeline, named_plan(bench, T2V, "gpu", fused_run), bench)
    with tempfile.TemporaryDirectory() as folder:
        switch_loras(bench, pipeline, placement, Path(folder), fused_run)
    if not bench.cuda:
        return
    off = Choice("off", "not measured here")
    attention = choose_speedups(GenerationConfig(attention="on"), torch.device(bench.device)).attention
    bench.report({"what": "attention kernel wanbot picks here", "kernel": attention.value, "why": attention.reason})
    if attention.value != "native":
        with attention_backend(pipeline, attention.value):
            run = Run(f"fast attention={attention.value}", size, 0, fast=True)
            measure(pipeline, T2V, run, bench, placement, 30)
    fp8 = choose_speedups(GenerationConfig(fp8="on"), torch.device(bench.device)).fp8
    if fp8.value == "on" and bench.fits("T2V-A14B fast fp8", 60):
        apply_speedups(pipeline, Speedups(Choice("native", "default"), fp8, off))
        measure(pipeline, T2V, Run("fast fp8", size, 0, fast=True), bench, placement, 30)
    else:
        bench.report({"what": "T2V-A14B fast fp8", "skipped": fp8.reason})
    if bench.fits("T2V-A14B fast compiled (+fp8 if on above)", 150):
        apply_speedups(pipeline, Speedups(Choice("native", "default"), off, Choice("on", "measured")))
        measure(pipeline, T2V, Run("fast compiled, first run", size, 0, fast=True), bench, placement, 120)
        measure(pipeline, T2V, Run("fast compiled", size, 0, fast=True), bench, placement, 30)
        with attention_backend(pipeline, attention.value):
            label = f"fast all together (attention={attention.value}, fp8={fp8.value}, compiled)"
            measure(pipeline, T2V, Run(label, size, 0, fast=True), bench, placement, 60)
    del pipeline, placement
    bench.free()


def switch_loras(bench: Bench, pipeline: Any, placement: Placement, folder: Path, run: Run) -> None:
    """Fuse a LoRA pair, run, take it out (read back from the saved weights), fuse it again: each switch timed on
    the first blocks and scaled to all, with the host memory it leaves behind."""
    layers = pipeline.transformer.config.num_layers
    blocks = LORA_BLOCKS if bench.real else layers
    scale = layers / blocks
    saved = save_first_blocks(pipeline, folder / "model", blocks)
    rank = LIGHTX2V_RANK if bench.real else 4
    files = random_lora_pair(pipeline, folder, rank, blocks)
    common = {"rank": rank, "blocks": f"{blocks} of {layers}", "scaled": f"x{scale:g} (the head counted each time)"}

    def switch(what: str, action: Any) -> Any:
        before = host_rss_mib()
        started = time.perf_counter()
        result = action()
        bench.sync()
        seconds = time.perf_counter() - started
        after = host_rss_mib()
        bench.report(
            {
                "what": f"T2V-A14B LoRA pair, {what}",
                **common,
                "s": seconds,
                "s_scaled_all_blocks": seconds * scale,
                "rss_before_mib": before,
                "rss_after_mib": after,
                "rss_growth_mib": after - before,
            }
        )
        return result

    fused = switch("fused", lambda: FusedLoras(pipeline, files, saved, placement.editing))
    measure(pipeline, T2V, run, bench, placement, 40)
    switch("taken out for a quality job (read back from the saved files)", fused.restore)
    switch("fused again (a second switch)", lambda: FusedLoras(pipeline, files, saved, placement.editing))


def save_first_blocks(pipeline: Any, folder: Path, blocks: int) -> SavedWeights:
    """Each expert's first `blocks` blocks and its head (proj_out: the LoRAs change it too), saved as a model's own
    files are, for the fused LoRAs to be restored from."""
    prefixes = (*(f"blocks.{index}." for index in range(blocks)), "proj_out.")
    for name in EXPERTS:
        state = getattr(pipeline, name).state_dict()
        kept = {key: value.detach().to("cpu").contiguous() for key, value in state.items() if key.startswith(prefixes)}
        (folder / name).mkdir(parents=True)
        save_file(kept, str(folder / name / SavedWeights.WEIGHTS))
        del state, kept
    gc.collect()
    return SavedWeights(folder)


def random_lora_pair(pipeline: Any, folder: Path, rank: int, blocks: int) -> LoraFiles:
    """LoRA files in LightX2V's layout for the first `blocks` blocks of the pipeline's experts (made on the CPU, in
    bf16 on a GPU run)."""
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if pipeline.transformer.dtype == torch.bfloat16 else torch.float32
    paths = []
    for expert, name in ((pipeline.transformer, "high.safetensors"), (pipeline.transformer_2, "low.safetensors")):
        lora = random_lightx2v_lora(expert, rank, generator, dtype=dtype, blocks=blocks)
        paths.append(write_lora(lora, folder / name))
    return LoraFiles(LoraPair("random", "high.safetensors", "low.safetensors"), paths[0], paths[1])


def passes_per_video(bench: Bench) -> None:
    """Passes of one video per mode and preset, counted with the real schedules, times the real per-pass FLOPs."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    sizes = {Mode.T2V: [(480, 832, 81), (720, 1280, 81)], Mode.I2V: [(480, 832, 81), (720, 1280, 81)]}
    sizes[Mode.TI2V] = [(704, 1280, 121)]
    for model in (T2V, I2V, TI2V):
        pipeline = build_tiny_pipeline(model.kind)
        correct_flow_shift(pipeline, model.spec)
        pipeline.set_progress_bar_config(disable=True)
        real = model.footprint
        for preset in ("quality", "fast"):
            calls = count_passes(pipeline, model.spec, preset == "fast", image if model.kind is Mode.I2V else None)
            for height, width, frames in sizes[model.kind]:
                flops = sum(calls.values()) * real.pass_flops(real.tokens(width, height, frames))
                seconds = flops / (H100_BF16_TFLOPS * 1e12 * real.measured.mfu)
                bench.report(
                    {
                        "what": f"{model.name} {preset} passes per video",
                        "size": f"{width}x{height}x{frames}",
                        "transformer_calls": calls,
                        "pflop_per_video": flops / 1e15,
                        "h100_denoise_s": seconds,
                    }
                )


def count_passes(pipeline: Any, spec: ModelSpec, fast: bool, image: Image.Image | None) -> dict[str, int]:
    sampling = fast_sampling(spec) if fast else None
    arguments: dict[str, Any] = {
        "prompt": "w1",
        "height": 64,
        "width": 64,
        "num_frames": 5,
        "num_inference_steps": sampling.steps if sampling else spec.steps,
        "guidance_scale": 1.0 if fast else spec.guidance,
        "output_type": "latent",
    }
    if spec.two_experts:
        arguments["guidance_scale_2"] = 1.0 if fast else spec.guidance_2
    if image is not None:
        arguments["image"] = image
    with scheduled(pipeline, sampling, seed=0), PassCounter(pipeline) as passes:
        pipeline(**arguments)
    return passes.calls


def i2v(bench: Bench, size: tuple[int, int, int]) -> None:
    """All on the GPU, then the offload plans smaller cards get, on the same weights."""
    if not bench.fits("I2V-A14B", 120):
        return
    pipeline = build(I2V, bench)
    quality = Run("quality", size, 3, decode=True)
    placement = place(pipeline, named_plan(bench, I2V, "gpu", quality), bench)
    measure(pipeline, I2V, quality, bench, placement, 60)
    if bench.cuda:
        for memory, run, need_s in (("model_offload", quality, 90), ("group_offload", Run("quality", size, 2), 90)):
            placement.evict_all()
            placement.remove()
            pipeline.to("cpu")
            bench.free()
            placement = place(pipeline, named_plan(bench, I2V, memory, run), bench)
            measure(pipeline, I2V, run, bench, placement, need_s)
    del pipeline, placement
    bench.free()


def t2v_720p_and_compiled(bench: Bench, size_720p: tuple[int, int, int], size_480p: tuple[int, int, int]) -> None:
    if not bench.fits("T2V-A14B 720p", 150):
        return
    pipeline = build(T2V, bench)
    quality = Run("quality 720p", size_720p, 2, decode=True)
    placement = place(pipeline, named_plan(bench, T2V, "gpu", quality), bench)
    measure(pipeline, T2V, quality, bench, placement, 140)
    if bench.cuda and bench.fits("T2V-A14B compiled", 150):
        pipeline.transformer.compile_repeated_blocks(fullgraph=True)
        pipeline.transformer_2.compile_repeated_blocks(fullgraph=True)
        first = Run("fast compiled, first run", size_480p, 3, fast=True)
        placement.plan = named_plan(bench, T2V, "gpu", first)  # the same placement; the tiling follows the size
        measure(pipeline, T2V, first, bench, placement, 120)
        measure(pipeline, T2V, Run("fast compiled", size_480p, 4, fast=True), bench, placement, 30)
    del pipeline, placement
    bench.free()


def multi_gpu(bench: Bench, model: str) -> None:
    """One video on 1, 2, 4 and 8 GPUs (bench/parallel.py), where this machine has more than one: s/video and
    tokens/s for each group size, and how far each group's frames are from one GPU's."""
    from bench.parallel import job, run

    count = torch.cuda.device_count() if bench.device == "cuda" else 0
    if count < 2:
        bench.report({"what": "parallel", "skipped": f"{count} GPU(s): one video on several needs two or more"})
        return
    with tempfile.TemporaryDirectory(prefix="wanbot-parallel-") as data:
        settings = Settings(data_dir=Path(data), models={"t2v": model}, previews={"enabled": False})
        settings.generation = settings.generation.model_copy(update={"device": "cuda"})
        height, width, frames = (480, 832, 81) if bench.real and model != "tiny" else (64, 64, 9)
        the_job = job(settings.models.t2v, width, height, frames, steps=4)
        tokens = frames // 4 * (height // 16) * (width // 16)
        alone = None
        for ranks in (size for size in (1, 2, 4, 8) if size <= count):
            if not bench.fits(f"parallel {ranks}", need_s=120):
                return
            times, made = run(settings, ranks, the_job, videos=2)
            alone = made if alone is None else alone
            seconds = statistics.median(times)
            bench.report(
                {
                    "what": "parallel",
                    "model": model,
                    "ranks": ranks,
                    "size": f"{width}x{height}x{frames}",
                    "s_per_video": seconds,
                    "tokens_per_s": tokens * 4 / seconds,
                    "max_difference_from_1": float(np.abs(made - alone).max()),
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    has_gpu = torch.cuda.is_available()
    parser.add_argument("--size", choices=("real", "tiny"), default="real" if has_gpu else "tiny")
    parser.add_argument("--budget-s", type=float, default=520, help="skip what would run past this many seconds")
    parser.add_argument(
        "--only",
        default="text,plans,ti2v,t2v,fast-preset,i2v,t2v-720p,parallel",
        help="which parts of the plan, in order",
    )
    parser.add_argument(
        "--parallel-model", default="tiny", help="the model the parallel part runs: tiny, a folder, or a repo on disk"
    )
    parser.add_argument("--out", type=Path, help="append each figure here as a JSON line")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when not in the table")
    args = parser.parse_args()
    device = "cuda" if has_gpu else "cpu"
    real = args.size == "real"
    card = torch.cuda.get_device_name() if has_gpu else "CPU"
    peak = args.peak_tflops
    if peak is None and has_gpu:
        peak = next((tflops for fragment, tflops in PEAK_BF16_TFLOPS.items() if fragment in card), None)
    bench = Bench(
        device=device,
        dtype=torch.bfloat16 if has_gpu else torch.float32,
        real=real,
        deadline=time.monotonic() + args.budget_s,
        out=args.out,
        peak_tflops=peak,
        card=card,
        vram=torch.cuda.get_device_properties(0).total_memory if has_gpu else None,
    )
    bench.report(
        {
            "what": "device",
            "name": card,
            "torch": torch.__version__,
            "size": args.size,
            "peak_bf16_tflops": peak,
            "vram_gib": bench.vram / GIB if bench.vram else None,
        }
    )
    tiny = (64, 64, 9)
    ti2v_size = (704, 1280, 121) if real else tiny
    a14b_size = (480, 832, 81) if real else tiny
    parts = {
        "passes": lambda: passes_per_video(bench),
        "text": lambda: text_encoder(bench),
        "plans": lambda: plans(bench, a14b_size),
        "ti2v": lambda: ti2v(bench, ti2v_size),
        "t2v": lambda: t2v(bench, a14b_size),
        "fast-preset": lambda: fast_preset(bench, a14b_size),
        "i2v": lambda: i2v(bench, a14b_size),
        "t2v-720p": lambda: t2v_720p_and_compiled(bench, (720, 1280, 81) if real else tiny, a14b_size),
        "parallel": lambda: multi_gpu(bench, args.parallel_model),
    }
    for part in args.only.split(","):
        parts[part]()


if __name__ == "__main__":
    main()
