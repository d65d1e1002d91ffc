"""The enhancer on an OpenAI-compatible endpoint: `POST {enhancer_url}/chat/completions`.

vLLM, llama.cpp's server, Ollama, LM Studio and hosted APIs all speak it, so the model can live on another machine
(or GPU) instead of being loaded beside Wan for every job. A try is limited by prompts.enhancer_timeout_s; connection
errors, timeouts, 429 and 5xx are tried again with exponential backoff, other answers are final.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from engine.config import PromptsConfig
from engine.enhance.failures import NOT_IN_TIME, UNAVAILABLE, UNUSABLE, EnhancerFailed

BACKOFF_S = 0.5  # the first wait before another try; doubles each time
SHOWN_BODY_CHARS = 200  # of an error answer, in the log: enough for the server's reason, not a whole HTML page


class _Transient(EnhancerFailed):
    """A failure worth another try."""


class OpenAIClient:
    def __init__(
        self,
        config: PromptsConfig,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        self._config = config
        self._url = f"{config.enhancer_url.rstrip('/')}/chat/completions"
        # Read once, at start, like the other secrets; never logged or shown.
        key = os.environ.get(config.enhancer_key_env)
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._sleep = sleep
        self._backoff_s = backoff_s
        self._session: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        model = f" (model {self._config.enhancer_model})" if self._config.enhancer_model else ""
        key_env = self._config.enhancer_key_env
        key = f"key from ${key_env}" if self._headers else f"no key (${key_env} unset)"
        return f"openai at {self._config.enhancer_url}{model}, {self._config.enhancer_timeout_s:g} s timeout, {key}"

    async def complete(self, system: str, user: str) -> str:
        """The endpoint's rewrite of `user` under `system`; EnhancerFailed once the tries are spent."""
        body = {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "max_tokens": self._config.enhancer_max_new_tokens,
            "temperature": 0,  # the same prompt gives the same rewrite, as the local model's greedy decoding does
        }
        if self._config.enhancer_model:  # else the server's own model: llama.cpp and vLLM serve one by default
            body["model"] = self._config.enhancer_model
        retries = self._config.enhancer_retries
        for attempt in range(retries + 1):
            try:
                return _content(await self._post(body), self._url)
            except _Transient as error:
                if attempt == retries:
                    raise EnhancerFailed(f"{error} (after {attempt + 1} tries)", error.note) from None
            await self._sleep(self._backoff_s * 2**attempt * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, body: dict[str, Any]) -> Any:
        # One session, kept: its connections are reused, so a request does not pay for a new TCP (or TLS) handshake.
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        timeout = aiohttp.ClientTimeout(total=self._config.enhancer_timeout_s)
        try:
            async with self._session.post(self._url, json=body, timeout=timeout) as response:
                text = await response.text(errors="replace")
                status = response.status
        except TimeoutError:
            raise _Transient(
                f"no answer from {self._url} within {self._config.enhancer_timeout_s:g} s", NOT_IN_TIME
            ) from None
        except aiohttp.ClientError as error:
            raise _Transient(
                f"{self._url} could not be reached ({type(error).__name__}: {error})", UNAVAILABLE
            ) from None
        if status == 429 or status >= 500:
            raise _Transient(f"{self._url} answered HTTP {status}: {text[:SHOWN_BODY_CHARS]}", UNAVAILABLE)
        if status >= 400:
            raise EnhancerFailed(f"{self._url} answered HTTP {status}: {text[:SHOWN_BODY_CHARS]}", UNAVAILABLE)
        try:
            return json.loads(text)
        except ValueError:
            raise EnhancerFailed(f"{self._url} answered with something that is not JSON", UNUSABLE) from None


def _content(answer: Any, url: str) -> str:
    """choices[0].message.content of a chat completion."""
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        content = None
    if not isinstance(content, str):
        shown = json.dumps(answer)[:SHOWN_BODY_CHARS]
        raise EnhancerFailed(f"{url} answered without choices[0].message.content: {shown}", UNUSABLE)
    return content
