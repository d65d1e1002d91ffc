from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.config import DownloadsConfig
from engine.hub.downloads import Downloader
from tests.enhance.fake_openai import FakeOpenAI


@pytest.fixture
async def openai() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    await server.start()
    yield server
    await server.stop()


class Sleeps(list[float]):
    """A sleep that only notes how long it was asked to wait: the backoff is checked, never waited for."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def downloader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Downloader:
    # This machine's own Hugging Face cache must not stand in for what a test serves.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    return Downloader(tmp_path / "models", DownloadsConfig(offline=True))
