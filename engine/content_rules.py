"""The content rules (safety) as the engine applies them: a prompt's blocked terms before anything is queued, the
picture classifier on a request's pictures before queueing and on a few frames of each video before it is sent,
and what a flagged video gets where it would be shown (safety.policy). Every refusal is logged and counted.

The classifier (engine/safety/classifier.py) imports torch: it is imported only where safety.classifier is on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from engine.config import Policy, SafetyConfig
from engine.errors import UserError
from engine.hub.downloads import Downloader
from engine.jobs import Job, PlaceKind
from engine.safety.terms import BlockedTerms

if TYPE_CHECKING:
    from engine.safety.classifier import PictureClassifier, Verdict

log = logging.getLogger(__name__)
# What a video gets when the classifier could not look at it: the place's policy, as for a flagged one.
UNCHECKED = "unchecked (the content check failed)"
PLACE_WORDS = {"public": "in this chat", "age_restricted": "in this channel", "private": "here"}


class ContentRules:
    def __init__(self, config: SafetyConfig, downloader: Downloader | None = None) -> None:
        self._config = config
        self._terms = BlockedTerms(config)
        self._classifier: PictureClassifier | None = None
        if config.classifier != "off":
            from engine.safety.classifier import PictureClassifier

            assert downloader is not None, "a classifier is fetched through the Downloader"
            self._classifier = PictureClassifier(config, downloader, downloader.root)
        # Set where this process serves /metrics: each refusal's reason is counted there.
        self.on_refused: Callable[[str], None] = lambda reason: None

    def describe(self) -> str | None:
        """The content rules in one line for the start-up lines; None where there are none."""
        parts = []
        if self._config.blocked_terms:
            parts.append(f"{len(self._config.blocked_terms)} blocked terms")
        if self._classifier is not None:
            policy = self._config.policy
            parts.append(
                f"{self._classifier.describe()}; flagged videos: {policy.public} in public places, "
                f"{policy.age_restricted} in age-restricted channels, {policy.private} in private chats"
            )
        return f"content rules: {', '.join(parts)}" if parts else None

    async def load(self) -> None:
        """The classifier fetched and loaded before the first picture needs it; a failure is said, not raised: until
        it loads, pictures are refused and videos are treated as flagged."""
        if self._classifier is None:
            return
        from engine.safety.classifier import ClassifierUnavailable

        try:
            await self._classifier.load()
        except ClassifierUnavailable as error:
            log.error("%s; until it loads, pictures are refused and every video is treated as flagged", error)

    async def close(self) -> None:
        if self._classifier is not None:
            await self._classifier.close()

    def check_prompt(self, *texts: str | None) -> None:
        """Raise the operator's sentence (a UserError) when a prompt holds a blocked term; counted and logged."""
        try:
            self._terms.check_prompt(*texts)
        except UserError:
            self.refused("blocked_term", "a prompt held a blocked term")
            raise

    def holds_blocked_term(self, text: str) -> bool:
        return self._terms.find(text) is not None

    async def picture_flag(self, pictures: Sequence[Image.Image], place: PlaceKind) -> str | None:
        """What the classifier flags in a request's pictures ("nsfw 0.98"), where the place's policy lets the job run
        all the same; a UserError where it blocks them, or where the classifier cannot look at them."""
        if self._classifier is None or not pictures:
            return None
        from engine.safety.classifier import ClassifierUnavailable

        try:
            verdict = await self._classifier.check(pictures)
        except ClassifierUnavailable as error:
            log.error("content check of a request's pictures failed: %s", error)
            self.refused("picture", "the content check could not look at a request's pictures")
            raise UserError(
                "This bot cannot check pictures right now, so it takes none.",
                "Ask without a picture, or try again later; the admin has been told.",
            ) from None
        if not verdict.flagged:
            return None
        if self._config.policy_for(place) == "block":
            self.refused("picture", f"a request's picture was flagged {_flag(verdict)}")
            raise UserError(
                f"This picture is not allowed {PLACE_WORDS[place]}: the content check flagged it as {verdict.label}.",
                "Send another picture.",
            )
        return _flag(verdict)

    async def video_flag(self, frames: np.ndarray, indices: Sequence[int]) -> str | None:
        """What the classifier flags in a finished video's frames (float RGB in [0, 1]); UNCHECKED where it cannot
        look, so the place's policy decides as for a flagged video."""
        if self._classifier is None:
            return None
        from engine.safety.classifier import ClassifierUnavailable

        pictures = await asyncio.to_thread(_pictures, frames, indices)  # off the worker's event loop
        try:
            verdict = await self._classifier.check(pictures)
        except ClassifierUnavailable as error:
            log.error("content check of a video failed: %s; it is treated as flagged", error)
            return UNCHECKED
        return _flag(verdict) if verdict.flagged else None

    def frames_to_check(self, frames: int) -> list[int]:
        from engine.safety.classifier import frames_to_check

        return frames_to_check(frames, self._config.video_frames)

    @property
    def checks_videos(self) -> bool:
        return self._classifier is not None

    def video_policy(self, job: Job, place: str | None = None) -> Policy:
        """What `job`'s finished video gets where it would be shown (its own place, or `place`): `allow` unless
        something was flagged."""
        flagged = job.result.flagged if job.result is not None else job.params.flagged
        return "allow" if flagged is None else self._config.policy_for(place or job.source.place)

    def refuse_video(self, job: Job) -> str:
        """The sentence a withheld video's owner reads; counted and logged."""
        flagged = job.result.flagged if job.result is not None else None
        self.refused("video", f"job={job.id}'s video was withheld ({flagged})")
        if flagged == UNCHECKED:
            return "the content check could not look at it, and unchecked videos are not sent here"
        label = (flagged or "").rsplit(" ", 1)[0]
        return f"the content check flagged it as {label}, and such videos are not sent {PLACE_WORDS[job.source.place]}"

    def refused(self, reason: str, what: str) -> None:
        """Log and count one refusal (metrics' wanbot_refused_total{reason}): a quota's too."""
        log.warning("refused (%s): %s", reason, what)
        self.on_refused(reason)


def _pictures(frames: np.ndarray, indices: Sequence[int]) -> list[Image.Image]:
    return [Image.fromarray((frames[index] * 255).round().clip(0, 255).astype(np.uint8)) for index in indices]


def _flag(verdict: Verdict) -> str:
    return f"{verdict.label} {verdict.score:.2f}"
