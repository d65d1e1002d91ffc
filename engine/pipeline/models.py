"""The model registry: which Wan 2.2 model serves each mode, its official settings, and request resolution.

A model is named by a Hub repo id, a local diffusers folder, or `tiny` (a tiny offline model per mode). Requests
are resolved against the model's spec before they are queued, and every change made to what the user asked for is
recorded as a sentence they can read.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from engine.config import GenerationConfig, Settings, StyleLoraConfig
from engine.errors import UserError, counted, quoted
from engine.jobs import GenerationParams, LoraUse
from engine.pipeline.presets import FASTWAN_DMD, LIGHTX2V_EULER, Preset, Sampling, choose_preset
from engine.storage.images import ImageInfo, Mode

TINY = "tiny"
# Where the stand-ins of [loras] entries with repo = "tiny" are built, under the models folder.
TINY_STYLE_FOLDER = "tiny-style-loras"
# A sanity bound, not the model's: the text encoder's 512 tokens are counted with its own tokenizer
# (engine/pipeline/prompts.py).
MAX_PROMPT_CHARS = 4000
# Widest (and, turned, tallest) video shape an image is followed to; Wan is trained on 16:9 and 9:16.
MAX_ASPECT = 2.4
# Far past any frame the limits allow; the bound keeps the size arithmetic within floats.
MAX_SIDE = 1_000_000
# What to suggest for a numeric option that is not a finite number.
NUMBER_EXAMPLES = {"seed": "42", "steps": "30", "frames": "49", "guidance": "4"}
YES, NO = {"yes", "on", "true", "1"}, {"no", "off", "false", "0"}


@dataclass(frozen=True)
class FastSpec:
    """How a model family runs the fast preset: its distilled schedule, and whether the distilled weights are a LoRA
    pair fused into both experts (models.fast_loras) or a model of their own (models.fast_ti2v)."""

    sampling: Sampling
    weights: Literal["lora", "model"]


@dataclass(frozen=True)
class ModelSpec:
    """Official settings of one model family (../shared/REFERENCE.md)."""

    family: str
    pipeline: str  # "WanPipeline" or "WanImageToVideoPipeline"
    presets: dict[str, tuple[int, int]]  # name -> landscape (width, height); portrait is the swap
    default_preset: str
    multiple: int  # width and height must be multiples of this (VAE scale x patch size)
    default_frames: int
    fps: int
    steps: int
    guidance: float
    guidance_2: float | None = None
    boundary_ratio: float | None = None
    flow_shift: float | None = None
    uses_end_image: bool = False
    size_follows_image: bool = False
    full_vram_gb: float = 0.0  # roughly what "all on GPU" needs; below it, offload
    # Peak GB with one component on the GPU at a time, by the largest frame it makes (official figures): below
    # that, group offload.
    offload_vram_gb: tuple[tuple[int, float], ...] = ()
    fast: FastSpec | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    def offload_need_gb(self, max_pixels: int) -> float:
        """What model offload needs for the largest frame allowed: the figure of the smallest size covering it."""
        covering = [gb for pixels, gb in self.offload_vram_gb if pixels >= max_pixels]
        return covering[0] if covering else max((gb for _, gb in self.offload_vram_gb), default=0.0)


A14B_PRESETS = {"480p": (832, 480), "720p": (1280, 720)}
A14B_OFFLOAD_GB = ((832 * 480, 42.0), (1280 * 720, 60.0))  # 41.3 and 59.8 GB on an H100

T2V_A14B = ModelSpec(
    family="wan2.2-t2v-a14b",
    pipeline="WanPipeline",
    presets=A14B_PRESETS,
    default_preset="480p",
    multiple=16,
    default_frames=81,
    fps=16,
    steps=40,
    guidance=4.0,
    guidance_2=3.0,
    boundary_ratio=0.875,
    flow_shift=12.0,
    full_vram_gb=80,
    offload_vram_gb=A14B_OFFLOAD_GB,
    fast=FastSpec(LIGHTX2V_EULER, "lora"),
)
I2V_A14B = ModelSpec(
    family="wan2.2-i2v-a14b",
    pipeline="WanImageToVideoPipeline",
    presets=A14B_PRESETS,
    default_preset="480p",
    multiple=16,
    default_frames=81,
    fps=16,
    steps=40,
    guidance=3.5,
    guidance_2=3.5,
    boundary_ratio=0.9,
    flow_shift=5.0,
    uses_end_image=True,
    size_follows_image=True,
    full_vram_gb=80,
    offload_vram_gb=A14B_OFFLOAD_GB,
    fast=FastSpec(LIGHTX2V_EULER, "lora"),
)
TI2V_5B = ModelSpec(
    family="wan2.2-ti2v-5b",
    pipeline="WanImageToVideoPipeline",
    presets={"720p": (1280, 704)},
    default_preset="720p",
    multiple=32,
    default_frames=121,
    fps=24,
    steps=50,
    guidance=5.0,
    flow_shift=5.0,
    size_follows_image=True,
    full_vram_gb=40,
    offload_vram_gb=((1280 * 704, 23.0),),  # 22.9 GB at 720p on an RTX 4090
    fast=FastSpec(FASTWAN_DMD, "model"),
)


def _tiny(spec: ModelSpec, mode: Mode) -> ModelSpec:
    """The tiny model mirrors the real one's wiring and settings, at a size a CPU runs in seconds."""
    return replace(
        spec,
        family=f"tiny-{mode.value}",
        presets={"tiny": (64, 64)},
        default_preset="tiny",
        default_frames=9,
        steps=4,
        full_vram_gb=0,
        offload_vram_gb=(),
    )


