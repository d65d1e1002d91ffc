from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from engine.config import DownloadsConfig
from engine.hub.downloads import Downloader


@pytest.fixture
def downloader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Downloader:
    # This machine's own Hugging Face cache must not stand in for what a test serves.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    return Downloader(tmp_path / "models", DownloadsConfig(offline=True))


@pytest.fixture
def pictures() -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), "red"), Image.new("RGB", (40, 90), "blue")]
