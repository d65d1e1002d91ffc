"""Workers, leases and events shared between processes, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from engine.errors import ClaimLost
from engine.jobs import (
    EventKind,
    JobStatus,
    PreviewInfo,
    Progress,
    ResultInfo,
    ServingRecord,
    Stage,
    WorkerRecord,
    WorkerState,
)
from engine.queue.follower import EventFollower
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode
from tests.factories import ADMIN, params, source
from tests.running import until

pytestmark = pytest.mark.both_backends
LEASE_S = 60.0


def result() -> ResultInfo:
    return ResultInfo(path="x.mp4", bytes=1, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="t", seed=1)


def worker(name: str, host: str = "gpu-a", pid: int = 100, **fields: object) -> WorkerRecord:
    return WorkerRecord(id=name, host=host, pid=pid, device="cuda:0", started_at=0.0, **fields)


@pytest.fixture
async def clocked(queue: JobQueue):
    """The queue with a clock the test moves: [JobQueue, now]."""
    now = [1000.0]
    yield JobQueue(queue.database, queue.events, lambda: now[0]), now


async def claimed_by(queue: JobQueue, name: str, prompt: str = "p", **fields: object):
    await queue.enqueue(source(prompt), Mode.T2V, "tiny", params(prompt))
    await queue.heartbeat(worker(name, **fields))
    job = await queue.claim_next(worker_id=name)
    assert job is not None and job.worker_id == name and job.claim_token
    return job


async def test_a_silent_worker_loses_its_job_after_the_lease_and_its_late_writes_are_refused(clocked):
    queue, now = clocked
    job = await claimed_by(queue, "w1")
    now[0] += LEASE_S - 1  # still within the lease: nothing to recover
    assert await queue.recover_interrupted(max_attempts=3, lease_s=LEASE_S) == []
    now[0] += 2
    (recovered,) = await queue.recover_interrupted(max_attempts=3, lease_s=LEASE_S)
    assert recovered.status is JobStatus.QUEUED and recovered.attempts == 1 and recovered.claim_token is None
    assert "was not heard from" in (await queue.events_of(job.id))[-1][1]

    await queue.heartbeat(worker("w2"))
    again = await queue.claim_next(worker_id="w2")
    assert again.id == job.id and again.attempts == 2 and again.claim_token != job.claim_token

    # The first worker comes back: it learns the job is gone, and nothing it writes lands.
    assert await queue.heartbeat(worker("w1", current_job=job.id), job.claim_token) is False
    with pytest.raises(ClaimLost):
        await queue.update_progress(job.id, Progress(stage=Stage.DENOISING, step=1, total=2), token=job.claim_token)
    queue.share_events()  # unstored progress still reaches other processes: only while the claim holds
    with pytest.raises(ClaimLost):
        await queue.update_progress(job.id, Progress(stage=Stage.DECODING), persist=False, token=job.claim_token)
    with pytest.raises(ClaimLost):
        await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    with pytest.raises(ClaimLost):
        await queue.requeue(job.id, "stopping", token=job.claim_token)
    finished = await queue.mark_succeeded(job.id, result(), token=again.claim_token)
    assert finished.status is JobStatus.SUCCEEDED and finished.worker_id == "w2"


async def test_a_heartbeat_keeps_the_job_and_a_worker_back_in_time_resumes_it(clocked):
    queue, now = clocked
    job = await claimed_by(queue, "w1")
    for _ in range(5):
        now[0] += LEASE_S / 2
        assert await queue.heartbeat(worker("w1", current_job=job.id), job.claim_token) is True
        assert await queue.recover_interrupted(max_attempts=3, lease_s=LEASE_S) == []
    # Silent for longer than the lease, but back before anyone looked: the job is still its own.
    now[0] += LEASE_S * 3
    assert await queue.heartbeat(worker("w1", current_job=job.id), job.claim_token) is True
    assert await queue.recover_interrupted(max_attempts=3, lease_s=LEASE_S) == []
    assert (await queue.mark_cancelled(job.id, token=job.claim_token)).status is JobStatus.CANCELLED


async def test_a_stopped_worker_or_a_dead_process_of_this_host_loses_its_job_at_once(clocked):
    queue, _ = clocked
    stopped = await claimed_by(queue, "w-stopped", "a")
    crashed = await claimed_by(queue, "w-crashed", "b", machine="here|pid:[1]", pid=4242)
    # The same host name but another PID namespace (a container with the host's name): its pid says nothing here.
    other_host = await claimed_by(queue, "w-elsewhere", "c", machine="here|pid:[2]", pid=4242)
    await queue.heartbeat(worker("w-stopped", state=WorkerState.STOPPED))

    recovered = await queue.recover_interrupted(3, LEASE_S, machine="here|pid:[1]", is_alive=lambda pid: pid != 4242)
    assert sorted(job.id for job in recovered) == [stopped.id, crashed.id]
    assert (await queue.get(other_host.id)).status is JobStatus.RUNNING


async def test_a_job_out_of_attempts_fails_with_a_message(clocked):
    queue, now = clocked
    job = await claimed_by(queue, "w1")
    now[0] += LEASE_S + 1
    (failed,) = await queue.recover_interrupted(max_attempts=1, lease_s=LEASE_S)
    assert failed.status is JobStatus.FAILED and "stopped while making this video 1 times" in failed.error_user
    assert failed.id == job.id


async def test_workers_are_listed_with_what_they_do(clocked):
    queue, now = clocked
    job = await claimed_by(queue, "w1")
    await queue.heartbeat(
        worker("w1", current_job=job.id, state=WorkerState.WORKING, loaded_model="tiny", downloading=["big"]),
        job.claim_token,
    )
    now[0] += 1
    await queue.heartbeat(worker("w2", gpu_name="H100", free_memory_bytes=2**34, state=WorkerState.IDLE))
    listed = {record.id: record for record in await queue.workers()}
    assert listed["w1"].current_job == job.id and listed["w1"].downloading == ["big"]
    assert listed["w1"].state is WorkerState.WORKING and listed["w2"].free_memory_bytes == 2**34
    assert listed["w2"].online(now[0], LEASE_S) and not listed["w1"].online(now[0] + LEASE_S + 1, LEASE_S)


async def test_events_reach_another_process_sharing_the_database(queue: JobQueue, database_url: str):
    """Two queues on one database are two processes: a worker's progress and a serving process's cancel each reach
    the other through the shared events (NOTIFY on PostgreSQL, polling on SQLite)."""
    serving = await JobQueue.connect(database_url)
    follower_tasks = []
    try:
        for side in (queue, serving):
            side.share_events()
            follower_tasks.append(asyncio.create_task(EventFollower(side).follow()))
        heard_by_serving = serving.events.subscribe()
        heard_by_worker = queue.events.subscribe()
        await asyncio.sleep(0.3)  # both followers have started

        asked = await serving.enqueue(source("alice"), Mode.T2V, "tiny", params())
        assert (await asyncio.wait_for(heard_by_worker.get(), 10)).kind is EventKind.ENQUEUED
        job = await queue.claim_next(worker_id="w1")
        await queue.update_progress(job.id, Progress(stage=Stage.DENOISING, step=1, total=2), token=job.claim_token)
        kinds = []
        while EventKind.PROGRESS not in kinds:
            event = await asyncio.wait_for(heard_by_serving.get(), 10)
            kinds.append(event.kind)
        assert kinds[0] is EventKind.ENQUEUED  # its own, published at once
        assert event.progress.step == 1 and event.job.id == asked.job.id

        await serving.cancel(job.id, ADMIN)
        event = await until(lambda: _drain_for(heard_by_worker, EventKind.CANCEL_REQUESTED), what="the cancel")
        assert event.job.cancel_requested
    finally:
        for task in follower_tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await serving.close()


def _drain_for(subscription, kind: EventKind):
    while not subscription.caught_up():
        event = subscription._inbox.get_nowait()
        if event.kind is kind:
            return event
    return None


async def test_a_new_follower_does_not_replay_what_happened_before_it_started(queue: JobQueue, database_url: str):
    queue.share_events()
    old = await queue.enqueue(source("alice"), Mode.T2V, "tiny", params())
    job = await queue.claim_next(worker_id="w1")
    await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    serving = await JobQueue.connect(database_url)
    follower = asyncio.create_task(EventFollower(serving).follow())
    heard = serving.events.subscribe()
    try:
        await asyncio.sleep(1.5)  # several polls
        new = await queue.enqueue(source("bob"), Mode.T2V, "tiny", params())
        event = await asyncio.wait_for(heard.get(), timeout=10)
        assert (event.kind, event.job.id) == (EventKind.ENQUEUED, new.job.id)
        assert old.job.id != new.job.id and heard.caught_up()
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await serving.close()


async def test_a_stale_worker_shows_no_preview_and_a_requeue_of_a_job_not_running_announces_nothing(clocked):
    queue, now = clocked
    job = await claimed_by(queue, "w1")
    now[0] += LEASE_S + 1
    await queue.recover_interrupted(max_attempts=3, lease_s=LEASE_S)
    await queue.heartbeat(worker("w2"))
    again = await queue.claim_next(worker_id="w2")
    heard = queue.events.subscribe()
    preview = PreviewInfo(seq=1, step=1, path="job.jpg", width=64, height=64)

    assert not await queue.holds_claim(job.id, job.claim_token)
    with pytest.raises(ClaimLost):
        await queue.announce_preview(job.id, preview, token=job.claim_token)
    assert await queue.holds_claim(job.id, again.claim_token)
    await queue.announce_preview(job.id, preview, token=again.claim_token)
    await queue.mark_succeeded(job.id, result(), token=again.claim_token)
    assert (
        await queue.requeue(job.id, "stopping", token=job.claim_token)
    ).status is JobStatus.SUCCEEDED  # not running: left as it is

    kinds = [(await asyncio.wait_for(heard.get(), timeout=5)).kind for _ in range(2)]
    assert kinds == [EventKind.PREVIEW, EventKind.SUCCEEDED]  # the new owner's preview and end, nothing else
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(heard.get(), timeout=0.1)
    assert [kind for kind, _ in await queue.events_of(job.id)].count("requeued") == 1  # the lease's, not the stop's


# -- deliveries: one process uploads a video at a time --------------------------------------------------------------


async def finished(queue: JobQueue) -> int:
    job = await claimed_by(queue, "w1")
    await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    return job.id


async def test_two_processes_claiming_one_delivery_at_once_make_one_upload(database_url: str):
    first, second = await JobQueue.connect(database_url), await JobQueue.connect(database_url)
    try:
        job_id = await finished(first)
        claims = await asyncio.gather(
            first.claim_delivery(job_id, "serve-a", max_attempts=5, claim_s=300),
            second.claim_delivery(job_id, "serve-b", max_attempts=5, claim_s=300),
        )
        (winner,) = [claim for claim in claims if claim is not None]
        assert winner.upload_starts == 1
        # The loser tries again later: still claimed; once delivered, nothing is waiting.
        loser = "serve-b" if claims[0] is not None else "serve-a"
        assert await second.claim_delivery(job_id, loser, max_attempts=5, claim_s=300) is None
        await first.mark_delivered(job_id)
        assert await second.claim_delivery(job_id, loser, max_attempts=5, claim_s=300) is None
    finally:
        await first.close()
        await second.close()


async def test_a_delivery_claim_is_the_holders_until_it_runs_out_or_the_holder_is_replaced(clocked):
    queue, now = clocked
    job_id = await finished(queue)
    assert (await queue.claim_delivery(job_id, "serve-a", max_attempts=5, claim_s=300)).upload_starts == 1
    failed = await queue.mark_delivery_failed(job_id, "the upload to Discord did not go through")
    # A failure ends the claim: the next try may come from any process, and counts its upload.
    assert (await queue.claim_delivery(job_id, "serve-b", max_attempts=5, claim_s=300)).upload_starts == 2
    assert failed.delivery_attempts == 1
    # serve-b dies mid-upload: its claim holds for claim_s, and its own later rounds may go on with it.
    now[0] += 299
    assert await queue.claim_delivery(job_id, "serve-a", max_attempts=5, claim_s=300) is None
    assert (await queue.claim_delivery(job_id, "serve-b", max_attempts=5, claim_s=300)).upload_starts == 3
    now[0] += 301
    assert (await queue.claim_delivery(job_id, "serve-a", max_attempts=5, claim_s=300)).upload_starts == 4

    # A serving process replacing one that is gone takes over its uploads at once.
    gone = ServingRecord(id="serve-a", host="h", machine="h/1", pid=41, started_at=0.0)
    assert await queue.take_serving(gone, LEASE_S) is None
    now[0] += LEASE_S + 1
    successor = ServingRecord(id="serve-c", host="h", machine="h/1", pid=42, started_at=now[0])
    assert await queue.take_serving(successor, LEASE_S) is None
    assert (await queue.claim_delivery(job_id, "serve-c", max_attempts=5, claim_s=300)).upload_starts == 5


async def test_a_stopping_process_hands_its_uploads_on(clocked):
    queue, _ = clocked
    job_id = await finished(queue)
    await queue.claim_delivery(job_id, "serve-a", max_attempts=5, claim_s=300)
    await queue.release_deliveries("serve-a")
    assert await queue.claim_delivery(job_id, "serve-b", max_attempts=5, claim_s=300) is not None


async def test_every_write_to_a_running_job_needs_its_claim(queue: JobQueue):
    """No write without the claim's token: a writer that never held the claim (or names none) changes nothing and
    publishes nothing."""
    job = await claimed_by(queue, "w1")
    heard = queue.events.subscribe()
    progress = Progress(stage=Stage.DENOISING, step=1, total=4)
    preview = PreviewInfo(seq=1, step=1, path="p.jpg", width=64, height=64)
    for stranger in (None, "not-the-token"):
        for write in (
            queue.update_progress(job.id, progress, token=stranger),
            queue.announce_preview(job.id, preview, token=stranger),
            queue.mark_succeeded(job.id, result(), token=stranger),
            queue.mark_failed(job.id, "no", token=stranger),
            queue.mark_cancelled(job.id, token=stranger),
            queue.requeue(job.id, "stopping", token=stranger),
        ):
            with pytest.raises(ClaimLost):
                await write
    assert heard.caught_up()  # nothing was published
    assert (await queue.get(job.id)).status is JobStatus.RUNNING
