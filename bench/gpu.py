"""The real Wan 2.2 models' speed: seconds per denoising step, VAE decode, peak VRAM and model-FLOPs utilisation.

With a CUDA GPU (`--size real`, the default there) the TI2V-5B and A14B transformers and VAEs are built at their
real configurations with random weights in bf16 (nothing is downloaded) and run through the real diffusers
pipelines at 704x1280x121 (TI2V-5B) and 480x832x81 (A14B), for each memory strategy wanbot uses: all on the GPU,
model offload and group offload. The text encoder is not needed: random prompt embeddings of the real shape stand
in for it. On a CPU (`--size tiny`, the default there) the same code runs the tiny pipelines at a small size, to
show the script works; those figures say nothing about a GPU.

    .venv/bin/python bench/gpu.py [--size real|tiny] [--steps 3] [--models ti2v-5b,a14b] [--strategies ...]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import time
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

from engine.generate import place_pipeline
from engine.images import Mode
from engine.tiny import build_tiny_pipeline

# Dense bf16 tensor-core peaks (no sparsity), by a fragment of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
TEXT_TOKENS = 512

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


@dataclass
class Workload:
    name: str
    kind: Mode
    height: int
    width: int
    frames: int
    guidance: float
    experts: int
    transformer: dict[str, Any]
    vae: dict[str, Any]


REAL = {
    "ti2v-5b": Workload("TI2V-5B", Mode.TI2V, 704, 1280, 121, 5.0, 1, TI2V_TRANSFORMER, TI2V_VAE),
    "a14b": Workload("T2V-A14B", Mode.T2V, 480, 832, 81, 4.0, 2, A14B_TRANSFORMER, A14B_VAE),
}


def build(workload: Workload, size: str, dtype: torch.dtype, device: str) -> WanPipeline:
    """The tiny pipeline for the mode, with the transformers and VAE swapped for real-size ones when asked."""
    pipeline = build_tiny_pipeline(workload.kind)
    if size == "real":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            # Built straight on the GPU: initialising 14B parameters on the CPU takes many minutes.
            with torch.device(device):
                pipeline.transformer = WanTransformer3DModel(**workload.transformer).eval()
                if workload.experts == 2:
                    pipeline.transformer_2 = WanTransformer3DModel(**workload.transformer).eval()
                pipeline.vae = AutoencoderKLWan(**workload.vae).eval()
        finally:
            torch.set_default_dtype(previous)
        pipeline.vae.to(torch.float32)  # the VAE runs in fp32, as wanbot runs it
        pipeline.to("cpu")  # every strategy starts from the CPU, as after a load
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def tokens(pipeline: WanPipeline, height: int, width: int, frames: int) -> int:
    spatial = pipeline.vae_scale_factor_spatial * pipeline.transformer.config.patch_size[1]
    latent_frames = (frames - 1) // pipeline.vae_scale_factor_temporal + 1
    return latent_frames * (height // spatial) * (width // spatial)


def step_flops(pipeline: WanPipeline, sequence: int, cfg: bool) -> float:
    """Model FLOPs of one denoising step: 2 per parameter per token, plus self- and cross-attention scores."""
    transformer = pipeline.transformer
    params = sum(parameter.numel() for parameter in transformer.parameters())
    config = transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    attention = config.num_layers * 4 * width * (sequence * sequence + sequence * TEXT_TOKENS)
    return (2 * params * sequence + attention) * (2 if cfg else 1)


def run_once(
    pipeline: WanPipeline, workload: Workload, args: argparse.Namespace, size: tuple[int, int, int], device: str
) -> dict[str, float]:
    height, width, frames = size
    text_dim = pipeline.transformer.config.text_dim
    dtype = pipeline.transformer.dtype
    # On the GPU already: the pipeline casts given embeddings but does not move them, and with everything on the GPU
    # (no offload hooks to move inputs) CPU embeddings would fail at the first step.
    embeds = torch.randn(1, TEXT_TOKENS, text_dim, dtype=dtype, device=device)
    marks: list[float] = []

    def on_step(_pipeline: Any, _step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        return kwargs

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    pipeline(
        prompt_embeds=embeds,
        negative_prompt_embeds=torch.zeros_like(embeds),
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=args.steps,
        guidance_scale=workload.guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        callback_on_step_end=on_step,
    )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    finished = time.perf_counter()
    # The first step also holds the scheduler set-up and, when offloading, the first transfer: report it apart.
    steady = [later - earlier for earlier, later in itertools.pairwise(marks)]
    return {
        "first_step_s": marks[0] - started,
        "step_s": sum(steady) / len(steady) if steady else marks[0] - started,
        "decode_s": finished - marks[-1],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0,
    }


def peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peak for fragment, peak in PEAK_BF16_TFLOPS.items() if fragment in name), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    has_gpu = torch.cuda.is_available()
    parser.add_argument("--size", choices=("real", "tiny"), default="real" if has_gpu else "tiny")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--models", default="ti2v-5b,a14b")
    parser.add_argument("--strategies", default="gpu,model_offload,group_offload" if has_gpu else "cpu")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, when not in the table")
    args = parser.parse_args()
    device = "cuda" if has_gpu else "cpu"
    dtype = torch.bfloat16 if has_gpu else torch.float32
    peak = peak_tflops(device, args.peak_tflops)
    print(f"device: {torch.cuda.get_device_name() if has_gpu else 'CPU'}; size {args.size}; {args.steps} steps")
    for key in args.models.split(","):
        workload = REAL[key]
        size = (workload.height, workload.width, workload.frames) if args.size == "real" else (64, 64, 9)
        for strategy in args.strategies.split(","):
            pipeline = build(workload, args.size, dtype, device)
            place_pipeline(pipeline, strategy, device)
            sequence = tokens(pipeline, *size)
            flops = step_flops(pipeline, sequence, cfg=workload.guidance > 1)
            label = f"{workload.name} {size[0]}x{size[1]}x{size[2]} {strategy}"
            try:
                figures = run_once(pipeline, workload, args, size, device)
            except torch.OutOfMemoryError:
                print(f"{label}: out of GPU memory")
                continue
            finally:
                del pipeline
                gc.collect()  # offload hooks keep reference cycles; free the 28 GB before the next build
                if has_gpu:
                    torch.cuda.empty_cache()
            line = (
                f"{label}: {figures['step_s']:.2f} s/step (first {figures['first_step_s']:.2f} s), "
                f"VAE decode {figures['decode_s']:.2f} s, {sequence} tokens, {flops / 1e12:.3g} TFLOP/step"
            )
            if has_gpu:
                line += f", peak VRAM {figures['peak_gib']:.1f} GiB"
            if peak:
                line += f", MFU {flops / figures['step_s'] / (peak * 1e12):.0%} of {peak:.0f} TFLOPS"
            print(line)


if __name__ == "__main__":
    main()
