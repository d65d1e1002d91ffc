"""Small builders of typed records for the tests."""

from __future__ import annotations

from engine.jobs import Actor, GenerationParams, JobSource


def params(prompt: str = "a red fox in the snow", **overrides: object) -> GenerationParams:
    values: dict[str, object] = {
        "prompt": prompt,
        "seed": 1,
        "steps": 2,
        "guidance": 4.0,
        "width": 64,
        "height": 64,
        "frames": 5,
        "fps": 16,
    }
    values.update(overrides)
    return GenerationParams.model_validate(values)


def source(user: str = "u1", message: str | None = None, platform: str = "telegram", chat: str = "c1") -> JobSource:
    return JobSource(platform=platform, chat_id=chat, user_id=user, message_id=message)


def owner(user: str = "u1", platform: str = "telegram") -> Actor:
    return Actor(platform=platform, user_id=user)


ADMIN = Actor(platform="cli", user_id="admin", is_admin=True)


def result_for_child() -> object:
    from engine.jobs import ResultInfo

    return ResultInfo(
        path="x.mp4", bytes=1, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="tiny", seed=1
    )


def chat_core(engine: object, platform: str = "telegram", **access: frozenset[str]) -> object:
    """The chat core as an adapter of `platform` holds it; `access` sets its allowlists and admins."""
    from bot.chat.core import AccessPolicy, ChatCore

    return ChatCore(engine, AccessPolicy(platform, **access), 25_000_000, lambda error: False, "(how to ask)")


def status_answer(engine: object) -> object:
    """/status as anyone may ask it."""
    from bot.chat.core import Person, Place

    return chat_core(engine).status_text(Person("u1"), Place("c1"))


async def token_of(queue: object, job_id: int) -> str | None:
    """The claim token of a job a test claimed without keeping it (every write of a running job needs it)."""
    return (await queue.get(job_id)).claim_token
