"""The Discord adapter with the real discord.py client against a fake Discord (REST, gateway, CDN) on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from bot.discord_adapter import DiscordAdapter
from engine.config import Settings
from engine.jobs import DeliveryStatus, JobStatus
from engine.service import Engine
from tests import imagefactory
from tests.fake_discord import GUILD_ID, FakeDiscord

TOKEN = "discord-TEST-token-do-not-log"
ALICE, BOB = 111111111111111111, 222222222222222222
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def discord_server() -> AsyncIterator[FakeDiscord]:
    server = FakeDiscord(TOKEN)
    await server.start()
    yield server
    await server.stop()


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


class Bot:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __aenter__(self) -> Bot:
        self.engine = await Engine.open(self.settings)
        await self.engine.worker.start_up()
        self.adapter = DiscordAdapter(self.engine, self.settings.discord)
        await self.adapter.start()
        self.worker = asyncio.create_task(self.engine.worker.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.worker.stop(requeue_running=True)
        await self.worker
        await self.adapter.stop()
        await self.engine.close()


async def until(condition: Callable[[], Any], limit_s: float = 60, what: str = "condition") -> Any:
    deadline = asyncio.get_running_loop().time() + limit_s
    while asyncio.get_running_loop().time() < deadline:
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_sync_then_text_only_video_with_defer_progress_and_followup_file(tiny_settings, discord_server):
    async with Bot(configure(tiny_settings, discord_server)) as bot:
        synced = discord_server.commands[f"applications/{discord_server_app()}/guilds/{GUILD_ID}/commands"]
        assert {command["name"] for command in synced} == {"video", "queue", "cancel", "status", "help"}
        interaction = await discord_server.slash(ALICE, "video", {"prompt": "a red fox", "seed": 5, "steps": 3})
        videos = await until(discord_server.with_files, what="the video")
        original = discord_server.original(interaction)
        await until(lambda: "the video is below" in original["content"], what="final text")
        job = (await bot.engine.queue.list_jobs())[0]
    assert discord_server.callback_delay(interaction) < 3.0
    assert job.params.prompt == "a red fox" and job.params.seed == 5
    assert job.delivery_status is DeliveryStatus.DELIVERED
    assert original["edits"] >= 3
    assert f"<@{ALICE}>" in videos[0]["content"] and "seed 5" in videos[0]["content"]
    assert videos[0]["components"][0]["components"][0]["custom_id"] == f"wanbot:reroll:{job.id}"


def discord_server_app() -> int:
    from tests.fake_discord import APPLICATION_ID

    return APPLICATION_ID
