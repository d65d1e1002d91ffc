"""What every `wanbot` command shares: the Typer apps, the common options, the settings a command loads (its data
folder checked first), and one line with exit code 2 for every mistake of the user, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from engine.config import Settings, load_settings
from engine.errors import ConfigError, JobNotFound, Unavailable, UserError
from engine.jobs import Actor

# Plain help, as Click writes it: typer's rich panels show every flag (--help too) as taking a <bool>.
HELP: dict[str, Any] = {
    "no_args_is_help": True,
    "rich_markup_mode": None,
    "context_settings": {"max_content_width": 120},
}


app = typer.Typer(help="wanbot: chat messages to Wan 2.2 videos.", add_completion=False, **HELP)
queue_app = typer.Typer(help="Look at and manage the job queue.", **HELP)
models_app = typer.Typer(help="Models: download, list, verify, and the tiny offline one.", **HELP)
loras_app = typer.Typer(help="The style and character LoRAs of [loras]: list them, download one.", **HELP)
app.add_typer(queue_app, name="queue")
app.add_typer(models_app, name="models")
app.add_typer(loras_app, name="loras")

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
CLI_ACTOR = Actor(platform="cli", user_id="admin", is_admin=True)
T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", metavar="FILE", help="TOML config file (default: $WANBOT_CONFIG, else none).", show_default=False
    ),
]


# metavar="": a flag takes no value, and typer would show it as <bool> next to the name.
JsonOption = Annotated[bool, typer.Option("--json", metavar="", help="Print JSON instead of text (default: text).")]


LoraOption = Annotated[
    list[str] | None,
    typer.Option(
        "--lora", metavar="NAME[:W]", help="A LoRA of [loras], weight 0 to 2 (repeat for more; default: none)."
    ),
]


JobIdArgument = Annotated[int, typer.Argument(metavar="JOB", help="The job's number, as `wanbot queue list` shows it.")]


def settings_from(config: Path | None) -> Settings:
    settings = load_settings(config)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    _check_data_dir(settings.data_dir)
    return settings


def _check_data_dir(data_dir: Path) -> None:
    """Refuse a data folder that cannot be used, before any command starts work in it (nothing is created here)."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = "Set WANBOT_DATA_DIR (or data_dir in the config) to a folder this user can write."
    if not existing.is_dir():
        problem = "is a file" if existing == data_dir else f"cannot be created: {existing} is a file"
        raise ConfigError(f"The data folder {data_dir} {problem}, not a folder. {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing == data_dir else f"cannot be created: {existing} is not writable"
        raise ConfigError(f"The data folder {data_dir} {problem}. {fix}")


def run_or_exit(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a UserError becomes its message and exit code 2, never a traceback."""
    try:
        return asyncio.run(coroutine)
    except UserError as exc:
        # One line, message and hint: it is read in journald and cron mails, a line per record. What is out of reach
        # now exits 1 (systemd starts it again); a mistake in the settings 2 (it does not: RestartPreventExitStatus).
        errors.print(str(exc), markup=False)
        raise typer.Exit(1 if isinstance(exc, Unavailable) else 2) from None


def cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


def time_text(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


@contextlib.asynccontextmanager
async def terminal_hints() -> AsyncIterator[None]:
    """The queue's hints name the chats' /queue; in a terminal the command to run is `wanbot queue list`."""
    try:
        yield
    except JobNotFound as exc:
        raise JobNotFound(exc.message, "Try wanbot queue list to see the jobs there are.") from None


def usage_error(message: str) -> typer.Exit:
    errors.print(message, markup=False)
    return typer.Exit(2)
