"""Discord's own ways in, through the real discord.py client against the fake Discord: the app added to a user's own
account (User Install) and used where the bot cannot post."""

from __future__ import annotations

import asyncio

from engine.jobs import DeliveryStatus
from tests.discord.test_discord import ALICE, BOB, configure, running_bot
from tests.fake_discord import APPLICATION_ID, CHANNEL_ID, GUILD_ID, OTHER_CHANNEL_ID, FakeDiscord
from tests.running import until

BY_DM = "it will come to you by direct message"


def dm_of(server: FakeDiscord, user: int) -> str:
    return str(server.dm_channels[user])


async def test_every_command_can_be_added_to_a_users_account_and_used_in_dms(tiny_settings, discord_server):
    async with running_bot(configure(tiny_settings, discord_server)):
        synced = discord_server.commands[f"applications/{APPLICATION_ID}/guilds/{GUILD_ID}/commands"]
    assert synced and all(command["integration_types"] == [0, 1] for command in synced)  # server, user
    assert all(command["contexts"] == [0, 1, 2] for command in synced)  # server, DM with the bot, group DM


async def test_a_user_install_where_the_bot_cannot_post_sends_a_late_video_by_dm(tiny_settings, discord_server):
    # Alice added the app to her account and asks in a server without the bot; Bob asks in the bot's server. Both
    # videos are ready after the interaction tokens have expired.
    settings = configure(tiny_settings, discord_server, interaction_lifetime_s=0.8)
    async with running_bot(settings) as bot:
        discord_server.token_lifetime_s = 1.0
        await bot.engine._queue.set_paused(True)
        alice = await discord_server.slash(ALICE, "video", {"prompt": "a fox abroad", "steps": 2}, user_install=True)
        bob = await discord_server.slash(BOB, "video", {"prompt": "a fox at home", "steps": 2})
        for interaction in (alice, bob):
            await until(lambda i=interaction: "is queued" in discord_server.original(i)["content"], what="queued")
        await asyncio.sleep(1.2)
        await bot.engine._queue.set_paused(False)
        videos = await until(
            lambda: len(discord_server.with_files()) == 2 and discord_server.with_files(), what="both videos"
        )
        jobs = {job.source.user_id: job for job in await bot.engine._queue.list_jobs()}
    by_channel = {video["channel_id"]: video["content"] for video in videos}
    assert "a fox abroad" in by_channel[dm_of(discord_server, ALICE)]
    assert "a fox at home" in by_channel[str(CHANNEL_ID)]
    assert BY_DM in discord_server.original(alice)["content"]  # the last words her interaction could show
    assert BY_DM not in discord_server.original(bob)["content"]
    assert not discord_server.calls_to("POST", f"channels/{OTHER_CHANNEL_ID}/")  # nothing where the bot is not
    assert all(job.delivery_status is DeliveryStatus.DELIVERED for job in jobs.values())


async def test_a_user_installs_interaction_sends_at_most_five_follow_ups_then_the_video_goes_by_dm(
    tiny_settings, discord_server
):
    # Five follow-ups fail (whatever the reason); Discord would refuse a sixth to an app that is not in the server.
    discord_server.faults["POST webhooks/followup"] = [(400, {"message": "Bad Request", "code": 0})] * 5
    settings = configure(tiny_settings, discord_server, delivery_retry_s=0.1, max_delivery_attempts=7)
    async with running_bot(settings) as bot:
        interaction = await discord_server.slash(
            ALICE, "video", {"prompt": "a patient fox", "steps": 2}, user_install=True
        )
        videos = await until(discord_server.with_files, what="the video")
        job = (await bot.engine._queue.list_jobs())[0]
    followups = discord_server.calls_to("POST", f"webhooks/{APPLICATION_ID}/{interaction['token']}")
    assert len(followups) == 5
    assert videos[0]["channel_id"] == dm_of(discord_server, ALICE) and "a patient fox" in videos[0]["content"]
    assert job.delivery_status is DeliveryStatus.DELIVERED and job.delivery_attempts == 6
