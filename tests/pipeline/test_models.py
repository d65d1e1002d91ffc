from __future__ import annotations

import math
import random

import pytest

from engine.config import WAN_NEGATIVE_PROMPT, GenerationConfig
from engine.errors import UserError
from engine.pipeline.models import (
    I2V_A14B,
    MAX_ASPECT,
    T2V_A14B,
    TI2V_5B,
    TINY_SPECS,
    GenerationRequest,
    ModelRef,
    resolve_model,
    resolve_request,
)
from engine.pipeline.prompts import PromptLengths
from engine.storage.images import ImageInfo, Mode


def image(width: int, height: int) -> ImageInfo:
    return ImageInfo(
        role="start",
        format="PNG",
        width=width,
        height=height,
        mode="RGB",
        has_transparency=False,
        animated=False,
        aspect_ratio=width / height,
        pixel_count=width * height,
        file_size=1,
        decoded_bytes=1,
        source_sha256="x",
    )


def resolve(mode: Mode, spec, start: ImageInfo | None = None, limits: GenerationConfig | None = None, **asked):
    request = GenerationRequest(mode=mode, prompt=asked.pop("prompt", "a fox"), **asked)
    model = ModelRef(name="m", mode=mode, spec=spec)
    return resolve_request(request, model, limits or GenerationConfig(), start=start, rng=random.Random(1))


def test_quality_defaults_are_the_official_settings():
    t2v = resolve(Mode.T2V, T2V_A14B, preset="quality")
    assert (t2v.width, t2v.height, t2v.frames, t2v.fps, t2v.steps) == (832, 480, 81, 16, 40)
    assert (t2v.guidance, t2v.guidance_2) == (4.0, 3.0)
    limits = GenerationConfig(max_pixels=1280 * 704)
    ti2v = resolve(Mode.TI2V, TI2V_5B, start=image(1280, 704), limits=limits, preset="quality")
    assert (ti2v.width, ti2v.height, ti2v.frames, ti2v.fps, ti2v.steps, ti2v.guidance) == (1280, 704, 121, 24, 50, 5.0)
    assert ti2v.adjustments == []


def test_the_negative_prompt_is_wans_default_unless_the_request_or_config_names_one():
    assert resolve(Mode.T2V, T2V_A14B).negative_prompt == WAN_NEGATIVE_PROMPT
    assert resolve(Mode.T2V, T2V_A14B, negative_prompt="  blurry, text ").negative_prompt == "blurry, text"
    assert resolve(Mode.T2V, T2V_A14B, limits=GenerationConfig(negative_prompt="")).negative_prompt == ""


def test_explicit_sizes_snap_to_the_model_multiple_and_say_so():
    params = resolve(Mode.T2V, T2V_A14B, resolution="1010x601")
    assert (params.width, params.height) == (1008, 608)
    assert any("1010x601 became 1008x608" in note for note in params.adjustments)
    portrait = resolve(Mode.T2V, T2V_A14B, resolution="480x832")
    assert (portrait.width, portrait.height) == (480, 832) and portrait.adjustments == []


def test_image_modes_keep_the_area_and_take_the_image_shape():
    params = resolve(Mode.I2V, I2V_A14B, start=image(1920, 1080), resolution="480p")
    assert params.width % 16 == 0 and params.height % 16 == 0
    assert params.width / params.height == pytest.approx(16 / 9, rel=0.03)
    assert params.width * params.height == pytest.approx(832 * 480, rel=0.05)
    portrait = resolve(Mode.TI2V, TI2V_5B, start=image(704, 1280), limits=GenerationConfig(max_pixels=1280 * 704))
    assert (portrait.width, portrait.height) == (704, 1280)


