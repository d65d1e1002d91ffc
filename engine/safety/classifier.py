"""The picture classifier: an image-classification model in this process (safety.classifier).

It is loaded once, on first use or at start (`load`), and kept; it runs on a thread, one batch at a time, so the
event loop goes on answering chats while it looks. A Hub model is fetched through wanbot's Downloader (resumable,
disk checked, into the Hugging Face cache) and only the three files an image classifier needs: its config, its image
processor's config and its weights. A folder on this machine is used where it is; "tiny:LABEL" is built under the
models folder (tiny.py).

A batch of pictures gets one verdict: the highest score any of them has for any of safety.flagged_labels, flagged
when it reaches safety.threshold. What a flagged picture means where it would be shown is the caller's to decide.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification, BaseImageProcessor, PreTrainedModel

from engine.config import SafetyConfig
from engine.errors import UserError
from engine.hub.downloads import Downloader
from engine.safety.tiny import make_tiny_classifier

log = logging.getLogger(__name__)

OFF = "off"
TINY_PREFIX = "tiny:"
TINY_FOLDER = "tiny-classifier"  # under the models folder, beside the tiny Wan models and the tiny enhancer
MODEL_FILES = ["config.json", "preprocessor_config.json", "model.safetensors"]


class ClassifierUnavailable(Exception):
    """The picture classifier could not be fetched, loaded or run; `str(error)` says why, for the operator's log."""


@dataclass(frozen=True)
class Verdict:
    """The most flagged picture of a batch: its highest score for a flagged label, and whether that reaches the
    threshold. An empty batch, or the classifier off, is not flagged and has no label."""

    flagged: bool
    label: str
    score: float


NOT_FLAGGED = Verdict(flagged=False, label="", score=0.0)


class PictureClassifier:
    def __init__(self, config: SafetyConfig, downloader: Downloader, models_dir: Path) -> None:
        self._config = config
        self._downloader = downloader
        self._models_dir = models_dir
        self._lock = asyncio.Lock()  # one load, and one batch at a time: they share the model and the cores
        # The processor, the model, and the indices of the flagged labels among its outputs.
        self._loaded: tuple[BaseImageProcessor, PreTrainedModel, list[int]] | None = None

    @property
    def enabled(self) -> bool:
        return self._config.classifier != OFF

    def describe(self) -> str:
        config = self._config
        if not self.enabled:
            return "classifier off"
        labels = " or ".join(config.flagged_labels)
        return f"classifier {config.classifier} on {self._device()}, flags {labels} at {config.threshold:g}"

    async def load(self) -> None:
        """Fetch the model if need be and load it; ClassifierUnavailable if either cannot be done. Loaded once."""
        async with self._lock:
            await self._load()

    async def check(self, images: Sequence[Image.Image]) -> Verdict:
        """The verdict on `images`, all looked at in one batch (loading the model first if need be)."""
        if not self.enabled or not images:
            return NOT_FLAGGED
        async with self._lock:
            await self._load()
            try:
                return await asyncio.to_thread(self._classify, images)
            except (RuntimeError, ValueError, OSError) as error:  # a picture it cannot read, the GPU out of memory
                raise ClassifierUnavailable(
                    f"the picture classifier {self._config.classifier} failed on {len(images)} pictures: {error}"
                ) from error

    async def close(self) -> None:
        self._loaded = None

    async def _load(self) -> None:
        if self._loaded is not None or not self.enabled:
            return
        name = self._config.classifier
        try:
            folder = await self._folder(name)
        except UserError as error:
            raise ClassifierUnavailable(f"the picture classifier {name} could not be fetched: {error}") from None
        try:
            processor, model = await asyncio.to_thread(self._read, folder)
        except (OSError, ValueError) as error:
            raise ClassifierUnavailable(f"the picture classifier in {folder} could not be loaded: {error}") from None
        self._loaded = processor, model, self._flagged_indices(model)
        log.info("picture classifier: %s loaded on %s", name, model.device)

    async def _folder(self, name: str) -> Path:
        if name.startswith(TINY_PREFIX):
            label = name.removeprefix(TINY_PREFIX)
            return await asyncio.to_thread(make_tiny_classifier, self._models_dir / _tiny_folder_name(label), label)
        if folder := await asyncio.to_thread(_folder_named, name):
            return folder
        if name.startswith(("/", ".", "~")):
            raise UserError(f"There is no folder {name}.", "Check safety.classifier.")
        if found := self._downloader.local_files(name, MODEL_FILES):
            return found
        log.info("picture classifier: downloading %s (%s)", name, ", ".join(MODEL_FILES))
        return await self._downloader.download(name, files=MODEL_FILES)

    def _read(self, folder: Path) -> tuple[BaseImageProcessor, PreTrainedModel]:
        processor = AutoImageProcessor.from_pretrained(folder)
        # float32 even on a GPU: the model is small beside Wan, and scores are compared with a threshold.
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32)
        return processor, model.to(self._device()).eval()

    def _flagged_indices(self, model: PreTrainedModel) -> list[int]:
        """Where the flagged labels sit among the model's outputs, compared case-blind. Every one must be there:
        a label mistyped in the settings would otherwise flag nothing, silently."""
        by_label = {str(label).casefold(): int(index) for index, label in model.config.id2label.items()}
        missing = [label for label in self._config.flagged_labels if label.casefold() not in by_label]
        if missing:
            known = ", ".join(str(label) for label in model.config.id2label.values())
            raise ClassifierUnavailable(
                f"the picture classifier {self._config.classifier} has no label {', '.join(missing)}: its labels "
                f"are {known}. Set safety.flagged_labels to some of them."
            )
        return [by_label[label.casefold()] for label in self._config.flagged_labels]

    def _classify(self, images: Sequence[Image.Image]) -> Verdict:
        assert self._loaded is not None
        processor, model, flagged = self._loaded
        pictures = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
        with torch.inference_mode():
            inputs = processor(images=pictures, return_tensors="pt").to(model.device)
            scores = model(**inputs).logits.float().softmax(dim=-1)[:, flagged]  # pictures x flagged labels
        best = int(scores.argmax())
        score = float(scores.flatten()[best])
        label = str(model.config.id2label[flagged[best % len(flagged)]])
        return Verdict(flagged=score >= self._config.threshold, label=label, score=score)

    def _device(self) -> torch.device:
        wanted = self._config.device
        if wanted == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(wanted)


def frames_to_check(frames_count: int, n: int) -> list[int]:
    """`n` frame indices spread evenly over a video of `frames_count` frames, the last among them: each the end of
    one of `n` equal stretches (81 frames, 3: 26, 53, 80). Every frame when `n` is as many or more."""
    if frames_count <= 0 or n <= 0:
        return []
    if n >= frames_count:
        return list(range(frames_count))
    return [-(-(part + 1) * frames_count // n) - 1 for part in range(n)]  # ceil((part + 1) * frames / n) - 1


def _folder_named(name: str) -> Path | None:
    """`safety.classifier` as a folder on this machine, if it names one."""
    folder = Path(name).expanduser()
    return folder if folder.is_dir() else None


def _tiny_folder_name(label: str) -> str:
    """One folder per forced label; a label that is no safe folder name gets a hash of itself instead."""
    if re.fullmatch(r"[\w.-]+", label, re.ASCII) and not label.startswith("."):
        return f"{TINY_FOLDER}-{label}"
    return f"{TINY_FOLDER}-{hashlib.sha256(label.encode()).hexdigest()[:16]}"
