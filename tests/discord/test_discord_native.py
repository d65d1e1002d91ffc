"""Discord's own ways in, through the real discord.py client against the fake Discord: the app added to a user's own
account (User Install) and used where the bot cannot post."""

from __future__ import annotations

import asyncio

import pytest

from bot.chat.core import NOT_ALLOWED
from engine.jobs import DeliveryStatus
from tests import imagefactory
from tests.discord.test_discord import ALICE, BOB, configure, running_bot
from tests.fake_discord import (
    APPLICATION_ID,
    CHANNEL_ID,
    COMPONENTS_V2,
    GROUP_DM_ID,
    GUILD_ID,
    OTHER_CHANNEL_ID,
    FakeDiscord,
)
from tests.running import until

BY_DM = "it will come to you by direct message"
CAROL = 333333333333333333


def dm_of(server: FakeDiscord, user: int) -> str:
    return str(server.dm_channels[user])


async def test_every_command_can_be_added_to_a_users_account_and_used_in_dms(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)):
        synced = discord_server.commands[f"applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands"]
    assert synced and all(command["integration_types"] == [0, 1] for command in synced)  # server, user
    assert all(command["contexts"] == [0, 1, 2] for command in synced)  # server, DM with the bot, group DM


@pytest.mark.parametrize("where", ["other_server", "group_dm"])
async def test_a_user_install_where_the_bot_cannot_post_sends_a_late_video_by_dm(tiny_settings, discord_server, where):
    # Alice added the app to her account and asks where the bot cannot post; Bob asks in the bot's server, Carol in
    # her DM with the bot. All three videos are ready after the interaction tokens have expired.
    settings = configure(tiny_settings, discord_server, interaction_lifetime_s=0.8)
    async with running_bot(settings) as bot:
        discord_server.token_lifetime_s = 1.0
        await bot.engine._queue.set_paused(True)
        alice = await discord_server.slash(ALICE, "video", {"prompt": "a fox abroad", "steps": 2}, where=where)
        bob = await discord_server.slash(BOB, "video", {"prompt": "a fox at home", "steps": 2})
        carol = await discord_server.slash(CAROL, "video", {"prompt": "a fox in private", "steps": 2}, where="bot_dm")
        for interaction in (alice, bob, carol):
            await until(lambda i=interaction: "is queued" in discord_server.original(i)["content"], what="queued")
        await asyncio.sleep(1.2)
        await bot.engine._queue.set_paused(False)
        videos = await until(
            lambda: len(discord_server.with_files()) == 3 and discord_server.with_files(), what="three videos"
        )
        jobs = await bot.engine._queue.list_jobs()
        while not all(job.delivery_status is DeliveryStatus.DELIVERED for job in jobs):  # recorded just after sending
            await asyncio.sleep(0.05)
            jobs = await bot.engine._queue.list_jobs()
    by_channel = {video["channel_id"]: discord_server.text_of(video) for video in videos}
    assert "a fox abroad" in by_channel[dm_of(discord_server, ALICE)]
    assert "a fox at home" in by_channel[str(CHANNEL_ID)]
    assert carol["channel_id"] == dm_of(discord_server, CAROL) and "a fox in private" in by_channel[carol["channel_id"]]
    assert BY_DM in discord_server.original(alice)["content"]  # the last words her interaction could show
    assert BY_DM not in discord_server.original(bob)["content"] + discord_server.original(carol)["content"]
    nowhere = (f"channels/{OTHER_CHANNEL_ID}/", f"channels/{GROUP_DM_ID}/")  # where the bot is not
    assert not [call for call in discord_server.calls if call.path.startswith(nowhere)]
    assert len(jobs) == 3


