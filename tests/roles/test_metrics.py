"""/metrics and /healthz (engine/metrics.py): what a scraper and a load balancer see of the queue and the workers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.errors import UserError
from engine.jobs import ResultInfo, WorkerRecord, WorkerState
from engine.metrics import Metrics, serve_metrics
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode
from tests.factories import owner, params, source

LEASE_S = 30.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def result() -> ResultInfo:
    return ResultInfo(
        path="/tmp/x.mp4", bytes=1, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="tiny", seed=1
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class Server:
    """serve_metrics (and Metrics.follow) running as tasks on a free loopback port."""

    def __init__(self, port: int, health: list[str | None]) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.health = health  # health()[0] is what the process says about itself; tests change it

    async def get(self, path: str) -> tuple[int, str, str]:
        async with aiohttp.ClientSession() as session, session.get(self.base + path) as response:
            return response.status, response.headers["Content-Type"], await response.text()

    async def samples(self, until: Callable[[Samples], bool] = lambda samples: True) -> Samples:
        """The scraped samples, once `until` holds: events reach Metrics.follow through a task of its own."""
        for _ in range(200):
            status, _, text = await self.get("/metrics")
            assert status == 200
            found = parse(text)
            if until(found):
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"/metrics never showed what was expected:\n{text}")


async def until_listening(server: Server, task: asyncio.Task[None]) -> None:
    for _ in range(200):
        try:
            await server.get("/healthz")
            return
        except aiohttp.ClientConnectionError:
            assert not task.done(), task
            await asyncio.sleep(0.05)
    raise AssertionError("serve_metrics never listened")


@contextlib.asynccontextmanager
async def running(
    metrics: Metrics, queue: JobQueue, port: int | None = None, follow: bool = True
) -> AsyncIterator[Server]:
    port = port or free_port()
    server = Server(port, [None])
    serving = asyncio.create_task(serve_metrics(metrics, queue, "127.0.0.1", port, lambda: server.health[0]))
    tasks = [serving, *([asyncio.create_task(metrics.follow(queue))] if follow else [])]
    try:
        await until_listening(server, serving)
        yield server
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def worker(worker_id: str, state: WorkerState, **fields: object) -> WorkerRecord:
    return WorkerRecord.model_validate(
        {"id": worker_id, "host": "h", "pid": 1, "device": "cpu", "started_at": time.time(), "state": state, **fields}
    )


@pytest.mark.both_backends
async def test_metrics_show_jobs_workers_times_and_failed_deliveries(queue: JobQueue):
    metrics = Metrics(LEASE_S, min_refresh_s=0)
    async with running(metrics, queue) as server:
        added = [
            await queue.enqueue(source(f"u{index}", f"m{index}"), Mode.T2V, "tiny", params()) for index in range(5)
        ]
        await queue.cancel(added[4].job.id, owner("u4"))
        first, second, third = [await queue.claim_next(worker_id="w1") for _ in range(3)]
        await queue.mark_succeeded(first.id, result(), token=first.claim_token)
        await queue.mark_failed(second.id, "It broke.", "detail", token=second.claim_token)
        await queue.mark_delivery_failed(first.id, "upload refused")
        await queue.heartbeat(worker("w1", WorkerState.WORKING, current_job=third.id, free_memory_bytes=2**30))
        await queue.heartbeat(worker("w2", WorkerState.IDLE))
        await queue.heartbeat(worker("w3", WorkerState.STOPPED))

        found = await server.samples(until=lambda s: value(s, "wanbot_delivery_failures_total") == 1)

        status, content_type, _ = await server.get("/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    for state in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert value(found, "wanbot_jobs", state=state) == 1, state
    assert value(found, "wanbot_queue_length") == 1
    assert value(found, "wanbot_database_up") == 1
    assert value(found, "wanbot_job_wait_seconds_count") == 3
    assert value(found, "wanbot_job_run_seconds_count", outcome="succeeded") == 1
    assert value(found, "wanbot_job_run_seconds_count", outcome="failed") == 1
    assert value(found, "wanbot_job_run_seconds_bucket", outcome="succeeded", le="+Inf") == 1
    assert value(found, "wanbot_jobs_finished_total", outcome="succeeded") == 1
    assert value(found, "wanbot_jobs_finished_total", outcome="failed") == 1
    assert value(found, "wanbot_jobs_finished_total", outcome="cancelled") == 1
    assert value(found, "wanbot_delivery_failures_total") == 1
    # The stopped worker is not online; the other two are, by state.
    assert value(found, "wanbot_workers", state="working") == 1
    assert value(found, "wanbot_workers", state="idle") == 1
    assert value(found, "wanbot_workers", state="paused") == 0
    assert value(found, "wanbot_worker_busy", worker="w1") == 1
    assert value(found, "wanbot_worker_busy", worker="w2") == 0
    assert value(found, "wanbot_worker_busy", worker="w3") is None
    assert value(found, "wanbot_worker_gpu_free_bytes", worker="w1") == 2**30
    assert value(found, "wanbot_worker_gpu_free_bytes", worker="w2") is None


async def test_a_fresh_queue_shows_zeros_not_nothing(queue: JobQueue):
    metrics = Metrics(LEASE_S, min_refresh_s=0)
    async with running(metrics, queue) as server:
        found = await server.samples()
    assert value(found, "wanbot_jobs", state="queued") == 0
    assert value(found, "wanbot_queue_length") == 0
    assert value(found, "wanbot_workers", state="working") == 0
    assert value(found, "wanbot_jobs_finished_total", outcome="succeeded") == 0
    assert value(found, "wanbot_job_run_seconds_count", outcome="failed") == 0
    assert value(found, "wanbot_job_wait_seconds_count") == 0
    assert value(found, "wanbot_delivery_failures_total") == 0


async def test_the_snapshot_is_reused_until_it_is_due_and_silent_workers_drop_out(queue: JobQueue):
    now = [time.time()]
    metrics = Metrics(LEASE_S, clock=lambda: now[0], min_refresh_s=3600)

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    await queue.enqueue(source("u1", "m1"), Mode.T2V, "tiny", params())
    await queue.heartbeat(worker("w1", WorkerState.IDLE, free_memory_bytes=5))
    await metrics.refresh(queue)
    assert sample("wanbot_queue_length") == 1
    assert sample("wanbot_worker_busy", worker="w1") == 0

    await queue.enqueue(source("u2", "m2"), Mode.T2V, "tiny", params())
    await metrics.refresh(queue)  # within min_refresh_s: the snapshot stands
    assert sample("wanbot_queue_length") == 1

    now[0] += LEASE_S + 1  # w1 has not been heard from within the lease
    await metrics.refresh(queue, force=True)
    assert sample("wanbot_queue_length") == 2
    assert sample("wanbot_workers", state="idle") == 0
    assert sample("wanbot_worker_busy", worker="w1") is None
    assert sample("wanbot_worker_gpu_free_bytes", worker="w1") is None


class BrokenQueue:
    """A queue whose database is gone."""

    async def counts(self) -> dict[str, int]:
        raise OSError("connection refused")

    async def workers(self) -> list[WorkerRecord]:
        raise OSError("connection refused")


async def test_a_failing_database_keeps_the_last_values_and_says_so(queue: JobQueue):
    metrics = Metrics(LEASE_S, min_refresh_s=0)
    await queue.enqueue(source("u1", "m1"), Mode.T2V, "tiny", params())
    await metrics.refresh(queue)
    await metrics.refresh(cast(JobQueue, BrokenQueue()))
    assert metrics.registry.get_sample_value("wanbot_database_up") == 0
    assert metrics.registry.get_sample_value("wanbot_queue_length") == 1


async def test_healthz_reports_the_process_and_the_database(queue: JobQueue):
    metrics = Metrics(LEASE_S)
    async with running(metrics, queue) as server:
        assert await server.get("/healthz") == (200, "text/plain; charset=utf-8", "ok\n")

        server.health[0] = "telegram: not connected"
        status, _, text = await server.get("/healthz")
        assert (status, text) == (503, "telegram: not connected\n")

        server.health[0] = None
        assert (await server.get("/healthz"))[0] == 200


async def test_healthz_fails_when_the_database_does_not_answer():
    metrics = Metrics(LEASE_S)
    async with running(metrics, cast(JobQueue, BrokenQueue()), follow=False) as server:
        status, _, text = await server.get("/healthz")
        # /metrics still answers, saying the database is down.
        found = await server.samples()
    assert status == 503
    assert "queue database failed" in text and "connection refused" in text
    assert value(found, "wanbot_database_up") == 0


@contextlib.contextmanager
def listening() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


async def test_a_port_in_use_is_a_clear_error(queue: JobQueue):
    with listening() as port, pytest.raises(UserError) as raised:
        await asyncio.wait_for(serve_metrics(Metrics(LEASE_S), queue, "127.0.0.1", port, lambda: None), 30)
    assert f"127.0.0.1:{port}" in raised.value.message
    assert "already in use" in raised.value.message
    assert "metrics.port" in raised.value.hint


async def test_a_restart_listens_on_the_same_port_again(queue: JobQueue):
    port = free_port()
    async with running(Metrics(LEASE_S), queue, port) as server:
        assert (await server.get("/healthz"))[0] == 200
    async with running(Metrics(LEASE_S), queue, port) as server:
        assert (await server.get("/healthz"))[0] == 200


def test_a_process_whose_metrics_port_is_taken_exits_2_before_starting_anything(tmp_path: Path):
    from tests.cli.test_cli import wanbot

    with listening() as port:
        done = wanbot("worker", "--device", "cpu", data=tmp_path / "data", env={"WANBOT_METRICS__PORT": str(port)})
    assert done.returncode == 2, done.stderr
    assert f"Cannot serve metrics on 127.0.0.1:{port}: the port is already in use." in done.stderr
    assert "wanbot stopped" not in done.stderr and "Traceback" not in done.stderr
