"""Scale-out figures on a PostgreSQL server, each part in a schema of its own (dropped at the end), so any database
the user may write to will do:

- claims: claim latency with 10,000 jobs from 100 users waiting (target p99 < 10 ms);
- throughput: jobs per minute of 1 and of 2 real `wanbot worker --device cpu` processes on the tiny t2v model, the
  same jobs each time, and the ratio (on a 2-core machine well under 2: the workers share the cores);
- latency: a worker process's progress to another process's subscribers, through the shared events (target p95
  < 250 ms), on PostgreSQL (LISTEN/NOTIFY) and on SQLite (polled);
- memory: the resident set of a real `wanbot serve` process without torch, once started with no chat and once
  started with the fake Telegram after it answered a /status (target < 150 MiB).

    .venv/bin/python -m bench.scale [--url postgresql://postgres@127.0.0.1:5432/test] [--only claims,throughput,...]
        [--jobs 10000] [--users 100] [--claims 2000] [--worker-jobs 12] [--steps 4] [--rounds 2] [--worker-threads N]
        [--reports 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.queue_load import fill, latency_line, measure_claims, percentile
from engine.jobs import EventKind, GenerationParams, JobSource, JobStatus, Progress, Stage, WorkerState
from engine.queue.follower import EventFollower
from engine.queue.jobqueue import JobQueue
from engine.queue.url import parse_database_url, sqlite_url
from engine.storage.images import Mode
from tests.postgres import temporary_schema

REPO = Path(__file__).resolve().parents[1]
WANBOT = [sys.executable, "-c", "from bot.cli import main; main()"]
PARTS = ("claims", "throughput", "latency", "memory")
TINY_T2V = "tiny-t2v"  # the queue's name of `models.t2v: tiny`
REPORT_EVERY_S = 0.3  # above SHARED_PROGRESS_EVERY_S (0.25), so every report of one stage is shared
TARGET_CLAIM_P99_MS, TARGET_PROGRESS_P95_MS, TARGET_SERVE_MIB = 10, 250, 150


def tiny_params(steps: int) -> GenerationParams:
    return GenerationParams(prompt="a fox", seed=1, steps=steps, guidance=4.0, width=64, height=64, frames=5, fps=16)


def role_env(
    data_dir: Path, url: str, telegram: tuple[str, str] | None = None, threads: int | None = None
) -> dict[str, str]:
    """The environment of a `wanbot serve` or `wanbot worker` process (as tests/roles/test_scale_out.py starts them)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "TELEGRAM_", "DISCORD_"))}
    env.update(
        WANBOT_DATA_DIR=str(data_dir),
        WANBOT_DATABASE__URL=url,
        WANBOT_MODELS__T2V="tiny",
        WANBOT_MODELS__I2V="tiny",
        WANBOT_MODELS__TI2V="tiny",
        WANBOT_PREVIEWS__ENABLED="false",
        WANBOT_QUEUE__HEARTBEAT_S="0.5",
        WANBOT_DOWNLOADS__ENDPOINT="http://127.0.0.1:9",  # never a real Hub: a closed port answers at once
    )
    if threads is not None:  # torch's intra-op threads (default: one per core)
        env["OMP_NUM_THREADS"] = str(threads)
    if telegram is not None:
        token, base = telegram
        env.update(
            TELEGRAM_BOT_TOKEN=token,
            WANBOT_TELEGRAM__API_BASE_URL=f"{base}/bot",
            WANBOT_TELEGRAM__FILE_BASE_URL=f"{base}/file/bot",
        )
    return env


