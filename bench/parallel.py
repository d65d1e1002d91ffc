"""One video on 1, 2, 4 or 8 ranks (`generation.parallel`, issue 27): seconds per video, transformer tokens per second,
and the largest difference of each group's frames from one process's, through wanbot's own runner and group.

Each run makes the same job (same seed) with a PipelineRunner whose LeaderRanks starts the group (gloo on the CPU,
NCCL on GPUs), after one untimed warm-up video that starts the group and loads the model on every rank. On the CPU
the ranks share the machine's cores (2 here), so the figures say nothing about speed, only that the group works and
what its collectives cost; on a machine with several GPUs, each rank has its own (bench/gpu.py runs this part when
it finds more than one).

The model is the tiny random Wan (engine/pipeline/tiny.py, 2 heads: 1 or 2 ranks) unless --model names a folder or a
Hub repo already on disk (A14B: 40 heads, so 2, 4, 5 or 8 ranks; TI2V-5B: 24).

    .venv/bin/python -m bench.parallel [--ranks 1,2] [--device cpu|cuda] [--model tiny] [--size 64x64x9]
        [--steps 4] [--videos 2] [--out bench/results/parallel.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.config import Settings
from engine.hub.downloads import Downloader
from engine.jobs import GenerationParams, Job, JobSource, JobStatus
from engine.parallel.group import group_plan
from engine.parallel.ranks import LeaderRanks
from engine.pipeline.generate import PipelineRunner, default_locator
from engine.pipeline.hooks import RunHooks
from engine.pipeline.libraries import quiet_libraries
from engine.pipeline.presets import Preset
from engine.storage.images import Mode


def job(model: str, width: int, height: int, frames: int, steps: int) -> Job:
    params = GenerationParams(
        prompt="a red fox running through snow, cinematic",
        seed=42,
        steps=steps,
        guidance=4.0,
        width=width,
        height=height,
        frames=frames,
        fps=16,
        preset=Preset.QUALITY,
    )
    source = JobSource(platform="cli", chat_id="bench", user_id="bench")
    return Job(
        id=1, source=source, mode=Mode.T2V, model=model, params=params, images=[], status=JobStatus.RUNNING,
        priority=0, attempts=1, cancel_requested=False, error_user=None, error_detail=None, progress=None,
        result=None, delivery_status=None, delivery_attempts=0, delivery_error=None, retry_of=None, created_at=0.0,
        started_at=0.0, finished_at=None, delivered_at=None,
    )  # fmt: skip


def run(settings: Settings, ranks: int, the_job: Job, videos: int) -> tuple[list[float], np.ndarray]:
    generation = settings.generation.model_copy(update={"parallel": ranks})
    group = None
    if ranks > 1:
        plan = group_plan(generation)
        generation = generation.model_copy(update={"device": plan.devices[0]})
        group = LeaderRanks(plan, settings.model_copy(update={"generation": generation}))
    downloader = Downloader(settings.models_dir, settings.downloads)
    runner = PipelineRunner(generation, default_locator(settings, downloader), ranks=group)
    try:
        frames = runner.run(the_job, [], RunHooks()).frames  # starts the group, loads the model on every rank
        times = []
        for _ in range(videos):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            runner.run(the_job, [], RunHooks())
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return times, frames
    finally:
        runner.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", default="1,2", help="group sizes to run, such as 1,2,4,8")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (ranks on cuda:0..N-1)")
    parser.add_argument("--model", default="tiny", help="tiny, a folder, or a Hub repo on disk")
    parser.add_argument("--size", default="64x64x9", help="WxHxFRAMES")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--videos", type=int, default=2, help="timed videos per group size")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = parser.parse_args()
    quiet_libraries()
    width, height, frames = (int(part) for part in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="wanbot-parallel-") as data:
        settings = Settings(data_dir=Path(data), models={"t2v": args.model}, previews={"enabled": False})
        settings.generation = settings.generation.model_copy(update={"device": args.device})
        the_job = job(settings.models.t2v, width, height, frames, args.steps)
        tokens = frames // 4 * (height // 16) * (width // 16) or 1  # latent frames x patches, per pass
        rows, alone = [], None
        for ranks in (int(part) for part in args.ranks.split(",")):
            times, made = run(settings, ranks, the_job, args.videos)
            alone = made if alone is None else alone
            seconds = statistics.median(times)
            row = {
                "ranks": ranks,
                "device": args.device,
                "s_per_video": round(seconds, 3),
                "tokens_per_s": round(tokens * args.steps / seconds, 1),
                "max_difference_from_first": float(np.abs(made - alone).max()),
            }
            rows.append(row)
            print(
                f"{ranks} rank(s) on {args.device}: {seconds:.3f} s/video, {row['tokens_per_s']} tokens/s, "
                f"largest difference from {rows[0]['ranks']} rank(s): {row['max_difference_from_first']}",
                flush=True,
            )
        if args.out is not None:
            args.out.write_text(json.dumps({"model": args.model, "size": args.size, "steps": args.steps, "runs": rows}))


if __name__ == "__main__":
    main()
