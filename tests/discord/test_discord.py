"""The Discord adapter with the real discord.py client against a fake Discord (REST, gateway, CDN) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import discord
import pytest

from bot.chat.core import NOT_ALLOWED, NOT_YOURS_TO_REROLL
from bot.discord.adapter import DiscordAdapter, WanbotClient
from engine.config import Settings
from engine.errors import UserError
from engine.jobs import DeliveryStatus, JobStatus
from engine.pipeline.models import MAX_PROMPT_CHARS
from tests import imagefactory
from tests.fake_discord import APPLICATION_ID, CHANNEL_ID, GUILD_ID, TEST_TOKEN, FakeDiscord
from tests.running import RunningBot, until

TOKEN = TEST_TOKEN
ALICE, BOB = 111111111111111111, 222222222222222222
pytestmark = pytest.mark.timeout(120)


def configure(settings: Settings, server: FakeDiscord, **overrides: Any) -> Settings:
    discord = {
        "token": TOKEN,
        "guild_ids": [GUILD_ID],
        "api_base_url": server.api_base,
        "gateway_url": server.gateway_url,
        "edit_interval_s": 0.2,
        "delivery_retry_s": 0.5,
        **overrides,
    }
    return settings.model_copy(update={"discord": settings.discord.model_validate(discord)})


def running_bot(settings: Settings) -> RunningBot:
    return RunningBot(settings, lambda engine: DiscordAdapter(engine, settings.discord))


async def test_sync_then_text_only_video_with_defer_progress_and_followup_file(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        synced = discord_server.commands[f"applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands"]
        names = {command["name"] for command in synced}
        assert names == {
            *("video", "queue", "cancel", "status", "help", "pause", "resume", "previews", "loras", "enhance"),
            *("extend", "video-form", "history"),
            "Make a video",
        }
        hidden = {command["name"] for command in synced if command["default_member_permissions"] is not None}
        assert hidden == {"pause", "resume"}
        [video_command] = [command for command in synced if command["name"] == "video"]
        limits = {option["name"]: option.get("max_length") for option in video_command["options"]}
        assert limits["prompt"] == limits["negative_prompt"] == MAX_PROMPT_CHARS  # the client stops longer ones
        prompt = "a red fox for @everyone and <@999>"
        interaction = await discord_server.slash(ALICE, "video", {"prompt": prompt, "seed": 5, "steps": 3})
        videos = await until(discord_server.with_files, what="the video")
        original = discord_server.original(interaction)
        await until(lambda: "the video is below" in original["content"], what="final text")
        job = (await bot.engine._queue.list_jobs())[0]
    assert discord_server.callback_delay(interaction) < 3.0
    assert job.params.prompt == prompt and job.params.seed == 5
    [upload] = [call.body for call in discord_server.calls_to("POST", "webhooks/") if call.files]
    assert upload["allowed_mentions"] == {"parse": [], "users": [ALICE]}  # the caption's prompt pings nobody
    assert job.delivery_status is DeliveryStatus.DELIVERED
    assert original["edits"] >= 3
    caption = discord_server.text_of(videos[0])
    assert caption.startswith(f"<@{ALICE}> {prompt}") and "seed 5" in caption
    assert discord_server.custom_ids(videos[0]) == [f"wanbot:reroll:{job.id}", f"wanbot:extend:{job.id}"]


async def test_one_and_two_attachments(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        start = discord_server.attachment(imagefactory.png(160, 120), "start.png")
        await discord_server.slash(ALICE, "video", {"prompt": "waves", "steps": 2}, {"start_image": start})
        start2 = discord_server.attachment(imagefactory.jpeg(160, 120), "a.jpg", "image/jpeg")
        end2 = discord_server.attachment(imagefactory.jpeg(320, 240), "b.jpg", "image/jpeg")
        await discord_server.slash(
            BOB, "video", {"prompt": "sunset", "mode": "i2v", "steps": 2}, {"start_image": start2, "end_image": end2}
        )
        await until(lambda: len(discord_server.with_files()) == 2, what="two videos")
        jobs = {job.source.user_id: job for job in await bot.engine._queue.list_jobs()}
    assert jobs[str(ALICE)].mode.value == "i2v" and len(jobs[str(ALICE)].images) == 1
    assert [image.role for image in jobs[str(BOB)].images] == ["start", "end"]
    assert jobs[str(BOB)].images[1].width == 160


async def test_bad_attachments_are_refused_from_their_metadata_before_download(tiny_settings, discord_server):
    settings = configure(tiny_settings, discord_server, download_limit_bytes=10_000)
    async with running_bot(settings) as bot:
        big = discord_server.attachment(imagefactory.png(), "big.png", size=50_000_000)
        first = await discord_server.slash(ALICE, "video", {"prompt": "x"}, {"start_image": big})
        text = discord_server.attachment(b"hello", "notes.txt", "text/plain")
        second = await discord_server.slash(ALICE, "video", {"prompt": "x"}, {"start_image": text})
        third = await discord_server.slash(ALICE, "video", {"mode": "ti2v", "prompt": "no image"})
        for interaction in (first, second, third):
            await until(lambda i=interaction: discord_server.original(i)["content"], what="a refusal")
        assert await bot.engine._queue.counts() == {}
    assert "is 50 MB; the most I can fetch is 10 KB" in discord_server.original(first)["content"]
    assert "attachment (text/plain) is not a picture" in discord_server.original(second)["content"]
    assert "ti2v needs a start image" in discord_server.original(third)["content"]
    assert not [call for call in discord_server.calls if call.path.startswith("cdn")]


async def queued_until_the_tokens_expire(bot: RunningBot, server: FakeDiscord, *users: int) -> list[dict[str, Any]]:
    """Each user's /video waits in the paused queue until its interaction token has expired; then the queue runs."""
    server.token_lifetime_s = 1.0
    await bot.engine._queue.set_paused(True)
    interactions = [await server.slash(user, "video", {"prompt": f"from {user}", "steps": 3}) for user in users]
    for interaction in interactions:
        await until(lambda i=interaction: "is queued" in server.original(i)["content"], what="queued")
    await asyncio.sleep(1.2)
    await bot.engine._queue.set_paused(False)
    return interactions


