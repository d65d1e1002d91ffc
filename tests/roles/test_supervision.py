"""Never silently dead: the supervisor, a worker that outlives faults outside its jobs, and a relay that keeps
delivering after any upload error."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bot.chat import texts
from bot.chat.relay import AnswerLost, JobRelay, UploadRefused
from engine.config import ChatConfig, Settings
from engine.errors import model_unusable_text
from engine.jobs import DeliveryStatus, JobStatus, ResultInfo
from engine.pipeline.models import GenerationRequest
from engine.queue.jobqueue import JobQueue
from engine.service import Engine
from engine.storage.images import Mode
from engine.supervisor import RestartPolicy, Supervisor
from tests.factories import ADMIN, params, source
from tests.running import until

pytestmark = pytest.mark.timeout(120)
QUICK = RestartPolicy(first_wait_s=0.01, max_wait_s=0.05, max_failures=3, healthy_after_s=60)


# -- the supervisor ---------------------------------------------------------------------------------------------


async def test_a_task_that_raises_is_logged_and_restarted(caplog: pytest.LogCaptureFixture):
    supervisor = Supervisor(QUICK)
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise ConnectionResetError("gone")
        await asyncio.Event().wait()

    supervisor.start("flaky", flaky)
    await until(lambda: len(runs) == 3, 5, "two restarts")
    assert not supervisor.failed
    assert sum("task flaky failed; restarting it" in record.message for record in caplog.records) == 2
    assert all(record.exc_info for record in caplog.records if "task flaky failed" in record.message)
    await supervisor.stop()


async def test_a_task_that_keeps_failing_or_must_not_restart_fails_the_supervisor():
    supervisor = Supervisor(QUICK)

    async def broken() -> None:
        raise RuntimeError("disk on fire")

    supervisor.start("broken", broken)
    await asyncio.wait_for(supervisor.wait_failed(), 5)
    assert supervisor.failure == "broken failed: RuntimeError: disk on fire"

    once = Supervisor(QUICK)
    connection = asyncio.create_task(asyncio.sleep(0))
    once.watch("chat connection", connection)
    await asyncio.wait_for(once.wait_failed(), 5)
    assert once.failure == "chat connection failed: RuntimeError: chat connection ended"


async def test_a_database_outage_of_any_length_is_waited_out_said_once_when_it_begins_and_ends(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    from engine import supervisor as supervision

    monkeypatch.setattr(supervision, "OUTAGE_OVER_AFTER_S", 0.2)
    supervisor = Supervisor(QUICK, outage_errors=(ConnectionRefusedError,))
    runs: list[int] = []

    async def needs_the_database() -> None:
        runs.append(1)
        if len(runs) <= 3 * QUICK.max_failures:  # far more failures in a row than any other error is allowed
            raise ConnectionRefusedError(111, "Connection refused")
        await asyncio.Event().wait()

    supervisor.start("relay", needs_the_database)
    await until(lambda: len(runs) > 3 * QUICK.max_failures, 10, "the database back")
    assert not supervisor.failed and supervisor.outage is not None
    await until(lambda: supervisor.outage is None, 5, "the outage over")
    said = [record.message for record in caplog.records if record.levelno >= logging.WARNING]
    assert said == [
        "the database is out of reach: ConnectionRefusedError: [Errno 111] Connection refused; every task waits and "
        "tries again until it is back",
        said[-1],
    ]
    assert said[-1].startswith("the database is reachable again, after ")
    await supervisor.stop()


async def test_a_task_cancelled_on_purpose_does_not_fail_the_supervisor():
    supervisor = Supervisor(QUICK)
    connection = asyncio.create_task(asyncio.Event().wait())
    supervisor.watch("chat connection", connection)
    await supervisor.cancel("chat connection")
    connection.cancel()
    await asyncio.sleep(0.05)
    assert not supervisor.failed


# -- the worker -------------------------------------------------------------------------------------------------


async def _submit(engine: Engine, prompt: str = "w1 a fox") -> int:
    submission = await engine.submit(GenerationRequest(mode=Mode.T2V, prompt=prompt), source(user=prompt))
    return submission.result.job.id


async def test_a_job_whose_local_model_folder_vanished_fails_and_the_next_job_runs(tiny_settings: Settings, caplog):
    folder = tiny_settings.data_dir / "local-model"
    shutil.copytree(tiny_settings.models_dir / "tiny-t2v", folder)
    settings = tiny_settings.model_copy(update={"models": tiny_settings.models.model_copy(update={"t2v": str(folder)})})
    engine = await Engine.open(settings)
    try:
        doomed = await _submit(engine, "w1 first")
        shutil.rmtree(folder)
        engine.settings.models.t2v = "tiny"
        fine = await _submit(engine, "w2 second")
        worker = asyncio.create_task(engine._worker.run())
        await until(lambda: engine._worker.state.jobs_done >= 1, 60, "the second job")
        failed = await engine._queue.get(doomed)
        assert failed.status is JobStatus.FAILED
        # The owner gets a plain sentence; what is wrong and where is the operator's, in the log and `queue show`.
        assert failed.error_user == model_unusable_text(doomed, "t2v")
        assert str(folder) in failed.error_detail
        [logged] = [
            r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and str(folder) in r.getMessage()
        ]
        assert f"job={doomed} cannot use its model" in logged
        assert (await engine._queue.get(fine)).status is JobStatus.SUCCEEDED
        assert not worker.done()
        await engine._worker.stop()
        await worker
    finally:
        await engine.close()


async def _next_job_runs_then_stop(engine: Engine, worker: asyncio.Task[None]) -> None:
    """The worker, still alive after the fault, makes the next video; then it stops."""
    next_id = await _submit(engine, "w2 next")
    done = engine._worker.state.jobs_done
    await until(lambda: engine._worker.state.jobs_done > done, 60, "the next job")
    assert (await engine._queue.get(next_id)).status is JobStatus.SUCCEEDED
    await engine._worker.stop()
    await worker


def _hold_write_lock(path: Path, seconds: float, locked: threading.Event) -> None:
    """Another process's connection holding the write lock, as `sqlite3 wanbot.db 'BEGIN IMMEDIATE'` would."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    locked.set()
    time.sleep(seconds)
    other.execute("ROLLBACK")
    other.close()


