"""Presets: `quality` (the official settings, minutes a video) and `fast` (step-distilled weights, seconds).

A fast model only works on the schedule it was distilled on, without guidance, so a fast request never takes a
user's steps or guidance: named together with `preset=fast` they are replaced with a note; named without a preset
they mean the user wants their own settings, which only the quality preset has.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine.errors import UserError


class Preset(StrEnum):
    FAST = "fast"
    QUALITY = "quality"


# What /help and the CLI say about the trade-off, in one line.
PRESET_HELP = "fast: seconds to a minute, a little less motion; quality: the official settings, minutes."


@dataclass(frozen=True)
class Sampling:
    """How a preset samples: a fixed flow-matching schedule, or None for the model's own scheduler."""

    name: str  # what the metadata calls it
    sigmas: tuple[float, ...]  # before the shift, highest first; the final 0 is appended by the scheduler
    shift: float = 1.0
    renoise: bool = False  # DMD: each step predicts the clean latent and noises it afresh to the next sigma

    @property
    def steps(self) -> int:
        return len(self.sigmas)


# LightX2V's 4-step Wan 2.2 A14B LoRAs: Euler, shift 5 on 1, 0.75, 0.5, 0.25 gives 1.0, 0.9375, 0.8333, 0.625, so
# timesteps 1000 and 937.5 run on the high-noise expert and 833.3 and 625 on the low-noise one at both boundaries
# (875 for t2v, 900 for i2v).
LIGHTX2V_EULER = Sampling(name="euler-flow-shift5-4step", sigmas=(1.0, 0.75, 0.5, 0.25), shift=5.0)
# FastWan2.2-TI2V-5B (DMD): timesteps 1000, 757, 522.
FASTWAN_DMD = Sampling(name="dmd-3step", sigmas=(1.0, 0.757, 0.522), renoise=True)


@dataclass(frozen=True)
class PresetChoice:
    preset: Preset
    notes: list[str]  # what the user is told about it


def choose_preset(
    asked: Preset | None,
    default: Preset,
    steps: int | None,
    guidance: float | None,
    fast_steps: int | None,
    family: str,
) -> PresetChoice:
    """The preset a request runs with, and what the user is told about their steps and guidance (`fast_steps`: the
    length of the model's fast schedule, None when it has no fast version)."""
    named = (("steps", steps), ("guidance", guidance))
    own_settings = [f"{name}={value:g}" for name, value in named if value is not None]
    preset = asked or default
    notes: list[str] = []
    if asked is None and preset is Preset.FAST and own_settings:
        notes.append(
            f"{' and '.join(own_settings)} made this a quality video: the fast preset runs a fixed schedule without "
            "guidance. Add preset=fast to get a fast one instead."
        )
        preset = Preset.QUALITY
    if preset is Preset.QUALITY:
        return PresetChoice(Preset.QUALITY, notes)
    if fast_steps is None:
        if asked is Preset.FAST:
            raise UserError(f"{family} has no fast version.", "Use preset=quality.")
        notes.append(f"{family} has no fast version: this video is made with the quality settings.")
        return PresetChoice(Preset.QUALITY, notes)
    if steps is not None and steps != fast_steps:
        notes.append(
            f"The fast preset runs exactly {fast_steps} steps, the ones its model was distilled for: steps={steps} "
            "was not used. Use preset=quality to choose the steps."
        )
    if guidance is not None and guidance != 1.0:
        notes.append(
            f"The fast preset runs without guidance (1.0), as its model was distilled: guidance={guidance:g} was not "
            "used. Use preset=quality to choose the guidance."
        )
    return PresetChoice(Preset.FAST, notes)
