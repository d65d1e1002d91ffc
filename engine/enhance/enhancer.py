"""The prompt enhancer's facade: a user's prompt in, the prompt to make the video from out, and never an exception
for the enhancer's sake.

Whatever goes wrong (no answer in time, an HTTP error, an answer that is no chat completion, no text, a rewrite too
long for the text encoder), the user's own words are used, with one sentence saying so; the reason, with the
endpoint and the status, goes to the operator's log. A rewrite that lost one of the user's key words gets the
user's prompt in front of it (engine/enhance/guard.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.config import PromptsConfig
from engine.enhance.failures import EMPTY, TOO_LONG, UNAVAILABLE, EnhancerFailed
from engine.enhance.guard import missing_words, with_user_words
from engine.enhance.instructions import system_prompt
from engine.enhance.openai_client import OpenAIClient
from engine.hub.downloads import Downloader

if TYPE_CHECKING:
    from engine.enhance.local import LocalModel

log = logging.getLogger(__name__)

MODES = ("t2v", "i2v", "ti2v")
# About the 512 tokens Wan's text encoder reads, in English; a longer rewrite would be cut without a word.
MAX_CHARS = 2000
# Reasoning models served without a reasoning parser put their thinking in the answer (all of it, when the token
# limit came first); it is no prompt.
THINKING = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
QUOTES = {'"': '"', "'": "'", "“": "”", "«": "»", "「": "」"}


@dataclass(frozen=True)
class Enhanced:
    """What a prompt became: `prompt` is what the video is made from, `original` the user's words; `enhanced` says
    `prompt` is a rewrite, and `note` is the one sentence the user is told when a rewrite was meant and failed."""

    prompt: str
    original: str
    enhanced: bool
    note: str | None = None


class Backend(Protocol):
    def describe(self) -> str: ...

    async def complete(self, system: str, user: str) -> str: ...

    async def close(self) -> None: ...


class Enhancer:
    def __init__(
        self,
        config: PromptsConfig,
        downloader: Downloader,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._local: LocalModel | None = None
        self._backend: Backend | None = None
        if config.enhancer == "openai":
            self._backend = OpenAIClient(config, sleep)
        elif config.enhancer == "local":
            # Imported here: torch and transformers are loaded only where a local model runs.
            from engine.enhance.local import LocalModel

            self._backend = self._local = LocalModel(config, downloader)

    def describe(self) -> str:
        """One line for the start-up log."""
        if self._backend is None:
            return "prompt enhancer: off"
        language = "in the prompt's language" if self._config.enhancer_language == "keep" else "in English"
        return f"prompt enhancer: {self._backend.describe()}; rewrites {language}"

    async def load(self) -> None:
        """Make a local model ready before the first request needs it (downloaded and loaded); nothing to do for the
        others. A failure is logged, not raised: requests then use the user's words, and the next one tries again."""
        if self._local is None:
            return
        try:
            await self._local.load()
        except EnhancerFailed as error:
            log.warning("prompt enhancer (%s) is not ready: %s", self._local.describe(), error)
        except Exception:
            log.exception("prompt enhancer (%s) is not ready", self._local.describe())

    async def enhance(self, prompt: str, mode: str, has_image: bool = False) -> Enhanced:
        """The prompt to make a `mode` video from: the rewrite, or the user's words with a note why not.
        `has_image`: the video starts from the user's picture (always so for i2v)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if self._backend is None or not prompt.strip():
            return Enhanced(prompt, prompt, enhanced=False)
        language = self._config.enhancer_language
        system = system_prompt(language, pictured=mode == "i2v" or (mode == "ti2v" and has_image))
        try:
            rewrite = _checked(tidy(await self._backend.complete(system, prompt)))
        except EnhancerFailed as error:
            log.warning("prompt enhancer (%s) failed; the user's words were used: %s", self._backend.describe(), error)
            return Enhanced(prompt, prompt, enhanced=False, note=error.note)
        except Exception:
            # Anything else (a CUDA error in the local model, a bug) must not fail the request either.
            log.exception("prompt enhancer (%s) failed; the user's words were used", self._backend.describe())
            return Enhanced(prompt, prompt, enhanced=False, note=UNAVAILABLE)
        if lost := missing_words(prompt, rewrite, language):
            rewrite = with_user_words(prompt, rewrite)
            log.info("prompt enhancer left out %s; the user's prompt was put in front of the rewrite", lost)
            if len(rewrite) > MAX_CHARS:
                log.warning(
                    "prompt enhancer: the rewrite with the user's prompt in front is over %d characters; "
                    "the user's words were used",
                    MAX_CHARS,
                )
                return Enhanced(prompt, prompt, enhanced=False, note=TOO_LONG)
        return Enhanced(rewrite, prompt, enhanced=True)

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()


def tidy(text: str) -> str:
    """The prompt in a model's answer: without thinking, one paragraph, no control characters, no enclosing quotes."""
    text = THINKING.sub(" ", text)
    text = " ".join("".join(char for char in part if char.isprintable()) for part in text.split())
    if len(text) >= 2 and QUOTES.get(text[0]) == text[-1]:
        text = text[1:-1].strip()
    return text


def _checked(rewrite: str) -> str:
    if not rewrite:
        raise EnhancerFailed("the answer held no text", EMPTY)
    if len(rewrite) > MAX_CHARS:
        raise EnhancerFailed(f"the rewrite has {len(rewrite)} characters, over {MAX_CHARS}", TOO_LONG)
    return rewrite
