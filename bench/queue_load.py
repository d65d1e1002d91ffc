"""The job queue under load: 10,000 queued jobs from 100 users in a real SQLite file (WAL).

Measures enqueue throughput, the latency of a position lookup with the queue full, and claim throughput and
latency (p50/p99) while the queue drains; each claim runs the fair order over everything still waiting.

    .venv/bin/python bench/queue_load.py [--jobs 10000] [--users 100] [--claims 2000] [--lookups 500]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

from engine.jobs import GenerationParams, JobSource
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode

PARAMS = GenerationParams(prompt="a fox", seed=1, steps=40, guidance=4.0, width=832, height=480, frames=81, fps=16)
MODELS = ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "Wan-AI/Wan2.2-TI2V-5B-Diffusers")


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(int(len(ordered) * fraction), len(ordered) - 1)]


def latency_line(name: str, samples: list[float]) -> str:
    ms = [sample * 1000 for sample in samples]
    return (
        f"{name}: p50 {statistics.median(ms):.2f} ms, p99 {percentile(ms, 0.99):.2f} ms, "
        f"max {max(ms):.2f} ms ({len(ms)} samples)"
    )


async def fill(queue: JobQueue, jobs: int, users: int, rng: random.Random) -> tuple[list[int], float]:
    """Enqueue `jobs` jobs of `users` users for two models, one transaction each; their ids and the seconds taken."""
    started = time.perf_counter()
    ids = []
    for index in range(jobs):
        source = JobSource(platform="bench", chat_id="c", user_id=f"u{index % users}", message_id=str(index))
        result = await queue.enqueue(
            source, Mode.T2V, rng.choice(MODELS), PARAMS, per_user_limit=jobs, global_limit=jobs
        )
        ids.append(result.job.id)
    return ids, time.perf_counter() - started


async def measure_claims(queue: JobQueue, claims: int) -> list[float]:
    """Seconds per claim (the worker finishes each job before the next, so a user's last_served moves on)."""
    samples = []
    for _ in range(claims):
        began = time.perf_counter()
        job = await queue.claim_next(MODELS[0])
        samples.append(time.perf_counter() - began)
        assert job is not None
        await queue.mark_cancelled(job.id, token=job.claim_token)
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--claims", type=int, default=2000, help="claims measured (the queue keeps the rest)")
    parser.add_argument("--lookups", type=int, default=500)
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as folder:
        queue = await JobQueue.open(Path(folder) / "wanbot.db")
        ids, enqueue_s = await fill(queue, args.jobs, args.users, rng)
        lookups = []
        for job_id in rng.sample(ids, args.lookups):
            began = time.perf_counter()
            await queue.position(job_id)
            lookups.append(time.perf_counter() - began)
        claims = await measure_claims(queue, args.claims)
        await queue.close()
    print(f"queue: {args.jobs} jobs from {args.users} users, SQLite WAL, synchronous=FULL (an fsync per commit)")
    print(f"enqueue: {args.jobs / enqueue_s:.0f} jobs/s ({enqueue_s:.1f} s in all, one transaction each)")
    print(latency_line(f"position lookup with {args.jobs} queued", lookups))
    print(f"claim throughput: {len(claims) / sum(claims):.0f} claims/s")
    print(latency_line(f"claim with {args.jobs}..{args.jobs - args.claims} queued", claims) + " (target p99 < 5 ms)")


if __name__ == "__main__":
    asyncio.run(main())