async def test_after_the_token_lifetime_a_waiting_place_posts_nothing_new(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server, interaction_lifetime_s=0.8)) as bot:
        await queued_until_the_tokens_expire(bot, discord_server, ALICE, BOB)
        await until(lambda: len(discord_server.with_files()) == 2, what="both videos")
    to_bob = [
        call.body["content"]
        for call in discord_server.calls_to("POST", f"channels/{CHANNEL_ID}/messages")
        if (call.body.get("content") or "").startswith(f"<@{BOB}>")  # the video's card has no content
    ]
    assert to_bob and "is queued" not in to_bob[0]  # his first channel message came with his job's start


async def test_after_the_token_lifetime_progress_and_video_move_to_the_channel(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server, interaction_lifetime_s=0.8)) as bot:
        (interaction,) = await queued_until_the_tokens_expire(bot, discord_server, ALICE)
        await until(discord_server.with_files, what="the video")
        await until(
            lambda: any("the video is below" in m["content"] for m in discord_server.messages.values()),
            what="the final text",
        )
        job = (await bot.engine._queue.list_jobs())[0]
    posted = [call for call in discord_server.calls_to("POST", f"channels/{CHANNEL_ID}/messages")]
    assert posted, "nothing was posted to the channel"
    assert not [
        call
        for call in discord_server.calls
        if call.path.startswith("webhooks/") and call.at > discord_server.interactions[interaction["token"]] + 1.0
    ]
    assert job.delivery_status is DeliveryStatus.DELIVERED
    channel_messages = [m for m in discord_server.messages.values() if m["content"].startswith(f"<@{ALICE}>")]
    assert any("the video is below" in m["content"] for m in channel_messages)


