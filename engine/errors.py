"""Exceptions that carry a message meant for the chat user.

Two kinds of error exist in wanbot: a `UserError` says what was wrong and what to do, and is shown as is; anything
else is logged with context and shown to the user as a short apology with the job id.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; `message` says what is wrong, `hint` what to do about it."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class ModelUnusable(UserError):
    """The model a job names cannot be used on this machine (not downloaded, its folder gone or not a model): the
    operator's to fix. Its message and hint go to the log and `queue show`; the job's owner gets
    `model_unusable_text`, which has no advice meant for the operator."""


def model_unusable_text(job_id: int, mode: str) -> str:
    return f"Sorry, video #{job_id} could not be made: this bot's {mode} model is not ready. The admin has been told."


class Unavailable(UserError):
    """A service wanbot needs (its database server, a chat platform) cannot be reached now: starting again later may
    work (exit code 1, which systemd restarts), unlike a mistake in the settings (exit code 2, which it does not)."""


def duration_text(seconds: float) -> str:
    """A wait or a run time as people say it: 42s, 3m 05s, 1h 20m."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def counted(count: int, noun: str) -> str:
    """'1 step', '30 steps': a number of things as a sentence says it."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def quoted(text: str, limit: int = 40) -> str:
    """The user's own words in an error message, in quotes, cut short: a 2000-character option value would push the
    message past what a chat platform lets a bot send."""
    return f"'{text}'" if len(text) <= limit else f"'{text[: limit - 1]}…'"


class ImageRejected(UserError):
    """An uploaded image failed validation."""


class QueueFull(UserError):
    """The per-user or global queue limit is reached."""


class QuotaExceeded(QueueFull):
    """A user's or a chat's GPU time in the last 24 hours (queue.daily_gpu_seconds) would be passed."""


class NotAllowed(UserError):
    """The caller may not act on this job."""


class JobNotFound(UserError):
    """No job with that id exists."""


class InvalidTransition(UserError):
    """The job's state does not allow the requested change (for example cancelling a finished job)."""


class ClaimLost(InvalidTransition):
    """A worker wrote to a job it no longer runs: it was silent past the lease, and the job was queued again."""


class ImageIntegrityError(UserError):
    """A stored image is missing or its bytes no longer match their hash."""


class ConfigError(Exception):
    """The configuration file or environment holds a bad value; the message names the key."""
