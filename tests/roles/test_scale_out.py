"""Scale-out end to end, with real processes: PostgreSQL, `wanbot serve` talking to the fake Telegram server, and
`wanbot worker` processes, each with a data folder of its own (pictures and videos travel through the database)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from engine.jobs import DeliveryStatus, Job, JobStatus, WorkerState
from engine.queue.jobqueue import JobQueue
from tests import imagefactory
from tests.conftest import postgres_schema
from tests.fake_telegram import TEST_TOKEN, FakeTelegram
from tests.running import until

ALICE, BOB, CAROL = 111, 222, 333
WANBOT = [sys.executable, "-c", "from bot.cli import main; main()"]


def role_env(data_dir: Path, url: str, telegram: FakeTelegram | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "TELEGRAM_", "DISCORD_"))}
    env.update(
        WANBOT_DATA_DIR=str(data_dir),
        WANBOT_DATABASE__URL=url,
        WANBOT_MODELS__T2V="tiny",
        WANBOT_MODELS__I2V="tiny",
        WANBOT_MODELS__TI2V="tiny",
        WANBOT_PREVIEWS__ENABLED="false",
        WANBOT_QUEUE__HEARTBEAT_S="0.5",
        WANBOT_QUEUE__LEASE_S="5",
        WANBOT_GENERATION__MAX_STEPS="2000",  # a long job stays long: a cancel must land within its steps
        WANBOT_DOWNLOADS__ENDPOINT="http://127.0.0.1:9",  # never a real Hub: a closed port answers at once
    )
    if telegram is not None:
        env.update(
            TELEGRAM_BOT_TOKEN=TEST_TOKEN,
            WANBOT_TELEGRAM__API_BASE_URL=f"{telegram.url}/bot",
            WANBOT_TELEGRAM__FILE_BASE_URL=f"{telegram.url}/file/bot",
            WANBOT_TELEGRAM__EDIT_INTERVAL_S="0.2",
            WANBOT_TELEGRAM__DELIVERY_RETRY_S="0.5",
        )
    return env


class Fleet:
    """The processes of one deployment; every one is stopped at the end, its output kept for the failure report."""

    def __init__(self, root: Path, url: str, tiny_models: Path, telegram: FakeTelegram) -> None:
        self.root, self.url, self.tiny_models, self.telegram = root, url, tiny_models, telegram
        self.processes: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, *args: str, **extra_env: str) -> asyncio.subprocess.Process:
        data = self.root / name
        data.mkdir(exist_ok=True)
        if args[0] == "worker" and not (data / "models").exists():
            (data / "models").symlink_to(self.tiny_models, target_is_directory=True)
        env = {**role_env(data, self.url, self.telegram if args[0] == "serve" else None), **extra_env}
        with (self.root / f"{name}.log").open("a") as log:
            process = await asyncio.create_subprocess_exec(*WANBOT, *args, env=env, stdout=log, stderr=log)
        self.processes[name] = process
        return process

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(self.root.glob("*.log")))

    async def stop_all(self) -> dict[str, int]:
        for process in self.processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            codes[name] = await asyncio.wait_for(process.wait(), timeout=60)
        return codes


@contextlib.asynccontextmanager
async def fleet_of(tmp_path: Path, tiny_models: Path, telegram: FakeTelegram) -> AsyncIterator[tuple[Fleet, JobQueue]]:
    async with postgres_schema() as url:
        queue = await JobQueue.connect(url)  # creates the tables before the processes race to
        fleet = Fleet(tmp_path, url, tiny_models, telegram)
        try:
            yield fleet, queue
        except BaseException:
            with contextlib.suppress(Exception):
                await fleet.stop_all()
            print(fleet.logs())
            raise
        finally:
            for process in fleet.processes.values():
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await queue.close()


async def test_serve_and_two_workers_deliver_every_video_once_and_a_cancel_reaches_the_worker(
    tmp_path, tiny_models, telegram
):
    async with fleet_of(tmp_path, tiny_models, telegram) as (fleet, queue):
        metrics_port = free_port()
        serve = await fleet.start("serve", "serve", WANBOT_METRICS__PORT=str(metrics_port))
        await fleet.start("worker-1", "worker", "--device", "cpu")
        await fleet.start("worker-2", "worker", "--device", "cpu")
        await until(lambda: telegram.sent("deleteWebhook"), what="serve polling Telegram")
        maps = await asyncio.to_thread(Path(f"/proc/{serve.pid}/maps").read_text)
        assert "libtorch" not in maps  # serve never loads torch
        await _online(queue, 2)

        for user in (ALICE, BOB, CAROL):
            for n in range(2):
                telegram.command(user, f"/video clip {n} of user {user} steps=12 seed={n}")
        # The picture is stored by `serve`; the worker that claims the job fetches it from the database.
        telegram.photo(CAROL, imagefactory.jpeg(128, 96), caption="/i2v the picture moves steps=3 seed=5")
        for user, count in ((ALICE, 2), (BOB, 2), (CAROL, 3)):
            await until(lambda u=user, c=count: len(telegram.sent("sendVideo", u)) >= c, 240, f"{count} for {user}")

        jobs = await _all_delivered(queue, 7)
        assert len({job.worker_id for job in jobs}) == 2, "both workers made videos"
        assert not (tmp_path / "serve" / "models").exists()  # serve never had a model
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                metrics = await response.text()
            async with http.get(f"http://127.0.0.1:{metrics_port}/healthz") as response:
                assert response.status == 200
        assert 'wanbot_jobs{state="succeeded"} 7.0' in metrics and "wanbot_workers" in metrics
        assert "wanbot_job_run_seconds_count" in metrics

        # A long job, cancelled from the chat: the worker running it stops within a step.
        telegram.command(ALICE, "/video a very long clip steps=2000 seed=1")
        long_job = await _running(queue)
        await until(lambda: _said(telegram, ALICE, "generating"), 60, "its progress in the chat")
        telegram.command(ALICE, f"/cancel {long_job.id}")
        await until(lambda: _said(telegram, ALICE, "was cancelled"), 60, "the cancelled status")
        assert (await queue.get(long_job.id)).status is JobStatus.CANCELLED

        codes = await fleet.stop_all()
        assert codes == {"serve": 0, "worker-1": 0, "worker-2": 0}, fleet.logs()
        for user, count in ((ALICE, 2), (BOB, 2), (CAROL, 3)):
            assert len(telegram.sent("sendVideo", user)) == count
        assert {w.state for w in await queue.workers()} == {WorkerState.STOPPED}
        assert TEST_TOKEN not in (tmp_path / "worker-1.log").read_text()


async def test_a_worker_killed_mid_job_loses_it_and_the_video_arrives_once(tmp_path, tiny_models, telegram):
    async with fleet_of(tmp_path, tiny_models, telegram) as (fleet, queue):
        await fleet.start("serve", "serve")
        workers = {name: await fleet.start(name, "worker", "--device", "cpu") for name in ("worker-1", "worker-2")}
        await until(lambda: telegram.sent("deleteWebhook"), what="serve polling Telegram")
        await _online(queue, 2)
        telegram.command(BOB, "/video survive a crash steps=300 seed=4")
        await until(lambda: _said(telegram, BOB, "generating"), 120, "progress from the worker that claimed it")
        job = (await queue.list_jobs([JobStatus.RUNNING]))[0]
        (victim,) = [name for name, process in workers.items() if f"/{process.pid}-" in job.worker_id]
        (survivor,) = set(workers) - {victim}

        workers[victim].send_signal(signal.SIGKILL)
        await workers[victim].wait()
        await until(lambda: telegram.sent("sendVideo", BOB), 180, "the video from the other worker")
        await until(lambda: _said(telegram, BOB, "the video is below"), 60, "the final status")

        done = await queue.get(job.id)
        assert done.status is JobStatus.SUCCEEDED and done.attempts == 2
        assert f"/{workers[survivor].pid}-" in done.worker_id
        assert done.delivery_status is DeliveryStatus.DELIVERED
        codes = await fleet.stop_all()
        assert codes["serve"] == 0 and codes[survivor] == 0, fleet.logs()
        assert len(telegram.sent("sendVideo", BOB)) == 1
        assert len(telegram.sent("sendMessage", BOB)) == 1  # one status message, across both workers


async def _online(queue: JobQueue, count: int, limit_s: float = 120) -> None:
    """Wait until `count` workers have said they are here (started, models checked)."""
    for _ in range(int(limit_s / 0.2)):
        if sum(w.state is not WorkerState.STOPPED for w in await queue.workers()) >= count:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"fewer than {count} workers started")


async def _running(queue: JobQueue, limit_s: float = 60) -> Job:
    """The running job, once there is one."""
    for _ in range(int(limit_s / 0.1)):
        if running := await queue.list_jobs([JobStatus.RUNNING]):
            return running[0]
        await asyncio.sleep(0.1)
    raise AssertionError("no job started")


async def _all_delivered(queue: JobQueue, count: int, limit_s: float = 60) -> list[Job]:
    """The jobs, once `count` of them are recorded as delivered (a video is marked delivered after it was sent)."""
    for _ in range(int(limit_s / 0.1)):
        jobs = await queue.list_jobs()
        if len(jobs) == count and all(job.delivery_status is DeliveryStatus.DELIVERED for job in jobs):
            return jobs
        await asyncio.sleep(0.1)
    raise AssertionError(f"not every job was recorded as delivered: {[job.delivery_status for job in jobs]}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _said(telegram: FakeTelegram, chat: int, fragment: str) -> bool:
    return any(fragment in message.get("text", "") for message in telegram.replies(chat))


@pytest.fixture(autouse=True)
def _no_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
