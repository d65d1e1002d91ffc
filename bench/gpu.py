"""The real Wan 2.2 models' speed and memory: per step and per expert, text encode, VAE decode, MP4 encode, MFU.

With a CUDA GPU (`--size real`, the default there) the models are built at their real configurations with random
bf16 weights (nothing is downloaded: UMT5-XXL, the TI2V-5B transformer and Wan 2.2 VAE, the two 14B experts of
T2V-A14B and of I2V-A14B with the Wan 2.1 VAE) and run through the real diffusers pipelines with wanbot's own
placement (`place_pipeline`), flow-shift correction and VAE tiling rule. Random prompt embeddings of the real shape
stand in for the text encoder inside the pipelines; the encoder is timed on its own. On a CPU (`--size tiny`, the
default there) the same plan runs the tiny pipelines at 64x64x9, to show the script works; those figures say
nothing about a GPU.

The plan runs in order of value and skips what its time budget (`--budget-s`) cannot fit, so one call on a lent
machine returns every figure it had time for. Each figure is printed and, with `--out`, appended as a JSON line.

Variants: `quality` is the official setting (classifier-free guidance: two transformer passes a step); `fast` is
the fast preset's sampling as wanbot runs it (engine/pipeline/samplers.py: LightX2V's 4 sigmas, 2 steps per expert, or
FastWan's 3 DMD steps; guidance 1: one pass a step). `fast-preset` runs it as wanbot does end to end: random LoRAs
of LightX2V's rank (64) and key layout fused into both experts (timed, and taken out again, timed), then each
speed-up alone and together (engine/pipeline/speedups.py: the attention kernel wanbot would pick, fp8 with torchao,
compiled blocks; the first compiled run includes the compilation). `passes` needs no GPU: the transformer passes of one
video per mode and preset, counted on the tiny pipelines with each preset's real schedule (the count does not
depend on the size), times the FLOPs of one pass of the real model at its real size (built on the meta device).

    .venv/bin/python bench/gpu.py [--size real|tiny] [--budget-s 520]
        [--only passes,text,ti2v,t2v,fast-preset,i2v,t2v-720p] [--out figures.jsonl]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from PIL import Image
from transformers import UMT5Config, UMT5EncoderModel

from engine.config import GenerationConfig
from engine.pipeline.generate import correct_flow_shift, place_pipeline, set_vae_tiling
from engine.pipeline.loras import FusedLoras, random_lightx2v_lora, write_lora
from engine.pipeline.models import I2V_A14B, T2V_A14B, TI2V_5B, ModelSpec
from engine.pipeline.passes import PassCounter
from engine.pipeline.presets import FASTWAN_DMD, LIGHTX2V_EULER, Sampling
from engine.pipeline.samplers import scheduled
from engine.pipeline.speedups import Choice, Speedups, apply_speedups, choose_speedups
from engine.pipeline.tiny import build_tiny_pipeline
from engine.pipeline.video import encode_mp4
from engine.storage.images import Mode

# Dense bf16 tensor-core peaks (no sparsity), by a fragment of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
TEXT_TOKENS = 512
LIGHTX2V_RANK = 64
# Measured on the H200 (BENCHMARKS.md), whose dense bf16 peak is the H100 SXM's: the expected H100 seconds.
H100_BF16_TFLOPS = 989.0
MEASURED_MFU = {Mode.T2V: 0.57, Mode.I2V: 0.44, Mode.TI2V: 0.46}

A14B_TRANSFORMER = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
I2V_TRANSFORMER = {**A14B_TRANSFORMER, "in_channels": 36}  # 16 noise + 4 mask + 16 image-condition channels
TI2V_TRANSFORMER = {**A14B_TRANSFORMER, "num_attention_heads": 24, "in_channels": 48, "out_channels": 48}
TI2V_TRANSFORMER.update(ffn_dim=14336, num_layers=30)
A14B_VAE: dict[str, Any] = {}  # the Wan 2.1 VAE is AutoencoderKLWan's default
TI2V_VAE = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}
UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
}


@dataclass
class Model:
    name: str
    kind: Mode
    spec: ModelSpec
    transformer: dict[str, Any]
    vae: dict[str, Any]


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


@dataclass
class Bench:
    device: str
    dtype: torch.dtype
    real: bool
    deadline: float
    out: Path | None
    peak_tflops: float | None
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
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else 0.0


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


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


def tokens(pipeline: Any, height: int, width: int, frames: int) -> int:
    spatial = pipeline.vae_scale_factor_spatial * pipeline.transformer.config.patch_size[1]
    latent_frames = (frames - 1) // pipeline.vae_scale_factor_temporal + 1
    return latent_frames * (height // spatial) * (width // spatial)


def pass_flops(transformer: Any, sequence: int) -> float:
    """Model FLOPs of one transformer pass: 2 per parameter per token, plus self- and cross-attention scores."""
    params = sum(parameter.numel() for parameter in transformer.parameters())
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    attention = config.num_layers * 4 * width * (sequence * sequence + sequence * TEXT_TOKENS)
    return 2 * params * sequence + attention


def fast_sampling(spec: ModelSpec) -> Sampling:
    return LIGHTX2V_EULER if spec.two_experts else FASTWAN_DMD


def run_pipeline(pipeline: Any, model: Model, run: Run, bench: Bench, strategy: str) -> dict[str, Any]:
    height, width, frames = run.size
    spec = model.spec
    sampling = fast_sampling(spec) if run.fast else None
    steps = sampling.steps if sampling else run.steps
    text_dim = pipeline.transformer.config.text_dim
    embeds = torch.randn(1, TEXT_TOKENS, text_dim, dtype=pipeline.transformer.dtype, device=bench.device)
    arguments: dict[str, Any] = {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": torch.zeros_like(embeds),
        "height": height,
        "width": width,
        "num_frames": frames,
        "num_inference_steps": steps,
        "guidance_scale": 1.0 if run.fast else spec.guidance,
        "generator": torch.Generator().manual_seed(0),
        "output_type": "np" if run.decode else "latent",
    }
    if spec.two_experts:
        arguments["guidance_scale_2"] = 1.0 if run.fast else spec.guidance_2
    if model.kind is Mode.I2V:
        arguments["image"] = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), np.uint8))
    boundary = (spec.boundary_ratio or 0) * 1000
    marks: list[tuple[float, str]] = []

    def on_step(_pipeline: Any, _step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        bench.sync()
        expert = "high" if not spec.two_experts or float(timestep) >= boundary else "low"
        marks.append((time.perf_counter(), expert))
        return kwargs

    arguments["callback_on_step_end"] = on_step
    set_vae_tiling(pipeline, "auto", width, height)
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats()
    resident = bench.allocated_gib()
    started = time.perf_counter()
    with scheduled(pipeline, sampling, seed=0), PassCounter(pipeline) as passes:
        output = pipeline(**arguments)
    bench.sync()
    finished = time.perf_counter()
    sequence = tokens(pipeline, height, width, frames)
    cfg = not run.fast
    flops = pass_flops(pipeline.transformer, sequence) * (2 if cfg else 1)
    figures: dict[str, Any] = {
        "what": f"{model.name} {run.label}",
        "strategy": strategy,
        "size": f"{width}x{height}x{frames}",
        "steps": steps,
        "passes_per_step": 2 if cfg else 1,
        "transformer_calls": passes.calls,
        "tokens": sequence,
        # The first step also holds the scheduler set-up, the image's VAE encode (i2v) and, offloading, the first
        # transfer; each expert's first step after the switch holds the swap: steady means leave both out.
        "first_step_s": marks[0][0] - started,
    }
    steps = list(itertools.pairwise(marks))
    for expert in ("high", "low"):
        steady = [later - earlier for (earlier, before), (later, name) in steps if before == name == expert]
        if steady:
            figures[f"{expert}_step_s"] = sum(steady) / len(steady)
    switch = [later - earlier for (earlier, before), (later, name) in steps if before != name]
    if switch:
        figures["switch_step_s"] = switch[0]
    step_s = figures.get("high_step_s") or figures.get("low_step_s")
    if step_s:
        figures["tflop_per_step"] = flops / 1e12
        if bench.peak_tflops:
            figures["mfu"] = f"{flops / step_s / (bench.peak_tflops * 1e12):.0%}"
        # Denoising one whole video: the official step count, or the fast preset's whole schedule.
        figures["denoise_video_s"] = step_s * (sampling.steps if sampling else spec.steps)
    if run.decode:
        figures["vae_decode_s"] = finished - marks[-1][0]
    figures["total_s"] = finished - started
    if bench.cuda:
        figures["resident_gib"] = resident
        figures["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if run.mp4:
        with tempfile.TemporaryDirectory() as folder:
            encode_started = time.perf_counter()
            encode_mp4(output.frames[0], model.spec.fps, Path(folder) / "video.mp4")
            figures["mp4_encode_s"] = time.perf_counter() - encode_started
    return figures


def measure(pipeline: Any, model: Model, run: Run, bench: Bench, strategy: str, need_s: float) -> None:
    if not bench.fits(f"{model.name} {run.label} {strategy}", need_s):
        return
    try:
        bench.report(run_pipeline(pipeline, model, run, bench, strategy))
    except Exception as exc:  # a failure on the GPU is a finding to record, not the end of the plan
        bench.report({"what": f"{model.name} {run.label}", "strategy": strategy, "failed": repr(exc)[:300]})
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


def ti2v(bench: Bench, size: tuple[int, int, int]) -> None:
    if not bench.fits("TI2V-5B", 90):
        return
    pipeline = build(TI2V, bench)
    place_pipeline(pipeline, "gpu", bench.device)
    measure(pipeline, TI2V, Run("quality", size, 3, decode=True, mp4=True), bench, "gpu", 60)
    measure(pipeline, TI2V, Run("fast (3 passes)", size, 3, fast=True), bench, "gpu", 20)
    del pipeline
    bench.free()


def t2v(bench: Bench, size: tuple[int, int, int]) -> None:
    if not bench.fits("T2V-A14B", 120):
        return
    pipeline = build(T2V, bench)
    place_pipeline(pipeline, "gpu", bench.device)
    measure(pipeline, T2V, Run("quality", size, 6, decode=True, mp4=True), bench, "gpu", 90)
    measure(pipeline, T2V, Run("fast (4 passes)", size, 4, fast=True), bench, "gpu", 30)
    if bench.cuda:
        for backend in ("_native_cudnn", "_native_flash"):
            with attention_backend(pipeline, backend):
                measure(pipeline, T2V, Run(f"fast attention={backend}", size, 3, fast=True), bench, "gpu", 30)
    del pipeline
    bench.free()


def fast_preset(bench: Bench, size: tuple[int, int, int]) -> None:
    """T2V-A14B's fast preset as wanbot runs it: a LoRA pair fused into both experts, then each speed-up alone and
    together. fp8 comes last: its weights can be neither fused into nor restored."""
    if not bench.fits("T2V-A14B fast preset", 240):
        return
    pipeline = build(T2V, bench)
    place_pipeline(pipeline, "gpu", bench.device)
    with tempfile.TemporaryDirectory() as folder:
        rank = LIGHTX2V_RANK if bench.real else 4
        high, low = random_lora_pair(pipeline, Path(folder), rank)
        started = time.perf_counter()
        fused = FusedLoras(pipeline, high, low)
        bench.sync()
        fuse_s = time.perf_counter() - started
        bench.report({"what": "T2V-A14B LoRA pair, fused", "rank": rank, "fuse_s": fuse_s})
        measure(pipeline, T2V, Run("fast, LoRAs fused", size, 0, fast=True, decode=True, mp4=True), bench, "gpu", 40)
        started = time.perf_counter()
        fused.restore()
        bench.sync()
        bench.report(
            {"what": "T2V-A14B LoRA pair, taken out for a quality job", "restore_s": time.perf_counter() - started}
        )
        FusedLoras(pipeline, high, low)
    if not bench.cuda:
        return
    off = Choice("off", "not measured here")
    attention = choose_speedups(GenerationConfig(attention="on"), torch.device(bench.device)).attention
    bench.report({"what": "attention kernel wanbot picks here", "kernel": attention.value, "why": attention.reason})
    if attention.value != "native":
        with attention_backend(pipeline, attention.value):
            measure(pipeline, T2V, Run(f"fast attention={attention.value}", size, 0, fast=True), bench, "gpu", 30)
    fp8 = choose_speedups(GenerationConfig(fp8="on"), torch.device(bench.device)).fp8
    if fp8.value == "on" and bench.fits("T2V-A14B fast fp8", 60):
        apply_speedups(pipeline, Speedups(Choice("native", "default"), fp8, off))
        measure(pipeline, T2V, Run("fast fp8", size, 0, fast=True), bench, "gpu", 30)
    else:
        bench.report({"what": "T2V-A14B fast fp8", "skipped": fp8.reason})
    if bench.fits("T2V-A14B fast compiled (+fp8 if on above)", 150):
        apply_speedups(pipeline, Speedups(Choice("native", "default"), off, Choice("on", "measured")))
        measure(pipeline, T2V, Run("fast compiled, first run", size, 0, fast=True), bench, "gpu", 120)
        measure(pipeline, T2V, Run("fast compiled", size, 0, fast=True), bench, "gpu", 30)
        with attention_backend(pipeline, attention.value):
            label = f"fast all together (attention={attention.value}, fp8={fp8.value}, compiled)"
            measure(pipeline, T2V, Run(label, size, 0, fast=True), bench, "gpu", 60)
    del pipeline
    bench.free()


def random_lora_pair(pipeline: Any, folder: Path, rank: int) -> tuple[Path, Path]:
    """LoRA files in LightX2V's layout for the pipeline's experts (made on the CPU, in bf16 on a GPU run)."""
    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if pipeline.transformer.dtype == torch.bfloat16 else torch.float32
    paths = []
    for expert, name in ((pipeline.transformer, "high.safetensors"), (pipeline.transformer_2, "low.safetensors")):
        paths.append(write_lora(random_lightx2v_lora(expert, rank, generator, dtype=dtype), folder / name))
    return paths[0], paths[1]


def passes_per_video(bench: Bench) -> None:
    """Passes of one video per mode and preset, counted with the real schedules, times the real per-pass FLOPs."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    sizes = {Mode.T2V: [(480, 832, 81), (720, 1280, 81)], Mode.I2V: [(480, 832, 81), (720, 1280, 81)]}
    sizes[Mode.TI2V] = [(704, 1280, 121)]
    for model in (T2V, I2V, TI2V):
        pipeline = build_tiny_pipeline(model.kind)
        correct_flow_shift(pipeline, model.spec)
        pipeline.set_progress_bar_config(disable=True)
        with torch.device("meta"):
            real = WanTransformer3DModel(**model.transformer)
        for preset in ("quality", "fast"):
            calls = count_passes(pipeline, model.spec, preset == "fast", image if model.kind is Mode.I2V else None)
            for height, width, frames in sizes[model.kind]:
                flops = sum(calls.values()) * pass_flops(real, real_tokens(model, height, width, frames))
                seconds = flops / (H100_BF16_TFLOPS * 1e12 * MEASURED_MFU[model.kind])
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


