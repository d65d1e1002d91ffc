"""The Telegram adapter with the real python-telegram-bot Application polling a fake Bot API on 127.0.0.1."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import socket
import sys
from typing import Any

import pytest

from bot.chat.core import NOT_ALLOWED, NOT_YOURS_TO_REROLL
from bot.telegram.adapter import TelegramAdapter
from engine.config import Settings
from engine.jobs import DeliveryStatus, JobStatus
from engine.service import Engine
from tests import imagefactory
from tests.factories import ADMIN
from tests.fake_telegram import TEST_TOKEN, FakeTelegram
from tests.running import RunningBot, until

TOKEN = TEST_TOKEN
ALICE, BOB = 111, 222
pytestmark = pytest.mark.timeout(120)


def configure(settings: Settings, server: FakeTelegram, **overrides: Any) -> Settings:
    telegram = {
        "token": TOKEN,
        "api_base_url": f"{server.url}/bot",
        "file_base_url": f"{server.url}/file/bot",
        "edit_interval_s": 0.2,
        "group_edit_interval_s": 0.2,
        "album_wait_s": 0.3,
        "delivery_retry_s": 0.5,
        **overrides,
    }
    return settings.model_copy(update={"telegram": settings.telegram.model_validate(telegram)})


def running_bot(settings: Settings) -> RunningBot:
    return RunningBot(settings, lambda engine: TelegramAdapter(engine, settings.telegram, poll_timeout_s=1))


def texts(server: FakeTelegram, chat_id: int) -> list[str]:
    return [message.get("text", "") for message in server.replies(chat_id)]


def status_of(server: FakeTelegram, chat_id: int, fragment: str) -> dict[str, Any] | None:
    return next((m for m in server.replies(chat_id) if fragment in m.get("text", "")), None)


async def test_text_command_queues_shows_progress_and_delivers_the_video(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video a red fox in the snow seed=7 steps=3 colour=red")
        videos = await until(lambda: telegram.sent("sendVideo", ALICE), what="the video")
        status = await until(lambda: status_of(telegram, ALICE, "the video is below"), what="final status")
        job = (await bot.engine._queue.list_jobs())[0]
        assert job.params.prompt == "a red fox in the snow" and job.params.seed == 7 and job.params.steps == 3
        assert job.delivery_status is DeliveryStatus.DELIVERED
        await until(lambda: bot.adapter._relay.tracked == 0, what="the relay to let go of the delivered job")
    caption = videos[0].fields["caption"]
    assert caption.startswith("a red fox in the snow") and "seed 7" in caption and "tiny-t2v" in caption
    assert json.loads(videos[0].fields["reply_markup"])["inline_keyboard"][0][0]["callback_data"] == f"reroll:{job.id}"
    assert status["edits"] >= 2  # queued text, then progress, then done: always the same message
    # A text request needs no "Checking" message: its first answer (its place, or its start when the idle worker took
    # it first) is one message, edited from then on.
    [answer] = [call.fields["text"] for call in telegram.sent("sendMessage", ALICE)]
    assert answer.startswith("Job #1") and "Ignored an unknown option: colour" in answer
    edits = [call.fields["text"] for call in telegram.sent("editMessageText", ALICE)]
    assert edits and not any("Ignored an unknown option" in edit for edit in edits)  # the note is said once
    # The place is never drawn over the progress of a job that started at once.
    assert not any("is queued" in edit for edit in edits)
    assert telegram.sent("setMyCommands")


async def test_photo_with_caption_and_image_document_and_reply(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        telegram.photo(ALICE, imagefactory.jpeg(128, 96), caption="/i2v waves roll in steps=2")
        telegram.document(BOB, imagefactory.png(64, 160), "portrait.png", caption="/video mode=ti2v steps=2")
        original = telegram.photo(ALICE, imagefactory.jpeg(128, 128))
        telegram.command(ALICE, "/ti2v steps=2 the sky turns", reply_to_message=original)
        await until(lambda: len(telegram.sent("sendVideo")) == 3, what="three videos")
        jobs = {job.id: job for job in await bot.engine._queue.list_jobs()}
    modes = sorted((job.source.user_id, job.mode.value, job.params.width > job.params.height) for job in jobs.values())
    assert modes == [("111", "i2v", True), ("111", "ti2v", False), ("222", "ti2v", False)]
    portrait = next(job for job in jobs.values() if job.source.user_id == "222")
    assert portrait.params.height > portrait.params.width
    assert portrait.images[0].format == "PNG"


async def test_album_of_two_is_start_and_end(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        telegram.photo(ALICE, imagefactory.jpeg(160, 120), media_group_id="album-1")
        telegram.photo(ALICE, imagefactory.jpeg(320, 240), caption="/i2v sunset steps=2", media_group_id="album-1")
        await until(lambda: telegram.sent("sendVideo", ALICE), what="the album's video")
        job = (await bot.engine._queue.list_jobs())[0]
    assert [image.role for image in job.images] == ["start", "end"]
    assert job.images[0].width == 160 and job.images[1].width == 160  # end resized to the start
    assert any("not trained with end images" in warning for warning in job.params.warnings)


async def test_bad_input_gets_a_clear_reply_and_queues_nothing(tiny_settings, telegram):
    settings = configure(tiny_settings, telegram, download_limit_bytes=5_000)
    async with running_bot(settings) as bot:
        telegram.command(ALICE, "/ti2v a beach")
        telegram.document(ALICE, b"just some text", "notes.txt", caption="/i2v hello", mime_type="text/plain")
        telegram.document(BOB, imagefactory.png(), "big.png", caption="/i2v big", size=25_000_000)
        telegram.command(BOB, "/video steps=many a cat")
        await until(lambda: sum("Checking" not in t for t in texts(telegram, ALICE)) >= 2, what="alice's errors")
        await until(lambda: sum("Checking" not in t for t in texts(telegram, BOB)) >= 2, what="bob's errors")
        assert await bot.engine._queue.counts() == {}
    alice, bob = " | ".join(texts(telegram, ALICE)), " | ".join(texts(telegram, BOB))
    assert "ti2v needs a start image" in alice and "Attach a photo" in alice
    assert "not an image type we accept" in alice or "not an image we can read" in alice
    assert "is 25 MB; the most I can fetch is" in bob
    assert "steps must be a number, not 'many'" in bob
    assert not [call for call in telegram.calls if call.method == "getFile" and "big" in call.fields["file_id"]]


async def test_two_users_at_once_each_get_their_own_video(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video alice's fox steps=2")
        telegram.command(BOB, "/video bob's cat steps=2")
        await until(lambda: telegram.sent("sendVideo", ALICE) and telegram.sent("sendVideo", BOB), what="videos")
        jobs = await bot.engine._queue.list_jobs()
    assert {job.params.prompt for job in jobs} == {"alice's fox", "bob's cat"}
    assert "alice's fox" in telegram.sent("sendVideo", ALICE)[0].fields["caption"]
    assert "bob's cat" in telegram.sent("sendVideo", BOB)[0].fields["caption"]


async def test_cancel_button_only_for_the_owner_and_reroll_makes_a_new_seed(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)  # keep the job queued while the buttons are pressed
        telegram.command(ALICE, "/video a slow fox steps=2 seed=3")
        status = await until(lambda: status_of(telegram, ALICE, "is queued"), what="queued status")
        job_id = (await bot.engine._queue.list_jobs())[0].id
        telegram.press(BOB, status, f"cancel:{job_id}")
        await until(lambda: telegram.sent("answerCallbackQuery"), what="bob's answer")
        assert (await bot.engine._queue.get(job_id)).status is JobStatus.QUEUED
        telegram.press(ALICE, status, f"cancel:{job_id}")
        await until(lambda: len(telegram.sent("answerCallbackQuery")) == 2, what="alice's answer")
        assert (await bot.engine._queue.get(job_id)).status is JobStatus.CANCELLED
        await until(lambda: status_of(telegram, ALICE, "was cancelled"), what="cancelled status")

        await bot.engine._queue.set_paused(False)
        telegram.command(ALICE, "/video another fox steps=2 seed=3")
        video = (await until(lambda: telegram.sent("sendVideo", ALICE), what="video"))[0]
        result_message = telegram.messages[(ALICE, max(m for (c, m) in telegram.messages if c == ALICE))]
        assert "video" in result_message
        reroll = json.loads(video.fields["reply_markup"])["inline_keyboard"][0][0]["callback_data"]
        telegram.press(ALICE, result_message, reroll)
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 2, what="rerolled video")
        # Days later Telegram sends the button's message as inaccessible: chat, id and date 0, nothing else.
        too_old = {"chat": result_message["chat"], "message_id": result_message["message_id"], "date": 0}
        telegram.press(ALICE, too_old, reroll)
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 3, what="video rerolled from an old message")
        jobs = await bot.engine._queue.list_jobs()
    answers = [call.fields.get("text", "") for call in telegram.sent("answerCallbackQuery")]
    assert "only they or an admin can cancel" in answers[0]
    rerolled = jobs[1]
    assert rerolled.retry_of == jobs[2].id and rerolled.params.seed != 3
    assert jobs[0].retry_of == jobs[2].id
    assert rerolled.params.prompt == "another fox"


async def test_oversize_video_is_reencoded_to_fit_the_upload_limit(tiny_settings, telegram):
    telegram.upload_limit = 40_000
    settings = configure(tiny_settings, telegram, upload_limit_bytes=40_000)
    async with running_bot(settings) as bot:
        telegram.command(ALICE, "/video noise steps=2 frames=33 res=128x128")
        video = (await until(lambda: telegram.sent("sendVideo", ALICE), what="video"))[0]
        job = (await bot.engine._queue.list_jobs())[0]
    assert job.result.bytes > 40_000  # random weights make noise, which compresses badly
    assert len(video.files["video"]) <= 40_000


async def test_429_storm_waits_and_keeps_editing_one_message(tiny_settings, telegram):
    telegram.faults["editMessageText"] = [(429, "Too Many Requests: retry after 1", {"retry_after": 1})] * 6
    async with running_bot(configure(tiny_settings, telegram)):
        telegram.command(ALICE, "/video a patient fox steps=6")
        await until(lambda: telegram.sent("sendVideo", ALICE), what="video")
        await until(lambda: status_of(telegram, ALICE, "the video is below"), what="final status")
    assert len(telegram.sent("sendMessage", ALICE)) == 1
    assert not telegram.faults["editMessageText"]


async def test_a_failed_upload_is_retried_from_the_stored_file_with_doubling_waits(tiny_settings, telegram, caplog):
    telegram.faults["sendVideo"] = [(500, "Internal Server Error", None)] * 3
    caplog.set_level("WARNING", logger="bot.chat.relay")
    async with running_bot(configure(tiny_settings, telegram, delivery_retry_s=0.2)) as bot:
        telegram.command(ALICE, "/video retry me steps=2")
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 4, what="the fourth upload")
        await until(lambda: status_of(telegram, ALICE, "the video is below"), what="final status")
        job = (await bot.engine._queue.list_jobs())[0]
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 4
    assert job.attempts == 1  # generated once
    waits = [record.args[2] for record in caplog.records if "next in" in record.msg]
    assert waits == [0.2, 0.4, 0.8]


async def test_an_admin_redelivers_a_video_the_bot_gave_up_on(tiny_settings, telegram):
    telegram.faults["sendVideo"] = [(500, "Internal Server Error", None)]
    async with running_bot(configure(tiny_settings, telegram, max_delivery_attempts=1)) as bot:
        telegram.command(ALICE, "/video deliver me later steps=2")
        gave_up = (await until(lambda: status_of(telegram, ALICE, "could not be sent"), what="giving up"))["text"]
        job = (await bot.engine._queue.list_jobs())[0]
        redeliver = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "from bot.cli import main; main()",
            "queue",
            "redeliver",
            str(job.id),
            env={**os.environ, "WANBOT_DATA_DIR": str(tiny_settings.data_dir)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(redeliver.communicate(), timeout=60)
        await until(lambda: status_of(telegram, ALICE, "the video is below"), what="the redelivered video")
        job = await bot.engine._queue.get(job.id)
    assert redeliver.returncode == 0 and "sends" in output.decode(), output.decode()
    assert f"wanbot queue redeliver {job.id}" in gave_up
    assert len(telegram.sent("sendVideo", ALICE)) == 2 and job.attempts == 1  # sent again, not generated again
    assert job.delivery_status is DeliveryStatus.DELIVERED


async def test_a_blocked_bot_gives_up_the_upload_at_once(tiny_settings, telegram):
    telegram.faults["sendVideo"] = [(403, "Forbidden: bot was blocked by the user", None)]
    async with running_bot(configure(tiny_settings, telegram, delivery_retry_s=0.2)) as bot:
        telegram.command(ALICE, "/video nobody will see this steps=2")
        await until(lambda: status_of(telegram, ALICE, "could not be sent"), what="giving up")
        await asyncio.sleep(1.0)  # five retry periods: none may upload again
        job = (await bot.engine._queue.list_jobs())[0]
    assert len(telegram.sent("sendVideo", ALICE)) == 1
    assert job.delivery_status is DeliveryStatus.DELIVERY_FAILED and job.delivery_attempts == 5
    assert "blocked by the user" in job.delivery_error


async def test_the_token_never_reaches_the_logs(tiny_settings, telegram, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    telegram.faults["sendVideo"] = [(500, "Internal Server Error", None)]
    async with running_bot(configure(tiny_settings, telegram)):
        telegram.command(ALICE, "/video log me steps=2")
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 2, what="second upload")
    assert "TEST-token-do-not-log" not in caplog.text


def run_environment(settings: Settings, server: FakeTelegram, **extra: str) -> dict[str, str]:
    """The environment of a `wanbot run` process that talks to the fake Bot API."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "TELEGRAM_", "DISCORD_"))}
    env.update(
        WANBOT_DATA_DIR=str(settings.data_dir),
        WANBOT_MODELS__T2V="tiny",
        TELEGRAM_BOT_TOKEN=TOKEN,
        WANBOT_TELEGRAM__API_BASE_URL=f"{server.url}/bot",
        WANBOT_TELEGRAM__FILE_BASE_URL=f"{server.url}/file/bot",
        WANBOT_TELEGRAM__EDIT_INTERVAL_S="0.2",
        WANBOT_TELEGRAM__DELIVERY_RETRY_S="0.5",
        WANBOT_PREVIEWS__ENABLED="false",  # as in tiny_settings: the live message stays a text message
        # The start-up check of models not on disk must never reach a real Hub: a closed port answers at once.
        WANBOT_DOWNLOADS__ENDPOINT="http://127.0.0.1:9",
    )
    return {**env, **extra}