def test_very_wide_or_tall_pictures_are_followed_only_to_the_shape_the_model_makes_well():
    wide = resolve(Mode.I2V, I2V_A14B, start=image(3000, 300))
    assert (wide.width, wide.height) == (976, 400)  # 2.44: as near 2.4:1 as multiples of 16 get at 832x480's area
    assert wide.adjustments[0] == (
        "The picture is 10.0:1; the video is made from its middle at 2.4:1, "
        "because the model makes poor videos in narrower shapes."
    )
    tall = resolve(Mode.TI2V, TI2V_5B, start=image(300, 3000))
    assert tall.height > 2.2 * tall.width and "The picture is 1:10.0;" in tall.adjustments[0]
    usual = resolve(Mode.I2V, I2V_A14B, start=image(1920, 1080))
    assert not any("middle" in note for note in usual.adjustments)


def test_a_thin_or_wide_t2v_size_keeps_its_area_at_the_nearest_shape_the_model_makes_well():
    tall = resolve(Mode.T2V, T2V_A14B, resolution="1x921600")
    assert (tall.width, tall.height) == (624, 1472)  # not 16x921600: 16 times the 921,600 pixels allowed
    assert tall.adjustments == [
        "Size 1x921600 became 624x1472 to be no taller than 1:2.4 (the model makes poor videos in narrower shapes), "
        "to stay within 921,600 pixels a frame and in multiples of 16."
    ]
    wide = resolve(Mode.T2V, T2V_A14B, resolution="3000x300")
    assert (wide.width, wide.height) == (1472, 608)  # 900,000 pixels asked, 894,976 made
    assert wide.adjustments == [
        "Size 3000x300 became 1472x608 to be no wider than 2.4:1 (the model makes poor videos in narrower shapes) "
        "and in multiples of 16."
    ]
    assert resolve(Mode.T2V, T2V_A14B, resolution="1152x480").adjustments == []  # 2.4:1 itself is made as asked


@pytest.mark.parametrize("spec", [T2V_A14B, TI2V_5B, TINY_SPECS[Mode.T2V]], ids=lambda spec: spec.family)
@pytest.mark.parametrize("max_pixels", [64 * 64, 832 * 480, 1280 * 720])
def test_no_size_frames_or_picture_leaves_the_frame_limit_or_the_models_multiples(spec, max_pixels: int):
    limits = GenerationConfig(max_pixels=max_pixels, max_frames=100)
    mode = Mode.T2V if spec.pipeline == "WanPipeline" else Mode.TI2V
    sizes = ("1x1", "1x2", "33x79", "1010x601", "1x921600", "921600x1", "16x100000", "1000000x1000000")
    for size in sizes:
        for frames in (1, 50, 500):
            for start in (None, image(1, 1000), image(3000, 300), image(1920, 1080)):
                params = resolve(mode, spec, start=start, limits=limits, resolution=size, frames=frames)
                width, height, multiple = params.width, params.height, spec.multiple
                assert width * height <= max_pixels, (size, start)
                assert width % multiple == 0 and height % multiple == 0 and min(width, height) >= multiple
                assert max(width, height) <= MAX_ASPECT * min(width, height) + multiple, (size, start)
                assert params.frames <= 100 and params.frames % 4 == 1
                if f"{width}x{height}" != size:
                    assert any(note.startswith(f"Size {size} became {width}x{height} ") for note in params.adjustments)


def test_sizes_past_any_frame_or_in_other_digits_are_user_errors():
    with pytest.raises(UserError, match="'1000001x480' has a side over 1,000,000 pixels") as caught:
        resolve(Mode.T2V, T2V_A14B, resolution="1000001x480")
    assert caught.value.hint == "Use 480p, 720p, or a size such as 832x480."
    with pytest.raises(UserError, match="has a side over"):  # was an OverflowError: too large for float arithmetic
        resolve(Mode.T2V, T2V_A14B, resolution="9" * 400 + "x9")
    with pytest.raises(UserError, match="is not a resolution"):  # "²" is a digit to str.isdigit, but not to int()
        resolve(Mode.T2V, T2V_A14B, resolution="²x480")


@pytest.mark.parametrize("field", ["guidance", "steps", "frames", "seed"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "-Infinity", "1e999"], ids=repr)
def test_a_number_that_is_not_finite_is_refused_with_what_to_give_instead(field: str, value: float | str):
    with pytest.raises(UserError) as caught:
        GenerationRequest(mode=Mode.T2V, prompt="a fox", **{field: value})
    assert caught.value.message.startswith(f"{field} must be a finite number, not '")
    assert caught.value.hint.startswith(f"Give a plain number, for example {field}=")
    assert getattr(GenerationRequest(mode=Mode.T2V, prompt="a fox", **{field: 5}), field) == 5