async def test_a_locked_database_at_the_end_of_a_job_delays_its_result_and_the_worker_goes_on(
    tiny_settings: Settings, caplog: pytest.LogCaptureFixture
):
    engine = await Engine.open(tiny_settings)
    await engine._queue.close()
    engine._queue = await JobQueue.open(tiny_settings.db_path, engine._queue.events, busy_timeout_s=0.05)
    engine._worker._queue = engine._queue
    engine._worker._error_wait_s = 0.05
    try:
        first = await _submit(engine, "w1 first")
        locked = threading.Event()
        holder: threading.Thread | None = None

        def lock_when_encoding(event) -> None:
            nonlocal holder
            if event.job.id == first and event.progress is not None and event.progress.stage.value == "encoding":
                holder = threading.Thread(target=_hold_write_lock, args=(tiny_settings.db_path, 2.0, locked))
                holder.start()
                locked.wait(5)

        engine._queue.events.publish = _tap(engine._queue.events.publish, lock_when_encoding)
        worker = asyncio.create_task(engine._worker.run())
        await until(lambda: engine._worker.state.jobs_done >= 1, 60, "the first job to end")
        assert holder is not None
        holder.join()
        assert (await engine._queue.get(first)).status is JobStatus.SUCCEEDED
        assert any("trying again" in record.message for record in caplog.records)
        assert not worker.done()
        await _next_job_runs_then_stop(engine, worker)
    finally:
        await engine.close()


def _tap(publish, observe):
    def tapped(event) -> None:
        publish(event)
        observe(event)

    return tapped