async def wanbot_run_until_exit(env: dict[str, str], limit_s: float = 60) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from bot.cli import main; main()",
        "run",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=limit_s)
    return process.returncode, output.decode()


async def test_wanbot_run_that_cannot_connect_says_why_and_exits(tiny_settings, telegram):
    rejected = run_environment(tiny_settings, telegram, TELEGRAM_BOT_TOKEN="999:wrong-secret")
    code, output = await wanbot_run_until_exit(rejected)
    assert code == 2 and "Telegram did not connect (InvalidToken" in output, output
    assert "Traceback" not in output and "wrong-secret" not in output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    discord_down = run_environment(
        tiny_settings,
        telegram,
        DISCORD_BOT_TOKEN="discord-token",
        WANBOT_DISCORD__API_BASE_URL=f"http://127.0.0.1:{closed_port}/api/v10",
    )
    code, output = await wanbot_run_until_exit(discord_down)  # Telegram starts first, then Discord fails
    assert code == 1 and "Discord did not connect" in output, output  # out of reach: systemd starts it again
    assert telegram.sent("deleteWebhook") and "Traceback" not in output  # Telegram had started polling
    telegram_down = run_environment(
        tiny_settings, telegram, WANBOT_TELEGRAM__API_BASE_URL=f"http://127.0.0.1:{closed_port}/bot"
    )
    code, output = await wanbot_run_until_exit(telegram_down)
    assert code == 1 and "Telegram did not connect (NetworkError" in output, output