async def test_a_user_installs_interaction_sends_at_most_five_follow_ups_then_the_video_goes_by_dm(
    tiny_settings, discord_server
):
    # Five follow-ups fail (whatever the reason); Discord would refuse a sixth to an app that is not in the server.
    discord_server.faults["POST webhooks/followup"] = [(400, {"message": "Bad Request", "code": 0})] * 5
    settings = configure(tiny_settings, discord_server, delivery_retry_s=0.1, max_delivery_attempts=7)
    async with running_bot(settings) as bot:
        interaction = await discord_server.slash(
            ALICE, "video", {"prompt": "a patient fox", "steps": 2}, where="other_server"
        )
        videos = await until(discord_server.with_files, what="the video")
        job = (await bot.engine._queue.list_jobs())[0]
    followups = discord_server.calls_to("POST", f"webhooks/{APPLICATION_ID}/{interaction['token']}")
    assert len(followups) == 5
    assert videos[0]["channel_id"] == dm_of(discord_server, ALICE) and "a patient fox" in discord_server.text_of(
        videos[0]
    )
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 6


async def test_the_preset_option_suggests_each_preset_with_its_trade_off(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server, allowed_users=[ALICE])) as bot:
        every = await discord_server.autocomplete(ALICE, "video", {"prompt": "a fox", "preset": ""}, "preset")
        typed = await discord_server.autocomplete(ALICE, "video", {"preset": "qu"}, "preset")
        outsider = await discord_server.autocomplete(BOB, "video", {"preset": ""}, "preset")
        # Discord lets a user send a word of their own past the suggestions.
        unknown = await discord_server.slash(ALICE, "video", {"prompt": "a fox", "preset": "turbo"})
        await until(lambda: discord_server.original(unknown)["content"], what="the refusal")
        assert await bot.engine._queue.counts() == {}
    assert every == [
        {"name": "fast: seconds to a minute, a little less motion", "value": "fast"},
        {"name": "quality: the official settings, minutes", "value": "quality"},
    ]
    assert [choice["value"] for choice in typed] == ["quality"]
    assert outsider == []
    assert "preset must be fast or quality, not 'turbo'" in discord_server.original(unknown)["content"]


async def test_the_video_form_makes_a_video_from_its_prompt_and_uploaded_start_picture(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        opened = await discord_server.slash(ALICE, "video-form")
        await until(lambda: opened["id"] in discord_server.modals, what="the form")
        start = discord_server.attachment(imagefactory.png(160, 120), "start.png")
        answers = {"What happens in the video": "the waves roll in steps=2", "Mode": ["i2v"], "Start picture": [start]}
        submitted = await discord_server.submit_modal(ALICE, opened, answers)
        videos = await until(discord_server.with_files, what="the video")
        await until(lambda: "the video is below" in discord_server.original(submitted)["content"], what="final text")
        jobs = await bot.engine._queue.list_jobs()
    form = discord_server.modals[opened["id"]]
    fields = {label["label"]: label["component"]["type"] for label in form["components"]}
    assert form["title"] == "Make a video"
    assert fields == {"What happens in the video": 4, "Mode": 3, "Start picture": 19, "End picture": 19}
    [job] = jobs
    assert job.source.user_id == str(ALICE) and job.mode.value == "i2v"
    assert job.params.prompt == "the waves roll in" and job.params.steps == 2
    assert [image.role for image in job.images] == ["start"] and discord_server.downloads == [start["id"]]
    assert discord_server.text_of(videos[0]).startswith(f"<@{ALICE}> the waves roll in")


async def test_an_outsider_gets_no_video_form(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server, allowed_users=[ALICE])):
        refused = await discord_server.slash(BOB, "video-form")
        await until(lambda: discord_server.original(refused)["content"], what="the refusal")
    [answer] = [call.body for call in discord_server.calls_to("POST", f"interactions/{refused['id']}/")]
    assert answer["type"] == 4 and answer["data"]["flags"] & 64  # only Bob sees it
    assert answer["data"]["content"] == NOT_ALLOWED and refused["id"] not in discord_server.modals


