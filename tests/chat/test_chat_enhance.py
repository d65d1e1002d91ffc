"""The prompt enhancer in the chats: a request's prompt rewritten before it is queued (an OpenAI-compatible endpoint,
faked on loopback), shown once, "Use my words" for its owner while it waits, enhance=yes|no, /enhance on|off, both
prompts in the caption, and the user's words with a note when the enhancer fails."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from bot.chat.core import NOT_ALLOWED
from engine.config import PromptsConfig, Settings
from engine.errors import UserError
from engine.service import Engine
from tests.discord import test_discord as on_discord
from tests.enhance.fake_openai import FakeOpenAI
from tests.fake_telegram import FakeTelegram
from tests.running import until
from tests.telegram import test_telegram as on_telegram

ALICE, BOB, CAROL = on_telegram.ALICE, on_telegram.BOB, 333
REWRITE = "A small red fox trots through deep fresh snow at dawn, soft golden light, the camera tracking beside it."
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(content=REWRITE)
    await server.start()
    yield server
    await server.stop()


def enhancing(settings: Settings, openai: FakeOpenAI, **prompts: object) -> Settings:
    config = PromptsConfig(enhancer="openai", enhancer_url=openai.url, enhancer_retries=0, **prompts)
    return settings.model_copy(update={"prompts": config})


def own_words_data(telegram: FakeTelegram, chat_id: int) -> str | None:
    """The callback data of the "Use my words" button on the chat's latest message that has one."""
    for message in reversed(telegram.replies(chat_id)):
        for row in json.loads(message.get("reply_markup") or "{}").get("inline_keyboard", []):
            for button in row:
                if button["text"] == "Use my words":
                    return button["callback_data"]
    return None


async def test_telegram_a_prompt_is_rewritten_shown_once_and_its_owner_may_keep_their_words(
    tiny_settings, telegram, openai
):
    settings = on_telegram.configure(enhancing(tiny_settings, openai), telegram, allowed_users=[ALICE, CAROL])
    async with on_telegram.running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        telegram.command(ALICE, "/video a red fox in snow")
        first = await until(lambda: on_telegram.texts(telegram, ALICE), what="the place")
        button = await until(lambda: own_words_data(telegram, ALICE), what="Use my words")
        [job] = await bot.engine._queue.list_jobs()
        status = telegram.replies(ALICE)[0]
        telegram.press(BOB, status, button)  # an outsider
        telegram.press(CAROL, status, button)  # allowed here, but not hers
        telegram.press(ALICE, status, button)
        await until(lambda: len(telegram.sent("answerCallbackQuery")) == 3, what="three answers")
        await until(lambda: own_words_data(telegram, ALICE) is None, what="the button gone")
        mine = await bot.engine._queue.get(job.id)
        await bot.engine._queue.set_paused(False)
        video = (await until(lambda: telegram.sent("sendVideo", ALICE), what="the video"))[0]
    assert job.params.prompt == REWRITE and job.params.original_prompt == "a red fox in snow"
    assert f"• Prompt enhanced: {REWRITE}" in first[0]
    assert openai.requests[0].messages["user"] == "a red fox in snow"
    answers = sorted(call.fields.get("text", "") for call in telegram.sent("answerCallbackQuery"))
    assert answers == sorted(
        [
            NOT_ALLOWED,
            f"Job #{job.id} is not yours.\nOnly the person who asked can choose its words.",
            f"Job #{job.id} will be made from your own words: a red fox in snow",
        ]
    )
    assert mine.params.prompt == "a red fox in snow" and mine.params.original_prompt is None
    assert video.fields["caption"].startswith(f"a red fox in snow\njob #{job.id} · seed ")