async def test_wanbot_run_killed_mid_job_delivers_exactly_one_video_after_restart(tiny_settings, telegram, tmp_path):
    """The real `wanbot run` process, SIGKILLed while generating, restarted: the job runs again, one video arrives."""
    env = run_environment(tiny_settings, telegram)
    log_path = tmp_path / "run.log"

    async def start_bot() -> asyncio.subprocess.Process:
        with log_path.open("a") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, "-c", "from bot.cli import main; main()", "run", env=env, stdout=log, stderr=log
            )

    first = await start_bot()
    telegram.command(ALICE, "/video survive a crash steps=400 seed=9")
    await until(
        lambda: any("generating" in call.fields.get("text", "") for call in telegram.sent("editMessageText")),
        what="progress from the first process",
    )
    first.send_signal(signal.SIGKILL)
    await first.wait()
    assert not telegram.sent("sendVideo")

    second = await start_bot()
    try:
        await until(lambda: telegram.sent("sendVideo", ALICE), limit_s=90, what="the video after the restart")
        await until(lambda: status_of(telegram, ALICE, "the video is below"), what="final status")
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), timeout=30)
    assert second.returncode == 0, log_path.read_text()[-3000:]
    assert len(telegram.sent("sendVideo", ALICE)) == 1
    assert len(telegram.sent("sendMessage", ALICE)) == 1  # the same status message across both processes
    engine = await Engine.open(tiny_settings)
    job = (await engine._queue.list_jobs())[0]
    await engine.close()
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2 and job.params.seed == 9
    assert job.delivery_status is DeliveryStatus.DELIVERED
    assert "TEST-token-do-not-log" not in log_path.read_text()
    assert "videos are made on the CPU (no CUDA GPU found" in log_path.read_text()
    assert "speed-ups: attention=native (no CUDA GPU); fp8=off (no CUDA GPU); compile=off" in log_path.read_text()


