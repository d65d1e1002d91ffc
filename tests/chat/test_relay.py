"""What a job's live message shows around its end: nothing more after "stopping…", a word when a job starts again
after a restart, and "done" with the video at once instead of after the edit pacing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from bot.chat import texts
from engine.config import ChatConfig
from engine.jobs import DeliveryStatus, Progress, Stage
from engine.operator import open_job_store
from engine.queue.core import WORKER_STOPPED
from engine.service import Engine
from engine.storage.images import Mode
from tests.factories import ADMIN, params, source, token_of
from tests.roles.test_supervision import FakePlatform, finished_job, relay_for
from tests.running import until


@asynccontextmanager
async def following(engine: Engine, platform: FakePlatform, config: ChatConfig) -> AsyncIterator[None]:
    """The relay following the engine's events for `platform`, stopped at the end."""
    relay = relay_for(engine, platform, config)
    relay.start(engine.subscribe())
    try:
        yield
    finally:
        await relay.stop()


STEP = Progress(stage=Stage.DENOISING, step=1, total=4, eta_s=9)


async def test_after_stopping_no_progress_or_cancel_button_is_shown_again(engine: Engine):
    platform = FakePlatform()
    async with following(engine, platform, ChatConfig(edit_interval_s=0)):
        queued = await engine._queue.enqueue(source(), Mode.T2V, "tiny", params())
        job_id = queued.job.id
        await engine._queue.claim_next()
        await engine._queue.update_progress(job_id, STEP, token=await token_of(engine._queue, job_id))
        await until(lambda: any("1/4" in text for text in platform.texts.get(job_id, [])), 5, "progress")
        await engine.cancel(job_id, ADMIN)
        await engine._queue.update_progress(
            job_id, STEP.model_copy(update={"step": 2}), token=await token_of(engine._queue, job_id)
        )  # the step under way ends
        await engine._queue.mark_cancelled(job_id, token=await token_of(engine._queue, job_id))
        await until(lambda: "was cancelled" in platform.texts[job_id][-1], 5, "the end")
    stopping = platform.texts[job_id].index(f"Job #{job_id} is stopping…")
    assert platform.texts[job_id][stopping + 1 :] == [f"Job #{job_id} was cancelled."]
    assert platform.buttons[job_id][stopping:] == ["none", "none"]


async def test_a_job_started_again_after_a_restart_says_so(engine: Engine):
    platform = FakePlatform()
    async with following(engine, platform, ChatConfig(edit_interval_s=0)):
        first = (await engine._queue.enqueue(source("a", "1"), Mode.T2V, "tiny", params())).job.id
        await engine._queue.claim_next()
        await engine._queue.requeue(first, WORKER_STOPPED, token=await token_of(engine._queue, first))
        await engine._queue.claim_next()
        await until(lambda: texts.RESTARTED in platform.texts.get(first, [""])[-1], 5, "the restart note")
        second = (await engine._queue.enqueue(source("b", "2"), Mode.T2V, "tiny", params())).job.id
        await engine._queue.mark_cancelled(first, token=await token_of(engine._queue, first))
        await engine._queue.claim_next()
        await until(lambda: "starting" in platform.texts.get(second, [""])[-1], 5, "the second job's start")
    assert texts.RESTARTED not in platform.texts[second][-1]  # a first start says nothing of the kind


async def test_done_and_the_video_go_out_without_waiting_for_the_edit_pacing(engine: Engine, tmp_path: Path):
    video = tmp_path / "job.mp4"
    video.write_bytes(b"video")
    platform = FakePlatform()
    async with following(engine, platform, ChatConfig(edit_interval_s=600)):  # a pace no test could wait out
        job_id = await finished_job(engine._queue, video)
        await until(lambda: platform.uploads == 1, 10, "the upload")
        await until(lambda: platform.texts[job_id][-1].endswith("the video is below."), 10, "the final text")
        delivered = await engine.job(job_id)
    assert delivered.delivery_status is DeliveryStatus.DELIVERED and platform.uploads == 1
    assert platform.texts[job_id][-2].startswith(f"Job #{job_id} is done (")  # "Sending the video…" came first


async def test_a_waiting_job_is_shown_its_wait_again_while_the_job_ahead_runs(engine: Engine):
    platform = FakePlatform()
    async with following(engine, platform, ChatConfig(edit_interval_s=0)):
        running = (await engine._queue.enqueue(source("a", "1"), Mode.T2V, "tiny", params())).job.id
        waiting = (await engine._queue.enqueue(source("b", "2"), Mode.T2V, "tiny", params())).job.id
        await engine._queue.claim_next()
        for eta_s, wait in ((90, "1m 30s"), (60, "1m 00s")):
            await engine._queue.update_progress(
                running, STEP.model_copy(update={"eta_s": eta_s}), token=await token_of(engine._queue, running)
            )
            said = f"position 1, about {wait} to wait."
            await until(lambda said=said: said in platform.texts.get(waiting, [""])[-1], 5, f"the wait of {wait}")


async def test_a_stale_copy_of_a_delivered_job_is_not_sent_again(engine: Engine, tmp_path: Path):
    # The redelivery round works through a list read before its uploads: one job on it may be delivered meanwhile.
    video = tmp_path / "job.mp4"
    video.write_bytes(b"video")
    platform = FakePlatform()
    relay = relay_for(engine, platform, ChatConfig(edit_interval_s=0))
    job_id = await finished_job(engine._queue, video)
    stale = await engine.job(job_id)
    await relay.deliver(stale)
    await relay.deliver(stale)
    await relay.stop()
    assert platform.uploads == 1


