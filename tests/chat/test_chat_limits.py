"""Every chat text fits its platform: Telegram messages 4096 characters and captions 1024, Discord 2000. Long lists of
notes, options or jobs are summarised into one readable answer, through the real adapters against fake servers that
refuse longer texts as the real APIs do."""

from __future__ import annotations

import itertools
import string
from typing import Any

import pytest

from bot.chat.texts import fit_text, parse_message, text_size
from bot.discord.adapter import DiscordAdapter
from bot.telegram.adapter import TelegramAdapter
from engine.config import Settings
from engine.jobs import JobSource
from engine.pipeline.models import GenerationRequest
from engine.storage.images import Mode
from tests import factories, fake_discord, fake_telegram, imagefactory
from tests.fake_discord import CHANNEL_ID, GUILD_ID, FakeDiscord
from tests.fake_telegram import FakeTelegram
from tests.running import RunningBot, until

TELEGRAM_TOKEN = fake_telegram.TEST_TOKEN
DISCORD_TOKEN = fake_discord.TEST_TOKEN
ALICE = 111
DISCORD_ALICE = 111111111111111111
pytestmark = pytest.mark.timeout(180)


def unknown_options(count: int) -> str:
    """`count` distinct options no one knows (keys are letters and underscores), as a user would type them."""
    names = ("unk_" + "".join(letters) for letters in itertools.product(string.ascii_lowercase, repeat=3))
    return " ".join(f"{name}=1" for name in itertools.islice(names, count))


def many_notes(count: int) -> list[str]:
    return [f"Note {number}: something about this request was changed to make it work." for number in range(count)]


# -- the function ------------------------------------------------------------------------------------------------


def test_a_text_that_fits_is_left_alone():
    text = "Job #1 (t2v) is queued: position 1.\n• Frames must be 4k+1: using 9 instead of 10."
    assert fit_text(text, 4096) == text


def test_long_lists_of_names_and_notes_are_summarised_and_the_rest_stays():
    options = parse_message(f"a fox {unknown_options(300)}", None, has_image=False).notes
    job = factories.params()
    text = "\n".join(
        ["Job #7 (t2v) is queued: position 3.", f"{job.width}x{job.height}, 5 frames at 16 fps, 2 steps, seed 1."]
        + [f"• {note}" for note in [*options, *many_notes(300)]]
    )
    fitted = fit_text(text, 2000)
    lines = fitted.splitlines()
    assert text_size(fitted) <= 2000 and lines[:2] == text.splitlines()[:2]
    assert "unk_aaa, unk_aab" in lines[2] and "unk_aaj … and 290 more. Known: cfg, enhance, frames" in lines[2]
    kept = len(lines) - 4  # the two head lines, the options note and the summary
    assert lines[-1] == f"… and {300 - kept} more notes" and kept > 10
    assert lines[3:-1] == [f"• {note}" for note in many_notes(kept)]


def test_a_queue_listing_keeps_its_first_jobs():
    listing = "\n".join(f"#{number} t2v · position {number} · a red fox running through snow" for number in range(80))
    fitted = fit_text(listing, 2000).splitlines()
    assert fitted[0].startswith("#0 t2v") and fitted[-1] == f"… and {80 - len(fitted) + 1} more jobs"


def test_the_last_resort_cuts_with_an_ellipsis_counting_emoji_as_telegram_does():
    assert fit_text("x" * 5000, 100) == "x" * 99 + "…"
    emoji = fit_text("🦊" * 3000, 4096)  # two UTF-16 units each
    assert emoji.endswith("…") and text_size(emoji) == 4095


# -- Telegram ----------------------------------------------------------------------------------------------------


def telegram_settings(settings: Settings, server: FakeTelegram) -> Settings:
    telegram = {
        "token": TELEGRAM_TOKEN,
        "api_base_url": f"{server.url}/bot",
        "file_base_url": f"{server.url}/file/bot",
        "edit_interval_s": 0.2,
        "delivery_retry_s": 0.5,
    }
    access = settings.access.model_copy(update={"admins": [f"telegram:{ALICE}"]})  # no per-user limit
    return settings.model_copy(update={"telegram": settings.telegram.model_validate(telegram), "access": access})


