"""Nothing lost: a chat request is stored before Telegram is told it arrived, and a process killed while handling it
finishes it after the restart, in the same "Checking" message."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from bot.chat.inbox import ChatInbox
from engine.jobs import DeliveryStatus, JobStatus
from engine.queue.jobqueue import JobQueue
from engine.service import Engine
from engine.storage.images import Mode
from tests import imagefactory
from tests.discord.test_discord import ALICE as DISCORD_ALICE
from tests.discord.test_discord import TOKEN as DISCORD_TOKEN
from tests.factories import params, source
from tests.fake_discord import GUILD_ID
from tests.running import until
from tests.telegram.test_telegram import ALICE, BOB, run_environment, status_of

pytestmark = pytest.mark.timeout(240)


async def _start_bot(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    with log_path.open("a") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from bot.cli import main; main()", "run", env=env, stdout=log, stderr=log
        )


async def test_requests_killed_while_checking_are_finished_after_the_restart(tiny_settings, telegram, tmp_path):
    env = run_environment(tiny_settings, telegram, WANBOT_MODELS__I2V="tiny")
    log_path = tmp_path / "run.log"
    telegram.gates["getFile"] = asyncio.Event()  # the picture's download hangs: the request stays "Checking"
    first = await _start_bot(env, log_path)
    telegram.photo(ALICE, imagefactory.jpeg(), caption="/i2v the picture survives a crash steps=2")
    await until(lambda: status_of(telegram, ALICE, "Checking your request"), what="the Checking message")
    await until(lambda: telegram.sent("getFile"), what="the picture download")
    telegram.gates["sendMessage"] = asyncio.Event()  # and a text request hangs before its "Checking" is shown
    telegram.command(BOB, "/video a text request too steps=2")
    await until(lambda: telegram.sent("sendMessage", BOB), what="bob's Checking message on its way")
    # Both updates are confirmed to Telegram (it forgets them) by the next getUpdates before the kill.
    polls = len(telegram.sent("getUpdates"))
    await until(lambda: len(telegram.sent("getUpdates")) > polls + 1, what="the updates confirmed")
    first.send_signal(signal.SIGKILL)
    await first.wait()
    assert not telegram.sent("sendVideo")

    # The dead process's calls stay stuck; the next process's go through.
    telegram.gates.clear()
    second = await _start_bot(env, log_path)
    try:
        await until(lambda: telegram.sent("sendVideo", ALICE), limit_s=90, what="alice's video after the restart")
        await until(lambda: telegram.sent("sendVideo", BOB), limit_s=90, what="bob's video")
        await until(lambda: status_of(telegram, ALICE, "the video is below"), what="alice's final status")
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), timeout=30)
    assert second.returncode == 0, log_path.read_text()[-3000:]
    assert "Loading pipeline components" not in log_path.read_text()  # no library progress bars in the log
    assert len(telegram.sent("sendVideo", ALICE)) == 1 and len(telegram.sent("sendVideo", BOB)) == 1
    assert len(telegram.sent("sendMessage", ALICE)) == 1  # one "Checking" message, edited by both processes
    bob_texts = [message["text"] for message in telegram.replies(BOB) if "text" in message]
    assert len(bob_texts) == 1 and "the video is below" in bob_texts[0]
    engine = await Engine.open(tiny_settings)
    jobs = await engine._queue.list_jobs()
    open_updates = await ChatInbox(engine.database, "telegram").unfinished()
    await engine.close()
    assert sorted(job.params.prompt for job in jobs) == ["a text request too", "the picture survives a crash"]
    assert all(job.status is JobStatus.SUCCEEDED and job.delivery_status is DeliveryStatus.DELIVERED for job in jobs)
    assert open_updates == []


@pytest.mark.both_backends
async def test_the_inbox_takes_an_update_once_and_forgets_handled_ones_after_a_day(database_url: str):
    now = [1000.0]
    queue = await JobQueue.connect(database_url, clock=lambda: now[0])
    inbox = ChatInbox(queue.database, "telegram", clock=lambda: now[0])
    try:
        assert await inbox.put("7", '{"update_id": 7}', "1:50")
        assert not await inbox.put("7", '{"update_id": 7}', "1:50")  # sent again: not taken twice
        await inbox.set_reply("1:50", "51")
        assert await inbox.reply("1:50") == "51"
        assert await inbox.unfinished() == ['{"update_id": 7}']
        await inbox.done("7")
        assert await inbox.unfinished() == []
        assert not await inbox.put("7", '{"update_id": 7}')  # handled, still remembered
        now[0] += 86401
        await inbox.unfinished()
        assert await inbox.put("7", '{"update_id": 7}')
        await queue.enqueue(source(), Mode.T2V, "tiny", params())  # the jobs table is untouched by all this
    finally:
        await queue.close()


async def test_a_deferred_discord_request_killed_before_it_was_queued_is_finished_after_the_restart(
    tiny_settings, discord_server, tmp_path
):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "TELEGRAM_", "DISCORD_"))}
    env.update(
        WANBOT_DATA_DIR=str(tiny_settings.data_dir),
        WANBOT_MODELS__I2V="tiny",
        DISCORD_BOT_TOKEN=DISCORD_TOKEN,
        WANBOT_DISCORD__API_BASE_URL=discord_server.api_base,
        WANBOT_DISCORD__GATEWAY_URL=discord_server.gateway_url,
        WANBOT_DISCORD__GUILD_IDS=f"[{GUILD_ID}]",
        WANBOT_DISCORD__EDIT_INTERVAL_S="0.2",
        WANBOT_PREVIEWS__ENABLED="false",
        WANBOT_DOWNLOADS__ENDPOINT="http://127.0.0.1:9",  # never a real Hub: a closed port
    )
    log_path = tmp_path / "run.log"
    first = await _start_bot(env, log_path)
    # Started, not only synced: the commands are synced before the gateway connects, and the slash needs both.
    await until(lambda: "wanbot running" in log_path.read_text(), limit_s=60, what="the bot connected")
    discord_server.cdn_gate = asyncio.Event()  # the picture's download hangs after the defer
    start = discord_server.attachment(imagefactory.png(160, 120), "start.png")
    options = {"prompt": "waves", "steps": 2}
    interaction = await discord_server.slash(DISCORD_ALICE, "video", options, {"start_image": start})
    await until(lambda: discord_server.downloads, what="the picture download, after the defer")
    assert discord_server.callback_delay(interaction) < 3.0
    first.send_signal(signal.SIGKILL)
    await first.wait()

    discord_server.cdn_gate = None
    second = await _start_bot(env, log_path)
    try:
        await until(discord_server.with_files, limit_s=90, what="the video after the restart")
        await until(lambda: "the video is below" in discord_server.original(interaction)["content"], what="final text")
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), timeout=30)
    assert second.returncode == 0, log_path.read_text()[-3000:]
    assert len(discord_server.with_files()) == 1
    engine = await Engine.open(tiny_settings)
    jobs = await engine._queue.list_jobs()
    open_requests = await ChatInbox(engine.database, "discord").unfinished()
    await engine.close()
    assert [job.params.prompt for job in jobs] == ["waves"] and jobs[0].status is JobStatus.SUCCEEDED
    assert open_requests == []
