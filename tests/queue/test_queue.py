from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import asyncpg
import pytest

from engine.errors import InvalidTransition, NotAllowed, QueueFull
from engine.jobs import (
    DeliveryStatus,
    EventKind,
    JobStatus,
    LoraUse,
    Progress,
    ResultInfo,
    Stage,
    WorkerRecord,
    WorkerState,
)
from engine.queue.jobqueue import JobQueue
from engine.queue.sqlite import MIGRATIONS, split_sql
from engine.storage.cleanup import remove_delivered_videos, remove_unused_images
from engine.storage.images import ImageInfo, ImageStore, Mode, validate_image_bytes
from tests import imagefactory
from tests.factories import ADMIN, owner, params, source, token_of

REPO = Path(__file__).resolve().parents[2]
# Every test that takes `queue` runs on SQLite and on PostgreSQL.
pytestmark = pytest.mark.both_backends


def result(path: str = "/tmp/x.mp4") -> ResultInfo:
    return ResultInfo(path=path, bytes=1, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="tiny", seed=1)


async def test_enqueue_stores_everything_and_reports_position(queue: JobQueue):
    added = await queue.enqueue(source("alice", "m1"), Mode.T2V, "tiny", params(), priority=2)
    assert added.created
    assert added.position.position == 1
    job = await queue.get(added.job.id)
    assert job.status is JobStatus.QUEUED
    assert job.source.user_id == "alice"
    assert job.params.prompt == "a red fox in the snow"
    assert job.priority == 2
    assert await queue.events_of(job.id) == [("enqueued", None)]


