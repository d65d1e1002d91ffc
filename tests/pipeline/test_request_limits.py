"""Sizes and numbers from a chat message are checked where the message is read and resolved, before a job is queued:
a bad one is a sentence for the user, never a job that fails later with "something went wrong"."""

from __future__ import annotations

import pytest

from bot.chat.texts import parse_message
from engine.config import GenerationConfig
from engine.errors import UserError
from engine.jobs import GenerationParams
from engine.pipeline.models import resolve_model, resolve_request
from engine.storage.images import Mode


def from_chat(text: str) -> GenerationParams:
    request = parse_message(text, None, has_image=False).request
    return resolve_request(request, resolve_model("Wan-AI/Wan2.2-T2V-A14B-Diffusers", Mode.T2V), GenerationConfig())


def test_a_thin_size_from_chat_is_made_within_the_frame_limit_and_the_user_is_told():
    params = from_chat("a fox size=16x100000")
    assert (params.width, params.height) == (624, 1472)  # was 16x75888, which failed in the pipeline
    assert params.width * params.height <= GenerationConfig().max_pixels
    assert params.adjustments == [
        "Size 16x100000 became 624x1472 to be no taller than 1:2.4 (the model makes poor videos in narrower shapes), "
        "to stay within 921,600 pixels a frame and in multiples of 16."
    ]


def test_a_size_past_any_frame_is_refused_when_the_message_is_read():
    with pytest.raises(UserError, match="'99999999x1' has a side over 1,000,000 pixels"):
        from_chat("a fox res=99999999x1")


@pytest.mark.parametrize("text", ["guidance=nan", "guidance=NaN", "cfg=inf", "guidance=-inf", "guidance=1e999"])
def test_guidance_that_is_not_a_finite_number_is_refused_with_what_to_give_instead(text: str):
    with pytest.raises(UserError) as caught:
        parse_message(f"a fox {text}", None, has_image=False)
    assert caught.value.message.startswith("guidance must be a finite number, not '")
    assert caught.value.hint == "Give a plain number, for example guidance=4."
    assert parse_message("a fox guidance=4.5", None, has_image=False).request.guidance == 4.5


@pytest.mark.parametrize(("key", "raw"), [("steps", "nan"), ("frames", "inf"), ("seed", "-inf"), ("seed", "1e999")])
def test_whole_number_options_that_are_not_finite_are_refused_with_what_to_give_instead(key: str, raw: str):
    with pytest.raises(UserError) as caught:
        parse_message(f"a fox {key}={raw}", None, has_image=False)
    assert caught.value.message == f"{key} must be a number, not '{raw}'."
    assert caught.value.hint.startswith(f"For example {key}=")
