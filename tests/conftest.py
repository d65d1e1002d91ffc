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
