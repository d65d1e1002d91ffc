"""The content rules in both chats: a blocked term refused before anything is queued, a flagged picture refused in
a public place, a flagged video withheld in a public place, hidden as a spoiler in a private one and sent as it is in
an age-restricted channel; every refusal counted by reason; GPU time a day in /status."""

from __future__ import annotations

from typing import Any

import pytest

from engine.config import Settings
from engine.errors import duration_text
from engine.jobs import DeliveryStatus
from tests import imagefactory
from tests.discord import test_discord as on_discord
from tests.running import until
from tests.telegram import test_telegram as on_telegram

pytestmark = pytest.mark.timeout(120)
GROUP = -100123


def with_rules(settings: Settings, **safety: Any) -> Settings:
    return settings.model_copy(update={"safety": settings.safety.model_validate(safety)})


async def test_telegram_a_blocked_term_is_refused_with_the_operators_sentence_and_nothing_is_queued(
    tiny_settings, telegram
):
    settings = with_rules(on_telegram.configure(tiny_settings, telegram), blocked_terms=["gore", "re:blo+d"])
    async with on_telegram.running_bot(settings) as bot:
        refused = {"blocked_term": 0}
        bot.engine._rules.on_refused = lambda reason: refused.__setitem__(reason, refused[reason] + 1)
        telegram.command(on_telegram.ALICE, "/video a fox in GORE steps=2")
        telegram.command(on_telegram.ALICE, "/video bloood on the snow steps=2")
        await until(lambda: len(telegram.replies(on_telegram.ALICE)) >= 2, what="two refusals")
        texts = [reply["text"] for reply in telegram.replies(on_telegram.ALICE)]
        assert await bot.engine._queue.list_jobs() == []
    assert all(text.startswith("This bot does not make videos of that.") for text in texts)
    assert 'Your prompt holds "gore"' in texts[0] and 'Your prompt holds "bloood"' in texts[1]
    assert refused == {"blocked_term": 2}


async def test_telegram_a_flagged_video_is_withheld_in_a_group_and_a_spoiler_in_a_private_chat(tiny_settings, telegram):
    settings = with_rules(on_telegram.configure(tiny_settings, telegram), classifier="tiny:nsfw")
    async with on_telegram.running_bot(settings) as bot:
        refused: list[str] = []
        bot.engine._rules.on_refused = refused.append
        telegram.command(on_telegram.ALICE, "/video a fox steps=2", chat_id=GROUP, chat_type="group")
        telegram.command(on_telegram.ALICE, "/video a fox steps=2")
        video = (await until(lambda: telegram.sent("sendVideo", on_telegram.ALICE), what="the private video"))[0]
        group_texts = await until(
            lambda: [reply["text"] for reply in telegram.replies(GROUP) if "is not sent here" in reply.get("text", "")],
            what="the withheld note",
        )
        jobs = {job.source.place: job for job in await bot.engine._queue.list_jobs()}
    assert video.fields["has_spoiler"] in (True, "true", "True")
    assert telegram.sent("sendVideo", GROUP) == []
    assert group_texts[0] == (
        f"Video #{jobs['public'].id} was made, but it is not sent here: the content check flagged it as nsfw, and "
        "such videos are not sent in this chat."
    )
    assert jobs["public"].result.flagged == "nsfw 1.00"  # the record keeps the video and why
    assert jobs["public"].delivery_status is DeliveryStatus.DELIVERY_FAILED
    assert jobs["private"].result.flagged.startswith("nsfw")
    assert refused == ["video"]


async def test_discord_a_flagged_picture_is_refused_in_a_public_channel_before_anything_is_queued(
    tiny_settings, discord_server
):
    settings = with_rules(on_discord.configure(tiny_settings, discord_server), classifier="tiny:nsfw")
    async with on_discord.running_bot(settings) as bot:
        refused: list[str] = []
        bot.engine._rules.on_refused = refused.append
        start = discord_server.attachment(imagefactory.png(160, 120), "start.png")
        asked = await discord_server.slash(
            on_discord.ALICE, "video", {"prompt": "waves", "mode": "i2v"}, {"start_image": start}
        )
        said = await until(lambda: _said(discord_server, asked), what="the refusal")
        assert await bot.engine._queue.list_jobs() == []
    assert "This picture is not allowed in this chat: the content check flagged it as nsfw." in said
    assert refused == ["picture"]


async def test_discord_an_age_restricted_channel_has_its_own_policy(tiny_settings, discord_server):
    policy = {"public": "block", "age_restricted": "spoiler", "private": "allow"}
    settings = with_rules(on_discord.configure(tiny_settings, discord_server), classifier="tiny:nsfw", policy=policy)
    async with on_discord.running_bot(settings) as bot:
        await discord_server.mark_age_restricted(True)
        await discord_server.slash(on_discord.ALICE, "video", {"prompt": "a fox", "steps": 2})
        [sent] = await until(discord_server.with_files, what="the video")
        [job] = await bot.engine._queue.list_jobs()
    assert job.source.place == "age_restricted"
    assert list(sent["file_bytes"]) == [f"SPOILER_wanbot-{job.id}.mp4"]  # Discord hides it until it is clicked


async def test_status_says_how_much_of_a_days_gpu_time_is_used(tiny_settings, telegram):
    settings = on_telegram.configure(tiny_settings, telegram)
    settings = settings.model_copy(update={"queue": settings.queue.model_copy(update={"daily_gpu_seconds": 600})})
    async with on_telegram.running_bot(settings) as bot:
        telegram.command(on_telegram.ALICE, "/video a fox steps=2")
        await until(lambda: telegram.sent("sendVideo", on_telegram.ALICE), what="the video")
        [job] = await bot.engine._queue.list_jobs()
        telegram.command(on_telegram.ALICE, "/status")
        status = await until(
            lambda: [
                reply["text"] for reply in telegram.replies(on_telegram.ALICE) if "GPU time" in reply.get("text", "")
            ],
            what="/status",
        )
    used = duration_text(job.finished_at - job.started_at)
    assert status[0].endswith(f"You have used {used} of your 10m 00s of GPU time a day.")


def _said(server, interaction: dict[str, Any]) -> str | None:
    """What the bot answered an interaction: its original response, or a reply to the interaction's callback."""
    content = server.original(interaction)["content"]
    if content:
        return content
    answers = [call.body.get("data", {}).get("content", "") for call in server.calls_to("POST", "/callback")]
    return answers[-1] if answers and answers[-1] else None


async def test_discord_a_blocked_term_is_refused_to_the_requester_alone(tiny_settings, discord_server):
    settings = with_rules(on_discord.configure(tiny_settings, discord_server), blocked_terms=["gore"])
    async with on_discord.running_bot(settings) as bot:
        await discord_server.slash(on_discord.ALICE, "video", {"prompt": "a gore fest"})
        [answer] = await until(lambda: _callbacks(discord_server), what="the refusal")
        assert await bot.engine._queue.list_jobs() == []
    assert answer["flags"] & 64  # ephemeral: nobody else in the channel sees it
    assert answer["content"].startswith("This bot does not make videos of that.")


def _callbacks(server) -> list[dict[str, Any]]:
    return [call.body["data"] for call in server.calls_to("POST", "/callback") if call.body.get("type") == 4]