@contextlib.asynccontextmanager
async def wanbot(
    root: Path,
    name: str,
    url: str,
    *args: str,
    models: Path | None = None,
    telegram: tuple[str, str] | None = None,
    threads: int | None = None,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A real wanbot process with a data folder of its own (output in root/<name>.log), stopped with SIGTERM."""
    data = root / name
    data.mkdir()
    if models is not None:
        (data / "models").symlink_to(models, target_is_directory=True)
    with (root / f"{name}.log").open("w") as log:
        process = await asyncio.create_subprocess_exec(
            *WANBOT, *args, env=role_env(data, url, telegram, threads), stdout=log, stderr=log
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=60)
            except TimeoutError:
                process.kill()
                await process.wait()


def log_tails(folder: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text()[-2000:]}" for path in sorted(folder.glob("*.log")))


async def until(check: Callable[[], Awaitable[bool]], limit_s: float, what: str, logs: Path) -> None:
    """Poll `check` until it holds; past `limit_s`, fail with the tails of the process logs under `logs`."""
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {limit_s:.0f} s\n{log_tails(logs)}")
        await asyncio.sleep(0.1)


# -- claims ------------------------------------------------------------------------------------------------------


async def claims_part(server: str, jobs: int, users: int, claims: int) -> None:
    async with temporary_schema(server) as url:
        queue = await JobQueue.connect(url)
        try:
            _, enqueue_s = await fill(queue, jobs, users, random.Random(1))
            samples = await measure_claims(queue, claims)
        finally:
            await queue.close()
    print(f"queue: {jobs} jobs from {users} users, PostgreSQL at {parse_database_url(server).shown()}")
    print(f"enqueue: {jobs / enqueue_s:.0f} jobs/s ({enqueue_s:.1f} s in all, one transaction each)")
    print(f"claim throughput: {len(samples) / sum(samples):.0f} claims/s")
    line = latency_line(f"claim with {jobs}..{jobs - claims} queued", samples)
    print(f"{line} (target p99 < {TARGET_CLAIM_P99_MS} ms)")


# -- throughput --------------------------------------------------------------------------------------------------


async def run_fleet(
    server: str, root: Path, models: Path, workers: int, jobs: int, steps: int, threads: int | None
) -> dict[str, Any]:
    """Start `workers` worker processes, wait until each is idle, enqueue `jobs` tiny t2v jobs of as many users, and
    time them until every one has succeeded."""
    params = tiny_params(steps)
    async with temporary_schema(server) as url, contextlib.AsyncExitStack() as stack:
        queue = await JobQueue.connect(url)  # creates the tables before the processes race to
        stack.push_async_callback(queue.close)
        fleet = root / f"{workers}-workers"
        fleet.mkdir(parents=True)
        started = time.perf_counter()
        for index in range(workers):
            await stack.enter_async_context(
                wanbot(fleet, f"worker-{index + 1}", url, "worker", "--device", "cpu", models=models, threads=threads)
            )

        async def all_idle() -> bool:
            return sum(w.state is WorkerState.IDLE for w in await queue.workers()) == workers

        await until(all_idle, 180, f"{workers} idle workers", fleet)
        ready_s = time.perf_counter() - started
        began = time.perf_counter()
        for index in range(jobs):
            source = JobSource(platform="bench", chat_id="c", user_id=f"u{index}", message_id=str(index))
            await queue.enqueue(source, Mode.T2V, TINY_T2V, params, per_user_limit=jobs, global_limit=jobs)

        async def all_done() -> bool:
            counts = await queue.counts()
            if counts.get(JobStatus.FAILED.value) or counts.get(JobStatus.CANCELLED.value):
                raise RuntimeError(f"a job did not succeed: {counts}\n{log_tails(fleet)}")
            return counts.get(JobStatus.SUCCEEDED.value, 0) == jobs

        await until(all_done, 900, f"{jobs} succeeded jobs", fleet)
        elapsed = time.perf_counter() - began
        done = await queue.list_jobs([JobStatus.SUCCEEDED])
    firsts, laters, split = [], [], []
    for worker in sorted({job.worker_id for job in done}, key=str):
        its = sorted((job for job in done if job.worker_id == worker), key=lambda job: job.started_at or 0)
        runs = [(job.finished_at or 0) - (job.started_at or 0) for job in its]
        firsts.append(runs[0])  # loads the model
        laters.extend(runs[1:])
        split.append(len(its))
    return {
        "per_min": jobs / elapsed * 60,
        "elapsed_s": elapsed,
        "ready_s": ready_s,
        "first_s": statistics.median(firsts),
        "run_p50_s": statistics.median(laters) if laters else float("nan"),
        "split": "/".join(str(n) for n in sorted(split, reverse=True)),
    }


async def throughput_part(server: str, jobs: int, steps: int, rounds: int, threads: int | None) -> None:
    from engine.pipeline.tiny import make_tiny_model  # imports torch: only this part needs it, in this process

    best: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="wanbot-scale-") as folder:
        root = Path(folder)
        models = root / "models"
        make_tiny_model(models / TINY_T2V, Mode.T2V)
        for round_ in range(1, rounds + 1):  # 1 then 2 workers, alternately: load from elsewhere hits both
            for n in (1, 2):
                f = await run_fleet(server, root / f"round-{round_}", models, n, jobs, steps, threads)
                best[n] = max(best.get(n, 0.0), f["per_min"])
                print(
                    f"throughput, {n} worker{'s' if n > 1 else ''}, round {round_} (tiny t2v 64x64, 5 frames, "
                    f"{steps} steps, {jobs} jobs, torch threads {threads or 'by default'}): {f['per_min']:.1f} "
                    f"jobs/min ({f['elapsed_s']:.1f} s from enqueue to the last success; jobs per worker "
                    f"{f['split']}; a worker's first job {f['first_s']:.2f} s with the model load, the others "
                    f"{f['run_p50_s']:.2f} s p50, claim to success; workers idle {f['ready_s']:.1f} s after start)"
                )
    print(
        f"throughput ratio, 2 workers / 1: {best[2] / best[1]:.2f} (best of {rounds} round{'s' if rounds > 1 else ''}: "
        f"{best[1]:.1f} and {best[2]:.1f} jobs/min; {os.cpu_count()} CPU cores here, shared by both workers, so "
        "well under 2 is expected)"
    )


# -- progress latency --------------------------------------------------------------------------------------------

SENDER = "import asyncio, sys; from bench.scale import send_progress; asyncio.run(send_progress(*sys.argv[1:]))"


async def send_progress(url: str, job_id: str, token: str, reports: str) -> None:
    """The worker's side, in a process of its own: shared progress reports carrying the wall-clock time they began."""
    queue = await JobQueue.connect(url)
    queue.share_events()
    rng = random.Random(2)
    try:
        for step in range(int(reports)):
            await asyncio.sleep(REPORT_EVERY_S + rng.uniform(0, 0.05))  # not in step with the poll
            progress = Progress(stage=Stage.DENOISING, step=step, total=int(reports), detail=repr(time.time()))
            await queue.update_progress(int(job_id), progress, persist=False, token=token)
    finally:
        await queue.close()


async def progress_latencies(url: str, reports: int) -> list[float]:
    """Seconds from a worker process's update_progress to this process's subscriber holding the event."""
    queue = await JobQueue.connect(url)
    try:
        source = JobSource(platform="bench", chat_id="c", user_id="u1", message_id="1")
        await queue.enqueue(source, Mode.T2V, TINY_T2V, tiny_params(4), per_user_limit=5, global_limit=5)
        job = await queue.claim_next(TINY_T2V, worker_id="bench/1")
        assert job is not None and job.claim_token is not None
        subscription = queue.events.subscribe()
        follower = asyncio.create_task(EventFollower(queue).follow())
        await asyncio.sleep(0.5)  # listening before the first report
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER, url, str(job.id), job.claim_token, str(reports), cwd=REPO
        )
        samples: list[float] = []
        try:
            while len(samples) < reports:
                event = await asyncio.wait_for(subscription.get(), timeout=30)
                if event.kind is EventKind.PROGRESS and event.progress and event.progress.detail:
                    samples.append(time.time() - float(event.progress.detail))
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            subscription.close()
            if await sender.wait() != 0:
                raise RuntimeError("the progress sender failed")
        return samples
    finally:
        await queue.close()


