"""One process serves a database's chats: a second `wanbot serve` (or `wanbot run` with a chat token) would answer
every request and upload every video again, so it refuses to start with one line naming the first, and starts once
the first is gone (stopped, or killed: at once on the same machine)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from engine.jobs import DeliveryStatus, ResultInfo
from engine.queue.jobqueue import JobQueue
from engine.queue.url import sqlite_url
from engine.storage.images import Mode
from tests.factories import params, source
from tests.fake_telegram import FakeTelegram
from tests.roles.test_scale_out import WANBOT, role_env
from tests.running import until

ALICE = 111


async def _serve(env: dict[str, str], log: Path) -> asyncio.subprocess.Process:
    with log.open("a") as output:
        return await asyncio.create_subprocess_exec(*WANBOT, "serve", env=env, stdout=output, stderr=output)


async def test_a_second_serve_refuses_to_start_and_takes_over_once_the_first_is_gone(
    tmp_path: Path, telegram: FakeTelegram
):
    data = tmp_path / "data"
    env = role_env(data, sqlite_url(data / "wanbot.sqlite3"), telegram)
    first_log, second_log, third_log = (tmp_path / f"{name}.log" for name in ("first", "second", "third"))
    first = await _serve(env, first_log)
    try:
        await until(lambda: "wanbot serving" in first_log.read_text(), limit_s=60, what="the first serve")
        second = await _serve(env, second_log)
        assert await asyncio.wait_for(second.wait(), timeout=60) == 2
        refusal = second_log.read_text()
        assert f"Not started: another wanbot process already serves the chats of this database: pid {first.pid}" in (
            refusal
        )
        assert "wanbot serving" not in refusal and "Traceback" not in refusal
        assert first.returncode is None  # the first goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()

    third = await _serve(env, third_log)
    try:
        await until(lambda: "wanbot serving" in third_log.read_text(), limit_s=60, what="the serve after a kill -9")
    finally:
        third.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(third.wait(), timeout=60) == 0, third_log.read_text()[-3000:]
    fourth = await _serve(env, second_log)  # a clean stop released the lease: the next one starts at once
    try:
        await until(lambda: second_log.read_text().count("wanbot serving") == 1, limit_s=60, what="a later serve")
    finally:
        fourth.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(fourth.wait(), timeout=60) == 0


async def test_a_stop_while_telegram_holds_back_its_answer_to_an_upload_sends_the_video_once(
    tmp_path: Path, telegram: FakeTelegram
):
    """SIGTERM during an upload Telegram has not answered yet: the stop waits for the answer and records the
    delivery, so the next serve has nothing to send (before, the upload was cut short and sent again)."""
    data = tmp_path / "data"
    url = sqlite_url(data / "wanbot.sqlite3")
    env = role_env(data, url, telegram)
    queue = await JobQueue.connect(url)
    try:
        job_id = await _a_finished_video(queue, data / "outputs")
    finally:
        await queue.close()
    telegram.gates["sendVideo"] = asyncio.Event()
    log = tmp_path / "serve.log"
    serve = await _serve(env, log)
    try:
        await until(lambda: telegram.sent("sendVideo"), limit_s=60, what="the upload")
        serve.send_signal(signal.SIGTERM)
        await until(lambda: "for the upload of job=1 to finish" in log.read_text(), limit_s=30, what="the wait")
        telegram.gates["sendVideo"].set()
        assert await asyncio.wait_for(serve.wait(), timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if serve.returncode is None:
            serve.kill()
            await serve.wait()

    again = await _serve(env, log)
    try:
        await until(lambda: log.read_text().count("wanbot serving") == 2, limit_s=60, what="the restart")
        await asyncio.sleep(2)  # four redelivery rounds: room for a second upload, were one due
    finally:
        again.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(again.wait(), timeout=60) == 0
    assert len(telegram.sent("sendVideo")) == 1
    queue = await JobQueue.connect(url)
    try:
        assert (await queue.get(job_id)).delivery_status is DeliveryStatus.DELIVERED
    finally:
        await queue.close()


async def _a_finished_video(queue: JobQueue, outputs: Path) -> int:
    """A video a worker made, waiting for its upload."""
    video = outputs / "made.mp4"
    await asyncio.to_thread(outputs.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(video.write_bytes, bytes(4096))
    job = (await queue.enqueue(source(str(ALICE), chat=str(ALICE)), Mode.T2V, "tiny", params())).job
    claimed = await queue.claim_next(worker_id=None)
    made = ResultInfo(
        path=str(video), bytes=4096, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="tiny", seed=1
    )
    await queue.mark_succeeded(job.id, made, token=claimed.claim_token)
    return job.id