async def test_a_token_refused_early_moves_progress_and_video_to_the_channel_at_once(tiny_settings, discord_server):
    # The adapter counts on 15 minutes; Discord refuses the token after one second (revoked, or clocks apart).
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        (interaction,) = await queued_until_the_tokens_expire(bot, discord_server, ALICE)
        await until(discord_server.with_files, what="the video")
        await until(
            lambda: any("the video is below" in m["content"] for m in discord_server.messages.values()),
            what="the final text",
        )
        job = (await bot.engine._queue.list_jobs())[0]
    refused = [
        call
        for call in discord_server.calls
        if call.path.startswith("webhooks/") and call.at > discord_server.interactions[interaction["token"]] + 1.0
    ]
    assert len(refused) == 1  # the first refusal moves the job: no upload to a dead token, no retries there
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 1
    assert len([call for call in discord_server.calls_to("POST", f"channels/{CHANNEL_ID}/messages") if call.files]) == 1
    [video] = discord_server.with_files()
    assert video["channel_id"] == str(CHANNEL_ID) and discord_server.text_of(video).startswith(f"<@{ALICE}>")


async def test_a_deleted_progress_message_does_not_stop_the_job(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        await bot.engine._queue.set_paused(True)
        interaction = await discord_server.slash(ALICE, "video", {"prompt": "deleted", "steps": 3})
        await until(lambda: "is queued" in discord_server.original(interaction)["content"], what="queued")
        del discord_server.messages[discord_server.originals[interaction["token"]]]
        await bot.engine._queue.set_paused(False)
        await until(discord_server.with_files, what="the video")
        await until(
            lambda: any("the video is below" in m["content"] for m in discord_server.messages.values()),
            what="final text in a new message",
        )
        job = (await bot.engine._queue.list_jobs())[0]
    assert job.status is JobStatus.SUCCEEDED and job.delivery_status is DeliveryStatus.DELIVERED


async def test_413_reencodes_smaller_once_and_429_is_waited_out(tiny_settings, discord_server):
    discord_server.upload_limit = 40_000
    discord_server.faults["PATCH webhooks/original"] = [
        (429, {"message": "You are being rate limited.", "retry_after": 0.3, "global": False})
    ] * 2
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        await discord_server.slash(
            ALICE, "video", {"prompt": "noise", "steps": 2, "frames": 33, "resolution": "128x128"}, size_limit=60_000
        )
        videos = await until(discord_server.with_files, what="the video")
        job = (await bot.engine._queue.list_jobs())[0]
    assert job.result.bytes > 40_000  # fits the interaction's limit, not the channel's: Discord answers 413
    assert len(discord_server.calls_to("POST", f"webhooks/{APPLICATION_ID}/")) == 2
    assert sum(len(data) for data in videos[0]["file_bytes"].values()) <= 40_000
    assert not discord_server.faults["PATCH webhooks/original"]
    assert job.delivery_status is DeliveryStatus.DELIVERED


async def test_buttons_work_after_a_restart_and_only_for_the_owner(tiny_settings, discord_server):
    settings = configure(tiny_settings, discord_server)
    async with running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        interaction = await discord_server.slash(ALICE, "video", {"prompt": "keep me", "steps": 2})
        await until(lambda: "is queued" in discord_server.original(interaction)["content"], what="queued")
    message = discord_server.original(interaction)
    async with running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        await discord_server.click(BOB, message, "wanbot:cancel:1")
        await until(lambda: len(discord_server.calls_to("POST", "/callback")) == 2, what="bob's answer")
        assert (await bot.engine._queue.get(1)).status is JobStatus.QUEUED
        await discord_server.click(ALICE, message, "wanbot:cancel:1")
        await until(lambda: len(discord_server.calls_to("POST", "/callback")) == 3, what="alice's answer")
        assert (await bot.engine._queue.get(1)).status is JobStatus.CANCELLED
        await bot.engine._queue.set_paused(False)
        await discord_server.slash(ALICE, "video", {"prompt": "reroll me", "steps": 2, "seed": 4})
        video = (await until(discord_server.with_files, what="video"))[0]
        await discord_server.click(ALICE, video, "wanbot:reroll:2")
        await until(lambda: len(discord_server.with_files()) == 2, what="rerolled video")
        rerolled = (await bot.engine._queue.list_jobs())[0]
    answers = [
        call.body["data"]["content"]
        for call in discord_server.calls_to("POST", "/callback")
        if call.body.get("type") == 4
    ]
    assert "only they or an admin can cancel" in answers[0] and answers[1] == "Job #1 is cancelled."
    assert rerolled.retry_of == 2 and rerolled.params.seed != 4 and rerolled.params.prompt == "reroll me"


async def test_two_users_at_once_and_role_allowlist(tiny_settings, discord_server):
    settings = configure(tiny_settings, discord_server, allowed_roles=[555])
    async with running_bot(settings) as bot:
        alice = await discord_server.slash(ALICE, "video", {"prompt": "alice fox", "steps": 2}, roles=[555])
        bob = await discord_server.slash(BOB, "video", {"prompt": "bob cat", "steps": 2}, roles=[555])
        mallory = await discord_server.slash(333, "video", {"prompt": "no role"}, roles=[1])
        await until(lambda: len(discord_server.with_files()) == 2, what="two videos")
        await until(lambda: discord_server.original(mallory)["content"], what="refusal")
        prompts = {job.params.prompt for job in await bot.engine._queue.list_jobs()}
    assert prompts == {"alice fox", "bob cat"}
    assert "not allowed" in discord_server.original(mallory)["content"]
    contents = [discord_server.text_of(m) for m in discord_server.with_files()]
    assert any(f"<@{ALICE}>" in c and "alice fox" in c for c in contents)
    assert any(f"<@{BOB}>" in c and "bob cat" in c for c in contents)
    assert discord_server.callback_delay(alice) < 3.0 and discord_server.callback_delay(bob) < 3.0


async def test_the_client_starts_without_warnings_about_voice_libraries(monkeypatch, caplog):
    """wanbot never joins a voice channel: discord.py's "PyNaCl/davey is not installed" warnings stay out of the log."""
    monkeypatch.setattr(discord.VoiceClient, "warn_nacl", True)
    monkeypatch.setattr(discord.VoiceClient, "warn_dave", True)
    with caplog.at_level(logging.WARNING, logger="discord"):
        await WanbotClient(adapter=None, intents=discord.Intents(guilds=True)).close()
    assert "voice" not in caplog.text


async def test_queue_cancel_status_and_help_answer_privately(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        await bot.engine._queue.set_paused(True)
        interaction = await discord_server.slash(ALICE, "video", {"prompt": "wait"})
        await until(lambda: "is queued" in discord_server.original(interaction)["content"], what="queued")
        for count, name in enumerate(("queue", "status", "help", "cancel"), start=2):
            await discord_server.slash(ALICE, name)
            await until(lambda count=count: len(discord_server.calls_to("POST", "/callback")) == count, what=name)
        assert (await bot.engine._queue.get(1)).status is JobStatus.CANCELLED
    answers = [call.body["data"] for call in discord_server.calls_to("POST", "/callback") if call.body["type"] == 4]
    assert all(answer["flags"] & 64 for answer in answers)  # ephemeral
    assert answers[0]["content"].startswith("#1 t2v · position 1")
    assert "The queue is paused" in answers[1]["content"]
    assert "/video" in answers[2]["content"]
    assert answers[3]["content"] == "Job #1 is cancelled."


async def test_the_token_never_reaches_the_logs(tiny_settings, discord_server, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    async with running_bot(configure(tiny_settings, discord_server)):
        interaction = await discord_server.slash(ALICE, "video", {"prompt": "log me", "steps": 2})
        await until(discord_server.with_files, what="the video")
    assert caplog.records and TOKEN not in caplog.text
    # Each interaction's token lets anyone post as the bot for 15 minutes; discord.py logs it in webhook URLs.
    assert interaction["token"] not in caplog.text


async def test_make_a_video_from_a_posted_picture_through_the_apps_menu(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        await bot.engine._queue.set_paused(True)
        attachments = [
            discord_server.attachment(b"packing list", "notes.txt", "text/plain"),
            discord_server.attachment(imagefactory.jpeg(160, 120), "start.jpg", "image/jpeg"),
            discord_server.attachment(imagefactory.jpeg(320, 240), "end.jpg", "image/jpeg"),
            discord_server.attachment(imagefactory.png(64, 64), "extra.png"),
        ]
        opened = await discord_server.message_command(
            ALICE, "Make a video", discord_server.user_post(BOB, "our trip", attachments)
        )
        await until(lambda: opened["id"] in discord_server.modals, what="the modal")
        answers = {"What happens in the video": "the tide comes in seed=5 steps=2", "Mode": ["ti2v"]}
        submitted = await discord_server.submit_modal(ALICE, opened, answers)
        await until(lambda: "is queued" in discord_server.original(submitted)["content"], what="the queued answer")
        no_picture = await discord_server.message_command(
            ALICE, "Make a video", discord_server.user_post(BOB, "just words", [])
        )
        await until(lambda: discord_server.original(no_picture)["content"], what="the refusal")
        jobs = await bot.engine._queue.list_jobs()
    job = jobs[0]
    assert len(jobs) == 1 and job.source.user_id == str(ALICE)
    assert job.mode.value == "ti2v" and job.params.prompt == "the tide comes in" and job.params.seed == 5
    assert [image.role for image in job.images] == ["start", "end"] and job.images[1].width == job.images[0].width
    assert "Only the first two pictures are used" in discord_server.original(submitted)["content"]
    assert "no picture to start from" in discord_server.original(no_picture)["content"]
    assert no_picture["id"] not in discord_server.modals


async def test_only_admins_pause_and_resume_the_queue(tiny_settings, discord_server):
    settings = configure(tiny_settings, discord_server)
    admins = settings.access.model_copy(update={"admins": [f"discord:{ALICE}"]})
    settings = settings.model_copy(update={"access": admins})
    async with running_bot(settings) as bot:
        refused = await discord_server.slash(BOB, "pause")
        await until(lambda: discord_server.original(refused)["content"], what="bob's refusal")
        assert not await bot.engine._queue.is_paused()
        paused = await discord_server.slash(ALICE, "pause")
        await until(lambda: discord_server.original(paused)["content"], what="the pause")
        assert await bot.engine._queue.is_paused()
        resumed = await discord_server.slash(ALICE, "resume")
        await until(lambda: discord_server.original(resumed)["content"], what="the resume")
        assert not await bot.engine._queue.is_paused()
    assert "Only admins can pause or resume" in discord_server.original(refused)["content"]
    assert discord_server.original(paused)["content"].startswith("Paused")
    assert discord_server.original(resumed)["content"].startswith("Resumed")


async def test_no_access_to_the_channel_gives_up_the_upload_at_once(tiny_settings, discord_server):
    # A long error body (a proxy's HTML page, say) is cut short before it is stored and shown.
    reason = "Missing Access" + " <p>details</p>" * 300
    discord_server.faults["POST webhooks/followup"] = [(403, {"message": reason, "code": 50001})]
    settings = configure(tiny_settings, discord_server, delivery_retry_s=0.2)
    async with running_bot(settings) as bot:
        interaction = await discord_server.slash(ALICE, "video", {"prompt": "a fox", "steps": 2})
        await until(lambda: "could not be sent" in discord_server.original(interaction)["content"], what="giving up")
        await asyncio.sleep(1.0)  # five retry periods: none may upload again
        job = (await bot.engine._queue.list_jobs())[0]
    assert len(discord_server.calls_to("POST", f"webhooks/{APPLICATION_ID}/")) == 1
    assert job.delivery_status is DeliveryStatus.DELIVERY_FAILED and job.delivery_attempts == 5
    assert "Missing Access" in job.delivery_error and len(job.delivery_error) <= 300


async def test_a_rejected_token_is_one_clear_error(tiny_settings, discord_server):
    settings = configure(tiny_settings, discord_server, token="wrong-discord-token")
    with pytest.raises(UserError) as refused:
        async with running_bot(settings):
            pass
    assert "Discord did not connect (LoginFailure" in refused.value.message
    assert "wrong-discord-token" not in f"{refused.value.message} {refused.value.hint}"


async def test_outsiders_are_refused_every_command_and_button_and_only_the_owner_rerolls(tiny_settings, discord_server):
    carol = 333333333333333333
    settings = configure(tiny_settings, discord_server, allowed_users=[ALICE, carol])
    async with running_bot(settings) as bot:
        await discord_server.slash(ALICE, "video", {"prompt": "a fox", "steps": 2})
        video = (await until(discord_server.with_files, what="alice's video"))[0]
        await bot.engine._queue.set_paused(True)
        waiting = await discord_server.slash(ALICE, "video", {"prompt": "a second fox"})
        await until(lambda: "is queued" in discord_server.original(waiting)["content"], what="a waiting job")
        answered = len(discord_server.calls_to("POST", "/callback"))
        posted = len(discord_server.calls_to("POST", "/messages")) + len(discord_server.calls_to("POST", "webhooks/"))
        asked = {"video": {"prompt": "let me in"}, "previews": {"state": "off"}, "extend": {"job": 1}}
        outsider_commands = ("queue", "status", "help", "cancel", "pause", "resume", "previews", "loras", "extend")
        for name in (*outsider_commands, "enhance", "video"):
            await discord_server.slash(BOB, name, asked.get(name))
        await discord_server.slash(carol, "pause")  # allowed here, but no admin
        picture = discord_server.attachment(imagefactory.png(), "p.png")
        await discord_server.message_command(BOB, "Make a video", discord_server.user_post(BOB, "", [picture]))
        for user, message, custom_id in (
            (BOB, video, "wanbot:reroll:1"),
            (BOB, discord_server.original(waiting), "wanbot:cancel:2"),
            (carol, video, "wanbot:reroll:1"),
        ):
            await discord_server.click(user, message, custom_id)
        await until(lambda: len(discord_server.calls_to("POST", "/callback")) == answered + 16, what="16 answers")
        await asyncio.sleep(0.5)  # room for a wrong extra message to arrive
        jobs = await bot.engine._queue.list_jobs()
    answers = [call.body for call in discord_server.calls_to("POST", "/callback")[answered:]]
    assert (
        len(discord_server.calls_to("POST", "/messages")) + len(discord_server.calls_to("POST", "webhooks/")) == posted
    )
    assert all(answer["type"] == 4 and answer["data"]["flags"] & 64 for answer in answers)  # each only to the presser
    contents = [answer["data"]["content"] for answer in answers]
    only_admins = "Only admins can pause or resume the queue.\nAsk an admin; /status shows the workers."
    # Each handler answers as soon as it can: the order of the answers is not the order of the clicks.
    assert sorted(contents) == sorted([NOT_ALLOWED] * 14 + [only_admins, NOT_YOURS_TO_REROLL])
    assert [job.status for job in jobs] == [JobStatus.QUEUED, JobStatus.SUCCEEDED]


async def test_the_preset_field_picks_the_preset_and_the_video_names_it(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)) as bot:
        synced = discord_server.commands[f"applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands"]
        video_command = next(command for command in synced if command["name"] == "video")
        preset_option = next(option for option in video_command["options"] if option["name"] == "preset")
        await discord_server.slash(ALICE, "video", {"prompt": "a slow fox", "preset": "quality", "steps": 2})
        await discord_server.slash(BOB, "video", {"prompt": "a quick fox preset=fast"})
        await until(lambda: len(discord_server.with_files()) == 2, what="two videos")
        jobs = {job.params.prompt: job for job in await bot.engine._queue.list_jobs()}
    assert preset_option["autocomplete"]  # its suggestions: tests/discord/test_discord_native.py
    assert jobs["a slow fox"].params.preset.value == "quality" and jobs["a slow fox"].params.steps == 2
    assert jobs["a quick fox"].params.preset.value == "fast"
    captions = [discord_server.text_of(message) for message in discord_server.with_files()]
    assert any("a slow fox" in c and "quality preset" in c for c in captions)
    assert any("a quick fox" in c and "fast preset" in c for c in captions)
