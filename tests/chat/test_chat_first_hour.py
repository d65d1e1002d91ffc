"""The first hour's rough edges: each platform's own help, options in Discord's /video prompt and its ranges, what a
Telegram reply to the bot's own hint or video uses, and /status and queued places while the queue is idle or paused."""

from __future__ import annotations

import time
from typing import Any

import pytest

from bot.chat import texts
from engine.jobs import WorkerRecord, WorkerState
from engine.storage.images import Mode
from tests import imagefactory
from tests.discord import test_discord as on_discord
from tests.factories import status_answer
from tests.fake_discord import APPLICATION_ID, GUILD_ID, FakeDiscord
from tests.running import until
from tests.telegram import test_telegram as on_telegram

ALICE = 111
DISCORD_ALICE = on_discord.ALICE
pytestmark = pytest.mark.timeout(120)
TELEGRAM_ONLY = ("caption", "album", "/t2v", "/i2v", "/ti2v", "private chat")


def public(message: dict[str, Any]) -> dict[str, Any]:
    """A message the fake stored, as Telegram quotes it in a reply."""
    return {key: value for key, value in message.items() if key not in ("edits", "reply_markup")}


def discord_answers(server: FakeDiscord) -> list[str]:
    return [call.body["data"]["content"] for call in server.calls_to("POST", "/callback") if call.body["type"] == 4]


# -- help ------------------------------------------------------------------------------------------------------


async def test_discord_help_describes_discord_and_telegram_help_telegram(tiny_settings, discord_server, telegram):
    async with on_discord.running_bot(on_discord.configure(tiny_settings, discord_server)):
        await discord_server.slash(DISCORD_ALICE, "help")
        [discord_help] = await until(lambda: discord_answers(discord_server), what="the Discord help")
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)):
        telegram.command(ALICE, "/help")
        [telegram_help] = await until(lambda: on_telegram.texts(telegram, ALICE), what="the Telegram help")
    assert not [word for word in TELEGRAM_ONLY if word in discord_help]
    assert "start_image" in discord_help and "Make a video" in discord_help and "seed=42" in discord_help
    assert "Make a video" not in telegram_help and "start_image" not in telegram_help
    assert all(word in telegram_help for word in ("caption", "album", "/t2v")) and "seed=42" in telegram_help


# -- Discord /video: options in the prompt, ranges from the settings ---------------------------------------------


async def test_discord_video_reads_options_in_its_prompt_and_its_fields_win(tiny_settings, discord_server):
    async with on_discord.running_bot(on_discord.configure(tiny_settings, discord_server)) as bot:
        await bot.engine._queue.set_paused(True)
        options = {"prompt": "a fox seed=42 steps=2 colour=red", "steps": 3}
        interaction = await discord_server.slash(DISCORD_ALICE, "video", options)
        answer = await until(lambda: "is queued" in discord_server.original(interaction)["content"], what="queued")
        [job] = await bot.engine._queue.list_jobs()
    assert answer and job.params.prompt == "a fox" and job.params.seed == 42 and job.params.steps == 3
    assert "Ignored an unknown option: colour" in discord_server.original(interaction)["content"]


async def test_discord_video_option_ranges_are_the_limits_in_force(tiny_settings, discord_server):
    generation = tiny_settings.generation.model_copy(update={"max_steps": 12, "max_frames": 33})
    settings = on_discord.configure(tiny_settings.model_copy(update={"generation": generation}), discord_server)
    async with on_discord.running_bot(settings):
        synced = discord_server.commands[f"applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands"]
    [video] = [command for command in synced if command["name"] == "video"]
    ranges = {option["name"]: (option.get("min_value"), option.get("max_value")) for option in video["options"]}
    assert ranges["steps"] == (1, 12) and ranges["frames"] == (5, 33)


# -- Telegram: replies to the bot's own messages -----------------------------------------------------------------


async def test_a_reply_to_the_picture_hint_uses_the_picture(tiny_settings, telegram):
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.photo(ALICE, imagefactory.jpeg(128, 96))
        hint = await until(lambda: on_telegram.status_of(telegram, ALICE, "Got the picture"), what="the hint")
        telegram.user_message(ALICE, text="the waves roll in steps=2", reply_to_message=public(hint))
        await until(lambda: on_telegram.status_of(telegram, ALICE, "is queued"), what="the job")
        [job] = await bot.engine._queue.list_jobs()
    assert job.mode is Mode.I2V and [image.role for image in job.images] == ["start"]
    assert job.params.prompt == "the waves roll in"


async def test_a_reply_to_a_hint_the_bot_no_longer_knows_says_so(tiny_settings, telegram):
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)):
        telegram.photo(ALICE, imagefactory.jpeg(128, 96))
        hint = await until(lambda: on_telegram.status_of(telegram, ALICE, "Got the picture"), what="the hint")
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:  # a restart
        telegram.user_message(ALICE, text="the waves roll in", reply_to_message=public(hint))
        answer = await until(lambda: on_telegram.status_of(telegram, ALICE, "no longer have"), what="the answer")
        assert await bot.engine._queue.list_jobs() == []
    assert "Send the picture again" in answer["text"]