async def test_allowlist_and_group_addressing(tiny_settings, telegram):
    settings = configure(tiny_settings, telegram, allowed_users=[ALICE])
    async with running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(BOB, "/video let me in")
        await until(lambda: texts(telegram, BOB), what="bob's refusal")
        group = -100
        telegram.command(ALICE, "/video@other_bot not for us", chat_id=group, chat_type="supergroup")
        telegram.photo(
            ALICE,
            imagefactory.jpeg(),
            caption="/i2v@other_bot not for us either",
            chat={"id": group, "type": "supergroup"},
        )
        telegram.command(ALICE, "/video@wanbot_test_bot for us", chat_id=group, chat_type="supergroup")
        await until(lambda: status_of(telegram, group, "is queued"), what="the addressed group command")
        jobs = await bot.engine._queue.list_jobs()
    assert texts(telegram, BOB) == ["Sorry, you are not allowed to use this bot here."]
    assert [job.params.prompt for job in jobs] == ["for us"]


async def test_queue_status_help_and_cancel_commands(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(ALICE, "/video first fox")
        telegram.command(ALICE, "/video second fox")
        await until(lambda: len([t for t in texts(telegram, ALICE) if "is queued" in t]) == 2, what="two jobs")
        for count, text in enumerate(("/queue", "/status", "/help", "/cancel nonsense", "/cancel"), start=3):
            telegram.command(ALICE, text)
            await until(lambda count=count: len(telegram.sent("sendMessage", ALICE)) == count, what=text)
        telegram.command(BOB, "/cancel 1")
        await until(lambda: telegram.sent("sendMessage", BOB), what="bob's answer")
        statuses = [job.status for job in await bot.engine._queue.list_jobs()]
    answers = [call.fields["text"] for call in telegram.sent("sendMessage", ALICE)][2:]
    assert answers[0].startswith("#1 t2v · position 1") and "#2 t2v · position 2" in answers[0]
    assert "The queue is paused" in answers[1] and "Queued: 2, running: 0." in answers[1]
    assert "/video a red fox" in answers[2] and "send pictures as files" in answers[2]
    assert "'nonsense' is not a job number" in answers[3]
    assert answers[4] == "Job #2 is cancelled."  # without a number: the latest
    assert "belongs to someone else" in telegram.sent("sendMessage", BOB)[0].fields["text"]
    assert statuses == [JobStatus.CANCELLED, JobStatus.QUEUED]


async def test_not_modified_and_413_answers_are_survived(tiny_settings, telegram):
    # Taken by the first edit (progress, or "done" at the latest); a spurious one on the last would hide the final text.
    telegram.faults["editMessageText"] = [(400, "Bad Request: message is not modified", None)]
    telegram.faults["sendVideo"] = [(413, "Request Entity Too Large", None)]
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video resilient fox steps=3 seed=5 frames=17")  # a video a re-encode can shrink
        await until(lambda: status_of(telegram, ALICE, "the video is below"), what="delivery")
        job = (await bot.engine._queue.list_jobs())[0]
    # The smaller file goes at once, within the same attempt, as on Discord (bot/chat/relay.py).
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 1
    assert len(telegram.sent("sendVideo", ALICE)) == 2


async def test_private_chats_need_no_command_and_groups_stay_quiet(tiny_settings, telegram):
    settings = configure(tiny_settings, telegram)
    settings = settings.model_copy(update={"queue": settings.queue.model_copy(update={"per_user_limit": 5})})
    async with running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.user_message(ALICE, text="a heron takes off steps=2")
        bare = telegram.photo(ALICE, imagefactory.jpeg(128, 96))
        await until(lambda: any("Got the picture" in t for t in texts(telegram, ALICE)), what="the picture hint")
        telegram.user_message(ALICE, text="the heron lands", reply_to_message=bare)
        telegram.document(ALICE, imagefactory.png(64, 160), "tall.png", caption="mode=ti2v a tower sways")
        telegram.photo(ALICE, imagefactory.jpeg(160, 120), media_group_id="trip")
        telegram.photo(ALICE, imagefactory.jpeg(160, 120), caption="day turns to night", media_group_id="trip")
        telegram.command(ALICE, "/animate please")
        telegram.user_message(
            ALICE,
            sticker={
                "file_id": "s1",
                "file_unique_id": "s1",
                "width": 512,
                "height": 512,
                "is_animated": False,
                "is_video": False,
                "type": "regular",
            },
        )
        group = {"chat_id": -100, "chat_type": "group"}
        telegram.user_message(BOB, text="just chatting in the group", **group)
        telegram.photo(BOB, imagefactory.jpeg(), caption="holiday snap", chat={"id": -100, "type": "group"})
        await until(lambda: len([t for t in texts(telegram, ALICE) if "is queued" in t]) == 4, what="four jobs")
        await until(lambda: any("I don't know /animate" in t for t in texts(telegram, ALICE)), what="unknown command")
        await until(lambda: any("I make videos from" in t for t in texts(telegram, ALICE)), what="the sticker's hint")
        telegram.command(ALICE, "/help")
        await until(lambda: any("/video is optional" in t for t in texts(telegram, ALICE)), what="the help")
        jobs = {job.params.prompt: job for job in await bot.engine._queue.list_jobs()}  # updates run concurrently
    requests = {prompt: (job.mode.value, [image.role for image in job.images]) for prompt, job in jobs.items()}
    assert requests == {
        "a heron takes off": ("t2v", []),
        "the heron lands": ("i2v", ["start"]),
        "a tower sways": ("ti2v", ["start"]),
        "day turns to night": ("i2v", ["start", "end"]),
    }
    assert jobs["a heron takes off"].params.steps == 2
    assert jobs["a tower sways"].params.height > jobs["a tower sways"].params.width
    assert texts(telegram, -100) == []  # in groups only commands are answered


async def test_a_request_in_a_forum_topic_is_answered_and_delivered_in_that_topic(tiny_settings, telegram):
    forum, topic = -300, 7
    async with running_bot(configure(tiny_settings, telegram)):
        telegram.command(
            ALICE,
            "/video waves in the topic steps=2",
            chat_id=forum,
            chat_type="supergroup",
            message_thread_id=topic,
            is_topic_message=True,
        )
        [video] = await until(lambda: telegram.sent("sendVideo", forum), what="the video")
    [status] = telegram.sent("sendMessage", forum)
    assert int(status.fields["message_thread_id"]) == topic
    assert int(video.fields["message_thread_id"]) == topic


async def test_progress_in_a_group_is_edited_at_the_slower_group_pace(tiny_settings, telegram):
    group = -400
    async with running_bot(configure(tiny_settings, telegram, group_edit_interval_s=0.6)):
        slow = "/video a slow pace preset=quality steps=50 frames=33 res=128x128"
        telegram.command(ALICE, slow, chat_id=group, chat_type="supergroup")
        await until(lambda: telegram.sent("sendVideo", group), what="the video")
        await until(lambda: status_of(telegram, group, "the video is below"), what="the final text")
    # The first message is the "queued" answer itself; every edit of it is a live update, paced for the group, but
    # for the end ("done", then "the video is below"), which goes with the video at once.
    shown = [*telegram.sent("sendMessage", group), *telegram.sent("editMessageText", group)]
    paced = [call for call in shown if "is done" not in call.fields["text"]]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(paced)]
    assert len(paced) >= 2 and min(gaps) >= 0.55, gaps
    ends = [call.fields["text"] for call in shown[len(paced) :]]
    assert len(ends) == 2 and ends[0].endswith("Sending the video…") and ends[1].endswith("the video is below.")


