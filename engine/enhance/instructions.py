"""What the enhancer's model is told: the system prompt, in wanbot's own words, after Wan's prompt-extension guidance.

Wan was trained on long, concrete captions; a short chat prompt leaves the model to guess, and distilled models guess
worst (../shared/REFERENCE.md, "Prompt extension"). The rewrite names the subject and its look, the motion, the
setting, the light, the camera and the style, in one paragraph of about 80 to 120 words, and keeps everything the user
asked for. With a start picture the picture already fixes the look, so the rewrite is about motion and camera.
"""

from __future__ import annotations

from typing import Literal

Language = Literal["keep", "english"]

_TASK = (
    "You turn a short request for a video into one detailed prompt for a text-to-video model. Write a single "
    "paragraph of about 80 to 120 words that describes, where it fits and in this order: the main subject and its "
    "appearance, what it does and how it moves, the setting, the lighting and atmosphere, how the camera moves and "
    "frames the shot, and the visual style."
)
_FAITHFUL = (
    "Keep every subject, object, name, number and colour the request mentions, with the same meaning. Add only details "
    "that fit the request; never add anything that contradicts it, and never drop or swap what it asks for. If the "
    "request is already detailed, keep it and fill in only what is missing."
)
_PICTURED = (
    "The video starts from a picture the user gave, and the picture already fixes how the subjects, the setting and "
    "the style look. Describe mainly the motion: what moves, how and in what order, and how the camera moves. Mention "
    "appearance only as far as the request does, and do not describe a different scene."
)
_LANGUAGE: dict[Language, str] = {
    "keep": "Write in the language of the request.",
    "english": (
        "Write in English, whatever language the request is in; keep names of people and places, and any text that "
        "should appear in the video, as the request writes them."
    ),
}
_FORM = "Answer with the prompt alone: no title, no preamble, no list, no quotation marks around it and no explanation."


def system_prompt(language: Language, pictured: bool) -> str:
    """The instructions for one request: `pictured` when the video starts from the user's picture (i2v, or ti2v
    with a start image)."""
    parts = [_TASK, _PICTURED if pictured else None, _FAITHFUL, _LANGUAGE[language], _FORM]
    return "\n\n".join(part for part in parts if part)
