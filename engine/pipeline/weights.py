"""Where a job's weights are on disk: the model's own folder and, for the fast preset, its distilled weights.

The distilled weights are used where they are when a Hugging Face cache holds them (the standard one or wanbot's
own, engine/hub/hfcache.py), else fetched like models: through wanbot's Downloader, resumable and checked, into the same
store. They are fetched
when the first fast job needs them, on the worker's thread, with download progress shown on that job; tiny models
get stand-ins built on this machine (engine/pipeline/tiny.py), as the tiny models themselves are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from engine.config import Settings
from engine.hub.downloads import Downloader
from engine.hub.fetcher import download_progress
from engine.jobs import LoraUse
from engine.pipeline.hooks import RunHooks
from engine.pipeline.loras import LoraFiles, LoraPair
from engine.pipeline.models import TINY, TINY_STYLE_FOLDER, ModelRef, resolve_model
from engine.pipeline.styles import StyleFiles
from engine.pipeline.tiny import (
    TINY_FAST_SEED,
    TINY_LORA_FILES,
    make_tiny_loras,
    make_tiny_model,
    make_tiny_style_lora,
)

TINY_LORA_REPO = "wanbot/tiny-loras"  # a name for the metadata; the files are built here, never downloaded


class Locator:
    """Finds (and, for the fast preset, fetches) the weights a job runs on; `base` finds a model's folder."""

    def __init__(self, settings: Settings, downloader: Downloader, base: Callable[[ModelRef, RunHooks], Path]) -> None:
        self._settings = settings
        self._downloader = downloader
        self._base = base

    def __call__(self, model: ModelRef, hooks: RunHooks) -> Path:
        return self._base(model, hooks)

    def on_disk(self, model: ModelRef) -> Path | None:
        """The model's diffusers folder if it is on disk already; nothing is built or downloaded."""
        if model.is_tiny:
            folder = self._settings.models_dir / model.name
            return folder if (folder / "model_index.json").exists() else None
        if model.is_local:
            return Path(model.name)
        return self._downloader.local_snapshot(model.name)

    def fast_model(self, model: ModelRef) -> ModelRef:
        """The distilled model that runs `model`'s fast preset (TI2V-5B: FastWan, models.fast_ti2v)."""
        if model.is_tiny:
            return ModelRef(name=f"{model.name}-fast", mode=model.mode, spec=model.spec)
        return resolve_model(self._settings.models.fast_ti2v, model.mode)

    def fast_model_folder(self, fast: ModelRef, hooks: RunHooks) -> Path:
        if fast.is_tiny:
            return make_tiny_model(self._settings.models_dir / fast.name, fast.mode, seed=TINY_FAST_SEED)
        if fast.is_local:
            return Path(fast.name)
        found = self._downloader.local_snapshot(fast.name)
        return found or self._download(fast.name, None, hooks)

    def loras(self, model: ModelRef, hooks: RunHooks) -> LoraFiles:
        """The LoRA pair that runs `model`'s fast preset (A14B: models.fast_loras.<mode>), on disk."""
        if model.is_tiny:
            pair = LoraPair(TINY_LORA_REPO, *TINY_LORA_FILES)
            folder = make_tiny_loras(self._settings.models_dir / f"{model.name}-fast-loras", model.mode)
        else:
            configured = getattr(self._settings.models.fast_loras, model.mode.value)
            pair = LoraPair(configured.repo, configured.high, configured.low)
            files = [pair.high, pair.low]
            found = self._downloader.local_files(pair.repo, files)
            folder = found or self._download(pair.repo, files, hooks)
        return LoraFiles(pair, folder / pair.high, folder / pair.low)

    def style(self, use: LoraUse, hooks: RunHooks) -> StyleFiles:
        """A job's style LoRA on disk: built here for `tiny`, used where it is for a folder, else found in a Hugging
        Face cache or downloaded (only its files), with the download's progress shown on the job."""
        if use.repo == TINY:
            folder = self._settings.models_dir / TINY_STYLE_FOLDER
            return StyleFiles(use, tuple(make_tiny_style_lora(folder, name) for name in use.files))
        local = Path(use.repo).expanduser()
        if local.is_dir():
            folder = local
        else:
            folder = self._downloader.local_files(use.repo, use.files) or self._download(use.repo, use.files, hooks)
        return StyleFiles(use, tuple(folder / name for name in use.files))

    def _download(self, repo_id: str, files: list[str] | None, hooks: RunHooks) -> Path:
        # On the worker's own thread, which has no event loop: the download gets one of its own.
        return asyncio.run(
            self._downloader.download(
                repo_id, on_progress=lambda progress: hooks.on_progress(download_progress(progress)), files=files
            )
        )
