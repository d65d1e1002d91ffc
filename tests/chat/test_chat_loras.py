"""Style LoRAs in both chats: `lora=` in a request (a Discord option with suggestions), /loras, the caption naming
them, and a plain sentence for one that cannot be used."""

from __future__ import annotations

import pytest

from bot.chat.core import NOT_ALLOWED
from engine.config import Settings
from tests.discord import test_discord as on_discord
from tests.running import until
from tests.telegram import test_telegram as on_telegram

ALICE, BOB = on_telegram.ALICE, on_telegram.BOB
DISCORD_ALICE, DISCORD_BOB = on_discord.ALICE, on_discord.BOB
LORAS = {
    "grain": {"repo": "tiny", "file": "grain.safetensors", "description": "film grain"},
    "glow": {"repo": "tiny", "file": "glow.safetensors", "trigger": "glowing", "modes": ["t2v"], "weight": 1.2},
}
pytestmark = pytest.mark.timeout(120)


def with_loras(settings: Settings) -> Settings:
    return settings.model_copy(update={"loras": Settings(loras=LORAS).loras})


async def test_telegram_a_request_names_a_lora_and_the_caption_says_so(tiny_settings, telegram):
    settings = on_telegram.configure(with_loras(tiny_settings), telegram, allowed_users=[ALICE])
    async with on_telegram.running_bot(settings) as bot:
        telegram.command(ALICE, "/loras")
        listed = await until(lambda: on_telegram.texts(telegram, ALICE), what="the list")
        telegram.command(ALICE, "/video a fox lora=grain:0.5 lora=glow seed=3")
        video = (await until(lambda: telegram.sent("sendVideo", ALICE), what="the video"))[0]
        telegram.command(ALICE, "/video a fox lora=sepia")
        # The video's own message has no text: wait for the refusal itself, after it.
        await until(lambda: "LoRA called 'sepia'" in on_telegram.texts(telegram, ALICE)[-1], what="the refusal")
        telegram.command(BOB, "/loras")
        await until(lambda: on_telegram.texts(telegram, BOB), what="bob's answer")
        [job] = await bot.engine._queue.list_jobs()
    assert listed[0] == (
        "Add lora=NAME or lora=NAME:WEIGHT (0 to 2) to a request, at most 2 LoRAs:\n"
        "• grain: film grain (t2v, i2v, ti2v, weight 0.8)\n"
        "• glow (t2v, weight 1.2 · adds “glowing”)"
    )
    assert [use.label for use in job.params.loras] == ["grain:0.5", "glow:1.2"]
    assert job.params.prompt == "glowing, a fox"
    assert video.fields["caption"].endswith(" · lora grain:0.5 · lora glow:1.2")
    refusal = on_telegram.texts(telegram, ALICE)[-1]
    assert refusal == "There is no LoRA called 'sepia' here.\n/loras lists them: grain, glow."
    assert on_telegram.texts(telegram, BOB) == [NOT_ALLOWED]


async def test_discord_the_lora_option_suggests_names_and_queues_with_them(tiny_settings, discord_server):
    settings = on_discord.configure(with_loras(tiny_settings), discord_server, allowed_users=[DISCORD_ALICE])
    async with on_discord.running_bot(settings) as bot:
        await bot.engine._queue.set_paused(True)
        typed = await discord_server.autocomplete(DISCORD_ALICE, "video", {"prompt": "a fox", "lora": "gr"}, "lora")
        second = await discord_server.autocomplete(DISCORD_ALICE, "video", {"lora": "grain:0.4, g"}, "lora")
        outsider = await discord_server.autocomplete(DISCORD_BOB, "video", {"lora": ""}, "lora")
        interaction = await discord_server.slash(DISCORD_ALICE, "video", {"prompt": "a fox", "lora": "grain:0.4, glow"})
        await until(lambda: "is queued" in discord_server.original(interaction)["content"], what="queued")
        listed = await discord_server.slash(DISCORD_ALICE, "loras")
        await until(lambda: discord_server.original(listed)["content"], what="the list")
        [job] = await bot.engine._queue.list_jobs()
    assert typed == [{"name": "grain", "value": "grain"}]
    assert [choice["value"] for choice in second] == ["grain:0.4, grain", "grain:0.4, glow"]
    assert outsider == []
    assert [use.label for use in job.params.loras] == ["grain:0.4", "glow:1.2"]
    assert "• grain: film grain" in discord_server.original(listed)["content"]