def test_frames_snap_to_4k_plus_1_within_the_limit():
    assert resolve(Mode.T2V, T2V_A14B, frames=50).frames == 49
    assert resolve(Mode.T2V, T2V_A14B, frames=2).frames == 5
    capped = resolve(Mode.T2V, T2V_A14B, frames=500, limits=GenerationConfig(max_frames=100))
    assert capped.frames == 97
    assert any("4k+1" in note and "97 instead of 500" in note for note in capped.adjustments)


def test_limits_on_pixels_steps_and_guidance():
    params = resolve(
        Mode.T2V,
        T2V_A14B,
        resolution="720p",
        steps=500,
        guidance=99,
        preset="quality",
        limits=GenerationConfig(max_pixels=832 * 480, max_steps=50),
    )
    assert params.width * params.height <= 832 * 480
    assert params.steps == 50 and params.guidance == 20
    assert params.adjustments[0] == (
        f"Size 1280x720 became {params.width}x{params.height} to stay within 399,360 pixels a frame and in multiples "
        "of 16."
    )
    assert len(params.adjustments) == 3


def test_seed_is_chosen_when_missing_and_checked_when_given():
    assert resolve(Mode.T2V, T2V_A14B).seed == random.Random(1).randrange(2**32)
    assert resolve(Mode.T2V, T2V_A14B, seed=5).seed == 5
    with pytest.raises(UserError, match="out of range"):
        resolve(Mode.T2V, T2V_A14B, seed=-1)


def test_unknown_resolution_and_empty_prompt_are_user_errors():
    with pytest.raises(UserError, match="'4k' is not a resolution") as caught:
        resolve(Mode.T2V, T2V_A14B, resolution="4k")
    assert "480p, 720p" in caught.value.hint
    with pytest.raises(UserError, match="t2v needs a prompt"):
        resolve(Mode.T2V, T2V_A14B, prompt="")
    assert resolve(Mode.I2V, I2V_A14B, start=image(832, 480), prompt="").prompt == ""
    assert len(resolve(Mode.T2V, T2V_A14B, prompt="a fox " * 600).prompt) == 3599  # long, but counted in tokens
    with pytest.raises(UserError, match="The prompt is 4199 characters; the limit is 4000"):
        resolve(Mode.T2V, T2V_A14B, prompt="a fox " * 700)


def test_model_names_resolve_to_specs(tiny_models):
    assert resolve_model("tiny", Mode.I2V).name == "tiny-i2v"
    assert resolve_model("Wan-AI/Wan2.2-TI2V-5B-Diffusers", Mode.TI2V).spec is TI2V_5B
    local = resolve_model(str(tiny_models / "tiny-ti2v"), Mode.TI2V)
    assert local.spec.family == "wan2.2-ti2v-5b" and local.is_local
    assert resolve_model(str(tiny_models / "tiny-i2v"), Mode.I2V).spec.two_experts
    with pytest.raises(UserError, match="text-to-video only"):
        resolve_model(str(tiny_models / "tiny-t2v"), Mode.I2V)
    with pytest.raises(UserError, match="neither a folder on this machine nor a Hub repo id"):
        resolve_model("no-such-model", Mode.T2V)
    with pytest.raises(UserError, match="for another mode"):
        resolve_model("tiny-t2v", Mode.I2V)


async def test_a_tokenizer_that_does_not_load_never_refuses_a_request_and_is_tried_once(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text("{ not json")
    looked_up = []
    lengths = PromptLengths(lambda model: looked_up.append(model.name) or tmp_path)
    model = resolve_model("tiny", Mode.T2V)
    params = resolve(Mode.T2V, T2V_A14B, prompt="w1 " * 600)
    assert await lengths.warnings(model, params) == []
    assert await lengths.warnings(model, params) == []
    assert looked_up == ["tiny-t2v"]