TINY_SPECS = {
    Mode.T2V: _tiny(T2V_A14B, Mode.T2V),
    Mode.I2V: _tiny(I2V_A14B, Mode.I2V),
    Mode.TI2V: _tiny(TI2V_5B, Mode.TI2V),
}
KNOWN_REPOS = {
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": T2V_A14B,
    "Wan-AI/Wan2.2-I2V-A14B-Diffusers": I2V_A14B,
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": TI2V_5B,
}
SPEC_FOR_MODE = {Mode.T2V: T2V_A14B, Mode.I2V: I2V_A14B, Mode.TI2V: TI2V_5B}


@dataclass(frozen=True)
class ModelRef:
    """A model as a job refers to it: a canonical name (the queue's `model`) and its spec."""

    name: str
    mode: Mode
    spec: ModelSpec

    @property
    def is_tiny(self) -> bool:
        return self.name.startswith(f"{TINY}-")

    @property
    def is_local(self) -> bool:
        return Path(self.name).is_dir()


def model_for_mode(mode: Mode, settings: Settings, override: str | None = None) -> ModelRef:
    """The model that serves `mode`: the override if given, else `models.<mode>` from the configuration."""
    name = override or getattr(settings.models, mode.value)
    return resolve_model(name, mode)


def resolve_model(name: str, mode: Mode) -> ModelRef:
    if name in (TINY, f"{TINY}-{mode.value}"):
        return ModelRef(name=f"{TINY}-{mode.value}", mode=mode, spec=TINY_SPECS[mode])
    if name.startswith(f"{TINY}-"):
        raise UserError(f"Model {name} is for another mode than {mode}.", f"Use '{TINY}' or '{TINY}-{mode.value}'.")
    folder = Path(name).expanduser()
    if folder.is_dir():
        return ModelRef(name=str(folder.resolve()), mode=mode, spec=_spec_from_folder(folder, mode))
    if name.count("/") != 1 or name.startswith(("/", ".", "~")):
        raise UserError(
            f"Model '{name}' is neither a folder on this machine nor a Hub repo id.",
            "Fix models.<mode> in the configuration: a folder, 'tiny', or an id like Wan-AI/Wan2.2-T2V-A14B-Diffusers.",
        )
    spec = KNOWN_REPOS.get(name, SPEC_FOR_MODE[mode])
    _check_spec_serves(spec, mode, name)
    return ModelRef(name=name, mode=mode, spec=spec)


def _spec_from_folder(folder: Path, mode: Mode) -> ModelSpec:
    """Read a local diffusers folder's shape: two experts or one, and the latent width, to pick its family."""
    index_path = folder / "model_index.json"
    if not index_path.exists():
        raise UserError(f"The folder {folder} has no model_index.json, so it is not a diffusers model.")
    index = json.loads(index_path.read_text())
    transformer_config = json.loads((folder / "transformer" / "config.json").read_text())
    has_two_experts = bool(index.get("transformer_2") and index["transformer_2"][0])
    channels = transformer_config.get("in_channels", 16)
    if channels == 48 or index.get("expand_timesteps"):
        spec = TI2V_5B
    elif channels == 36:
        spec = I2V_A14B
    else:
        spec = T2V_A14B
    if not has_two_experts and spec.two_experts:
        # The distilled LoRAs come as a pair, one per expert.
        spec = replace(spec, boundary_ratio=None, guidance_2=None, fast=None)
    _check_spec_serves(spec, mode, str(folder))
    return spec