async def test_a_reply_to_the_bots_video_says_it_is_text_to_video(tiny_settings, telegram):
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        telegram.command(ALICE, "/video a fox steps=2")
        await until(lambda: telegram.sent("sendVideo", ALICE), what="the first video")
        video = next(message for message in telegram.replies(ALICE) if "video" in message)
        await bot.engine._queue.set_paused(True)
        telegram.user_message(ALICE, text="the fox sleeps", reply_to_message=public(video))
        answer = await until(lambda: on_telegram.status_of(telegram, ALICE, "(t2v) is queued"), what="the answer")
        second = (await bot.engine._queue.list_jobs())[0]
    assert second.mode is Mode.T2V and second.params.prompt == "the fox sleeps"
    assert "My video is not used as a picture, so this is text to video" in answer["text"]


# -- idle and paused -------------------------------------------------------------------------------------------


async def test_status_says_idle_when_nothing_runs_and_paused_when_paused(engine):
    assert (await status_answer(engine)).startswith(texts.NO_WORKER_ONLINE)
    # An idle worker's heartbeat, as the worker stores it.
    worker = WorkerRecord(id="gpu-a-1", host="gpu-a", pid=1, device="cuda:0", started_at=time.time())
    await engine._queue.heartbeat(worker.model_copy(update={"state": WorkerState.IDLE}))
    idle = await status_answer(engine)
    await engine._queue.set_paused(True)
    await engine._queue.heartbeat(worker.model_copy(update={"state": WorkerState.PAUSED}))
    paused = await status_answer(engine)
    assert idle.splitlines() == [
        "Workers: 1 online (1 idle).",
        "Queued: 0, running: 0.",
        "Worker gpu-a/cuda:0: idle, no model loaded.",
    ]
    assert paused.splitlines() == [
        "Workers: 1 online (1 paused).",
        texts.QUEUE_PAUSED,
        "Queued: 0, running: 0.",
        "Worker gpu-a/cuda:0: paused, no model loaded.",
    ]


async def test_a_queued_job_says_the_queue_is_paused(tiny_settings, telegram):
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(ALICE, "/video a patient fox")
        answer = await until(lambda: on_telegram.status_of(telegram, ALICE, "is queued"), what="the place")
    assert "Job #1 (t2v) is queued: position 1. The queue is paused" in answer["text"]


# -- places ----------------------------------------------------------------------------------------------------


async def test_messages_sent_at_once_get_numbers_in_order_and_distinct_places_and_a_move_back_says_why(
    tiny_settings, telegram
):
    group, bob, carol = -700, 222, 333

    def heads() -> dict[int, str]:
        """The first line of each job's message in the group, by job number."""
        return {int(text.split("#")[1].split(" ")[0]): text for text in on_telegram.texts(telegram, group)}

    def places() -> dict[int, int]:
        return {job: int(text.split("position ")[1].split(".")[0]) for job, text in heads().items()}

    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        queue = bot.engine._queue
        await queue.set_paused(True)
        # Five messages in one getUpdates answer, handled at once: Alice's three, then Bob's two.
        sent = [
            telegram.command(user, f"/video {user} {index}", chat_id=group, chat_type="supergroup")
            for user, index in ((ALICE, 0), (ALICE, 1), (ALICE, 2), (bob, 0), (bob, 1))
        ]
        await until(lambda: len(heads()) == 5, what="five answers")
        jobs = await queue.list_jobs(oldest_first=True)
        assert [job.params.prompt for job in jobs] == [message["text"].removeprefix("/video ") for message in sent]
        # One job per person in turn: Bob's first goes before Alice's second; every message shows its own place.
        expected = {1: 1, 4: 2, 2: 3, 5: 4, 3: 5}
        await until(lambda: places() == expected, what="every place as it is now")
        # Carol's first job goes before everyone's second: theirs move back, and their messages say why.
        telegram.command(carol, "/video carol 0", chat_id=group, chat_type="supergroup")
        await until(lambda: places() == {1: 1, 4: 2, 6: 3, 2: 4, 5: 5, 3: 6}, what="the places after Carol's")
    for moved in (2, 5, 3):  # the best place each showed depends on how the five were taken in: 2 or 3 for #2
        reason = heads()[moved].split("\n")[1]
        was = int(reason.removeprefix("It was position ").split(":")[0])
        assert was < places()[moved] and reason == texts.MOVED_BACK.format(was=was)
    assert not any("It was position" in heads()[unmoved] for unmoved in (1, 4, 6))


async def test_an_album_keeps_its_place_in_the_chats_order(tiny_settings, telegram):
    # The album's pictures wait album_wait_s for each other; a message after them still comes after the album.
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.photo(ALICE, imagefactory.jpeg(160, 120), caption="/i2v the album first", media_group_id="a1")
        telegram.photo(ALICE, imagefactory.jpeg(160, 120), media_group_id="a1")
        telegram.command(ALICE, "/video the text after it")
        await until(lambda: len(on_telegram.texts(telegram, ALICE)) >= 2 and _both_queued(telegram), what="two jobs")
        jobs = await bot.engine._queue.list_jobs(oldest_first=True)
    assert [job.params.prompt for job in jobs] == ["the album first", "the text after it"]


def _both_queued(telegram: object) -> bool:
    return sum("is queued" in text for text in on_telegram.texts(telegram, ALICE)) == 2
