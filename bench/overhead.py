"""What wanbot costs on top of a bare diffusers call, on the tiny t2v model (CPU is fine).

Bare: pipeline call + export_to_video. wanbot: submit (validation, resolution, queue) -> worker claim -> the same
pipeline call in the executor with progress -> MP4 encode -> mark_succeeded. Runs are interleaved; the median
ratio is printed, with the latency from a warm job's claim to its first denoising step.

    .venv/bin/pip install -e ".[bench]"   # once: imageio for export_to_video
    .venv/bin/python bench/overhead.py [--runs 5] [--frames 33] [--size 128] [--steps 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import WanPipeline
from diffusers.utils import export_to_video

from engine.config import WAN_NEGATIVE_PROMPT, Settings
from engine.jobs import EventKind, JobSource, Stage
from engine.pipeline.models import GenerationRequest
from engine.pipeline.tiny import make_tiny_model
from engine.service import Engine
from engine.storage.images import Mode


def bare_run(pipeline: WanPipeline, args: argparse.Namespace, out: Path) -> float:
    started = time.perf_counter()
    frames = pipeline(
        prompt="w1 w2 a fox",
        negative_prompt=WAN_NEGATIVE_PROMPT,  # what wanbot sends when a request names none
        height=args.size,
        width=args.size,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    ).frames[0]
    export_to_video(list(frames), str(out), fps=16)
    return time.perf_counter() - started


async def wanbot_run(engine: Engine, args: argparse.Namespace, index: int) -> tuple[float, float]:
    """Seconds from submit to succeeded, and from the claim to the first denoising step."""
    inbox = engine._queue.events.subscribe()
    started = time.perf_counter()
    request = GenerationRequest(
        mode=Mode.T2V,
        prompt="w1 w2 a fox",
        seed=1,
        steps=args.steps,
        frames=args.frames,
        resolution=f"{args.size}x{args.size}",
    )
    await engine.submit(request, JobSource(platform="bench", chat_id="c", user_id=f"u{index}"))
    worker = asyncio.create_task(engine._worker.run(stop_after=1))
    claimed_at = first_step_at = 0.0
    async for event in inbox:
        if event.kind is EventKind.STARTED:
            claimed_at = time.perf_counter()
        elif event.progress and event.progress.stage is Stage.DENOISING and not first_step_at:
            first_step_at = time.perf_counter()
        elif event.kind in (EventKind.SUCCEEDED, EventKind.FAILED):
            break
    elapsed = time.perf_counter() - started
    await worker
    inbox.close()
    return elapsed, first_step_at - claimed_at


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frames", type=int, default=33)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        model = make_tiny_model(root / "data" / "models" / "tiny-t2v", Mode.T2V)
        settings = Settings(data_dir=root / "data", models={"t2v": "tiny"}, queue={"per_user_limit": 100})
        engine = await Engine.open(settings)
        pipeline = WanPipeline.from_pretrained(model)
        pipeline.set_progress_bar_config(disable=True)
        # Same scheduler as the engine uses (flow shift corrected), so both do the same work.
        from diffusers import UniPCMultistepScheduler

        pipeline.scheduler = UniPCMultistepScheduler.from_config(pipeline.scheduler.config, flow_shift=12.0)
        await wanbot_run(engine, args, -1)  # warm-up: loads the model once, as a running bot would have
        bare_run(pipeline, args, root / "warm.mp4")
        bare, ours, warm_starts = [], [], []
        for index in range(args.runs):
            bare.append(bare_run(pipeline, args, root / f"bare-{index}.mp4"))
            elapsed, warm_start = await wanbot_run(engine, args, index)
            ours.append(elapsed)
            warm_starts.append(warm_start)
        await engine.close()
    ratios = [mine / base for mine, base in zip(ours, bare, strict=True)]
    print(f"workload: tiny t2v, {args.size}x{args.size}, {args.frames} frames, {args.steps} steps, {args.runs} runs")
    print(f"bare diffusers + export_to_video: median {statistics.median(bare):.3f} s")
    print(f"wanbot submit -> succeeded:       median {statistics.median(ours):.3f} s")
    print(f"ratio wanbot / bare:              median {statistics.median(ratios):.3f} (target <= 1.05)")
    print(
        f"warm claim -> first denoising step: median {statistics.median(warm_starts) * 1000:.1f} ms, "
        f"max {max(warm_starts) * 1000:.1f} ms (target < 50 ms)"
    )


if __name__ == "__main__":
    asyncio.run(main())
