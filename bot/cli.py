"""The `wanbot` command: validate images, manage the queue, generate from the terminal, run the demo and the bot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from bot.chat.core import reply_for_new_job
from engine.config import ModelsConfig, Settings, load_settings
from engine.errors import ConfigError, JobNotFound, UserError, counted, duration_text
from engine.jobs import Actor, EventKind, Job, JobSource, JobStatus, WorkerRecord, WorkerState
from engine.pipeline.models import GenerationRequest
from engine.pipeline.presets import PRESET_HELP, Preset
from engine.service import (
    Upload,
    check_pictures,
    check_repo_id,
    make_tiny_model,
    model_downloader,
    model_named,
    open_job_store,
    size_text,
    verify_snapshot,
)
from engine.storage.images import Mode

if TYPE_CHECKING:
    from engine.service import Engine

# Plain help, as Click writes it: typer's rich panels show every flag (--help too) as taking a <bool>.
HELP: dict[str, Any] = {
    "no_args_is_help": True,
    "rich_markup_mode": None,
    "context_settings": {"max_content_width": 120},
}
app = typer.Typer(help="wanbot: chat messages to Wan 2.2 videos.", add_completion=False, **HELP)
queue_app = typer.Typer(help="Look at and manage the job queue.", **HELP)
models_app = typer.Typer(help="Models: download, list, verify, and the tiny offline one.", **HELP)
app.add_typer(queue_app, name="queue")
app.add_typer(models_app, name="models")

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
JobIdArgument = Annotated[int, typer.Argument(metavar="JOB", help="The job's number, as `wanbot queue list` shows it.")]


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        errors.print(str(exc), markup=False)
        sys.exit(2)
    except OSError as exc:
        # A path that is a file, a folder this user may not write, a full disk: the user's to fix, never a traceback.
        where = f" {exc.filename}" if exc.filename else ""
        errors.print(
            f"Could not use{where}: {exc.strerror or exc}. Check the path and its permissions, or choose another.",
            markup=False,
        )
        sys.exit(2)


def _settings(config: Path | None) -> Settings:
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


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine; a UserError becomes its message and exit code 2, never a traceback."""
    try:
        return asyncio.run(coroutine)
    except UserError as exc:
        # One line, message and hint: it is read in journald and cron mails, a line per record.
        errors.print(str(exc), markup=False)
        raise typer.Exit(2) from None


# -- validate ----------------------------------------------------------------------------------------------------


