from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.config import ImagesConfig, Settings
from engine.queue import JobQueue


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def images_config() -> ImagesConfig:
    return ImagesConfig()


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[JobQueue]:
    opened = await JobQueue.open(tmp_path / "queue.sqlite3")
    yield opened
    await opened.close()


@pytest.fixture
async def telegram() -> AsyncIterator[object]:
    """The fake Telegram Bot API on 127.0.0.1."""
    from tests.fake_telegram import TEST_TOKEN, FakeTelegram

    server = FakeTelegram(TEST_TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def discord_server() -> AsyncIterator[object]:
    """The fake Discord (REST, gateway, CDN) on 127.0.0.1."""
    from tests.fake_discord import TEST_TOKEN, FakeDiscord

    server = FakeDiscord(TEST_TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three tiny models, built once per test session and shared read-only."""
    from engine.images import Mode
    from engine.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    for mode in Mode:
        make_tiny_model(root / f"tiny-{mode.value}", mode)
    return root


@pytest.fixture
def tiny_settings(tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(tiny_models, target_is_directory=True)
    return Settings(data_dir=data, models={"t2v": "tiny", "i2v": "tiny", "ti2v": "tiny"})


@pytest.fixture
async def engine(tiny_settings: Settings) -> AsyncIterator[object]:
    from engine.service import Engine

    opened = await Engine.open(tiny_settings)
    yield opened
    await opened.close()