async def test_telegram_answers_a_huge_request_and_a_huge_note_list_in_one_readable_message(tiny_settings, telegram):
    settings = telegram_settings(tiny_settings, telegram)
    async with RunningBot(settings, lambda engine: TelegramAdapter(engine, settings.telegram, poll_timeout_s=1)) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(ALICE, f"/video a fox in the snow {unknown_options(300)}")  # 3,000 characters
        options = await until(lambda: _text_with(telegram, "Ignored unknown options"), what="the options answer")

        # A job whose notes alone are 16,000 characters, answered in the status message its request got.
        status = await bot.adapter.app.bot.send_message(ALICE, "Checking your request…")
        source = JobSource(
            platform="telegram",
            chat_id=str(ALICE),
            user_id=str(ALICE),
            message_id="many-notes",
            reply={"status_message_id": str(status.message_id)},
        )
        request = GenerationRequest(mode=Mode.T2V, prompt="a fox " * 600, steps=2)  # the caption must cut it
        await bot.engine.submit(request, source, priority=10, notes=many_notes(300))
        await until(lambda: "more notes" in _text_of(telegram, status.message_id), what="the notes answer")
        noted = _text_of(telegram, status.message_id)

        await bot.engine._queue.set_paused(False)  # the many-notes job goes first and comes back with a caption
        videos = await until(lambda: telegram.sent("sendVideo", ALICE), what="the video")
    texts = [call.fields["text"] for call in telegram.calls if call.method in ("sendMessage", "editMessageText")]
    assert max(len(text) for text in texts) <= 4096  # the fake refuses longer ones: nothing was refused
    assert "unk_aaa" in options and "Known: cfg" in options  # 300 names fit in 4096: all are named
    assert noted.startswith("Job #2 (t2v) is queued: position 1.") and "• Note 0: something" in noted
    caption = videos[0].fields["caption"]
    assert caption.startswith("a fox a fox") and len(caption) <= 1024 and "seed" in caption


def _text_of(server: FakeTelegram, message_id: int) -> str:
    return server.messages[(ALICE, message_id)].get("text", "")


def _text_with(server: FakeTelegram, fragment: str) -> str | None:
    return next((m["text"] for m in server.replies(ALICE) if fragment in m.get("text", "")), None)


# -- Discord -----------------------------------------------------------------------------------------------------


def discord_settings(settings: Settings, server: FakeDiscord) -> Settings:
    discord = {
        "token": DISCORD_TOKEN,
        "guild_ids": [GUILD_ID],
        "api_base_url": server.api_base,
        "gateway_url": server.gateway_url,
        "edit_interval_s": 0.2,
    }
    access = settings.access.model_copy(update={"admins": [f"discord:{DISCORD_ALICE}"]})
    return settings.model_copy(update={"discord": settings.discord.model_validate(discord), "access": access})


async def test_discord_answers_a_huge_request_and_a_long_queue_in_one_readable_message(tiny_settings, discord_server):
    settings = discord_settings(tiny_settings, discord_server)
    async with RunningBot(settings, lambda engine: DiscordAdapter(engine, settings.discord)) as bot:
        await bot.engine._queue.set_paused(True)
        picture = discord_server.attachment(imagefactory.png(160, 120), "start.png")
        opened = await discord_server.message_command(
            DISCORD_ALICE, "Make a video", discord_server.user_post(DISCORD_ALICE, "look", [picture])
        )
        await until(lambda: opened["id"] in discord_server.modals, what="the modal")
        prompt = f"the waves roll in {unknown_options(300)}"  # 3,000 characters: the modal takes 4,000
        submitted = await discord_server.submit_modal(DISCORD_ALICE, opened, {"What happens in the video": prompt})
        await until(lambda: "is queued" in discord_server.original(submitted)["content"], what="the queued answer")
        answer = discord_server.original(submitted)["content"]

        for number in range(40):  # queued without a chat message of their own: only the listing shows them
            source = JobSource(
                platform="discord", chat_id=str(CHANNEL_ID), user_id=str(DISCORD_ALICE), message_id=f"bulk-{number}"
            )
            params = factories.params(f"job {number}: a red fox running through deep snow at dusk")
            await bot.engine._queue.enqueue(source, Mode.T2V, "tiny", params, is_admin=True)
        listed = await discord_server.slash(DISCORD_ALICE, "queue")
        await until(lambda: discord_server.original(listed)["content"], what="the /queue answer")
        listing = discord_server.original(listed)["content"]
    longest = max(len(_content(call.body)) for call in discord_server.calls)
    assert longest <= 2000  # the fake refuses longer ones: nothing was refused
    assert answer.startswith("Job #1 (i2v) is queued: position 1.")
    assert "unk_aaj … and 290 more. Known: cfg" in answer  # the names are summarised, the note is whole
    assert listing.startswith("#1 i2v · position 1") and listing.splitlines()[-1].endswith("more jobs")


def _content(body: Any) -> str:
    """The text of a message the bot sent or edited, or of an interaction's answer."""
    if not isinstance(body, dict):
        return ""
    return body.get("content") or (body.get("data") or {}).get("content") or ""
