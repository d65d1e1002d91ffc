"""What a request becomes before it is queued, beside the limits and the pictures: a loop's settings (its end
picture, a t2v loop's second pass) and the prompt enhancer's rewrite, with the note a user reads when it is not used.
The facade (engine/service.py) calls these on its submit path; the CLI's checks use the loop's rules too."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from engine.config import Settings
from engine.enhance.enhancer import Enhanced, Enhancer
from engine.enhance.failures import NOT_IN_TIME
from engine.errors import UserError
from engine.jobs import GenerationParams
from engine.pipeline.models import GenerationRequest, ModelRef, model_for_mode, with_triggers
from engine.storage.images import Mode

log = logging.getLogger(__name__)
# How a job's notes begin the enhancer's rewrite of its prompt (the user's own words are kept beside it).
ENHANCED_NOTE = "Prompt enhanced"
ENHANCER_BLOCKED = "The enhancer's rewrite held words this bot does not allow, so your own words were used."
ENHANCER_SLACK_S = 5.0  # beyond the enhancer's own tries and timeouts: its backoff waits
LOOP_NOTE = (
    "Loop: made in two passes, a short t2v video for its first frame, then the i2v model from that frame back to it."
)


@dataclass
class Upload:
    """An attachment as downloaded by an adapter: raw bytes and the name the user gave it (if any)."""

    data: bytes
    filename: str | None = None


def looped(settings: Settings, request: GenerationRequest, params: GenerationParams) -> GenerationParams:
    """A loop's settings: an i2v loop ends on its start picture (loop_end); a t2v loop is made in two passes, the
    second by the i2v model from the first pass's first frame back to it."""
    if not request.loop:
        return params
    if request.mode is Mode.I2V:
        return params.model_copy(update={"loop": True})
    second = loop_model(settings)
    for use in params.loras:
        if "i2v" not in settings.loras[use.name].modes:
            raise UserError(
                f"A t2v loop's second pass is i2v, and the LoRA {use.name} is not for i2v.",
                "Ask without it, or without loop=yes.",
            )
    return params.model_copy(
        update={"loop": True, "loop_model": second.name, "adjustments": [*params.adjustments, LOOP_NOTE]}
    )


async def enhanced(
    enhancer: Enhancer,
    settings: Settings,
    blocked: Callable[[str], bool],
    params: GenerationParams,
    request: GenerationRequest,
    has_image: bool,
) -> GenerationParams:
    """`params` with the enhancer's rewrite of the prompt (the user's words kept beside it, a LoRA's trigger words
    put back); the user's words, with a note, where it failed, took too long, or wrote a term `blocked` refuses."""
    config = settings.prompts
    try:
        # Its own tries each have their timeout; this bounds them all, so one request never holds its user long.
        async with asyncio.timeout(config.enhancer_timeout_s * (config.enhancer_retries + 1) + ENHANCER_SLACK_S):
            rewrite = await enhancer.enhance(params.prompt, request.mode.value, has_image)
    except TimeoutError:
        log.warning("prompt enhancer took longer than all its tries may; the user's words were used")
        rewrite = Enhanced(params.prompt, params.prompt, enhanced=False, note=NOT_IN_TIME)
    if rewrite.enhanced and blocked(rewrite.prompt):
        rewrite = Enhanced(params.prompt, params.prompt, enhanced=False, note=ENHANCER_BLOCKED)
    if not rewrite.enhanced:
        return params.model_copy(update={"warnings": [*params.warnings, *filter(None, [rewrite.note])]})
    prompt = with_triggers(rewrite.prompt, params.loras, settings.loras, [])
    adjustments = [*params.adjustments, f"{ENHANCED_NOTE}: {prompt}"]
    return params.model_copy(update={"prompt": prompt, "original_prompt": rewrite.original, "adjustments": adjustments})


def loop_model(settings: Settings) -> ModelRef:
    """The model of a t2v loop's second pass: the i2v one, which must aim at an end frame."""
    second = model_for_mode(Mode.I2V, settings)
    if not second.spec.uses_end_image:
        raise UserError(
            f"A t2v loop needs an i2v model that aims at an end frame, and this bot's ({second.name}) does not.",
            "Ask without loop=yes.",
        )
    return second


def loop_end(request: GenerationRequest, start: Upload | None, end: Upload | None) -> Upload | None:
    """The end picture of a request: for an i2v loop, its start picture again (it returns to where it began)."""
    if not request.loop:
        return end
    if request.mode is Mode.TI2V:
        raise UserError("TI2V-5B cannot aim at an end frame, so it makes no loops.", "Use mode=i2v or mode=t2v.")
    if request.mode is Mode.I2V and end is not None:
        raise UserError(
            "A loop ends on its start picture, so it takes no end picture.",
            "Send one picture with loop=yes, or two without it.",
        )
    return start if request.mode is Mode.I2V else end
