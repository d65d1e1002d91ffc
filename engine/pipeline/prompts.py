"""Prompt lengths in the model's own tokens: the text encoder reads 512 and the pipelines cut the rest without a
word, so a request whose prompt would be cut is told which words the model will not see."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.jobs import GenerationParams
from engine.pipeline.models import ModelRef

log = logging.getLogger(__name__)

# The Wan pipelines' max_sequence_length: the UMT5 encoder's context, end-of-text token included.
TEXT_TOKENS = 512
QUOTED_CHARS = 40


class PromptLengths:
    """Counts prompts with the tokenizer of a model that is on disk (loaded once per model); a model not downloaded
    yet is not counted."""

    def __init__(self, find_folder: Callable[[ModelRef], Path | None]) -> None:
        self._find_folder = find_folder
        self._tokenizers: dict[str, PreTrainedTokenizerBase | None] = {}

    async def warnings(self, model: ModelRef, params: GenerationParams) -> list[str]:
        try:
            tokenizer = await self._tokenizer(model)
            if tokenizer is None:
                return []
            labelled = (("The prompt", params.prompt), ("The negative prompt", params.negative_prompt))
            return [note for label, text in labelled if (note := _cut_note(tokenizer, label, text))]
        except Exception:
            # Counting is a courtesy and must never refuse a request (a tokenizer without offsets, say): a tokenizer
            # that does not work fails the job later with a real error.
            log.warning("cannot count the prompt's tokens for %s", model.name, exc_info=True)
            return []

    async def _tokenizer(self, model: ModelRef) -> PreTrainedTokenizerBase | None:
        if model.name not in self._tokenizers:
            folder = await asyncio.to_thread(self._find_folder, model)
            if folder is None or not (folder / "tokenizer").is_dir():
                return None  # not downloaded yet: asked again next time
            try:
                self._tokenizers[model.name] = await asyncio.to_thread(
                    AutoTokenizer.from_pretrained, folder / "tokenizer"
                )
            except Exception:
                self._tokenizers[model.name] = None  # not tried again for every request
                raise
        return self._tokenizers[model.name]


def _cut_note(tokenizer: PreTrainedTokenizerBase, label: str, text: str) -> str | None:
    if not text:
        return None
    # Not verbose: the tokenizer's own "sequence length is longer than ... (570 > 512)" warning would repeat, in a
    # log an operator reads, what the note below tells the user.
    count = len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
    if count <= TEXT_TOKENS:
        return None
    # Tokenised as the pipelines do it; special tokens have empty offsets, so the largest end is where reading stops.
    kept = tokenizer(
        text, max_length=TEXT_TOKENS, truncation=True, add_special_tokens=True, return_offsets_mapping=True
    )
    kept_until = max(end for _, end in kept["offset_mapping"])
    ignored = text[kept_until:].strip()
    quoted = ignored[:QUOTED_CHARS].rstrip() + ("…" if len(ignored) > QUOTED_CHARS else "")
    return (
        f"{label} is {count} tokens long and the model reads {TEXT_TOKENS}: it will not see the last "
        f"{count - len(kept['input_ids'])}, from “{quoted}” on. Shorten it to keep them."
    )
