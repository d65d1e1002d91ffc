"""What live previews cost (CPU is fine).

1. One preview at the real models' latent sizes: the denoising thread's part (x0 of the three key frames and the
   copy to the CPU) and the rendering thread's part (projection, upscaling, JPEG), against the step times measured on
   an H200 (BENCHMARKS.md).
2. A whole job on the tiny t2v model with previews off and on, interleaved, through the real worker.

    .venv/bin/python bench/previews.py [--renders 20] [--runs 12] [--frames 9] [--size 256] [--steps 60]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import PreviewsConfig, Settings
from engine.jobs import EventKind, JobSource
from engine.pipeline.models import GenerationRequest
from engine.pipeline.previews import clean_estimate, project, render
from engine.pipeline.tiny import make_tiny_model
from engine.service import Engine
from engine.storage.images import Mode

# name, latent [C, T, H, W], H200 seconds per step (quality, fast) from BENCHMARKS.md; None where not measured.
LATENTS = [
    ("A14B 832x480x81", (16, 21, 60, 104), (6.54, 3.28)),
    ("A14B 1280x720x81", (16, 21, 90, 160), (None, None)),
    ("TI2V-5B 1280x704x121", (48, 31, 44, 80), (2.43, 1.19)),
]


def cpu_ms(runs: int, work: Callable[..., object], *args: object) -> float:
    """Median CPU time of one call, all threads of the process: what it takes from the machine, and steadier than
    wall time on a shared one."""
    times = []
    for _ in range(runs):
        started = time.process_time()
        work(*args)
        times.append(time.process_time() - started)
    return statistics.median(times) * 1000


def capture(noisy: torch.Tensor, velocity: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """What the denoising thread does for a preview: x0 of the key frames, copied to the CPU."""
    return clean_estimate(noisy, velocity, timestep, (1, 2, 2), 1000).to("cpu")


def share(ms: float, step_s: float | None) -> str:
    return f"{ms / 10 / step_s:.2f}%" if step_s else "-"


def preview_costs(renders: int) -> None:
    print(f"CPU time of one preview, all threads, median of {renders}:")
    print(
        "| latents | denoising thread: x0 + copy | projection | projection + upscale + JPEG | JPEG | share of a step "
        "(quality / fast, H200) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (channels, frames, height, width), (quality_s, fast_s) in LATENTS:
        noisy = torch.randn(1, channels, frames, height, width, dtype=torch.bfloat16)
        velocity = torch.randn_like(noisy)
        timestep = torch.tensor([700.0])
        captured = capture(noisy, velocity, timestep)
        capture_ms = cpu_ms(renders, capture, noisy, velocity, timestep)
        project_ms = cpu_ms(renders, project, captured)
        render_ms = cpu_ms(renders, render, captured, 100_000)
        jpeg, image = render(captured, 100_000)
        print(
            f"| {name} {list(captured.shape)} | {capture_ms:.1f} ms | {project_ms:.1f} ms | {render_ms:.1f} ms | "
            f"{len(jpeg) / 1000:.0f} KB, {image.width}x{image.height} | {share(render_ms, quality_s)} / "
            f"{share(render_ms, fast_s)} |"
        )


async def timed_job(engine: Engine, args: argparse.Namespace, index: int) -> tuple[float, float, int]:
    """Seconds from submit to succeeded, the CPU seconds the process spent meanwhile, and how many previews the job
    published."""
    inbox = engine._queue.events.subscribe()
    started, cpu_started = time.perf_counter(), time.process_time()
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
    previews = 0
    async for event in inbox:
        previews += event.kind is EventKind.PREVIEW
        if event.kind in (EventKind.SUCCEEDED, EventKind.FAILED):
            break
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    await worker
    inbox.close()
    return elapsed, cpu, previews


# Each arm: its name and the previews setting it runs with. "off again" is the noise floor: the same work as "off".
ARMS = [
    ("off", PreviewsConfig(enabled=False)),
    ("off again", PreviewsConfig(enabled=False)),
    ("on, every 10 s (default)", PreviewsConfig(interval_s=10.0)),
    ("on, every 0.25 s (stress)", PreviewsConfig(interval_s=0.25)),
]


async def on_versus_off(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_tiny_model(root / "data" / "models" / "tiny-t2v", Mode.T2V)
        settings = Settings(data_dir=root / "data", models={"t2v": "tiny"}, queue={"per_user_limit": 1000})
        engine = await Engine.open(settings)
        await timed_job(engine, args, -1)  # warm-up: loads the model once, as a running bot would have
        times: dict[str, list[float]] = {name: [] for name, _ in ARMS}
        cpus: dict[str, list[float]] = {name: [] for name, _ in ARMS}
        counts: dict[str, list[int]] = {name: [] for name, _ in ARMS}
        for round_ in range(args.runs):
            # Interleaved, and the order rotated every round, so drift on a shared machine falls on every arm.
            for name, config in ARMS[round_ % len(ARMS) :] + ARMS[: round_ % len(ARMS)]:
                engine.settings.previews = config
                elapsed, cpu, count = await timed_job(engine, args, round_)
                times[name].append(elapsed)
                cpus[name].append(cpu)
                counts[name].append(count)
        await engine.close()
    off, off_cpu = statistics.median(times["off"]), statistics.median(cpus["off"])
    print(f"\nworkload: tiny t2v, {args.size}x{args.size}, {args.frames} frames, {args.steps} steps, {args.runs} runs")
    print("| previews | wall time, submit -> succeeded (median) | ratio to off | CPU time (median) | ratio | made |")
    print("|---|---|---|---|---|---|")
    for name, _ in ARMS:
        wall, cpu = statistics.median(times[name]), statistics.median(cpus[name])
        print(
            f"| {name} | {wall:.3f} s | {wall / off:.3f} | {cpu:.3f} s | {cpu / off_cpu:.3f} | "
            f"{statistics.median(counts[name]):.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--renders", type=int, default=20)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    preview_costs(args.renders)
    asyncio.run(on_versus_off(args))


if __name__ == "__main__":
    main()
