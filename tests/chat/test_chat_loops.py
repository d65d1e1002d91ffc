"""loop=yes in both chats: the progress says which pass runs, the caption says it loops."""

from __future__ import annotations

import pytest

from engine.pipeline.generate import LOOP_FIRST_PASS, LOOP_SECOND_PASS
from tests import imagefactory
from tests.discord import test_discord as on_discord
from tests.running import until
from tests.telegram import test_telegram as on_telegram

pytestmark = pytest.mark.timeout(120)


async def test_telegram_a_t2v_loop_says_its_two_passes_and_its_caption_says_loop(tiny_settings, telegram):
    async with on_telegram.running_bot(on_telegram.configure(tiny_settings, telegram)) as bot:
        events = bot.engine.subscribe()
        telegram.command(on_telegram.ALICE, "/video a fox loop=yes steps=2")
        video = (await until(lambda: telegram.sent("sendVideo", on_telegram.ALICE), what="the video"))[0]
        [job] = await bot.engine._queue.list_jobs()
    said = []  # what the progress said, which the relay shows (its pacing may skip some of it on screen)
    while not events.caught_up():
        event = await events.get()
        said.append(event.progress.detail if event.progress else "")
    assert job.params.loop and job.params.loop_model == "tiny-i2v"
    assert video.fields["caption"].endswith(" · loop")
    assert any(LOOP_FIRST_PASS in detail for detail in said) and any(LOOP_SECOND_PASS in detail for detail in said)


async def test_discord_the_loop_option_makes_an_i2v_loop_from_one_picture(tiny_settings, discord_server):
    async with on_discord.running_bot(on_discord.configure(tiny_settings, discord_server)) as bot:
        start = discord_server.attachment(imagefactory.png(160, 120), "start.png")
        options = {"prompt": "waves", "steps": 2, "loop": True}
        await discord_server.slash(on_discord.ALICE, "video", options, {"start_image": start})
        await until(discord_server.with_files, what="the video")
        [job] = await bot.engine._queue.list_jobs()
    assert job.params.loop and [image.role for image in job.images] == ["start", "end"]
    assert job.images[0].sha256 == job.images[1].sha256