async def test_a_result_that_cannot_be_written_in_time_is_recorded_as_a_failure(tiny_settings: Settings):
    engine = await Engine.open(tiny_settings)
    engine._worker._error_wait_s = 0.01
    engine._worker._write_retry_s = 0.1
    real = engine._queue.mark_succeeded

    async def refused(*args, **kwargs):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    engine._queue.mark_succeeded = refused
    try:
        job_id = await _submit(engine)
        worker = asyncio.create_task(engine._worker.run())
        await until(lambda: engine._worker.state.jobs_done >= 1, 60, "the job to end")
        job = await engine._queue.get(job_id)
        assert job.status is JobStatus.FAILED
        assert job.error_user == f"Video #{job_id} could not be saved: the server's database refused the write."
        engine._queue.mark_succeeded = real
        await _next_job_runs_then_stop(engine, worker)
    finally:
        await engine.close()


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs, filled: every write there fails with ENOSPC, as on a full data disk."""
    mount = tmp_path / "full"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    assert result.returncode == 0, f"tests need to mount a tmpfs (root): {result.stderr.decode()}"
    try:
        with (mount / "filler").open("wb") as filler, pytest.raises(OSError):
            filler.write(b"\0" * 1024 * 1024)
            filler.flush()
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_during_the_encode_fails_the_job_plainly_and_the_next_one_runs(
    tiny_settings: Settings, full_disk: Path
):
    engine = await Engine.open(tiny_settings)
    outputs = tiny_settings.outputs_dir
    outputs.mkdir(parents=True, exist_ok=True)
    outputs.rmdir()
    outputs.symlink_to(full_disk, target_is_directory=True)
    try:
        job_id = await _submit(engine)
        worker = asyncio.create_task(engine._worker.run())
        await until(lambda: engine._worker.state.jobs_done >= 1, 60, "the job to end")
        job = await engine._queue.get(job_id)
        assert job.status is JobStatus.FAILED
        assert job.error_user == f"Video #{job_id} could not be saved: the server's disk is full. It has been " + (
            "logged; send the request again once an admin has made room."
        )
        assert sorted(os.listdir(full_disk)) == ["filler"]  # no half-written video left
        (full_disk / "filler").unlink()
        await _next_job_runs_then_stop(engine, worker)
    finally:
        await engine.close()


# -- the relay --------------------------------------------------------------------------------------------------


class FakePlatform:
    """What an adapter gives the relay: texts shown per job, and an upload that fails as told."""

    def __init__(self) -> None:
        self.texts: dict[int, list[str]] = {}
        self.uploads = 0
        self.failures: list[BaseException] = []

        self.buttons: dict[int, list[str]] = {}

    async def show(self, job, text: str, buttons: str, picture: bytes | None = None) -> None:
        self.texts.setdefault(job.id, []).append(text)
        self.buttons.setdefault(job.id, []).append(buttons)

    async def send_video(self, job, video: Path) -> None:
        self.uploads += 1
        if self.failures:
            raise self.failures.pop(0)


def relay_for(engine: Engine, platform: FakePlatform, config: ChatConfig) -> JobRelay:
    engine.supervisor = Supervisor(QUICK)
    return JobRelay(engine, "telegram", platform.show, platform.send_video, lambda job: 50_000_000, config)


async def finished_job(queue: JobQueue, video: Path) -> int:
    created = await queue.enqueue(source(), Mode.T2V, "tiny", params())
    job = await queue.claim_next()
    result = ResultInfo(
        path=str(video), bytes=5, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="tiny", seed=1
    )
    await queue.mark_succeeded(job.id, result, token=job.claim_token)
    return created.job.id


async def test_any_upload_error_is_a_failed_attempt_and_redelivery_goes_on(engine: Engine, tmp_path: Path):
    queue = engine._queue
    import aiohttp

    video = tmp_path / "job.mp4"
    video.write_bytes(b"video")
    platform = FakePlatform()
    platform.failures = [aiohttp.ServerDisconnectedError(), KeyError("attachments")]
    config = ChatConfig(edit_interval_s=0, delivery_retry_s=0.05, max_delivery_attempts=5)
    relay = relay_for(engine, platform, config)
    supervisor = engine.supervisor
    job_id = await finished_job(queue, video)
    relay.start(queue.events.subscribe())
    try:
        job = await _job_when(queue, job_id, lambda job: job.delivery_status is DeliveryStatus.DELIVERED)
        assert platform.uploads == 3 and job.delivery_attempts == 3  # two failed, then the one that went
        assert not supervisor.failed
        assert not any("could not be sent" in text for text in platform.texts[job_id])  # retried quietly
    finally:
        await relay.stop()


async def test_the_relay_reads_the_kind_of_each_upload_failure(engine: Engine, tmp_path: Path, caplog):
    """Refused for good: no more tries. Answer lost after the whole file went out: counted as sent, never sent twice.
    A flood wait: the next try waits at least as long as the platform asked."""
    video = tmp_path / "job.mp4"
    video.write_bytes(b"video")
    platform = FakePlatform()
    config = ChatConfig(edit_interval_s=0, delivery_retry_s=0.01, max_delivery_attempts=5)
    relay = relay_for(engine, platform, config)
    refused, lost, flooded = [await finished_job(engine._queue, video) for _ in range(3)]
    platform.failures = [UploadRefused("Forbidden: bot was blocked by the user")]
    await relay.deliver(await engine._queue.get(refused))
    platform.failures = [AnswerLost()]
    await relay.deliver(await engine._queue.get(lost))
    platform.failures = [texts.RetryLater(30)]
    await relay.deliver(await engine._queue.get(flooded))
    refused_job, lost_job, flooded_job = [await engine._queue.get(job_id) for job_id in (refused, lost, flooded)]
    assert refused_job.delivery_status is DeliveryStatus.DELIVERY_FAILED and refused_job.delivery_attempts == 5
    assert "blocked" in platform.texts[refused][-1]
    assert lost_job.delivery_status is DeliveryStatus.DELIVERED and platform.uploads == 3
    assert flooded_job.delivery_attempts == 1 and flooded not in platform.texts  # tried again later, quietly
    assert f"job={flooded} attempt=1, next in 30.0 s" in caplog.text  # not the 0.01 s of delivery_retry_s
    await relay.stop()


async def _job_when(queue: JobQueue, job_id: int, check, limit_s: float = 10):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        job = await queue.get(job_id)
        if check(job):
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached the state wanted: {job}")


async def test_a_missing_video_file_gives_up_at_once_without_showing_a_path(engine: Engine, tmp_path: Path):
    queue = engine._queue
    platform = FakePlatform()
    config = ChatConfig(edit_interval_s=0, delivery_retry_s=0.05, max_delivery_attempts=5)
    relay = relay_for(engine, platform, config)
    job_id = await finished_job(queue, tmp_path / "outputs" / "job-1-abcd.mp4")
    await relay.deliver(await queue.get(job_id))
    job = await queue.get(job_id)
    assert platform.uploads == 0
    assert job.delivery_attempts == 5 and job.delivery_status is DeliveryStatus.DELIVERY_FAILED
    last = platform.texts[job_id][-1]
    assert "no longer on the server" in last and "Reroll" in last
    assert str(tmp_path) not in last and "Errno" not in last and "/" not in last.split("redeliver")[0]


async def test_jobs_that_ended_unseen_show_their_end_when_the_relay_starts(engine: Engine, tmp_path: Path):
    queue = engine._queue
    given_up = await queue.enqueue(source("a", "1"), Mode.T2V, "tiny", params())
    await queue.claim_next()
    await queue.claim_next()  # nothing else waits: the same job is not claimed twice
    # The process died twice while it ran: at the next start it is given up without any event.
    (recovered,) = await queue.recover_interrupted(max_attempts=1)
    assert recovered.status is JobStatus.FAILED
    shown = await queue.enqueue(source("b", "2"), Mode.T2V, "tiny", params())
    await queue.cancel(shown.job.id, ADMIN)
    await queue.mark_final_shown(shown.job.id)
    platform = FakePlatform()
    config = ChatConfig(edit_interval_s=0, delivery_retry_s=60)
    relay = relay_for(engine, platform, config)
    relay.start(queue.events.subscribe())
    try:
        await until(lambda: given_up.job.id in platform.texts, 5, "the given-up job's end")
        assert platform.texts[given_up.job.id] == [texts.finished_text(recovered)]
        assert "given up" in platform.texts[given_up.job.id][0]
        assert shown.job.id not in platform.texts
        assert await queue.final_unshown("telegram", 5) == []
    finally:
        await relay.stop()


@pytest.mark.parametrize(
    "write_retry_s", [300.0, 0.2], ids=["recorded when the database is free", "recorded by a later round"]
)
async def test_a_database_locked_right_after_an_upload_never_sends_the_video_twice(
    engine: Engine, tmp_path: Path, write_retry_s: float
):
    """The upload went through, then the delivery record met a locked database: the record waits for it (or, past
    queue.write_retry_s, the next redelivery round records it), and the video is never uploaded again."""
    await engine._queue.close()
    engine._queue = await JobQueue.open(engine.settings.db_path, engine._queue.events, busy_timeout_s=0.05)
    engine.settings.queue.write_retry_s = write_retry_s
    video = tmp_path / "job.mp4"
    video.write_bytes(b"video")
    platform = FakePlatform()
    upload = platform.send_video
    locked, holders = threading.Event(), []

    async def upload_then_lock(job, path: Path) -> None:
        await upload(job, path)
        holder = threading.Thread(target=_hold_write_lock, args=(engine.settings.db_path, 1.5, locked))
        holder.start()
        holders.append(holder)
        await asyncio.to_thread(locked.wait, 5)

    platform.send_video = upload_then_lock
    config = ChatConfig(edit_interval_s=0, delivery_retry_s=0.05, max_delivery_attempts=5)
    relay = relay_for(engine, platform, config)
    job_id = await finished_job(engine._queue, video)
    relay.start(engine._queue.events.subscribe())
    try:
        job = await _job_when(engine._queue, job_id, lambda job: job.delivery_status is DeliveryStatus.DELIVERED, 20)
        for holder in holders:
            await asyncio.to_thread(holder.join)
        await asyncio.sleep(0.3)  # several redelivery rounds: none may upload again
        assert platform.uploads == 1
        assert job.delivery_attempts == 1
    finally:
        await relay.stop()