async def latency_part(server: str, reports: int) -> None:
    async with temporary_schema(server) as url:
        postgres = await progress_latencies(url, reports)
    with tempfile.TemporaryDirectory(prefix="wanbot-scale-") as folder:
        sqlite = await progress_latencies(sqlite_url(Path(folder) / "wanbot.sqlite3"), reports)
    for name, samples in (("PostgreSQL, LISTEN/NOTIFY", postgres), ("SQLite, polled", sqlite)):
        ms = [s * 1000 for s in samples]
        print(
            f"progress to another process ({name}): p50 {statistics.median(ms):.1f} ms, "
            f"p95 {percentile(ms, 0.95):.1f} ms, max {max(ms):.1f} ms ({len(ms)} reports "
            f"{REPORT_EVERY_S:.2f} s apart; target p95 < {TARGET_PROGRESS_P95_MS} ms)"
        )


# -- memory of `wanbot serve` ------------------------------------------------------------------------------------


def memory_of(pid: int) -> tuple[float, float, bool]:
    """Resident MiB now (VmRSS), its peak (VmHWM), and whether libtorch is mapped."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    mib = {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}
    torch = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return mib["VmRSS"], mib["VmHWM"], torch


async def memory_part(server: str) -> None:
    from tests.fake_telegram import TEST_TOKEN, FakeTelegram

    results: list[tuple[str, float, float, bool]] = []
    codes: list[int | None] = []
    with tempfile.TemporaryDirectory(prefix="wanbot-scale-") as folder:
        root = Path(folder)
        async with temporary_schema(server) as url:
            queue = await JobQueue.connect(url)  # the tables, before serve starts
            await queue.close()
            async with wanbot(root, "serve-alone", url, "serve") as process:
                log = root / "serve-alone.log"

                async def started() -> bool:
                    return "wanbot serving" in log.read_text()

                await until(started, 60, "start-up line", root)
                await asyncio.sleep(5)  # relay, clean-up, recovery and the event follower have run
                results.append(("no chat, 5 s after its start-up line", *memory_of(process.pid)))
            codes.append(process.returncode)

            telegram = FakeTelegram(TEST_TOKEN)
            await telegram.start()
            try:
                async with wanbot(root, "serve-telegram", url, "serve", telegram=(TEST_TOKEN, telegram.url)) as process:

                    async def polling() -> bool:
                        return bool(telegram.sent("deleteWebhook"))

                    async def answered() -> bool:
                        return bool(telegram.sent("sendMessage", 111))

                    await until(polling, 60, "Telegram polling", root)
                    telegram.command(111, "/status")
                    await until(answered, 60, "answer to /status", root)
                    await asyncio.sleep(2)
                    results.append(("Telegram, after answering /status", *memory_of(process.pid)))
                codes.append(process.returncode)
            finally:
                await telegram.stop()
    for (name, rss, peak, torch), code in zip(results, codes, strict=True):
        print(
            f"wanbot serve ({name}): {rss:.0f} MiB resident, peak {peak:.0f} MiB, torch "
            f"{'LOADED' if torch else 'not loaded'}, exit status {code} on SIGTERM (target < {TARGET_SERVE_MIB} MiB)"
        )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test", help="a PostgreSQL server")
    parser.add_argument("--only", default=",".join(PARTS), help=f"the parts to run, of {','.join(PARTS)}")
    parser.add_argument("--jobs", type=int, default=10_000, help="claims: jobs queued")
    parser.add_argument("--users", type=int, default=100, help="claims: their users")
    parser.add_argument("--claims", type=int, default=2000, help="claims measured (the queue keeps the rest)")
    parser.add_argument("--worker-jobs", type=int, default=12, help="throughput: jobs for each fleet")
    parser.add_argument("--steps", type=int, default=4, help="throughput: denoising steps a job")
    parser.add_argument("--rounds", type=int, default=2, help="throughput: rounds of 1 then 2 workers (best counts)")
    parser.add_argument(
        "--worker-threads", type=int, help="throughput: OMP_NUM_THREADS of each worker (default: torch's, one a core)"
    )
    parser.add_argument("--reports", type=int, default=60, help="latency: progress reports on each database")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure as it is measured, also into a pipe
    parts = [part.strip() for part in args.only.split(",") if part.strip()]
    if unknown := set(parts) - set(PARTS):
        parser.error(f"unknown parts {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if "claims" in parts:
        await claims_part(args.url, args.jobs, args.users, args.claims)
    if "throughput" in parts:
        await throughput_part(args.url, args.worker_jobs, args.steps, args.rounds, args.worker_threads)
    if "latency" in parts:
        await latency_part(args.url, args.reports)
    if "memory" in parts:
        await memory_part(args.url)


if __name__ == "__main__":
    asyncio.run(main())