def real_tokens(model: Model, height: int, width: int, frames: int) -> int:
    """`tokens` for the real model, whose VAE compresses 4x in time and 8x (A14B) or 16x (TI2V) in space."""
    spatial = (16 if model.kind is Mode.TI2V else 8) * model.transformer["patch_size"][1]
    return ((frames - 1) // 4 + 1) * (height // spatial) * (width // spatial)


def i2v(bench: Bench, size: tuple[int, int, int]) -> None:
    """All on the GPU, then the offload strategies smaller cards get, on the same weights moved back to the CPU."""
    if not bench.fits("I2V-A14B", 120):
        return
    pipeline = build(I2V, bench)
    place_pipeline(pipeline, "gpu", bench.device)
    measure(pipeline, I2V, Run("quality", size, 3, decode=True), bench, "gpu", 60)
    if bench.cuda:
        pipeline.to("cpu")
        bench.free()
        place_pipeline(pipeline, "model_offload", bench.device)
        measure(pipeline, I2V, Run("quality", size, 3, decode=True), bench, "model_offload", 90)
        pipeline.remove_all_hooks()
        pipeline.to("cpu")
        bench.free()
        place_pipeline(pipeline, "group_offload", bench.device)
        measure(pipeline, I2V, Run("quality", size, 2), bench, "group_offload", 90)
    del pipeline
    bench.free()


def t2v_720p_and_compiled(bench: Bench, size_720p: tuple[int, int, int], size_480p: tuple[int, int, int]) -> None:
    if not bench.fits("T2V-A14B 720p", 150):
        return
    pipeline = build(T2V, bench)
    place_pipeline(pipeline, "gpu", bench.device)
    measure(pipeline, T2V, Run("quality 720p", size_720p, 2, decode=True), bench, "gpu", 140)
    if bench.cuda and bench.fits("T2V-A14B compiled", 150):
        pipeline.transformer.compile_repeated_blocks(fullgraph=True)
        pipeline.transformer_2.compile_repeated_blocks(fullgraph=True)
        measure(pipeline, T2V, Run("fast compiled, first run", size_480p, 3, fast=True), bench, "gpu", 120)
        measure(pipeline, T2V, Run("fast compiled", size_480p, 4, fast=True), bench, "gpu", 30)
    del pipeline
    bench.free()


def main() -> None:
    parser = argparse.ArgumentParser()
    has_gpu = torch.cuda.is_available()
    parser.add_argument("--size", choices=("real", "tiny"), default="real" if has_gpu else "tiny")
    parser.add_argument("--budget-s", type=float, default=520, help="skip what would run past this many seconds")
    parser.add_argument(
        "--only", default="text,ti2v,t2v,fast-preset,i2v,t2v-720p", help="which parts of the plan, in order"
    )
    parser.add_argument("--out", type=Path, help="append each figure here as a JSON line")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when not in the table")
    args = parser.parse_args()
    device = "cuda" if has_gpu else "cpu"
    real = args.size == "real"
    peak = args.peak_tflops
    if peak is None and has_gpu:
        name = torch.cuda.get_device_name()
        peak = next((tflops for fragment, tflops in PEAK_BF16_TFLOPS.items() if fragment in name), None)
    bench = Bench(
        device=device,
        dtype=torch.bfloat16 if has_gpu else torch.float32,
        real=real,
        deadline=time.monotonic() + args.budget_s,
        out=args.out,
        peak_tflops=peak,
    )
    bench.report(
        {
            "what": "device",
            "name": torch.cuda.get_device_name() if has_gpu else "CPU",
            "torch": torch.__version__,
            "size": args.size,
            "peak_bf16_tflops": peak,
        }
    )
    tiny = (64, 64, 9)
    ti2v_size = (704, 1280, 121) if real else tiny
    a14b_size = (480, 832, 81) if real else tiny
    plan = {
        "passes": lambda: passes_per_video(bench),
        "text": lambda: text_encoder(bench),
        "ti2v": lambda: ti2v(bench, ti2v_size),
        "t2v": lambda: t2v(bench, a14b_size),
        "fast-preset": lambda: fast_preset(bench, a14b_size),
        "i2v": lambda: i2v(bench, a14b_size),
        "t2v-720p": lambda: t2v_720p_and_compiled(bench, (720, 1280, 81) if real else tiny, a14b_size),
    }
    for part in args.only.split(","):
        plan[part]()


if __name__ == "__main__":
    main()
