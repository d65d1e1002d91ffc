"""Live previews in the chats: the video taking shape in the job's live message, at most once per interval, the video
still arriving once; and /previews, which admins use to turn them off in a chat."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

from engine.config import PreviewsConfig, Settings
from engine.service import Engine
from tests.discord import test_discord as on_discord
from tests.fake_discord import FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.running import until
from tests.telegram import test_telegram as on_telegram

ALICE, BOB = on_telegram.ALICE, on_telegram.BOB
INTERVAL_S = 1.0
SLOW_JOB = "preset=quality steps=16"  # 32 transformer calls of 0.1 s: about four previews
pytestmark = pytest.mark.timeout(180)


def previewing(settings: Settings) -> Settings:
    return settings.model_copy(update={"previews": PreviewsConfig(enabled=True, interval_s=INTERVAL_S)})


def slow_down(engine: Engine) -> None:
    """Each transformer call of the warm tiny model takes 0.1 s more, as a real step would take longer."""
    pipeline = engine._runner.loaded.pipeline
    for expert in (pipeline.transformer, pipeline.transformer_2):
        expert.register_forward_pre_hook(lambda module, inputs: time.sleep(0.1))


def pictures_to(telegram: FakeTelegram, chat_id: int) -> list[Any]:
    methods = ("sendPhoto", "editMessageMedia")
    return [call for call in telegram.calls if call.method in methods and int(call.fields["chat_id"]) == chat_id]


async def test_telegram_shows_previews_in_the_live_message_and_then_the_video_once(tiny_settings, telegram):
    settings = on_telegram.configure(previewing(tiny_settings), telegram)
    async with on_telegram.running_bot(settings) as bot:
        telegram.command(ALICE, "/video warm up preset=quality steps=2")
        await until(lambda: telegram.sent("sendVideo", ALICE), what="the warm-up video")
        shown_before = len(pictures_to(telegram, ALICE))
        slow_down(bot.engine)
        telegram.command(ALICE, f"/video a fox taking shape {SLOW_JOB}")
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 2, limit_s=120, what="the video")
        done = "Job #2 is done: the video is below."
        await until(lambda: any(m.get("caption") == done for m in telegram.replies(ALICE)), what="the end")
    pictures = pictures_to(telegram, ALICE)[shown_before:]
    video = telegram.sent("sendVideo", ALICE)[1]
    assert len(pictures) >= 2 and pictures[-1].at < video.at
    assert [call.method for call in pictures] == ["sendPhoto"] + ["editMessageMedia"] * (len(pictures) - 1)
    assert all(later.at - earlier.at >= INTERVAL_S for earlier, later in itertools.pairwise(pictures))
    assert all(len(next(iter(call.files.values()))) <= settings.previews.max_bytes for call in pictures)
    job_messages = [m for m in telegram.replies(ALICE) if "Job #2" in m.get("text", m.get("caption", ""))]
    assert len(job_messages) == 1 and "photo" in job_messages[0]  # the text message was replaced, not left behind


async def test_discord_attaches_each_preview_to_the_live_message(tiny_settings, discord_server: FakeDiscord):
    settings = on_discord.configure(previewing(tiny_settings), discord_server)
    async with on_discord.running_bot(settings) as bot:
        await discord_server.slash(on_discord.ALICE, "video", {"prompt": "warm up", "preset": "quality", "steps": 2})
        await until(lambda: len(discord_server.with_files()) == 1, what="the warm-up video")
        attached_before = len(discord_server.attached)
        slow_down(bot.engine)
        options = {"prompt": "a fox taking shape", "preset": "quality", "steps": 16}
        interaction = await discord_server.slash(on_discord.ALICE, "video", options)
        await until(lambda: len(discord_server.with_files()) == 2, limit_s=120, what="the video")
        await until(lambda: "the video is below" in discord_server.original(interaction)["content"], what="the end")
    attached = discord_server.attached[attached_before:]
    original = discord_server.original(interaction)
    assert len(attached) >= 2 and {message_id for _, message_id, _ in attached} == {original["id_int"]}
    assert all(later[0] - earlier[0] >= INTERVAL_S for earlier, later in itertools.pairwise(attached))
    assert [list(files) for _, _, files in attached] == [["preview.jpg"]] * len(attached)
    assert len(discord_server.with_files()) == 2  # the videos, each once


async def test_admins_turn_previews_off_in_a_chat_and_others_may_only_ask(tiny_settings, telegram):
    settings = on_telegram.configure(previewing(tiny_settings), telegram)
    settings.access.admins = [f"telegram:{ALICE}"]
    async with on_telegram.running_bot(settings):
        for user, text in ((BOB, "/previews off"), (ALICE, "/previews off"), (BOB, "/previews")):
            telegram.command(user, text, chat_id=-100, chat_type="supergroup")
        await until(lambda: len(on_telegram.texts(telegram, -100)) == 3, what="three answers")
        telegram.command(BOB, f"/video no previews here {SLOW_JOB}", chat_id=-100, chat_type="supergroup")
        await until(lambda: telegram.sent("sendVideo", -100), limit_s=120, what="the video")
    answers = on_telegram.texts(telegram, -100)[:3]
    assert answers[0].startswith("Only admins can turn previews on or off.")
    assert answers[1] == "Previews off for this chat."
    assert answers[2].startswith("Previews are off here.")
    assert pictures_to(telegram, -100) == []
