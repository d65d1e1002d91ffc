"""Prometheus metrics and a health check over HTTP (`metrics.port`), for `wanbot run`, `serve` and `worker`.

What the database knows (jobs by state, the workers) is read into a cached snapshot by `Metrics.refresh`, which the
/metrics handler awaits before it renders: collectors run synchronously inside `generate_latest` and must not block
the event loop on a query, and a refresh at most every `min_refresh_s` keeps a scraper (or several) from turning into
database load. What only events tell (wait and run times, finished jobs, failed deliveries) is counted by
`Metrics.follow` as this process hears the events.

Nothing here imports torch: `wanbot serve` serves this too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.errors import UserError
from engine.jobs import EventKind, JobEvent, JobStatus, WorkerRecord, WorkerState

if TYPE_CHECKING:
    from engine.queue.jobqueue import JobQueue

log = logging.getLogger(__name__)
# Why a request or a video was refused: a blocked term in its prompt, a flagged picture or video, a GPU-time quota.
REFUSAL_REASONS = ("blocked_term", "picture", "video", "quota")

# Snapshots are at most this old at scrape time; Prometheus scrapes every 15 s or more, so each scrape usually reads.
MIN_REFRESH_S = 2.0
# A database that takes longer than this to count the jobs is as good as down to a scraper or a load balancer.
DATABASE_TIMEOUT_S = 2.0
# A video waits and runs from seconds (a tiny model) to an hour (a long 720p video on a busy queue).
DURATION_BUCKETS = (1, 2, 5, 10, 15, 30, 60, 90, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600, 7200)
RUN_OUTCOMES = (JobStatus.SUCCEEDED, JobStatus.FAILED)  # a cancelled run was cut short: its time says nothing
FINISHED_OUTCOMES = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
ONLINE_STATES = tuple(state for state in WorkerState if state is not WorkerState.STOPPED)
# The classic text format, which every scraper reads; generate_latest's default output is exactly this.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class Metrics:
    """The metrics of one process, in a registry of its own (never prometheus_client's global one), so that tests and
    several instances in one process do not clash.

    `lease_s` (settings.queue.lease_s) decides which workers count as online; `clock` must be the clock the
    workers' heartbeats are stamped with (wall time)."""

    def __init__(
        self, lease_s: float, clock: Callable[[], float] = time.time, min_refresh_s: float = MIN_REFRESH_S
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._lease_s = lease_s
        self._clock = clock
        self._min_refresh_s = min_refresh_s
        self._refreshed_at: float | None = None  # time.monotonic() of the last refresh that read
        self._refresh_lock = asyncio.Lock()
        registry = self.registry

        self.jobs = Gauge("wanbot_jobs", "Jobs in the queue's database by state.", ["state"], registry=registry)
        self.queue_length = Gauge("wanbot_queue_length", "Jobs waiting to start.", registry=registry)
        self.database_up = Gauge(
            "wanbot_database_up",
            "1 when the last refresh read the queue's database, 0 when it failed (the job and worker gauges are then "
            "the last values read).",
            registry=registry,
        )
        self.workers = Gauge("wanbot_workers", "Online workers by state.", ["state"], registry=registry)
        self.worker_busy = Gauge(
            "wanbot_worker_busy", "1 while an online worker runs a job, else 0.", ["worker"], registry=registry
        )
        self.worker_gpu_free = Gauge(
            "wanbot_worker_gpu_free_bytes",
            "Free accelerator memory an online worker last reported.",
            ["worker"],
            registry=registry,
        )
        self.wait_seconds = Histogram(
            "wanbot_job_wait_seconds",
            "From a job's request to its start (a retried or requeued job counts from its request).",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.run_seconds = Histogram(
            "wanbot_job_run_seconds",
            "From a job's start to its end, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.finished = Counter("wanbot_jobs_finished", "Jobs that ended, by outcome.", ["outcome"], registry=registry)
        self.delivery_failures = Counter(
            "wanbot_delivery_failures", "Failed uploads of finished videos (each try).", registry=registry
        )
        self.refused = Counter(
            "wanbot_refused",
            "Requests or videos refused by the content rules or the quotas, by reason.",
            ["reason"],
            registry=registry,
        )

        # Every label value a dashboard may ask for is there from the start, so rate() and sums see a 0, not nothing.
        for status in JobStatus:
            self.jobs.labels(state=status.value)
        for state in ONLINE_STATES:
            self.workers.labels(state=state.value)
        for outcome in RUN_OUTCOMES:
            self.run_seconds.labels(outcome=outcome.value)
        for outcome in FINISHED_OUTCOMES:
            self.finished.labels(outcome=outcome.value)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)

    # -- what the database knows -----------------------------------------------------------------------------------

    async def refresh(self, queue: JobQueue, force: bool = False) -> None:
        """Read the job counts and the workers into the gauges, unless that was done under `min_refresh_s` ago.

        A database that fails or is slow leaves the last values and sets wanbot_database_up to 0: a scrape still
        answers (with the event-counted metrics current), and the health check reports the database itself."""
        async with self._refresh_lock:  # concurrent scrapes share one read
            now = time.monotonic()
            if not force and self._refreshed_at is not None and now - self._refreshed_at < self._min_refresh_s:
                return
            self._refreshed_at = now
            try:
                async with asyncio.timeout(DATABASE_TIMEOUT_S):
                    counts = await queue.counts()
                    workers = await queue.workers()
            except Exception as exc:
                log.warning("Metrics could not read the queue's database: %s", str(exc) or type(exc).__name__)
                self.database_up.set(0)
                return
            self.database_up.set(1)
            self._set_jobs(counts)
            self._set_workers(workers)

    def _set_jobs(self, counts: dict[str, int]) -> None:
        for status in JobStatus:
            self.jobs.labels(state=status.value).set(counts.get(status.value, 0))
        self.queue_length.set(counts.get(JobStatus.QUEUED.value, 0))

    def _set_workers(self, workers: list[WorkerRecord]) -> None:
        now = self._clock()
        online = [worker for worker in workers if worker.online(now, self._lease_s)]
        for state in ONLINE_STATES:
            self.workers.labels(state=state.value).set(sum(worker.state is state for worker in online))
        # A worker that stopped or went silent leaves the per-worker series instead of freezing at its last value.
        # No await between clear() and the sets below, so no scrape renders the gap.
        self.worker_busy.clear()
        self.worker_gpu_free.clear()
        for worker in online:
            busy = worker.current_job is not None or worker.state is WorkerState.WORKING
            self.worker_busy.labels(worker=worker.id).set(int(busy))
            if worker.free_memory_bytes is not None:
                self.worker_gpu_free.labels(worker=worker.id).set(worker.free_memory_bytes)

    # -- what the events tell ----------------------------------------------------------------------------------------

    def observe(self, event: JobEvent) -> None:
        """Count one job event. Each event counts as often as it is heard: this process's bus hears an event once, so
        nothing is de-duplicated here. Every process that follows counts what it hears, though: where `serve` also
        hears the workers' events (shared between processes), sum these metrics over one kind of process only."""
        job = event.job
        if event.kind is EventKind.STARTED:
            if job.started_at is not None:
                self.wait_seconds.observe(max(job.started_at - job.created_at, 0.0))
        elif event.kind in (EventKind.SUCCEEDED, EventKind.FAILED, EventKind.CANCELLED):
            outcome = JobStatus(event.kind.value)
            self.finished.labels(outcome=outcome.value).inc()
            # A job cancelled while it waited has no start; a cancelled run is not a run time worth a bucket.
            if outcome in RUN_OUTCOMES and job.started_at is not None and job.finished_at is not None:
                self.run_seconds.labels(outcome=outcome.value).observe(max(job.finished_at - job.started_at, 0.0))
        elif event.kind is EventKind.DELIVERY_FAILED:
            self.delivery_failures.inc()

    async def follow(self, queue: JobQueue) -> None:
        """Observe every event of `queue` from now on; runs until cancelled."""
        subscription = queue.events.subscribe()
        try:
            async for event in subscription:
                try:
                    self.observe(event)
                except Exception:  # one odd event must not end the metrics for the life of the process
                    log.exception("Metrics could not count a %s event of job #%s", event.kind, event.job.id)
        finally:
            subscription.close()

    def render(self) -> bytes:
        """The exposition text of the current values (no database read: `refresh` first)."""
        return generate_latest(self.registry)


# -- the HTTP server -------------------------------------------------------------------------------------------------


async def serve_metrics(
    metrics: Metrics,
    queue: JobQueue,
    host: str,
    port: int,
    health: Callable[[], str | None],
    degraded: Callable[[], Awaitable[str | None]] | None = None,
) -> None:
    """Serve GET /metrics and GET /healthz on host:port until cancelled.

    /healthz answers 200 "ok" when `health()` returns None (the process's own view: adapters connected, worker
    alive...) and the queue's database answers within DATABASE_TIMEOUT_S, else 503 with the reason; 200 "degraded:
    <why>" when the process is well but `degraded()` names what the service lacks (a serve with no worker online).
    A port that cannot be bound is a UserError naming metrics.port (or metrics.host)."""

    async def metrics_page(request: web.Request) -> web.Response:
        await metrics.refresh(queue)
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def health_page(request: web.Request) -> web.Response:
        reason = await _unhealthy(queue, health)
        if reason is not None:
            return web.Response(status=503, text=f"{reason}\n")
        lacking = await degraded() if degraded is not None else None
        return web.Response(text=f"degraded: {lacking}\n" if lacking else "ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", health_page)
    # No access log: a scraper every few seconds would bury everything else in the log.
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise _bind_error(host, port, exc) from exc
        log.info("Metrics on http://%s:%d/metrics, health on /healthz", host, port)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()


async def _unhealthy(queue: JobQueue, health: Callable[[], str | None]) -> str | None:
    """Why this process is not healthy, or None."""
    try:
        reason = health()
    except Exception as exc:  # a broken check is itself a reason, and must not turn into a 500 without a word
        log.exception("The health check failed")
        return f"health check failed: {exc}"
    if reason is not None:
        return reason
    try:
        async with asyncio.timeout(DATABASE_TIMEOUT_S):
            await queue.counts()
    except TimeoutError:
        return f"queue database did not answer within {DATABASE_TIMEOUT_S:g} s"
    except Exception as exc:
        return f"queue database failed: {exc}"
    return None


def check_port(host: str, port: int) -> None:
    """Raise the UserError serve_metrics would, before anything starts: a port in use is a mistake in the settings
    (exit 2, not restarted), not a failure of the running process."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no conflict
            probe.bind((host, port))
    except OSError as exc:
        raise _bind_error(host, port, exc) from exc


def _bind_error(host: str, port: int, exc: OSError) -> UserError:
    if exc.errno == errno.EADDRINUSE:
        return UserError(
            f"Cannot serve metrics on {host}:{port}: the port is already in use.",
            "Stop what listens there or set metrics.port to a free port (each wanbot process on a host needs its "
            "own); leave metrics.port unset to turn metrics off.",
        )
    reason = exc.strerror or str(exc)
    return UserError(
        f"Cannot serve metrics on {host}:{port}: {reason}.",
        "Check metrics.host (an address of this machine, or 0.0.0.0) and metrics.port.",
    )
