"""The PostgreSQL queue under load: claim latency with 10,000 jobs from 100 users waiting (target p99 < 10 ms).

Runs in a schema of its own on the server (dropped at the end), so any database the user may write to will do.

    .venv/bin/python -m bench.scale [--url postgresql://postgres@127.0.0.1:5432/test] [--jobs 10000] [--claims 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import random

from bench.queue_load import fill, latency_line, measure_claims
from engine.queue import JobQueue
from engine.queue_postgres import temporary_schema
from engine.queue_url import parse_database_url


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test", help="a PostgreSQL server")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--claims", type=int, default=2000, help="claims measured (the queue keeps the rest)")
    args = parser.parse_args()
    async with temporary_schema(args.url) as url:
        queue = await JobQueue.connect(url)
        try:
            _, enqueue_s = await fill(queue, args.jobs, args.users, random.Random(1))
            claims = await measure_claims(queue, args.claims)
        finally:
            await queue.close()
    print(f"queue: {args.jobs} jobs from {args.users} users, PostgreSQL at {parse_database_url(args.url).shown()}")
    print(f"enqueue: {args.jobs / enqueue_s:.0f} jobs/s ({enqueue_s:.1f} s in all, one transaction each)")
    print(f"claim throughput: {len(claims) / sum(claims):.0f} claims/s")
    print(latency_line(f"claim with {args.jobs}..{args.jobs - args.claims} queued", claims) + " (target p99 < 10 ms)")


if __name__ == "__main__":
    asyncio.run(main())