async def test_the_video_arrives_as_a_card_with_its_prompt_settings_and_buttons(tiny_settings, discord_server):
    prompt = "a heron " + "standing very still " * 150  # longer than a plain message may be: the card holds 4000
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        await discord_server.slash(ALICE, "video", {"prompt": prompt, "seed": 9, "steps": 2})
        [video] = await until(discord_server.with_files, what="the video")
        job = (await bot.engine._queue.list_jobs())[0]
    [card] = video["components"]
    gallery, text, row = card["components"]
    assert video["flags"] & COMPONENTS_V2 and not video["content"] and card["type"] == 17  # a container
    assert gallery["items"] == [{"media": {"url": f"attachment://wanbot-{job.id}.mp4"}, "spoiler": False}]
    assert text["content"].startswith(f"<@{ALICE}> {prompt.strip()}") and "seed 9" in text["content"]
    assert len(text["content"]) > 2000
    assert row["type"] == 1 and [button["custom_id"] for button in row["components"]] == [
        f"wanbot:reroll:{job.id}",
        f"wanbot:extend:{job.id}",
    ]
    assert list(video["file_bytes"]) == [f"wanbot-{job.id}.mp4"]


async def test_the_content_rules_count_a_group_dm_as_public_and_the_dm_with_the_bot_as_private(
    tiny_settings, discord_server
):
    settings = configure(tiny_settings, discord_server)
    settings = settings.model_copy(update={"safety": settings.safety.model_validate({"classifier": "tiny:nsfw"})})
    async with running_bot(settings) as bot:
        group = await discord_server.slash(ALICE, "video", {"prompt": "a fox", "steps": 2}, where="group_dm")
        private = await discord_server.slash(ALICE, "video", {"prompt": "a fox", "steps": 2}, where="bot_dm")
        [video] = await until(discord_server.with_files, what="the private video")
        await until(lambda: "is not sent here" in discord_server.original(group)["content"], what="the withheld note")
        jobs = {job.source.place: job for job in await bot.engine._queue.list_jobs()}
    assert set(jobs) == {"public", "private"}
    assert video["channel_id"] == private["channel_id"]
    assert list(video["file_bytes"]) == [f"SPOILER_wanbot-{jobs['private'].id}.mp4"]  # hidden until it is clicked
    assert jobs["public"].delivery_status is DeliveryStatus.DELIVERY_FAILED and len(discord_server.with_files()) == 1


async def test_history_lists_your_videos_privately_and_sends_one_again_without_making_it_again(
    tiny_settings, discord_server
):
    async with running_bot(configure(tiny_settings, discord_server, allowed_users=[ALICE, BOB])) as bot:
        await discord_server.slash(ALICE, "video", {"prompt": "a fox in the snow", "steps": 2})
        await until(discord_server.with_files, what="the video")
        [job] = await bot.engine._queue.list_jobs()
        asked = await discord_server.slash(ALICE, "history")
        listed = await until(lambda: _answer(discord_server, asked), what="/history")
        await discord_server.click(ALICE, listed, f"wanbot:again:{job.id}")
        await until(lambda: len(discord_server.with_files()) == 2, what="the video again")
        await discord_server.click(BOB, listed, f"wanbot:again:{job.id}")  # not Bob's video
        await discord_server.slash(CAROL, "history")  # an outsider
        refusals = await until(lambda: len(_refusals(discord_server)) == 2 and _refusals(discord_server), what="")
        assert len(await bot.engine._queue.list_jobs()) == 1  # sent again, never made again
    assert listed["flags"] & 64 and f"#{job.id} t2v" in listed["content"]  # only Alice sees her list
    assert f"wanbot:again:{job.id}" in discord_server.custom_ids(listed)
    assert len(discord_server.with_files()) == 2
    assert sorted(refusals) == sorted([f"Video #{job.id} is not yours: /history lists your own.", NOT_ALLOWED])


def _refusals(server) -> list[str]:
    answers = [call.body.get("data", {}).get("content", "") for call in server.calls_to("POST", "/callback")]
    return [text for text in answers if "not yours" in text or text == NOT_ALLOWED]


def _answer(server, interaction: dict) -> dict | None:
    """The message an interaction was answered with, once it is there."""
    message = server.original(interaction)
    return message if message.get("content") else None