async def test_in_a_busy_group_only_the_first_places_are_refreshed_when_the_queue_moves(tiny_settings, telegram):
    group = -500

    def places() -> list[int]:
        """How often each waiting job's message in the group was edited, in the order they were asked for."""
        return [message.get("edits", 0) for message in telegram.replies(group) if "is queued" in message["text"]]

    async with running_bot(configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(ALICE, "/video first in line")
        await until(lambda: status_of(telegram, ALICE, "is queued"), what="alice's job")
        for count, member in enumerate(range(1001, 1007), start=1):
            telegram.command(member, f"/video member {member} waits", chat_id=group, chat_type="supergroup")
            await until(lambda count=count: len(places()) == count, what=f"place {count} in the group")
        await bot.engine._queue.cancel(1, ADMIN)  # the queue moves: everyone behind alice has a new place
        await until(lambda: places()[:5] == [1] * 5, what="the first five places refreshed")
        await asyncio.sleep(0.5)
    # 11 messages in all (six answers, five new places), within the group's 20 a minute; the sixth waiting job keeps
    # its place text.
    assert places() == [1, 1, 1, 1, 1, 0]


async def test_only_admins_pause_and_resume_the_queue(tiny_settings, telegram):
    settings = configure(tiny_settings, telegram)
    admins = settings.access.model_copy(update={"admins": [f"telegram:{ALICE}"]})
    settings = settings.model_copy(update={"access": admins})
    async with running_bot(settings) as bot:
        telegram.command(BOB, "/pause")
        await until(lambda: texts(telegram, BOB), what="bob's refusal")
        assert not await bot.engine._queue.is_paused()
        telegram.command(ALICE, "/pause")
        await until(lambda: any(t.startswith("Paused") for t in texts(telegram, ALICE)), what="the pause")
        assert await bot.engine._queue.is_paused()
        telegram.command(BOB, "/video waits while paused steps=2")
        await until(lambda: status_of(telegram, BOB, "is queued"), what="bob's job queued while paused")
        telegram.command(ALICE, "/resume")
        await until(lambda: telegram.sent("sendVideo", BOB), what="the video after the resume")
    assert "Only admins can pause or resume" in texts(telegram, BOB)[0]
    assert "Resumed: 1 waiting video will start in turn." in texts(telegram, ALICE)


async def test_waiting_jobs_see_their_place_move_up(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(ALICE, "/video a long one steps=400")
        # Updates are handled concurrently: Bob asks once Alice is in line, so he is second.
        await until(lambda: status_of(telegram, ALICE, "is queued"), what="alice's job queued")
        telegram.command(BOB, "/video second in line steps=2")
        await until(lambda: status_of(telegram, BOB, "is queued"), what="bob's job queued")
        bob_status = status_of(telegram, BOB, "is queued")
        assert "position 2" in bob_status["text"]
        await bot.engine._queue.set_paused(False)
        await until(lambda: status_of(telegram, ALICE, "generating"), what="the first job running")
        await until(lambda: "position 1" in bob_status["text"], what="bob's place moving up")
        await bot.engine._queue.cancel((await bot.engine._queue.list_jobs(user_key=f"telegram:{ALICE}"))[0].id, ADMIN)
        await until(lambda: telegram.sent("sendVideo", BOB), what="bob's video")
    moves = [
        call.fields["text"].split("\n")[0]
        for call in telegram.sent("editMessageText", BOB)
        if int(call.fields["message_id"]) == bob_status["message_id"] and "is queued" in call.fields["text"]
    ]
    assert "position 2" in telegram.sent("sendMessage", BOB)[0].fields["text"] and "position 1" in moves[-1]


async def test_outsiders_are_refused_every_command_and_button_and_only_the_owner_rerolls(tiny_settings, telegram):
    carol, group = 333, -100
    settings = configure(tiny_settings, telegram, allowed_users=[ALICE, carol])
    async with running_bot(settings) as bot:
        telegram.command(ALICE, "/video a group fox steps=2", chat_id=group, chat_type="supergroup")
        video = (await until(lambda: telegram.sent("sendVideo", group), what="alice's video"))[0]
        await until(lambda: status_of(telegram, group, "the video is below"), what="the final text")
        video_message = next(message for message in telegram.replies(group) if "video" in message)
        reroll = json.loads(video.fields["reply_markup"])["inline_keyboard"][0][0]["callback_data"]
        in_group_before = len(telegram.replies(group))
        outsider_commands = (
            "/queue",
            "/status",
            "/help",
            "/cancel 1",
            "/pause",
            "/resume",
            "/previews off",
            "/loras",
            "/enhance",
            "/extend",
            "/video x",
        )
        for text in outsider_commands:
            telegram.command(BOB, text)
        await until(lambda: len(texts(telegram, BOB)) == len(outsider_commands), what="bob's answers")
        # Stray things from an outsider get silence: a picture without a prompt, an unknown command, a sticker.
        telegram.photo(BOB, imagefactory.jpeg())
        telegram.command(BOB, "/nosuchthing")
        telegram.user_message(
            BOB,
            sticker={
                "file_id": "s",
                "file_unique_id": "s",
                "width": 1,
                "height": 1,
                "is_animated": False,
                "is_video": False,
                "type": "regular",
            },
        )
        telegram.press(BOB, video_message, reroll)
        telegram.press(BOB, video_message, "cancel:1")
        telegram.press(carol, video_message, reroll)  # allowed, but not hers
        await until(lambda: len(telegram.sent("answerCallbackQuery")) == 3, what="three button answers")
        await asyncio.sleep(0.5)  # room for a wrong extra message to arrive
        jobs = await bot.engine._queue.list_jobs()
    assert texts(telegram, BOB) == [NOT_ALLOWED] * len(outsider_commands)
    answers = [call.fields.get("text", "") for call in telegram.sent("answerCallbackQuery")]
    assert sorted(answers) == sorted([NOT_ALLOWED, NOT_ALLOWED, NOT_YOURS_TO_REROLL])  # handled concurrently
    assert len(telegram.replies(group)) == in_group_before  # nothing posted into the group for anybody
    assert len(jobs) == 1


async def test_queue_retry_of_a_chat_job_gets_a_message_of_its_own(tiny_settings, telegram):
    from tests.cli.test_cli import wanbot

    async with running_bot(configure(tiny_settings, telegram)):
        telegram.command(ALICE, "/video a fox made twice steps=2")
        first = await until(lambda: status_of(telegram, ALICE, "Job #1 is done: the video is below"), what="job 1")
        retried = await asyncio.to_thread(wanbot, "queue", "retry", "1", data=tiny_settings.data_dir)
        assert retried.returncode == 0, retried.stderr
        second = await until(lambda: status_of(telegram, ALICE, "Job #2 is done: the video is below"), what="job 2")
    assert second["message_id"] != first["message_id"] and len(telegram.sent("sendVideo", ALICE)) == 2
    assert telegram.messages[(ALICE, first["message_id"])]["text"] == "Job #1 is done: the video is below."


async def test_presets_are_named_in_the_answer_and_caption_and_bad_ones_refused(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video a quick fox preset=fast steps=30")
        video = (await until(lambda: telegram.sent("sendVideo", ALICE), what="the fast video"))[0]
        telegram.command(BOB, "/video a fox preset=turbo")
        refusal = await until(lambda: texts(telegram, BOB), what="the refusal")
        job = (await bot.engine._queue.list_jobs())[0]
    shown = [
        call.fields["text"]
        for call in telegram.calls
        if call.method in ("sendMessage", "editMessageText") and int(call.fields.get("chat_id", 0)) == ALICE
    ]
    assert job.params.preset.value == "fast" and job.params.steps == 4
    assert any("4 steps, seed" in text and "fast preset." in text for text in shown)  # the place, with the preset
    assert any("steps=30 was not used" in text for text in shown)
    assert "fast preset" in video.fields["caption"]
    assert "turbo" in refusal[0] and "preset=" in refusal[0]


async def test_ten_quick_taps_of_reroll_make_one_job_and_one_message(tiny_settings, telegram):
    async with running_bot(configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video a fox on a bike steps=2")
        video = (await until(lambda: telegram.sent("sendVideo", ALICE), what="the video"))[0]
        result_message = telegram.messages[(ALICE, max(m for (c, m) in telegram.messages if c == ALICE))]
        await bot.engine._queue.set_paused(True)  # the rerolled job waits, so every later tap finds it
        reroll = json.loads(video.fields["reply_markup"])["inline_keyboard"][0][0]["callback_data"]
        messages_before = len(telegram.sent("sendMessage", ALICE))
        for _ in range(10):
            telegram.press(ALICE, result_message, reroll)
        await until(lambda: len(telegram.sent("answerCallbackQuery")) == 10, what="an answer to every tap")
        jobs = await bot.engine._queue.list_jobs()
    assert len(jobs) == 2 and jobs[0].retry_of == jobs[1].id
    assert len(telegram.sent("sendMessage", ALICE)) == messages_before + 1  # one "Rerolling job #1…"
    answers = [call.fields.get("text", "") for call in telegram.sent("answerCallbackQuery")]
    assert sum("is already making this video again" in answer for answer in answers) == 9