async def test_a_job_whose_worker_stopped_says_at_once_that_it_waits_for_a_worker_again(engine: Engine):
    platform = FakePlatform()
    async with following(engine, platform, ChatConfig(edit_interval_s=0)):
        job_id = (await engine._queue.enqueue(source(), Mode.T2V, "tiny", params())).job.id
        claimed = await engine._queue.claim_next(worker_id="gpu-a/cuda:0/7-ab")
        await engine._queue.update_progress(job_id, STEP, token=claimed.claim_token)
        await until(lambda: any("1/4" in text for text in platform.texts.get(job_id, [])), 5, "progress")
        await engine._queue.requeue(job_id, WORKER_STOPPED, token=claimed.claim_token)
        said = f"Job #{job_id} (t2v) is waiting for a worker again: the one making it stopped."
        await until(lambda: platform.texts[job_id][-1].startswith(said), 5, "the wait for a worker")
    assert "restarted" not in platform.texts[job_id][-1] and "joined" not in platform.texts[job_id][-1]
    assert platform.buttons[job_id][-1] == "cancel"


async def test_with_no_worker_online_a_waiting_job_says_so_until_one_is(engine: Engine):
    from engine.jobs import WorkerRecord, WorkerState

    platform = FakePlatform()
    async with following(engine, platform, ChatConfig(edit_interval_s=0)):
        job_id = (await engine._queue.enqueue(source("a", "1"), Mode.T2V, "tiny", params())).job.id
        said = f"Job #{job_id} (t2v) is queued: position 1. {texts.NO_WORKER_WAIT}"
        await until(lambda: platform.texts.get(job_id, [""])[-1].startswith(said), 5, "no worker online")
        await engine._queue.heartbeat(
            WorkerRecord(
                id="gpu-a/cuda:0/1-ab", host="gpu-a", pid=1, device="cuda:0", state=WorkerState.IDLE, started_at=0
            )
        )
        await engine._queue.enqueue(source("b", "2"), Mode.T2V, "tiny", params())  # places are shown again
        said = f"Job #{job_id} (t2v) is queued: position 1, about to start."
        await until(lambda: platform.texts[job_id][-1].startswith(said), 5, "the wait once a worker is online")


async def test_healthz_of_a_serve_with_no_worker_online_says_degraded(tiny_settings, tmp_path: Path):
    import aiohttp

    from tests.roles.test_metrics import free_port

    port = free_port()
    settings = tiny_settings.model_copy(update={"metrics": tiny_settings.metrics.model_copy(update={"port": port})})
    engine = await Engine.open(settings, with_worker=False)
    served = asyncio.create_task(engine.serve_metrics())
    try:
        async with aiohttp.ClientSession() as http:

            async def health() -> tuple[int, str] | None:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                        return response.status, await response.text()
                except aiohttp.ClientConnectionError:
                    return None

            for _ in range(100):
                if answer := await health():
                    break
                await asyncio.sleep(0.05)
            assert answer == (200, "degraded: no worker is online: queued videos wait until one starts\n")
    finally:
        served.cancel()
        await engine.close()


async def test_a_pause_and_a_resume_show_every_waiting_place_again_at_once(engine: Engine):
    from engine.jobs import WorkerRecord, WorkerState

    platform = FakePlatform()
    await engine._queue.heartbeat(
        WorkerRecord(id="gpu-a/cuda:0/1-ab", host="gpu-a", pid=1, device="cuda:0", state=WorkerState.IDLE, started_at=0)
    )
    async with following(engine, platform, ChatConfig(edit_interval_s=0)):
        jobs = [(await engine._queue.enqueue(source(user, "1"), Mode.T2V, "tiny", params())).job.id for user in "ab"]
        await until(lambda: all("is queued" in platform.texts.get(job, [""])[-1] for job in jobs), 5, "the places")
        await engine.set_paused(True)
        await until(lambda: all(texts.QUEUE_PAUSED in platform.texts[job][-1] for job in jobs), 5, "paused")
        await engine.set_paused(False)
        await until(lambda: all(texts.QUEUE_PAUSED not in platform.texts[job][-1] for job in jobs), 5, "resumed")


async def test_a_pause_and_a_resume_from_another_process_show_every_waiting_place_again(engine: Engine):
    platform = FakePlatform()
    watching = asyncio.create_task(engine.follow_events())
    try:
        async with following(engine, platform, ChatConfig(edit_interval_s=0)):
            job = (await engine._queue.enqueue(source(), Mode.T2V, "tiny", params())).job.id
            await until(lambda: "is queued" in platform.texts.get(job, [""])[-1], 5, "the place")
            for paused in (True, False):
                # What `wanbot queue pause` and `resume` open: a connection of their own to the same database.
                async with open_job_store(engine.settings) as store:
                    await store.set_paused(paused)
                await until(
                    lambda paused=paused: (texts.QUEUE_PAUSED in platform.texts[job][-1]) == paused,
                    10,
                    "paused" if paused else "resumed",
                )
    finally:
        watching.cancel()