@app.command()
def validate(
    mode: Annotated[Mode, typer.Option(help="t2v, i2v or ti2v.", show_default=False)],
    start: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Start image (default: none; i2v and ti2v need one).")
    ] = None,
    end: Annotated[Path | None, typer.Option(metavar="FILE", help="End image (default: none).")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Check images for a mode, as the bot would, and say what the video will change. Exit 0 if valid, 2 if not."""
    settings = _settings(config)
    report: dict[str, Any] = {
        "valid": False,
        "mode": mode.value,
        "errors": [],
        "warnings": [],
        "adjustments": [],
        "images": [],
    }
    try:
        # What generate and the chats would say, once the pictures meet the model too: an end image it ignores, a crop.
        checked = check_pictures(settings, mode, _read_picture(start, "start"), _read_picture(end, "end"))
        report.update(
            valid=True,
            warnings=checked.warnings,
            adjustments=checked.adjustments,
            images=[info.model_dump() for info in checked.images],
        )
    except UserError as exc:
        report["valid"] = False
        report["errors"].append(str(exc))
    if as_json:
        console.print_json(json.dumps(report))
    else:
        _print_validation(report)
    raise typer.Exit(0 if report["valid"] else 2)


def _read_picture(path: Path | None, role: str) -> Upload | None:
    if path is None:
        return None
    try:
        return Upload(path.read_bytes(), path.name)
    except OSError as exc:
        raise UserError(f"The {role} image {path} cannot be read ({exc.strerror}).", "Check the path.") from None


def _print_validation(report: dict[str, Any]) -> None:
    if report["valid"]:
        console.print(f"[green]valid[/green] for {report['mode']}")
    for message in report["errors"]:
        console.print(f"[red]invalid:[/red] {message}", highlight=False)
    for message in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
    for message in report["adjustments"]:
        console.print(f"note: {message}", highlight=False, markup=False)
    for image in report["images"]:
        console.print(
            f"  {image['role']}: {image['format']} {image['width']}x{image['height']} {image['mode']}, "
            f"{image['file_size']} bytes, sha256 {image['source_sha256'][:12]}…",
            highlight=False,
        )


# -- queue -------------------------------------------------------------------------------------------------------


def _job_summary(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "mode": job.mode.value,
        "model": job.model,
        "user": job.source.user_key,
        "prompt": job.params.prompt,
        "attempts": job.attempts,
        "delivery": job.delivery_status.value if job.delivery_status else None,
        "error": job.error_user,
        "result": job.result.path if job.result else None,
    }


@queue_app.command("list")
def queue_list(
    status: Annotated[
        list[JobStatus] | None,
        typer.Option(
            metavar="STATE",
            help="Only jobs in this state: queued, running, succeeded, failed or cancelled; repeatable "
            "(default: every state).",
        ),
    ] = None,
    limit: Annotated[int, typer.Option(metavar="N", help="At most this many jobs, the newest.")] = 50,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """The latest jobs, newest first."""
    settings = _settings(config)

    async def work() -> list[Job]:
        async with open_job_store(settings) as queue:
            return await queue.list_jobs(status or (), limit=limit)

    jobs = _run(work())
    if as_json:
        console.print_json(json.dumps([_job_summary(job) for job in jobs]))
        return
    if not jobs:
        console.print("No jobs.")
    for job in jobs:
        # A line per job, not a table: a table cuts the model's folder and the video's path to fit the terminal.
        outcome = job.result.path if job.result else job.error_user
        parts = [f"#{job.id}", job.status.value, job.mode.value, job.model, job.source.user_key]
        parts += [_cut(job.params.prompt), *([outcome] if outcome else [])]
        console.print(" · ".join(parts), highlight=False, markup=False)


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


@queue_app.command("show")
def queue_show(job_id: JobIdArgument, as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Everything about one job, with its event history."""
    settings = _settings(config)

    async def work() -> tuple[Job, list[tuple[str, str | None]], Any]:
        async with open_job_store(settings) as queue, _terminal_hints():
            return await queue.get(job_id), await queue.events_of(job_id), await queue.position(job_id)

    job, history, place = _run(work())
    data = job.model_dump(mode="json")
    # Output that gets pasted into bug reports: a Discord interaction token lets anyone post as the bot for 15 min.
    reply = data["source"]["reply"]
    data["source"]["reply"] = {key: "<redacted>" if "token" in key else value for key, value in reply.items()}
    data["history"] = [{"event": kind, "detail": detail} for kind, detail in history]
    data["position"] = place.model_dump() if place else None
    if as_json:
        console.print_json(json.dumps(data))
        return
    for key, value in _job_lines(job, history, place):
        console.print(f"{key:>9}: {value}", highlight=False, markup=False)


def _job_lines(job: Job, history: list[tuple[str, str | None]], place: Any) -> list[tuple[str, str]]:
    """`queue show` as text: what was asked, what was made, when, and what went wrong; nothing unknown is printed."""
    params = job.params
    lines = [
        ("job", f"#{job.id} {job.status.value}" + (" (cancel requested)" if job.cancel_requested else "")),
        ("mode", job.mode.value),
        ("model", job.model),
        ("user", job.source.user_key),
        ("prompt", params.prompt or "(none)"),
        ("seed", str(params.seed)),
        ("size", f"{params.width}x{params.height}, {params.frames} frames at {params.fps} fps"),
        ("steps", str(params.steps)),
        ("attempts", str(job.attempts)),
        ("asked", _time_text(job.created_at)),
    ]
    if job.started_at is not None:
        waited = duration_text(job.started_at - job.created_at)
        lines.append(("started", f"{_time_text(job.started_at)} (waited {waited})"))
    if job.finished_at is not None:
        took = f" (ran {duration_text(job.finished_at - job.started_at)})" if job.started_at is not None else ""
        lines.append(("finished", _time_text(job.finished_at) + took))
    if place is not None:
        lines.append(("position", _place_text(place, history)))
    if job.error_user:
        lines.append(("error", job.error_user))
    if job.result is not None:
        lines.append(("video", job.result.path))
    if job.delivery_status is not None:
        problem = f": {job.delivery_error}" if job.delivery_error else ""
        lines.append(("delivery", f"{job.delivery_status.value} after {job.delivery_attempts} tries{problem}"))
    if job.delivered_at is not None:
        lines.append(("delivered", _time_text(job.delivered_at)))
    lines.extend(("note", note) for note in (*params.adjustments, *params.warnings))
    lines.extend(("event", f"{kind} ({detail})" if detail else kind) for kind, detail in history)
    return lines


def _place_text(place: Any, history: list[tuple[str, str | None]]) -> str:
    last_kind, last_detail = history[-1] if history else ("", None)
    if last_kind == EventKind.REQUEUED.value and "download" in (last_detail or ""):
        # Put back by the worker until its model is on disk: no place in the line says when that is.
        return f"{place.position}, waiting for its model to download"
    if place.position == 1 and (place.eta_s is None or place.eta_s < 1):
        return "1, next to start"
    if place.eta_s is None:  # no video of the model made yet, or the job ahead overrunning its usual time
        return f"{place.position}, wait not known yet"
    return f"{place.position}, about {duration_text(max(place.eta_s, 1))} to wait"


def _time_text(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


@contextlib.asynccontextmanager
async def _terminal_hints() -> AsyncIterator[None]:
    """The queue's hints name the chats' /queue; in a terminal the command to run is `wanbot queue list`."""
    try:
        yield
    except JobNotFound as exc:
        raise JobNotFound(exc.message, "Try wanbot queue list to see the jobs there are.") from None


@queue_app.command("cancel")
def queue_cancel(job_id: JobIdArgument, config: ConfigOption = None) -> None:
    """Cancel a queued job at once, or ask a running one to stop."""
    settings = _settings(config)

    async def work() -> Job:
        async with open_job_store(settings) as queue, _terminal_hints():
            return await queue.cancel(job_id, CLI_ACTOR)

    job = _run(work())
    verb = "cancelled" if job.status is JobStatus.CANCELLED else "asked to stop (it is running)"
    console.print(f"job #{job.id} {verb}")


@queue_app.command("retry")
def queue_retry(job_id: JobIdArgument, config: ConfigOption = None) -> None:
    """Queue a finished job again as a new job."""
    settings = _settings(config)

    async def work():
        async with open_job_store(settings) as queue, _terminal_hints():
            # The new job gets its own message in the chat: the old one keeps its ending.
            old = await queue.get(job_id)
            source = old.source.model_copy(update={"message_id": None, "reply": reply_for_new_job(old.source.reply)})
            return await queue.retry(job_id, CLI_ACTOR, source=source)

    added = _run(work())
    console.print(f"job #{added.job.id} queued as a retry of job #{job_id}")


@queue_app.command("redeliver")
def queue_redeliver(job_id: JobIdArgument, config: ConfigOption = None) -> None:
    """Send a finished video whose delivery failed again, from its stored file (the running bot sends it)."""
    settings = _settings(config)

    async def work() -> Job:
        async with open_job_store(settings) as queue, _terminal_hints():
            return await queue.redeliver(job_id)

    job = _run(work())
    console.print(f"job #{job.id}: the running bot sends {job.result.path} to {job.source.platform} again")


@queue_app.command("stats")
def queue_stats(
    days: Annotated[float, typer.Option(metavar="DAYS", help="How far back, by the day a job was asked for.")] = 7,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Per model: how many jobs, how they ended, how long they waited and ran."""
    if not 0 < days < math.inf:
        raise _usage_error(f"--days must be a number of days above 0, not {days:g}. Give one such as 7, or 0.5.")
    settings = _settings(config)

    async def work() -> list[dict[str, Any]]:
        async with open_job_store(settings) as queue:
            return await queue.stats(days * 86400)

    rows = _run(work())
    if as_json:
        console.print_json(json.dumps(rows))
        return
    if not rows:
        console.print(f"No jobs in the last {days:g} days.")
    for row in rows:
        # One line per model: repo ids are long, and a table would cut them on a narrow terminal.
        wait, run, longest = (
            duration_text(row[key]) if row[key] is not None else "-"
            for key in ("mean_wait_s", "mean_run_s", "longest_run_s")
        )
        console.print(
            f"{row['model']}: {row['jobs']} job{'' if row['jobs'] == 1 else 's'} ({row['succeeded']} done, "
            f"{row['failed']} failed, {row['cancelled']} cancelled, {row['active']} active, "
            f"{row['undelivered']} undelivered); mean wait {wait}, mean run {run}, longest run {longest}",
            highlight=False,
            soft_wrap=True,
        )


# -- workers -----------------------------------------------------------------------------------------------------

NO_WORKERS = (
    "No worker has started yet: queued videos wait until one does. Start one with `wanbot worker` (a GPU worker "
    "alone) or `wanbot run` (the chats and a worker)."
)
NONE_ONLINE = "None is online: queued videos wait until a worker starts (`wanbot worker` or `wanbot run`)."
WORKER_COLUMNS = ("worker", "host", "device", "GPU", "state", "model", "job", "free GPU memory", "uptime")


@app.command()
def workers(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """The worker processes the job store has heard from in the last week: online ones with what they do (their
    job, model and free GPU memory), then those offline (silent past queue.lease_s) and stopped."""
    settings = _settings(config)

    async def work() -> tuple[list[WorkerRecord], dict[int, Job]]:
        async with open_job_store(settings) as queue:
            records = await queue.workers()
            jobs: dict[int, Job] = {}
            for record in records:
                if record.current_job is not None:
                    with contextlib.suppress(JobNotFound):  # deleted since the worker said it runs it
                        jobs[record.current_job] = await queue.get(record.current_job)
            return records, jobs

    records, jobs = _run(work())
    now, lease_s = time.time(), settings.queue.lease_s
    online = {record.id: record.online(now, lease_s) for record in records}
    # Online first, then offline (silent: worth a look), then stopped; each part as the store lists it.
    records.sort(key=lambda record: 0 if online[record.id] else 2 if record.state is WorkerState.STOPPED else 1)
    if as_json:
        rows = [{**record.model_dump(mode="json"), "online": online[record.id]} for record in records]
        console.print_json(json.dumps(rows))
        return
    if not records:
        console.print(NO_WORKERS, highlight=False, markup=False)
        return
    table = Table()
    for column in WORKER_COLUMNS:
        table.add_column(column, overflow="fold")  # ids and model names wrap on a narrow terminal, never cut
    for record in records:
        job = jobs.get(record.current_job) if record.current_job is not None else None
        cells = _worker_cells(record, job, online[record.id], now)
        table.add_row(*(Text(cell) for cell in cells))  # Text: a prompt's [brackets] are not rich markup
    console.print(table)
    if not any(online.values()):
        console.print(NONE_ONLINE, highlight=False, markup=False)


def _worker_cells(record: WorkerRecord, job: Job | None, online: bool, now: float) -> list[str]:
    """A row of `wanbot workers`, in WORKER_COLUMNS' order; "-" for what is not known."""
    if online:
        state = record.state.value
        if record.downloading:
            state += f", downloading {', '.join(sorted(record.downloading))}"
    elif record.state is WorkerState.STOPPED:
        state = "stopped"
    else:
        state = f"offline (last heard {_ago(now - record.heartbeat_at)} ago)"
    if record.current_job is None:
        current = "-"
    else:
        current = f"#{record.current_job}" + (f" {_cut(job.params.prompt, 30)}" if job is not None else "")
    free = size_text(record.free_memory_bytes) if record.free_memory_bytes is not None else "-"
    uptime = duration_text(now - record.started_at) if online else "-"
    gpu, model = record.gpu_name or "-", record.loaded_model or "-"
    return [record.id, record.host, record.device, gpu, state, model, current, free, uptime]


def _ago(seconds: float) -> str:
    """How long ago, as people say it: 42s, 3 min, 2h 05m, 3 days."""
    seconds = max(round(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return duration_text(seconds)
    return counted(seconds // 86400, "day")


@app.command()
def backup(
    target: Annotated[Path, typer.Argument(help="The file to write the copy to; an existing one is replaced.")],
    config: ConfigOption = None,
) -> None:
    """Copy the job database, consistently, even while wanbot runs (SQLite's online backup)."""
    settings = _settings(config)
    if target.is_dir():
        raise _usage_error(f"{target} is a folder; name the file to write, such as {target / 'wanbot-backup.db'}.")

    async def work() -> Path | None:
        async with open_job_store(settings) as queue:
            try:
                await queue.backup(target)
            except OSError as exc:
                raise UserError(f"Could not write {target}: {exc.strerror}.", "Choose another place.") from None
            return queue.path

    console.print(f"Copied {_run(work())} to {target}.", highlight=False)


def _usage_error(message: str) -> typer.Exit:
    errors.print(message, markup=False)
    return typer.Exit(2)


@queue_app.command("pause")
def queue_pause(config: ConfigOption = None) -> None:
    """Stop starting new jobs (the running one finishes)."""
    _set_paused(config, True)


@queue_app.command("resume")
def queue_resume(config: ConfigOption = None) -> None:
    """Start jobs again after a pause."""
    _set_paused(config, False)


def _set_paused(config: Path | None, paused: bool) -> None:
    settings = _settings(config)

    async def work() -> None:
        async with open_job_store(settings) as queue:
            await queue.set_paused(paused)

    _run(work())
    console.print("queue paused" if paused else "queue resumed")


# -- generate and demo -------------------------------------------------------------------------------------------


QUEUE_PAUSED = "the queue is paused (wanbot queue resume)"


async def _wait_for_jobs(
    engine: Engine, job_ids: set[int], show_progress: bool, stop: asyncio.Event | None = None
) -> list[Job]:
    """Run the worker (or wait on another process's) until every job in `job_ids` has ended.

    The command owns its jobs: once `stop` is set (a signal), or when the queue is paused while one still waits, the
    jobs not yet ended are cancelled, so none is left behind to be made by the next command or `wanbot run`."""
    stop = stop or asyncio.Event()
    from bot.roles.runtime import worker_lock

    with worker_lock(engine.settings) as own_worker:
        inbox = engine.subscribe()
        worker = None
        if own_worker:
            await engine.recover()
            worker = asyncio.create_task(engine.run_worker())
        else:
            errors.print("Another wanbot process runs the worker; waiting for it to make the video.")
        try:
            with _progress_display(show_progress) as display:
                pending = set(job_ids)
                while pending and not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        event = await asyncio.wait_for(inbox.get(), timeout=1.0)
                        display.show(event)
                    jobs = [await engine.job(job_id) for job_id in pending]
                    pending = {job.id for job in jobs if not job.status.terminal}
                    if any(job.status is JobStatus.QUEUED for job in jobs) and await engine.is_paused():
                        cancelled = await _cancel_jobs(engine, pending)
                        raise UserError(f"Cancelled {cancelled}: {QUEUE_PAUSED}.", "Resume it, then run this again.")
                    if worker is not None and worker.done():
                        worker.result()
                if stop.is_set():
                    await _cancel_jobs(engine, pending)
        finally:
            inbox.close()
            if worker is not None:
                # A cancelled job stops at its next step; only an unexpected end puts the running one back.
                await engine.stop_worker(requeue_running=not stop.is_set())
                await worker
    return [await engine.job(job_id) for job_id in sorted(job_ids)]


async def _cancel_jobs(engine: Engine, job_ids: set[int]) -> str:
    """Cancel what has not ended (a running job stops at its next step); say which, as 'job #3' or 'jobs #3, #4'."""
    for job_id in sorted(job_ids):
        with contextlib.suppress(UserError):  # it ended meanwhile
            await engine.cancel(job_id, CLI_ACTOR)
    named = ", ".join(f"#{job_id}" for job_id in sorted(job_ids))
    return f"job{'s' if len(job_ids) > 1 else ''} {named}"


class _ProgressDisplay:
    def __init__(self, progress: Progress | None) -> None:
        self._progress = progress
        self._tasks: dict[int, Any] = {}

    def show(self, event: Any) -> None:
        if self._progress is None or event.kind not in (EventKind.PROGRESS, EventKind.STARTED):
            return
        job_id = event.job.id
        if job_id not in self._tasks:
            self._tasks[job_id] = self._progress.add_task(f"job #{job_id}", total=None, count="")
        if event.progress is None:
            return
        stage = event.progress.stage.value + (f" ({event.progress.detail})" if event.progress.detail else "")
        # Loading and downloading have no step count yet: the bar pulses, with no "0/None" beside it.
        total = event.progress.total or None
        self._progress.update(
            self._tasks[job_id],
            description=f"job #{job_id} {stage}",
            completed=event.progress.step,
            total=total,
            count=f"{event.progress.step}/{total}" if total else "",
        )


@contextlib.contextmanager
def _progress_display(enabled: bool, console: Console = errors) -> Iterator[_ProgressDisplay]:
    if not enabled:
        yield _ProgressDisplay(None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[count]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield _ProgressDisplay(progress)


def _upload(path: Path | None) -> Upload | None:
    if path is None:
        return None
    try:
        return Upload(path.read_bytes(), path.name)
    except OSError as exc:
        raise UserError(f"{path} cannot be read ({exc.strerror}).", "Check the path.") from None


def _model_option(ctx: typer.Context, name: str | None) -> str | None:
    """Check --model as soon as it is read: the engine's message about a bad name points to models.<mode>."""
    mode = ctx.params.get("mode")
    if name is None or mode is None:
        return name
    try:
        model_named(name, mode)
    except UserError as exc:
        what = f"--model {exc.message.removeprefix('Model ')}" if exc.message.startswith("Model ") else exc.message
        example = getattr(ModelsConfig(), mode.value)
        raise _usage_error(f"{what} Give --model a model folder, 'tiny', or a Hub repo id such as {example}.") from None
    return name


@app.command()
def generate(
    # Eager: --model's check below needs the mode, wherever on the line each one stands.
    mode: Annotated[Mode, typer.Option(help="t2v, i2v or ti2v.", is_eager=True)],
    prompt: Annotated[
        str, typer.Option(metavar="TEXT", help="What the video shows (default: none; t2v needs one).")
    ] = "",
    start: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Start image (default: none; i2v and ti2v need one).")
    ] = None,
    end: Annotated[Path | None, typer.Option(metavar="FILE", help="End image (default: none).")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="Repo id, folder or 'tiny' (default: the configured models.<mode>).",
            callback=_model_option,
        ),
    ] = None,
    frames: Annotated[
        int | None, typer.Option(metavar="N", help="Frames, 4k+1 (default: the model's, 81 or 121 for TI2V-5B).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(metavar="N", help="Denoising steps (default: the model's, 40 or 50 for TI2V-5B).")
    ] = None,
    width: Annotated[
        int | None, typer.Option(metavar="PX", help="Width, with --height (default: from --resolution).")
    ] = None,
    height: Annotated[
        int | None, typer.Option(metavar="PX", help="Height, with --width (default: from --resolution).")
    ] = None,
    resolution: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE",
            help="WxH such as 832x480, or the model's preset: 480p or 720p (A14B), 720p (TI2V-5B) "
            "(default: the model's; images set shape).",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(metavar="N", help="0 to 4294967295 (default: a random one).")] = None,
    guidance: Annotated[float | None, typer.Option(metavar="SCALE", help="0 to 20 (default: the model's).")] = None,
    preset: Annotated[
        Preset | None,
        typer.Option(help=f"fast or quality (default: generation.default_preset). {PRESET_HELP}"),
    ] = None,
    negative: Annotated[
        str, typer.Option(metavar="TEXT", help="What to avoid (default: generation.negative_prompt).")
    ] = "",
    out: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Copy the MP4 here too (default: only under the data folder).")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Make one video through the same validation, queue and worker as the bot, with a progress bar."""
    settings = _settings(config)
    if (width is None) != (height is None):
        errors.print("Give both --width and --height, or neither.")
        raise typer.Exit(2)
    size = f"{width}x{height}" if width and height else resolution
    request = GenerationRequest(
        mode=mode,
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance=guidance,
        resolution=size,
        frames=frames,
        preset=preset,
    )
    if out is not None and out.is_dir():
        raise _usage_error(f"--out {out} is a folder, not a file. Name the file to write, such as {out / 'video.mp4'}.")
    try:
        job = _run(_generate(settings, request, _upload(start), _upload(end), model))
    except _Interrupted as stopped:
        errors.print(stopped.message, markup=False)
        raise typer.Exit(128 + stopped.signum) from None
    if job.status is not JobStatus.SUCCEEDED or job.result is None:
        errors.print(f"job #{job.id} {job.status.value}: {job.error_user or ''}", markup=False)
        raise typer.Exit(1)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(Path(job.result.path).read_bytes())
        except OSError as exc:
            where = job.result.path
            raise _usage_error(f"The video could not be copied to {out} ({exc.strerror}). It is in {where}.") from None
    console.print(f"{out or job.result.path}  ({_timings(job)})", highlight=False)


class _Interrupted(Exception):
    """`generate` got SIGINT or SIGTERM and cancelled its job."""

    def __init__(self, signum: int, job: Job) -> None:
        super().__init__(signum, job)
        self.signum = signum
        name = "Ctrl+C" if signum == signal.SIGINT else signal.Signals(signum).name
        done = "was cancelled" if job.status is JobStatus.CANCELLED else "stops at its next step"
        self.message = f"Interrupted by {name}: job #{job.id} {done} and makes no video. Run the command again for it."


def _quiet_libraries() -> None:
    """The libraries' own progress bars and INFO lines ("Loading weights", "Writing model shards") would run
    between ours and repeat what the progress display says."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()
    disable_progress_bars()


async def _generate(
    settings: Settings, request: GenerationRequest, start: Upload | None, end: Upload | None, model: str | None
) -> Job:
    # torch and diffusers load only for the commands that generate: `queue list` stays quick.
    from engine.service import Engine

    _quiet_libraries()
    # pause_on_start is for `wanbot run` after a restart; here it would pause the queue under this command's own job.
    settings = settings.model_copy(update={"queue": settings.queue.model_copy(update={"pause_on_start": False})})
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()
        loop.remove_signal_handler(signum)  # a second Ctrl+C stops at once

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    engine = await Engine.open(settings)
    try:
        if await engine.is_paused():
            raise UserError(f"Nothing was queued: {QUEUE_PAUSED}.", "Resume it, then run this command again.")
        source = JobSource(platform="cli", chat_id="terminal", user_id="admin")
        submission = await engine.submit(request, source, start, end, model_override=model)
        job = submission.result.job
        for note in submission.notes:
            errors.print(f"note: {note}", markup=False)
        errors.print(f"job #{job.id}: {_settings_text(job)}", markup=False)
        job = (await _wait_for_jobs(engine, {job.id}, show_progress=True, stop=stop))[0]
        if received and job.status is not JobStatus.SUCCEEDED:
            raise _Interrupted(received[0], job)
        return job
    finally:
        await engine.close()


def _settings_text(job: Job) -> str:
    params = job.params
    return (
        f"{params.width}x{params.height}, {params.frames} frames at {params.fps} fps, {counted(params.steps, 'step')}, "
        f"seed {params.seed}, model {job.model}, {params.preset.value} preset"
    )


def _timings(job: Job) -> str:
    assert job.result is not None
    parts = [f"{key.removesuffix('_s')} {value:.2f}s" for key, value in job.result.timings.items()]
    return ", ".join(parts)


@app.command()
def demo(config: ConfigOption = None) -> None:
    """Run a t2v, an i2v (start + end image) and a ti2v job at quality, and a fast t2v one, on the tiny models
    through queue and worker."""
    settings = _settings(config)
    # Four jobs from one user: the per-user queue limit (3 by default) must let them all wait at once.
    queue = settings.queue.model_copy(update={"per_user_limit": max(settings.queue.per_user_limit, 4)})
    models = ModelsConfig(t2v="tiny", i2v="tiny", ti2v="tiny")
    settings = settings.model_copy(update={"models": models, "queue": queue})
    started = time.monotonic()
    jobs = _run(_demo(settings))
    failed = [job for job in jobs if job.status is not JobStatus.SUCCEEDED]
    for job in jobs:
        if job.result is not None:
            console.print(
                f"{job.mode.value:5} {job.params.preset.value:7} job #{job.id}: {job.result.path}  "
                f"{job.result.width}x{job.result.height}, {job.result.frames} frames @ {job.result.fps} fps, "
                f"{sum(job.result.run.transformer_calls.values()) if job.result.run else '?'} transformer passes  "
                f"({_timings(job)})",
                highlight=False,
            )
        else:
            console.print(f"{job.mode.value:5} job #{job.id}: {job.status.value}: {job.error_user}", highlight=False)
    console.print(f"demo finished in {time.monotonic() - started:.1f}s", highlight=False)
    if failed:
        raise typer.Exit(1)


async def _demo(settings: Settings) -> list[Job]:
    from engine.service import Engine, Upload

    start_png, end_png = _demo_images()
    engine = await Engine.open(settings)
    try:
        source = JobSource(platform="cli", chat_id="demo", user_id="admin")
        quality = Preset.QUALITY
        fox = "w1 w2 w3 a red fox running through snow"
        requests = [
            (GenerationRequest(mode=Mode.T2V, prompt=fox, preset=quality), None, None),
            (
                GenerationRequest(mode=Mode.I2V, prompt="w4 w5 the sun sets", preset=quality),
                Upload(start_png, "start.png"),
                Upload(end_png, "end.png"),
            ),
            (
                GenerationRequest(mode=Mode.TI2V, prompt="w6 w7 waves roll in", preset=quality),
                Upload(start_png, "start.png"),
                None,
            ),
            # The same fox with the distilled 4-step LoRAs: 4 transformer passes instead of 2 x 4.
            (GenerationRequest(mode=Mode.T2V, prompt=fox, preset=Preset.FAST), None, None),
        ]
        ids = set()
        for request, start, end in requests:
            submission = await engine.submit(request, source, start, end, priority=1)
            ids.add(submission.result.job.id)
            console.print(f"queued {request.mode.value} as job #{submission.result.job.id}", highlight=False)
        return await _wait_for_jobs(engine, ids, show_progress=sys.stderr.isatty())
    finally:
        await engine.close()


def _demo_images() -> tuple[bytes, bytes]:
    """A sunset-coloured start frame and a darker end frame of the same 4:3 shape, drawn on the spot."""
    import io

    from PIL import Image, ImageDraw

    frames = []
    for sun_y, sky in ((40, (250, 170, 90)), (90, (90, 60, 120))):
        image = Image.new("RGB", (160, 120), sky)
        draw = ImageDraw.Draw(image)
        draw.ellipse((60, sun_y, 100, sun_y + 40), fill=(255, 230, 120))
        draw.rectangle((0, 90, 160, 120), fill=(30, 60, 110))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        frames.append(buffer.getvalue())
    return frames[0], frames[1]


# -- models ------------------------------------------------------------------------------------------------------


@models_app.command("make-tiny")
def models_make_tiny(
    target: Annotated[Path, typer.Argument(help="Folder to create.")],
    kind: Annotated[Mode, typer.Option("--kind", help="Which pipeline shape: t2v, i2v or ti2v.")] = Mode.T2V,
    seed: Annotated[int, typer.Option(metavar="N", help="Seed of the random weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace a model already in the folder.")] = False,
) -> None:
    """Build a randomly initialised tiny Wan pipeline and save it as a diffusers folder."""
    if target.exists() and not target.is_dir():
        raise _usage_error(f"{target} is a file, not a folder. Name a new or empty folder.")
    if target.is_dir() and any(target.iterdir()):
        held = _folder_holds(target)
        if not (target / "model_index.json").exists():
            # --force replaces a model, never a folder of something else (`make-tiny . --force` must not empty it).
            raise _usage_error(f"{target} already holds {held}, not a model. Name a new or empty folder.")
        if not force:
            fix = "Name a new or empty folder, or add --force to replace it."
            raise _usage_error(f"{target} already holds {held}. {fix}")
        shutil.rmtree(target)
    _quiet_libraries()
    try:
        # Checked here, before the pipeline is built: a path this user cannot write fails in a second, not after.
        target.parent.mkdir(parents=True, exist_ok=True)
        make_tiny_model(target, kind, seed)
    except OSError as exc:
        raise _usage_error(
            f"The tiny model could not be written to {target} ({exc.strerror}). Choose a folder this user can write."
        ) from None
    size = sum(path.stat().st_size for path in target.rglob("*") if path.is_file())
    console.print(f"tiny {kind.value} model in {target} ({size / 1024:.0f} KiB)", highlight=False)


def _folder_holds(folder: Path) -> str:
    """What a folder holds, in a few words: which Wan model, or how many entries."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        entries = sorted(path.name for path in folder.iterdir())
        shown = ", ".join(entries[:3]) + (", …" if len(entries) > 3 else "")
        return f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} ({shown})"
    kind = "i2v" if index.get("_class_name") == "WanImageToVideoPipeline" else "t2v"
    kind = "ti2v" if index.get("expand_timesteps") else kind
    return f"a {kind} model ({index.get('_class_name')})"


def _repo_for(name: str, settings: Settings) -> str:
    """A mode names the model configured for it; anything else is taken as a repo id, checked by its form."""
    if name in {mode.value for mode in Mode}:
        return getattr(settings.models, name)
    try:
        check_repo_id(name)
    except UserError as exc:
        errors.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    return name


@models_app.command("download")
def models_download(
    name: Annotated[str, typer.Argument(help="t2v, i2v, ti2v (the configured model) or a repo id.")],
    revision: Annotated[str, typer.Option(metavar="REV", help="A branch, tag or commit of the repo.")] = "main",
    config: ConfigOption = None,
) -> None:
    """Download a model (only the files the pipeline needs), resuming whatever an earlier run fetched."""

    settings = _settings(config)
    repo_id = _repo_for(name, settings)
    downloader = model_downloader(settings)

    async def work() -> Path:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
        )
        # A bar only where someone watches it: in a log or a pipe it would leave a line of its own before the result.
        with Progress(*columns, console=errors, disable=not errors.is_terminal) as bar:
            task = bar.add_task(repo_id, total=None, speed="")

            def show(progress: Any) -> None:
                bar.update(
                    task,
                    completed=progress.done_bytes,
                    total=progress.total_bytes,
                    speed=f"{size_text(int(progress.speed_bps))}/s",
                )

            return await downloader.download(repo_id, revision, on_progress=show)

    folder = _run(work())
    console.print(f"{repo_id} is complete in {folder}", highlight=False)


@models_app.command("list")
def models_list(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """The configured models: on disk or not, size on disk (at once), size still to download (asked briefly)."""

    settings = _settings(config)
    downloader = model_downloader(settings)

    def describe(mode: Mode) -> dict[str, Any]:
        name = getattr(settings.models, mode.value)
        model = model_named(name, mode)
        row: dict[str, Any] = {
            "mode": mode.value,
            "model": model.name,
            "on_disk": False,
            "bytes_on_disk": 0,
            "bytes_to_download": None,
            "not_checked": None,
        }
        folder = (
            settings.models_dir / model.name
            if model.is_tiny
            else Path(model.name)
            if model.is_local
            else downloader.local_snapshot(model.name)
        )
        if folder is not None and (folder / "model_index.json").exists():
            row["on_disk"] = True
            row["bytes_on_disk"] = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
            row["bytes_to_download"] = 0
        elif model.is_tiny:
            row["bytes_to_download"] = 0  # built locally on first use
        return row

    async def work() -> list[dict[str, Any]]:
        rows = [describe(mode) for mode in Mode]  # from disk: no waiting on a network
        # Then the Hub, once and briefly, for what is missing: without a network this answers in seconds.
        to_check = list(dict.fromkeys(row["model"] for row in rows if row["bytes_to_download"] is None))
        for size in await downloader.sizes_to_download(to_check):
            for row in rows:
                if row["model"] == size.repo_id:
                    row["bytes_to_download"] = size.missing_bytes
                    row["not_checked"] = size.not_checked or None
        return rows

    rows = _run(work())
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table("mode", "model", "on disk", "size on disk", "to download")
    for row in rows:
        to_get = (
            f"not checked: {row['not_checked']}"
            if row["bytes_to_download"] is None
            else size_text(row["bytes_to_download"])
        )
        on_disk = "yes" if row["on_disk"] else "no"
        table.add_row(row["mode"], row["model"], on_disk, size_text(row["bytes_on_disk"]), to_get)
    console.print(table)


@models_app.command("verify")
def models_verify(
    name: Annotated[str, typer.Argument(help="t2v, i2v, ti2v (the configured model) or a repo id.")],
    config: ConfigOption = None,
) -> None:
    """Check a downloaded model's files against their sizes and sha256. Exit 0 intact, 2 not."""

    settings = _settings(config)
    repo_id = _repo_for(name, settings)
    folder = model_downloader(settings).local_snapshot(repo_id)
    if folder is None:
        errors.print(f"{repo_id} is not downloaded. Run: wanbot models download {name}")
        raise typer.Exit(2)
    problems = verify_snapshot(folder)
    for problem in problems:
        errors.print(f"{repo_id}: {problem}", markup=False)
    if problems:
        raise typer.Exit(2)
    console.print(f"{repo_id} is intact ({folder})", highlight=False)


# -- run ---------------------------------------------------------------------------------------------------------


@app.command()
def run(config: ConfigOption = None) -> None:
    """Run the worker and the chat adapters that have a token, until Ctrl+C or SIGTERM."""
    _run_role(config, "run")


@app.command("serve")
def serve_command(config: ConfigOption = None) -> None:
    """Run the chat adapters, delivery and clean-up without a worker (no GPU, no model): `wanbot worker` processes,
    here or on other machines sharing database.url, make the videos."""
    _run_role(config, "serve")


@app.command("worker")
def worker_command(
    device: Annotated[
        str | None, typer.Option("--device", help="The GPU to use, such as cuda:1 (default: generation.device).")
    ] = None,
    devices: Annotated[
        str | None,
        typer.Option(
            "--devices",
            help="Start one worker process per GPU listed, such as cuda:0,cuda:1 (default: generation.devices).",
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Run one GPU worker and nothing else (no chat token needed); with --devices, one worker process per GPU."""
    settings = _settings(config)
    if device and devices:
        raise _usage_error("Give --device (one worker) or --devices (one process per GPU), not both.")
    listed = [name.strip() for name in devices.split(",") if name.strip()] if devices else settings.generation.devices
    if device is None and listed:
        from bot.roles.worker_processes import run_worker_processes

        failure = _run(run_worker_processes(listed, str(config) if config else None, _say))
        _exit_on(failure)
        return
    if device is not None:
        settings.generation = settings.generation.model_copy(update={"device": device})
    _run_role(config, "worker", settings)


def _say(line: str) -> None:
    errors.print(line, markup=False)


def _run_role(config: Path | None, role: str, settings: Settings | None = None) -> None:
    from bot.roles.runtime import Role, serve

    settings = settings or _settings(config)
    _exit_on(_run(serve(settings, _say, Role(role))))


def _exit_on(failure: str | None) -> None:
    if failure:
        # systemd's Restart=on-failure starts it again; exit code 2 stays for what a restart cannot fix.
        errors.print(f"wanbot stopped: {failure}. The log above has the details.", markup=False)
        raise typer.Exit(1)