async def test_telegram_the_caption_keeps_both_prompts_and_enhance_no_keeps_the_words(tiny_settings, telegram, openai):
    settings = on_telegram.configure(enhancing(tiny_settings, openai), telegram)
    async with on_telegram.running_bot(settings) as bot:
        telegram.command(ALICE, "/video a fox steps=2")
        enhanced = (await until(lambda: telegram.sent("sendVideo", ALICE), what="the video"))[0]
        telegram.command(ALICE, "/video a plain fox enhance=no")
        await until(lambda: len(telegram.sent("sendVideo", ALICE)) == 2, what="the second video")
        jobs = sorted(await bot.engine._queue.list_jobs(), key=lambda job: job.id)
    assert enhanced.fields["caption"].startswith(f"a fox\nEnhanced: {REWRITE}\njob #{jobs[0].id} · seed ")
    assert len(openai.requests) == 1  # enhance=no asked nothing
    assert jobs[1].params.prompt == "a plain fox" and jobs[1].params.original_prompt is None


async def test_telegram_a_failed_enhancer_keeps_the_words_with_a_note_and_admins_turn_it_off(
    tiny_settings, telegram, openai
):
    settings = on_telegram.configure(enhancing(tiny_settings, openai), telegram)
    admins = settings.access.model_copy(update={"admins": [f"telegram:{ALICE}"]})
    settings = settings.model_copy(update={"access": admins})
    async with on_telegram.running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        openai.faults.append("500")
        telegram.command(ALICE, "/video a fox")
        failed = await until(lambda: on_telegram.texts(telegram, ALICE), what="the place")
        telegram.command(BOB, "/enhance off")
        telegram.command(ALICE, "/enhance off")
        await until(lambda: len(on_telegram.texts(telegram, ALICE)) == 2, what="alice's answer")
        await until(lambda: on_telegram.texts(telegram, BOB), what="bob's answer")
        telegram.command(ALICE, "/video an owl")
        await until(lambda: len(on_telegram.texts(telegram, ALICE)) == 3, what="the second place")
        jobs = sorted(await bot.engine._queue.list_jobs(), key=lambda job: job.id)
    assert "• The prompt enhancer is not available right now, so your own words were used." in failed[0]
    assert [job.params.prompt for job in jobs] == ["a fox", "an owl"]
    assert len(openai.requests) == 1  # the chat turned it off before the owl
    assert on_telegram.texts(telegram, ALICE)[1].startswith("Prompt enhancer off for this chat")
    assert on_telegram.texts(telegram, BOB)[0].startswith("Only admins can turn the prompt enhancer on or off.")


async def test_discord_the_enhance_option_and_the_use_my_words_button(tiny_settings, discord_server, openai):
    settings = on_discord.configure(enhancing(tiny_settings, openai), discord_server)
    async with on_discord.running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        rewritten = await discord_server.slash(on_discord.ALICE, "video", {"prompt": "a fox"})
        kept = await discord_server.slash(on_discord.ALICE, "video", {"prompt": "an owl", "enhance": False})
        for interaction in (rewritten, kept):
            await until(lambda i=interaction: "is queued" in discord_server.original(i)["content"], what="queued")
        message = discord_server.original(rewritten)
        buttons = [item["custom_id"] for row in message["components"] for item in row["components"]]
        await discord_server.click(on_discord.ALICE, message, buttons[1])
        await until(lambda: "own words" in on_discord_answers(discord_server), what="the answer")
        jobs = sorted(await bot.engine._queue.list_jobs(), key=lambda job: job.id)
    assert buttons == [f"wanbot:cancel:{jobs[0].id}", f"wanbot:own:{jobs[0].id}"]
    assert [job.params.prompt for job in jobs] == ["a fox", "an owl"]
    assert len(openai.requests) == 1


def on_discord_answers(server) -> str:
    calls = server.calls_to("POST", "/callback")
    return " ".join(call.body.get("data", {}).get("content", "") for call in calls)


async def test_a_serving_process_refuses_a_local_enhancer_in_one_sentence(tiny_settings):
    settings = tiny_settings.model_copy(update={"prompts": PromptsConfig(enhancer="local", enhancer_repo="tiny")})
    with pytest.raises(UserError, match="a serving process runs none"):
        await Engine.open(settings, with_worker=False)