def _check_spec_serves(spec: ModelSpec, mode: Mode, name: str) -> None:
    if mode is Mode.T2V and spec.pipeline != "WanPipeline":
        raise UserError(f"Model {name} needs a start image, so it cannot serve t2v.", "Set models.t2v to a T2V model.")
    if mode is not Mode.T2V and spec.pipeline == "WanPipeline":
        raise UserError(
            f"Model {name} is text-to-video only and cannot serve {mode}.", f"Set models.{mode} accordingly."
        )


class GenerationRequest(BaseModel):
    """What a user asked for, before it is checked and completed against the model."""

    mode: Mode
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    resolution: str | None = Field(None, description="A preset name like '480p' or 'WxH'.")
    frames: int | None = None
    preset: Preset | None = Field(None, description="fast or quality; None: generation.default_preset.")
    loras: list[str] = Field(
        default_factory=list, description="LoRAs of [loras] as NAME or NAME:WEIGHT (commas may join several)."
    )
    enhance: bool | None = Field(
        None, description="Rewrite the prompt with the enhancer (prompts.enhancer); None: the chat's choice."
    )
    loop: bool = Field(False, description="A video that returns to its first frame (i2v and t2v).")

    @field_validator("enhance", "loop", mode="before")
    @classmethod
    def _yes_or_no(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in YES or text in NO:
            return text in YES
        name = str(info.field_name)
        raise UserError(f"{name} must be yes or no, not {quoted(str(value))}.", f"Use {name}=yes or {name}=no.")

    @field_validator("preset", mode="before")
    @classmethod
    def _known_preset(cls, value: Any) -> Any:
        # A chat option arrives as text; pydantic's own enum error would not say what to write instead.
        if value is None or isinstance(value, Preset):
            return value
        text = str(value).strip().lower()
        if text not in {preset.value for preset in Preset}:
            raise UserError(
                f"preset must be fast or quality, not {quoted(str(value))}.",
                "Use preset=fast (seconds to a minute) or preset=quality (the official settings, minutes).",
            )
        return text

    @field_validator("seed", "steps", "frames", "guidance", mode="before")
    @classmethod
    def _finite(cls, value: Any, info: ValidationInfo) -> Any:
        # nan fails every comparison, so the range checks in resolve_request would pass it on to fail in the
        # pipeline with no word why; inf is no number a user meant either. A UserError, unlike a ValueError, comes
        # out of pydantic as it is, so every adapter shows it as it shows the other request errors.
        try:
            finite = value is None or math.isfinite(float(value))
        except (TypeError, ValueError, OverflowError):
            return value  # not a number at all, or a huge whole one: pydantic's own checks and the ranges handle it
        if not finite:
            name = str(info.field_name)
            raise UserError(
                f"{name} must be a finite number, not {quoted(str(value))}.",
                f"Give a plain number, for example {name}={NUMBER_EXAMPLES[name]}.",
            )
        return value


def resolve_request(
    request: GenerationRequest,
    model: ModelRef,
    limits: GenerationConfig,
    start: ImageInfo | None = None,
    end: ImageInfo | None = None,
    rng: random.Random | None = None,
    loras_offered: Mapping[str, StyleLoraConfig] | None = None,
) -> GenerationParams:
    """Fill defaults, snap sizes and frames to what the model accepts, and say what was adjusted. `loras_offered`:
    the [loras] a request may name (none without it)."""
    spec = model.spec
    adjustments: list[str] = []
    warnings: list[str] = []
    prompt = request.prompt.strip()
    if not prompt and request.mode is Mode.T2V:
        raise UserError("t2v needs a prompt.", "Describe the video you want, for example: a red fox running in snow.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(
            f"The prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}.",
            "The model reads 512 tokens, about 2000 characters of English; shorten the prompt.",
        )
    loras = resolve_loras(request.loras, loras_offered or {}, request.mode, spec, limits.max_loras)
    prompt = with_triggers(prompt, loras, loras_offered or {}, adjustments)
    width, height = _resolve_size(request.resolution, spec, limits, start, adjustments)
    frames = _resolve_frames(request.frames, spec, limits, adjustments)
    fast_steps = spec.fast.sampling.steps if spec.fast else None
    choice = choose_preset(
        request.preset, Preset(limits.default_preset), request.steps, request.guidance, fast_steps, spec.family
    )
    adjustments.extend(choice.notes)
    if choice.preset is Preset.FAST and fast_steps is not None:
        # Both experts without guidance: guidance_scale alone decides whether the unconditional pass runs at all.
        steps, guidance, guidance_2 = fast_steps, 1.0, (1.0 if spec.two_experts else None)
    else:
        steps, guidance, guidance_2 = _steps_and_guidance(request.steps, request.guidance, spec, limits, adjustments)
    if end is not None and not spec.uses_end_image:
        warnings.append(f"{spec.family} does not use an end image: only the start image guides this video.")
    seed = request.seed if request.seed is not None else (rng or random.SystemRandom()).randrange(2**32)
    if not 0 <= seed < 2**32:
        raise UserError(f"The seed {seed} is out of range.", "Use a whole number from 0 to 4294967295.")
    return GenerationParams(
        prompt=prompt,
        negative_prompt=request.negative_prompt.strip() or limits.negative_prompt,
        seed=seed,
        steps=steps,
        guidance=guidance,
        guidance_2=guidance_2,
        width=width,
        height=height,
        frames=frames,
        fps=spec.fps,
        preset=choice.preset,
        loras=loras,
        adjustments=adjustments,
        warnings=warnings,
    )


def resolve_loras(
    asked: list[str], offered: Mapping[str, StyleLoraConfig], mode: Mode, spec: ModelSpec, most: int
) -> list[LoraUse]:
    """The LoRAs a request names (NAME or NAME:WEIGHT, several joined by commas), checked against what [loras]
    offers for its mode and model, each once, at most `most`."""
    named = [part.strip() for item in asked for part in item.split(",") if part.strip()]
    if not named:
        return []
    if not offered or most == 0:
        raise UserError("This bot offers no LoRAs.", "Ask again without lora=.")
    uses: dict[str, LoraUse] = {}
    for item in named:
        name, _, weight_text = item.partition(":")
        name = name.strip().lower()
        config = offered.get(name)
        if config is None:
            raise UserError(
                f"There is no LoRA called {quoted(name)} here.", f"/loras lists them: {', '.join(offered)}."
            )
        if mode.value not in config.modes:
            raise UserError(f"The LoRA {name} is not for {mode.value}.", f"It is for {', '.join(config.modes)}.")
        if config.file is None and not spec.two_experts:
            raise UserError(
                f"The LoRA {name} is made for the two experts of an A14B model; this bot's {mode.value} model has one.",
                "Ask again without it, or in a mode it is for.",
            )
        uses[name] = LoraUse(
            name=name, weight=_lora_weight(name, weight_text, config), repo=config.repo, files=config.files
        )
    if len(uses) > most:
        raise UserError(
            f"A request may use at most {counted(most, 'LoRA')}; this one names {len(uses)}.",
            "Name fewer in lora=.",
        )
    return list(uses.values())


def _lora_weight(name: str, text: str, config: StyleLoraConfig) -> float:
    if not text.strip():
        return config.weight
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not 0 <= weight <= 2:
        raise UserError(
            f"The weight of the LoRA {name} must be a number from 0 to 2, not {quoted(text)}.",
            f"For example lora={name}:{config.weight:g}.",
        )
    return weight


def with_triggers(
    prompt: str, loras: list[LoraUse], offered: Mapping[str, StyleLoraConfig], adjustments: list[str]
) -> str:
    """The prompt with the trigger words of each LoRA it lacks, put first: without them many LoRAs do little."""
    for use in reversed(loras):
        trigger = offered[use.name].trigger.strip()
        if trigger and trigger.lower() not in prompt.lower():
            prompt = f"{trigger}, {prompt}" if prompt else trigger
            adjustments.append(f"The LoRA {use.name}'s trigger words were put before the prompt: {trigger}.")
    return prompt


def _steps_and_guidance(
    steps: int | None, guidance: float | None, spec: ModelSpec, limits: GenerationConfig, adjustments: list[str]
) -> tuple[int, float, float | None]:
    """The quality preset's steps and guidance: the user's within the limits, else the model's official ones."""
    steps = steps if steps is not None else spec.steps
    if not 1 <= steps <= limits.max_steps:
        clamped = min(max(steps, 1), limits.max_steps)
        adjustments.append(f"Steps must be between 1 and {limits.max_steps}: using {clamped} instead of {steps}.")
        steps = clamped
    guidance = guidance if guidance is not None else spec.guidance
    if not 0 <= guidance <= 20:
        clamped_guidance = min(max(guidance, 0.0), 20.0)
        adjustments.append(f"Guidance must be between 0 and 20: using {clamped_guidance:g} instead of {guidance:g}.")
        guidance = clamped_guidance
    return steps, guidance, spec.guidance_2


def parse_resolution(text: str, spec: ModelSpec) -> tuple[int, int]:
    cleaned = text.strip().lower().replace("×", "x").replace(" ", "")
    if cleaned in spec.presets:
        return spec.presets[cleaned]
    names = ", ".join(spec.presets)
    parts = cleaned.split("x")
    if len(parts) == 2 and all(part.isdecimal() for part in parts):
        width, height = int(parts[0]), int(parts[1])
        if max(width, height) > MAX_SIDE:
            raise UserError(
                f"{quoted(text)} has a side over {MAX_SIDE:,} pixels.", f"Use {names}, or a size such as 832x480."
            )
        return width, height
    raise UserError(
        f"{quoted(text)} is not a resolution this model knows.", f"Use one of {names}, or WIDTHxHEIGHT such as 832x480."
    )


def _resolve_size(
    resolution: str | None, spec: ModelSpec, limits: GenerationConfig, start: ImageInfo | None, adjustments: list[str]
) -> tuple[int, int]:
    asked = parse_resolution(resolution, spec) if resolution else spec.presets[spec.default_preset]
    width, height = asked
    if min(width, height) <= 0:
        raise UserError(f"The size {width}x{height} is empty.", "Use positive numbers, such as 832x480.")
    reasons: list[str] = []
    if spec.size_follows_image and start is not None:
        # The i2v way: keep the preset's area, take the image's shape (within what the model makes well).
        ratio = _within_aspect(start.width / start.height)
        if ratio != start.width / start.height:
            adjustments.append(
                f"The picture is {_ratio_text(start.width / start.height)}; the video is made from its middle at "
                f"{_ratio_text(ratio)}, because the model makes poor videos in narrower shapes."
            )
        reasons.append("to follow the start image's shape")
    else:
        # The model makes thin shapes poorly, and snapping a thin side up to one multiple would multiply the area
        # (1x921600 became 16x921600): keep the area at the nearest shape it makes well.
        ratio = _within_aspect(width / height)
        if ratio != width / height:
            bound = "wider" if ratio > 1 else "taller"
            reasons.append(
                f"to be no {bound} than {_ratio_text(ratio)} (the model makes poor videos in narrower shapes)"
            )
    too_large = width * height > limits.max_pixels
    if reasons or too_large:
        area = min(width * height, limits.max_pixels)
        width, height = math.sqrt(area * ratio), math.sqrt(area / ratio)
    rounded = (_snap(width, spec.multiple), _snap(height, spec.multiple))
    snapped = _within_pixels(rounded, spec.multiple, limits.max_pixels)
    if snapped != asked:
        if too_large or snapped != rounded:
            reasons.append(f"to stay within {limits.max_pixels:,} pixels a frame")
        reasons.append(f"in multiples of {spec.multiple}")
        why = reasons[0] if len(reasons) == 1 else f"{', '.join(reasons[:-1])} and {reasons[-1]}"
        if resolution:
            adjustments.append(f"Size {asked[0]}x{asked[1]} became {snapped[0]}x{snapped[1]} {why}.")
        else:
            # No size was asked for: "became" would name the preset's size, which the user never gave.
            adjustments.append(f"The video is {snapped[0]}x{snapped[1]} {why}.")
    return snapped


def _within_aspect(ratio: float) -> float:
    return min(max(ratio, 1 / MAX_ASPECT), MAX_ASPECT)


def _ratio_text(ratio: float) -> str:
    return f"{ratio:.1f}:1" if ratio >= 1 else f"1:{1 / ratio:.1f}"


def _snap(value: float, multiple: int) -> int:
    return max(multiple, round(value / multiple) * multiple)


def _within_pixels(size: tuple[int, int], multiple: int, max_pixels: int) -> tuple[int, int]:
    """`size` (in multiples), with multiples taken off its longer side until it holds at most `max_pixels`."""
    fitted = list(size)
    # Snapping rounds up as well as down, and never below one multiple, so it can go over the limit.
    # The configuration's smallest max_pixels (64x64) holds one multiple squared, so this ends within the limit.
    while fitted[0] * fitted[1] > max_pixels and max(fitted) > multiple:
        longer = 0 if fitted[0] >= fitted[1] else 1
        fitted[longer] -= multiple
    return fitted[0], fitted[1]


def _resolve_frames(asked: int | None, spec: ModelSpec, limits: GenerationConfig, adjustments: list[str]) -> int:
    frames = asked if asked is not None else spec.default_frames
    highest = (limits.max_frames - 1) // 4 * 4 + 1
    snapped = min(max((frames - 1) // 4 * 4 + 1, 5), highest)
    if snapped != frames:
        adjustments.append(f"Frames must be 4k+1 between 5 and {highest}: using {snapped} instead of {frames}.")
    return snapped
