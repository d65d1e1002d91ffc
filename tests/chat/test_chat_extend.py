"""Extend in both chats: a button under every video (beside Reroll), /extend [prompt] as a reply on Telegram and
/extend job:<id> [prompt] on Discord; one joined video back, outsiders and others' videos refused, too long refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bot.chat.core import NOT_ALLOWED, NOT_YOURS_TO_EXTEND
from engine.config import Settings
from engine.pipeline.video import probe
from tests.discord import test_discord as on_discord
from tests.running import until
from tests.telegram import test_telegram as on_telegram

ALICE, BOB, CAROL = on_telegram.ALICE, on_telegram.BOB, 333
pytestmark = pytest.mark.timeout(120)


def quoted(message: dict[str, Any]) -> dict[str, Any]:
    """A message the fake stored, as Telegram quotes it in a reply (with its buttons)."""
    kept = {key: value for key, value in message.items() if key not in ("edits", "reply_markup")}
    return {**kept, "reply_markup": json.loads(message["reply_markup"])} if message.get("reply_markup") else kept


def buttons_of(message: dict[str, Any]) -> list[str]:
    rows = json.loads(message["reply_markup"])["inline_keyboard"]
    return [button["callback_data"] for row in rows for button in row]


async def test_telegram_extend_button_and_reply_make_one_joined_video_each(tiny_settings: Settings, telegram):
    settings = on_telegram.configure(tiny_settings, telegram, allowed_users=[ALICE, CAROL])
    async with on_telegram.running_bot(settings) as bot:
        telegram.command(ALICE, "/video a fox steps=2 frames=9")
        await until(lambda: telegram.sent("sendVideo", ALICE), what="the first video")
        video = next(message for message in telegram.replies(ALICE) if "video" in message)
        assert buttons_of(video) == ["reroll:1", "extend:1"]
        telegram.press(BOB, video, "extend:1")  # an outsider
        telegram.press(CAROL, video, "extend:1")  # allowed, but not hers
        telegram.press(ALICE, video, "extend:1")
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 2, what="the extended video")
        second = next(message for message in reversed(telegram.replies(ALICE)) if "video" in message)
        telegram.command(ALICE, "/extend the fox jumps", reply_to_message=quoted(second))
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 3, what="the chained video")
        group = -100
        telegram.command(ALICE, "/extend", chat_id=group, chat_type="supergroup", reply_to_message=quoted(second))
        await until(lambda: telegram.replies(group), what="the refusal in the group")
        telegram.command(ALICE, "/extend")  # a reply to nothing
        await until(lambda: any("Reply /extend" in text for text in on_telegram.texts(telegram, ALICE)), what="how")
        jobs = sorted(await bot.engine._queue.list_jobs(), key=lambda job: job.id)
    answers = sorted(call.fields.get("text", "") for call in telegram.sent("answerCallbackQuery"))
    assert answers == sorted([NOT_ALLOWED, NOT_YOURS_TO_EXTEND, "Continuing the video from its last frame…"])
    assert [job.params.extends for job in jobs] == [None, 1, 2]
    assert [probe(job.result.path).frames for job in jobs] == [9, 17, 25]
    [refused] = [message.get("text", "") for message in telegram.replies(group)]
    assert refused == "Job #2's video was made in another chat: extend it there, where it will be sent."
    assert jobs[2].params.prompt == "the fox jumps" and jobs[1].params.prompt == "a fox"
    captions = [call.fields["caption"] for call in telegram.sent("sendVideo", ALICE)]
    assert " · 17 frames · " in captions[1] and captions[1].endswith(" · extends #1")


async def test_telegram_an_extend_past_max_seconds_says_why(tiny_settings: Settings, telegram):
    generation = tiny_settings.generation.model_copy(update={"max_seconds": 1.0})
    settings = on_telegram.configure(tiny_settings.model_copy(update={"generation": generation}), telegram)
    async with on_telegram.running_bot(settings) as bot:
        telegram.command(ALICE, "/video a fox steps=2 frames=13")
        await until(lambda: telegram.sent("sendVideo", ALICE), what="the video")
        video = next(message for message in telegram.replies(ALICE) if "video" in message)
        telegram.press(ALICE, video, "extend:1")
        await until(lambda: telegram.sent("answerCallbackQuery"), what="the answer")
        assert await bot.engine._queue.counts() == {"succeeded": 1}
    [refusal] = [call.fields["text"] for call in telegram.sent("answerCallbackQuery")]
    assert refusal.startswith("Extended, job #1's video would be 1.6 s long; this bot makes at most 1 s.")


async def test_discord_extend_button_and_command(tiny_settings: Settings, discord_server):
    async with on_discord.running_bot(on_discord.configure(tiny_settings, discord_server)) as bot:
        await discord_server.slash(on_discord.ALICE, "video", {"prompt": "a fox", "steps": 2, "frames": 9})
        video = (await until(discord_server.with_files, what="the video"))[0]
        custom_ids = discord_server.custom_ids(video)  # wherever the card holds them
        await discord_server.click(on_discord.ALICE, video, "wanbot:extend:1")
        await until(lambda: len(discord_server.with_files()) == 2, what="the extended video")
        await discord_server.slash(on_discord.ALICE, "extend", {"job": 2, "prompt": "the fox sleeps"})
        await until(lambda: len(discord_server.with_files()) == 3, what="the chained video")
        jobs = sorted(await bot.engine._queue.list_jobs(), key=lambda job: job.id)
    assert custom_ids == ["wanbot:reroll:1", "wanbot:extend:1"]
    assert [job.params.extends for job in jobs] == [None, 1, 2] and jobs[2].params.prompt == "the fox sleeps"
    assert jobs[2].result.frames == 25