async def test_database_is_in_wal_mode(tmp_path: Path):
    queue = await JobQueue.open(tmp_path / "q.sqlite3")
    await queue.close()
    with sqlite3.connect(tmp_path / "q.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


async def test_same_message_enqueued_twice_is_one_job(queue: JobQueue):
    first, second = await asyncio.gather(
        queue.enqueue(source("alice", "m1"), Mode.T2V, "tiny", params()),
        queue.enqueue(source("alice", "m1"), Mode.T2V, "tiny", params()),
    )
    assert first.job.id == second.job.id
    assert sorted([first.created, second.created]) == [False, True]
    assert (await queue.counts()) == {"queued": 1}


async def test_concurrent_enqueues_from_many_tasks_all_land(queue: JobQueue):
    async def add(user: int, index: int) -> int:
        added = await queue.enqueue(
            source(f"u{user}", f"m{user}-{index}"), Mode.T2V, "tiny", params(), global_limit=500
        )
        return added.job.id

    ids = await asyncio.gather(*(add(user, index) for user in range(40) for index in range(3)))
    assert len(set(ids)) == 120
    assert (await queue.counts()) == {"queued": 120}


async def test_per_user_and_global_limits(queue: JobQueue):
    for index in range(3):
        await queue.enqueue(source("alice", f"m{index}"), Mode.T2V, "tiny", params())
    with pytest.raises(QueueFull, match="already have 3 videos waiting") as caught:
        await queue.enqueue(source("alice", "m9"), Mode.T2V, "tiny", params())
    assert "/cancel" in caught.value.hint
    admin_job = await queue.enqueue(source("alice", "m10"), Mode.T2V, "tiny", params(), is_admin=True)
    assert admin_job.created
    with pytest.raises(QueueFull, match="queue is full"):
        await queue.enqueue(source("bob", "b1"), Mode.T2V, "tiny", params(), global_limit=4)


async def test_daily_limit_counts_what_used_or_may_use_the_gpu_and_says_when_the_next_is_possible(queue: JobQueue):
    now = [100_000.0]
    clocked = JobQueue(queue.database, queue.events, lambda: now[0])

    async def ask(message: str, **options: object):
        limits = {"daily_limit": 3, "per_user_limit": 10}
        return await clocked.enqueue(source("alice", message), Mode.T2V, "tiny", params(), **limits, **options)

    done = await ask("m0")
    await clocked.claim_next()
    await clocked.mark_succeeded(done.job.id, result(), token=await token_of(clocked, done.job.id))
    now[0] += 3600
    never_started = await ask("m1")
    await clocked.cancel(never_started.job.id, owner("alice"))  # a job cancelled while waiting is not counted
    await ask("m2")
    now[0] += 3600
    await ask("m3")
    with pytest.raises(QueueFull, match="asked for 3 videos in the last 24 hours; the limit is 3 a day") as caught:
        await ask("m4")
    assert caught.value.hint == "You can ask for the next one in 22h 00m."  # when the first leaves the 24 hours
    now[0] += 22 * 3600
    assert (await ask("m5")).created
    assert (await ask("m6", is_admin=True)).created  # admins are exempt


async def test_gpu_time_a_day_counts_runs_and_what_waits_and_refuses_what_would_pass_it(queue: JobQueue):
    now = [100_000.0]
    clocked = JobQueue(queue.database, queue.events, lambda: now[0])
    limits = {"daily_gpu_seconds": 600, "per_user_limit": 10}

    async def ask(user: str, message: str, chat: str = "c1", **options: object):
        asked = source(user, message, chat=chat)
        return await clocked.enqueue(asked, Mode.T2V, "tiny", params(), **{**limits, **options})

    async def run(job_id: int, seconds: float) -> None:
        assert (await clocked.claim_next()).id == job_id
        now[0] += seconds
        await clocked.mark_succeeded(job_id, result(), token=await token_of(clocked, job_id))

    first = await ask("alice", "m0")
    await run(first.job.id, 240)  # the tiny model's usual run is now 240 s
    second = await ask("alice", "m1")
    assert (await clocked.gpu_time("telegram:alice")).used_s == 240
    assert (await clocked.gpu_time("telegram:alice")).expected_s == 240  # the waiting one, at the usual run time
    with pytest.raises(
        QueueFull, match=r"would take more than the 10m 00s of GPU time a day this bot gives each"
    ) as no:
        await ask("alice", "m2")  # 240 used + 240 waiting + 240 for this one > 600
    assert "4m 00s used in the last 24 hours, about 4m 00s for the ones waiting, about 4m 00s for this one" in str(
        no.value
    )
    assert no.value.hint == "GPU time stops counting 24 hours after it was used: the oldest in 23h 56m."
    # Before anything is downloaded, what is used and what waits already count (the new job's model is not known yet).
    await clocked.check_room(source("alice", "m2"), **limits)
    with pytest.raises(QueueFull):
        await clocked.check_room(source("alice", "m2"), **{**limits, "daily_gpu_seconds": 400})
    assert (await ask("bob", "b0")).created  # each person has their own
    exempt = await ask("alice", "m3", is_admin=True)
    assert exempt.created  # admins are exempt
    for waiting in (second, exempt):
        await clocked.cancel(waiting.job.id, owner("alice"))  # cancelled while waiting: it takes no GPU time
    assert (await ask("alice", "m4")).created
    now[0] += 24 * 3600  # the first run leaves the 24 hours
    assert (await clocked.gpu_time("telegram:alice")).used_s == 0

    # A chat's limit counts everyone's videos asked for in it, not another chat's.
    in_chat = {"daily_gpu_seconds": 0, "daily_chat_gpu_seconds": 500}
    with pytest.raises(QueueFull, match="The videos asked for in this chat would take more than the 8m 20s"):
        for index in range(3):  # three waiting at 240 s each pass 500 s
            await ask(f"user{index}", f"g{index}", chat="group", **in_chat)
    assert (await ask("dave", "d0", chat="elsewhere", **in_chat)).created


async def test_claim_is_round_robin_between_users_then_priority_then_age(queue: JobQueue):
    for index in range(3):
        await queue.enqueue(source("alice", f"a{index}"), Mode.T2V, "tiny", params(f"alice {index}"))
    await queue.enqueue(source("bob", "b0"), Mode.T2V, "tiny", params("bob 0"))
    await queue.enqueue(source("carol", "c0"), Mode.T2V, "tiny", params("carol 0"))
    await queue.enqueue(source("carol", "c1"), Mode.T2V, "tiny", params("carol urgent"), priority=5)
    order = []
    while (job := await queue.claim_next()) is not None:
        order.append(job.params.prompt)
        await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    # Everyone's first job before anyone's second; carol's urgent job is her first turn.
    assert order[:3] == ["carol urgent", "alice 0", "bob 0"]
    assert order[3:] == ["carol 0", "alice 1", "alice 2"]


async def test_a_user_served_recently_waits_behind_a_newcomer(queue: JobQueue):
    for index in range(3):
        await queue.enqueue(source("alice", f"a{index}"), Mode.T2V, "tiny", params(f"alice {index}"))
    first = await queue.claim_next()
    await queue.mark_succeeded(first.id, result(), token=first.claim_token)
    await queue.enqueue(source("bob", "b0"), Mode.T2V, "tiny", params("bob 0"))
    assert (await queue.claim_next()).params.prompt == "bob 0"


async def test_position_follows_the_claim_order_and_has_an_eta(queue: JobQueue):
    now = [1000.0]
    clocked = JobQueue(queue.database, queue.events, lambda: now[0])
    first = await clocked.enqueue(source("alice", "a0"), Mode.T2V, "tiny", params())
    second = await clocked.enqueue(source("alice", "a1"), Mode.T2V, "tiny", params())
    bob = await clocked.enqueue(source("bob", "b0"), Mode.T2V, "tiny", params())
    places = [await clocked.position(added.job.id) for added in (first, bob, second)]
    assert [place.position for place in places] == [1, 2, 3]
    assert places[1].eta_s is None  # no finished job yet to estimate from
    assert (await clocked.claim_next()).id == first.job.id
    now[0] += 30
    await clocked.mark_succeeded(first.job.id, result(), token=await token_of(clocked, first.job.id))
    assert (await clocked.claim_next()).id == bob.job.id
    now[0] += 10
    waiting = await clocked.position(second.job.id)
    assert waiting.position == 1
    assert waiting.eta_s == pytest.approx(20.0)  # a typical job takes 30 s and bob's has run for 10
    assert await clocked.position(bob.job.id) is None
    # Once bob's job reports its own estimate (from its step times), that is the wait of the job behind it.
    await clocked.update_progress(
        bob.job.id,
        Progress(stage=Stage.DENOISING, step=2, total=40, eta_s=95.0),
        token=await token_of(clocked, bob.job.id),
    )
    assert (await clocked.position(second.job.id)).eta_s == pytest.approx(95.0)
    carol = await clocked.enqueue(source("carol", "c0"), Mode.T2V, "tiny", params())  # not served yet: goes first
    assert (await clocked.position(carol.job.id)).eta_s == pytest.approx(95.0)
    behind = await clocked.position(second.job.id)
    assert (behind.position, behind.eta_s) == (2, pytest.approx(95.0 + 30.0))


async def test_a_wait_counts_runs_of_the_same_model_and_says_unknown_rather_than_zero(queue: JobQueue):
    now = [1000.0]
    clocked = JobQueue(queue.database, queue.events, lambda: now[0])
    tiny = await clocked.enqueue(source("alice", "a0"), Mode.T2V, "tiny", params())
    now[0] += 2
    await clocked.claim_next()
    await clocked.mark_succeeded(
        tiny.job.id, result(), token=await token_of(clocked, tiny.job.id)
    )  # a tiny video takes 2 s
    big = await clocked.enqueue(source("alice", "a1"), Mode.T2V, "big", params())
    waiting = await clocked.enqueue(source("alice", "a2"), Mode.T2V, "big", params())
    assert (await clocked.claim_next()).id == big.job.id
    # No video of "big" yet: the tiny model's 2 s say nothing about it.
    assert (await clocked.position(waiting.job.id)).eta_s is None
    # A download's time left, or the steps' without the decode and encode, are not the time the job has left.
    for partial in (
        Progress(stage=Stage.DOWNLOADING, eta_s=5.0),
        Progress(stage=Stage.DENOISING, step=1, total=60, eta_s=4.0, eta_steps_only=True),
    ):
        await clocked.update_progress(big.job.id, partial, token=await token_of(clocked, big.job.id))
        assert (await clocked.position(waiting.job.id)).eta_s is None
    now[0] += 300
    await clocked.mark_succeeded(big.job.id, result(), token=await token_of(clocked, big.job.id))
    assert (await clocked.claim_next()).id == waiting.job.id
    behind = await clocked.enqueue(source("alice", "a3"), Mode.T2V, "big", params())
    now[0] += 100
    assert (await clocked.position(behind.job.id)).eta_s == pytest.approx(200.0)  # a big video takes 300 s
    now[0] += 250
    assert (await clocked.position(behind.job.id)).eta_s is None  # overrunning: not "0s"


async def test_a_wait_counts_every_online_worker_idle_ones_at_once(queue: JobQueue):
    now = [1000.0]
    clocked = JobQueue(queue.database, queue.events, lambda: now[0])
    done = await clocked.enqueue(source("zed", "z0"), Mode.T2V, "tiny", params())
    await clocked.claim_next()
    now[0] += 100
    await clocked.mark_succeeded(
        done.job.id, result(), token=await token_of(clocked, done.job.id)
    )  # a video takes 100 s
    running = await clocked.enqueue(source("ann", "a0"), Mode.T2V, "tiny", params())
    await clocked.claim_next()
    await clocked.update_progress(
        running.job.id,
        Progress(stage=Stage.DENOISING, step=2, total=4, eta_s=60.0),
        token=await token_of(clocked, running.job.id),
    )
    first, second = [
        (await clocked.enqueue(source(user, f"{user}0"), Mode.T2V, "tiny", params())).job.id for user in ("bob", "cy")
    ]
    # One worker (the busy one): each job waits for the one before it.
    assert (await clocked.position(first)).eta_s == pytest.approx(60.0)
    assert (await clocked.position(second)).eta_s == pytest.approx(160.0)
    for name in ("gpu-a", "gpu-b"):  # two online, one of them idle
        await clocked.heartbeat(
            WorkerRecord(id=f"{name}-1", host=name, pid=1, device="cuda:0", state=WorkerState.IDLE, started_at=0)
        )
    assert (await clocked.position(first)).eta_s == 0.0  # the idle worker takes it now
    assert (await clocked.position(second)).eta_s == pytest.approx(60.0)  # the busy one, when its job ends
    now[0] += 120  # both heard from too long ago: one slot again, the running job's
    assert (await clocked.position(second)).eta_s == pytest.approx(160.0)


async def test_decode_and_encode_times_are_scaled_from_the_models_latest_videos(queue: JobQueue):
    assert await queue.finish_times("tiny", 64 * 64 * 5) is None  # no video yet
    for decode_s, encode_s in ((2.0, 1.0), (4.0, 3.0)):
        await queue.enqueue(source("alice", f"m{decode_s}"), Mode.T2V, "tiny", params())
        job = await queue.claim_next()
        timed = result().model_copy(update={"timings": {"decode_s": decode_s, "encode_s": encode_s}})
        await queue.mark_succeeded(job.id, timed, token=job.claim_token)  # each 64x64, 5 frames
    twice_the_pixels = await queue.finish_times("tiny", 2 * 64 * 64 * 5)
    assert (twice_the_pixels.decode_s, twice_the_pixels.encode_s) == (pytest.approx(6.0), pytest.approx(4.0))
    assert await queue.finish_times("other", 64 * 64 * 5) is None


async def test_terminal_states_never_change(queue: JobQueue):
    added = await queue.enqueue(source(), Mode.T2V, "tiny", params())
    job = await queue.claim_next()
    await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    with pytest.raises(InvalidTransition):
        await queue.mark_failed(job.id, "late failure", token=job.claim_token)
    with pytest.raises(InvalidTransition, match="already finished"):
        await queue.cancel(job.id, owner())
    with pytest.raises((sqlite3.IntegrityError, asyncpg.RaiseError), match="terminal job status cannot change"):
        async with queue._transaction() as db:
            await db.run("UPDATE jobs SET status = 'queued' WHERE id = ?", added.job.id)
    assert (await queue.get(job.id)).status is JobStatus.SUCCEEDED


async def test_cancel_queued_is_immediate_and_running_sets_a_request(queue: JobQueue):
    waiting = await queue.enqueue(source("alice", "a1"), Mode.T2V, "tiny", params())
    running = await queue.enqueue(source("bob", "b1"), Mode.T2V, "tiny", params())
    claimed = await queue.claim_next()
    assert claimed.id == waiting.job.id
    claimed_second = await queue.enqueue(source("alice", "a2"), Mode.T2V, "tiny", params())
    cancelled = await queue.cancel(claimed_second.job.id, owner("alice"))
    assert cancelled.status is JobStatus.CANCELLED
    assert (await queue.claim_next()).id == running.job.id
    requested = await queue.cancel(running.job.id, owner("bob"))
    assert requested.status is JobStatus.RUNNING and requested.cancel_requested
    assert await queue.is_cancel_requested(running.job.id)
    assert (
        await queue.mark_cancelled(running.job.id, token=await token_of(queue, running.job.id))
    ).status is JobStatus.CANCELLED


async def test_only_owner_or_admin_may_cancel(queue: JobQueue):
    added = await queue.enqueue(source("alice", "a1"), Mode.T2V, "tiny", params())
    with pytest.raises(NotAllowed, match="belongs to someone else"):
        await queue.cancel(added.job.id, owner("mallory"))
    with pytest.raises(NotAllowed):
        await queue.cancel(added.job.id, owner("alice", platform="discord"))
    assert (await queue.cancel(added.job.id, ADMIN)).status is JobStatus.CANCELLED


async def test_cancel_racing_the_claim_never_runs_a_cancelled_job(queue: JobQueue):
    for round_number in range(20):
        added = await queue.enqueue(source("alice", f"r{round_number}"), Mode.T2V, "tiny", params())
        cancelled, claimed = await asyncio.gather(
            queue.cancel(added.job.id, owner("alice")), queue.claim_next(), return_exceptions=True
        )
        final = await queue.get(added.job.id)
        if claimed is not None and not isinstance(claimed, BaseException):
            assert final.status is JobStatus.RUNNING and final.cancel_requested
            await queue.mark_cancelled(final.id, token=final.claim_token)
        else:
            assert final.status is JobStatus.CANCELLED
        assert not isinstance(cancelled, BaseException)


async def test_retry_creates_a_new_linked_job(queue: JobQueue):
    added = await queue.enqueue(source("alice", "a1"), Mode.T2V, "tiny", params())
    job = await queue.claim_next()
    await queue.mark_failed(job.id, "It broke.", "trace", token=job.claim_token)
    with pytest.raises(NotAllowed):
        await queue.retry(added.job.id, owner("bob"))
    again = await queue.retry(added.job.id, owner("alice"))
    assert again.created and again.job.id != added.job.id
    assert again.job.retry_of == added.job.id
    assert again.job.params == added.job.params
    assert (await queue.get(added.job.id)).status is JobStatus.FAILED
    with pytest.raises(InvalidTransition, match="still queued"):
        await queue.retry(again.job.id, owner("alice"))


async def test_crash_recovery_requeues_then_fails_after_max_attempts(queue: JobQueue):
    added = await queue.enqueue(source("alice", "a1"), Mode.T2V, "tiny", params())
    await queue.claim_next()
    recovered = await queue.recover_interrupted(max_attempts=2)
    assert [job.status for job in recovered] == [JobStatus.QUEUED]
    assert (await queue.claim_next()).attempts == 2
    recovered = await queue.recover_interrupted(max_attempts=2)
    assert recovered[0].status is JobStatus.FAILED
    assert "stopped while making this video 2 times" in recovered[0].error_user
    assert (await queue.get(added.job.id)).status is JobStatus.FAILED


async def test_requeue_on_shutdown_does_not_count_the_attempt(queue: JobQueue):
    await queue.enqueue(source("alice", "a1"), Mode.T2V, "tiny", params())
    job = await queue.claim_next()
    requeued = await queue.requeue(job.id, "shutting down", token=job.claim_token)
    assert requeued.status is JobStatus.QUEUED and requeued.attempts == 0


async def test_preferred_model_goes_first_but_only_a_bounded_number_of_times(queue: JobQueue):
    await queue.enqueue(source("alice", "a1"), Mode.I2V, "model-b", params("needs b"))
    for index in range(5):
        await queue.enqueue(source(f"u{index}", f"m{index}"), Mode.T2V, "model-a", params(f"a{index}"))
    order = []
    while (job := await queue.claim_next(preferred_model="model-a", max_model_skips=2)) is not None:
        order.append(job.params.prompt)
        await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    assert order[:3] == ["a0", "a1", "needs b"]


async def test_a_worker_holding_a_jobs_loras_takes_it_before_one_needing_others_but_only_a_bounded_number_of_times(
    queue: JobQueue,
):
    grain = LoraUse(name="grain", weight=0.8, repo="tiny", files=["grain.safetensors"])
    glow = LoraUse(name="glow", weight=0.5, repo="tiny", files=["glow.safetensors"])
    await queue.enqueue(source("alice", "a1"), Mode.T2V, "model-a", params("needs glow", loras=[glow]))
    for index in range(3):
        await queue.enqueue(
            source(f"u{index}", f"m{index}"), Mode.T2V, "model-a", params(f"grain {index}", loras=[grain])
        )
    await queue.enqueue(source("zed", "z1"), Mode.T2V, "model-a", params("plain"))
    first = await queue.claim_next(preferred_model="model-a")  # holds nothing: the fair order
    await queue.requeue(first.id, "back", token=first.claim_token)
    order = []
    while job := await queue.claim_next(preferred_model="model-a", max_model_skips=2, held_loras={grain.key}):
        order.append(job.params.prompt)
        await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    assert first.params.prompt == "needs glow"
    assert order[:3] == ["grain 0", "grain 1", "needs glow"]  # passed over twice, then its turn
    assert set(order[3:]) == {"grain 2", "plain"}


async def test_progress_and_events_reach_subscribers(queue: JobQueue):
    inbox = queue.events.subscribe()
    added = await queue.enqueue(source(), Mode.T2V, "tiny", params())
    job = await queue.claim_next()
    await queue.update_progress(
        job.id, Progress(stage=Stage.DENOISING, step=1, total=2, eta_s=3.0), token=job.claim_token
    )
    await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    kinds = [(await inbox.get()).kind for _ in range(4)]
    assert kinds == [EventKind.ENQUEUED, EventKind.STARTED, EventKind.PROGRESS, EventKind.SUCCEEDED]
    assert (await queue.get(added.job.id)).progress.step == 1
    inbox.close()


async def test_delivery_is_tracked_apart_from_generation(queue: JobQueue):
    await queue.enqueue(source(platform="discord"), Mode.T2V, "tiny", params())
    job = await queue.claim_next()
    done = await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    assert done.delivery_status is DeliveryStatus.PENDING
    assert [pending.id for pending in await queue.undelivered("discord")] == [job.id]
    assert await queue.undelivered("telegram") == []
    failed = await queue.mark_delivery_failed(job.id, "413 too large")
    assert failed.status is JobStatus.SUCCEEDED and failed.delivery_status is DeliveryStatus.DELIVERY_FAILED
    assert [pending.id for pending in await queue.undelivered("discord")] == [job.id]
    delivered = await queue.mark_delivered(job.id)
    assert delivered.delivery_status is DeliveryStatus.DELIVERED and delivered.delivered_at is not None
    assert await queue.undelivered("discord") == []
    with pytest.raises(InvalidTransition):
        await queue.mark_delivered(job.id)


async def test_redeliver_sends_a_stored_video_again_and_nothing_else(queue: JobQueue, tmp_path: Path):
    video = tmp_path / "job.mp4"
    video.write_bytes(b"mp4")
    await queue.enqueue(source(platform="discord"), Mode.T2V, "tiny", params())
    job = await queue.claim_next()
    with pytest.raises(InvalidTransition, match="no undelivered video"):
        await queue.redeliver(job.id)  # still running
    await queue.mark_succeeded(job.id, result(str(video)), token=job.claim_token)
    for attempt in range(3):
        await queue.mark_delivery_failed(job.id, f"413 too large ({attempt})")
    assert await queue.undelivered("discord", max_attempts=3) == []  # the bot gave up
    again = await queue.redeliver(job.id)
    assert again.delivery_status is DeliveryStatus.PENDING and again.delivery_attempts == 0
    assert again.delivery_error is None and again.attempts == 1  # not generated again
    assert [pending.id for pending in await queue.undelivered("discord", max_attempts=3)] == [job.id]
    await queue.mark_delivered(job.id)
    with pytest.raises(InvalidTransition, match="no undelivered video"):
        await queue.redeliver(job.id)  # no second copy by accident
    await queue.enqueue(source(platform="discord", message="m2"), Mode.T2V, "tiny", params())
    gone = await queue.claim_next()
    await queue.mark_succeeded(gone.id, result(str(tmp_path / "deleted.mp4")), token=gone.claim_token)
    await queue.mark_delivery_failed(gone.id, "timeout")
    with pytest.raises(InvalidTransition, match="no longer on disk"):
        await queue.redeliver(gone.id)


async def test_pause_flag_survives_reopening(tmp_path: Path):
    first = await JobQueue.open(tmp_path / "q.sqlite3")
    assert not await first.is_paused()
    await first.set_paused(True)
    await first.close()
    second = await JobQueue.open(tmp_path / "q.sqlite3")
    assert await second.is_paused()
    await second.close()


async def test_unused_images_are_removed_after_retention(queue: JobQueue, tmp_path: Path, images_config):
    store = ImageStore(tmp_path / "images")
    kept = store.put(validate_image_bytes(imagefactory.png(128, 96), images_config))
    gone = store.put(validate_image_bytes(imagefactory.png(96, 128), images_config))
    orphan = store.put(validate_image_bytes(imagefactory.png(100, 100), images_config))
    await queue.enqueue(source("a", "1"), Mode.I2V, "tiny", params(), [kept])
    await queue.enqueue(source("b", "2"), Mode.I2V, "tiny", params(), [gone])
    job = await queue.claim_next()
    finished = job.id if job.images[0].sha256 == gone.sha256 else (await queue.claim_next()).id
    await queue.mark_failed(finished, "x", token=await token_of(queue, finished))
    assert await remove_unused_images(queue, store, retention_s=3600, grace_s=0) == 1
    assert not store.path_for(orphan.sha256).exists()
    assert await remove_unused_images(queue, store, retention_s=-1, grace_s=0) == 1
    assert store.stored_hashes() == {kept.sha256}


async def test_delivered_videos_are_removed_after_retention_and_undelivered_ones_stay(queue: JobQueue, tmp_path: Path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    delivered, given_up, waiting = [await queue.enqueue(source(u, u), Mode.T2V, "tiny", params()) for u in "abc"]
    for _ in range(3):
        job = await queue.claim_next()
        await queue.mark_succeeded(job.id, result(str(outputs / f"job-{job.id}.mp4")), token=job.claim_token)
    await queue.mark_delivered(delivered.job.id)
    await queue.mark_delivery_failed(given_up.job.id, "chat not found", attempts_at_least=5)
    files = {
        name: outputs / name
        for name in (
            f"job-{delivered.job.id}.mp4",
            f"job-{delivered.job.id}.fit-10485760.mp4",
            f"job-{given_up.job.id}.mp4",
            f"job-{waiting.job.id}.mp4",
            "job-999.mp4",  # no such job: not ours to judge
            f".job-{waiting.job.id}.k2j4h1.mp4",  # a crash mid-encode left it
            "notes.txt",
        )
    }
    for path in files.values():
        path.write_bytes(b"video")
    fresh_temp = outputs / f".job-{waiting.job.id}.fit-1000.x8a7.mp4"  # being written right now
    fresh_temp.write_bytes(b"half")
    old = time.time() - 7200
    os.utime(files[f".job-{waiting.job.id}.k2j4h1.mp4"], (old, old))

    assert await remove_delivered_videos(queue, outputs, retention_s=3600) == 1
    assert not files[f".job-{waiting.job.id}.k2j4h1.mp4"].exists()
    assert await remove_delivered_videos(queue, outputs, retention_s=-1) == 2
    assert sorted(path.name for path in outputs.iterdir()) == sorted(
        [f"job-{given_up.job.id}.mp4", f"job-{waiting.job.id}.mp4", "job-999.mp4", "notes.txt", fresh_temp.name]
    )
    assert await remove_delivered_videos(queue, tmp_path / "never-made", retention_s=-1) == 0


async def test_migration_from_the_first_schema_keeps_old_rows(tmp_path: Path):
    path = tmp_path / "old.sqlite3"
    image = ImageInfo(
        role="start",
        format="PNG",
        width=64,
        height=64,
        mode="RGB",
        has_transparency=False,
        animated=False,
        aspect_ratio=1.0,
        pixel_count=4096,
        file_size=10,
        decoded_bytes=1,
        source_sha256="s",
        sha256="abc",
    )
    old_params = {
        "v": 1,
        "prompt": "old job",
        "seed": 3,
        "steps": 2,
        "guidance": 4.0,
        "width": 64,
        "height": 64,
        "frames": 5,
        "fps": 16,
        "removed_setting": True,
    }
    with sqlite3.connect(path) as db:
        for statement in split_sql(MIGRATIONS[0]):
            db.execute(statement)
        db.execute("PRAGMA user_version=1")
        db.execute(
            "INSERT INTO jobs (user_key, source_json, mode, model, params_json, images_json, status, created_at) "
            "VALUES (?, ?, 'i2v', 'tiny', ?, ?, 'queued', 1.0)",
            ("telegram:u1", source().model_dump_json(), json.dumps(old_params), json.dumps([image.model_dump()])),
        )
    queue = await JobQueue.open(path)
    job = (await queue.list_jobs())[0]
    assert job.params.prompt == "old job" and job.params.negative_prompt == ""
    assert job.delivery_status is None
    assert await queue.images_in_use(retention_s=0) == {"abc"}
    claimed = await queue.claim_next()
    assert claimed.id == job.id
    await queue.close()


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from engine.storage.images import Mode
    from engine.queue.jobqueue import JobQueue
    from tests.factories import params, source, result_for_child

    async def main():
        queue = await JobQueue.open(Path({db!r}))
        index = 0
        while True:
            added = await queue.enqueue(source(f"u{{index % 50}}", f"m{{index}}"), Mode.T2V, "tiny", params(),
                                        per_user_limit=10**6, global_limit=10**6)
            print("enqueued", added.job.id, flush=True)
            job = await queue.claim_next()
            if job is not None:
                await queue.mark_succeeded(job.id, result_for_child(), token=job.claim_token)
                print("succeeded", job.id, flush=True)
            index += 1

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("kill_after_writes", [5, 40])
def test_sigkill_mid_transaction_loses_nothing_committed(tmp_path: Path, kill_after_writes: int):
    db_path = tmp_path / "killed.sqlite3"
    script = CHILD.format(repo=str(REPO), db=str(db_path))
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acknowledged: dict[int, str] = {}
    deadline = time.monotonic() + 60
    while len(acknowledged) < kill_after_writes and time.monotonic() < deadline:
        line = child.stdout.readline()
        if not line:
            break
        state, job_id = line.split()
        acknowledged[int(job_id)] = state
    # The child is in the middle of its next transaction (or between two): kill it there.
    os.kill(child.pid, signal.SIGKILL)
    for line in child.stdout:
        state, job_id = line.split()
        acknowledged[int(job_id)] = state
    child.wait()
    assert acknowledged, "the child process acknowledged nothing before it was killed"
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        statuses = dict(db.execute("SELECT id, status FROM jobs").fetchall())
        logged = {row[0] for row in db.execute("SELECT DISTINCT job_id FROM job_events WHERE kind = 'enqueued'")}
    for job_id, state in acknowledged.items():
        assert job_id in statuses
        if state == "succeeded":
            assert statuses[job_id] == "succeeded"
    # Every row that exists came with its event-log entry: no half-applied enqueue.
    assert logged == set(statuses)


async def test_positions_always_match_the_claim_order(queue: JobQueue):
    rng = random.Random(7)
    for index in range(60):
        user = f"u{rng.randrange(6)}"
        await queue.enqueue(
            source(user, f"m{index}"), Mode.T2V, "tiny", params(), priority=rng.choice([0, 0, 0, 2]), per_user_limit=99
        )
        if rng.random() < 0.2:  # some users get served in between, so their last turn moves on
            job = await queue.claim_next()
            await queue.mark_succeeded(job.id, result(), token=job.claim_token)
    claimed = 0
    while waiting := await queue.list_jobs([JobStatus.QUEUED], limit=1000):
        places = {job.id: (await queue.position(job.id)).position for job in waiting}
        assert sorted(places.values()) == list(range(1, len(waiting) + 1))
        job = await queue.claim_next()
        assert places[job.id] == 1
        await queue.mark_succeeded(job.id, result(), token=job.claim_token)
        claimed += 1
    assert claimed > 30


async def test_each_state_change_is_one_info_line_with_its_job_worker_and_times(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="engine.queue.core")
    created = await queue.enqueue(source("u7"), Mode.T2V, "tiny", params())
    job = await queue.claim_next(worker_id="gpu-a/cuda:0/7-ab")
    await queue.update_progress(job.id, Progress(stage=Stage.DENOISING, step=1, total=2), token=job.claim_token)
    result = ResultInfo(path="x.mp4", bytes=1, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="t", seed=1)
    await queue.mark_succeeded(job.id, result, token=job.claim_token)
    await queue.mark_delivered(job.id)
    lines = [record.getMessage() for record in caplog.records if record.name == "engine.queue.core"]
    number = created.job.id
    assert [line.split()[1] for line in lines] == ["enqueued", "started", "succeeded", "delivered"]  # no progress
    assert lines[0] == f"job={number} enqueued user=telegram:u7 model=tiny"
    assert re.fullmatch(rf"job={number} started worker=gpu-a/cuda:0/7-ab waited=\d+\.\ds attempt=1", lines[1])
    assert re.fullmatch(rf"job={number} succeeded worker=gpu-a/cuda:0/7-ab ran=\d+\.\ds", lines[2])
    assert re.fullmatch(rf"job={number} delivered worker=gpu-a/cuda:0/7-ab after=\d+\.\ds attempts=1", lines[3])
