"""`wanbot queue ...`: list, show, cancel, retry, redeliver, pause, resume and the statistics of the job queue."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from bot.chat.core import reply_for_new_job
from bot.cli.common import (
    CLI_ACTOR,
    ConfigOption,
    JobIdArgument,
    JsonOption,
    console,
    cut,
    run_or_exit,
    settings_from,
    terminal_hints,
    time_text,
    usage_error,
)
from engine.errors import duration_text
from engine.jobs import EventKind, Job, JobStatus
from engine.operator import open_job_store


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
    settings = settings_from(config)

    async def work() -> list[Job]:
        async with open_job_store(settings) as store:
            return await store.jobs(status or (), limit=limit)

    jobs = run_or_exit(work())
    if as_json:
        console.print_json(json.dumps([_job_summary(job) for job in jobs]))
        return
    if not jobs:
        console.print("No jobs.")
    for job in jobs:
        # A line per job, not a table: a table cuts the model's folder and the video's path to fit the terminal.
        outcome = job.result.path if job.result else job.error_user
        parts = [f"#{job.id}", job.status.value, job.mode.value, job.model, job.source.user_key]
        parts += [cut(job.params.prompt), *([outcome] if outcome else [])]
        console.print(" · ".join(parts), highlight=False, markup=False)


def queue_show(job_id: JobIdArgument, as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Everything about one job, with its event history."""
    settings = settings_from(config)

    async def work() -> tuple[Job, list[tuple[str, str | None]], Any, dict[str, str]]:
        async with open_job_store(settings) as store, terminal_hints():
            job, history, place = await store.job(job_id), await store.history(job_id), await store.position(job_id)
            hosts = {record.id: record.host for record in await store.workers()} if job.worker_id else {}
            return job, history, place, hosts

    job, history, place, hosts = run_or_exit(work())
    data = job.model_dump(mode="json")
    # Output that gets pasted into bug reports: a Discord interaction token lets anyone post as the bot for 15 min.
    reply = data["source"]["reply"]
    data["source"]["reply"] = {key: "<redacted>" if "token" in key else value for key, value in reply.items()}
    data["history"] = [{"event": kind, "detail": detail} for kind, detail in history]
    data["position"] = place.model_dump() if place else None
    if as_json:
        console.print_json(json.dumps(data))
        return
    for key, value in _job_lines(job, history, place, hosts):
        console.print(f"{key:>9}: {value}", highlight=False, markup=False)


def _job_lines(
    job: Job, history: list[tuple[str, str | None]], place: Any, workers: dict[str, str]
) -> list[tuple[str, str]]:
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
        ("asked", time_text(job.created_at)),
    ]
    if job.started_at is not None:
        waited = duration_text(job.started_at - job.created_at)
        lines.append(("started", f"{time_text(job.started_at)} (waited {waited})"))
    if job.finished_at is not None:
        took = f" (ran {duration_text(job.finished_at - job.started_at)})" if job.started_at is not None else ""
        lines.append(("finished", time_text(job.finished_at) + took))
    if place is not None:
        lines.append(("position", _place_text(place, history)))
    if job.worker_id is not None:
        host = workers.get(job.worker_id)
        lines.append(("worker", job.worker_id + (f" on {host}" if host else "")))
    if job.error_user:
        lines.append(("error", job.error_user))
    if job.error_detail and job.error_detail != job.error_user:
        lines.append(("cause", job.error_detail))
    if job.result is not None:
        lines.append(("video", job.result.path))
    if job.delivery_status is not None:
        problem = f": {job.delivery_error}" if job.delivery_error else ""
        lines.append(("delivery", f"{job.delivery_status.value} after {job.delivery_attempts} tries{problem}"))
    if job.delivered_at is not None:
        lines.append(("delivered", time_text(job.delivered_at)))
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


def queue_cancel(job_id: JobIdArgument, config: ConfigOption = None) -> None:
    """Cancel a queued job at once, or ask a running one to stop."""
    settings = settings_from(config)

    async def work() -> Job:
        async with open_job_store(settings) as store, terminal_hints():
            return await store.cancel(job_id, CLI_ACTOR)

    job = run_or_exit(work())
    verb = "cancelled" if job.status is JobStatus.CANCELLED else "asked to stop (it is running)"
    console.print(f"job #{job.id} {verb}")


def queue_retry(job_id: JobIdArgument, config: ConfigOption = None) -> None:
    """Queue a finished job again as a new job."""
    settings = settings_from(config)

    async def work():
        async with open_job_store(settings) as store, terminal_hints():
            # The new job gets its own message in the chat: the old one keeps its ending.
            old = await store.job(job_id)
            source = old.source.model_copy(update={"message_id": None, "reply": reply_for_new_job(old.source.reply)})
            return await store.retry(job_id, CLI_ACTOR, source=source)

    added = run_or_exit(work())
    console.print(f"job #{added.job.id} queued as a retry of job #{job_id}")


def queue_redeliver(job_id: JobIdArgument, config: ConfigOption = None) -> None:
    """Send a finished video whose delivery failed again, from its stored file (the running bot sends it)."""
    settings = settings_from(config)

    async def work() -> Job:
        async with open_job_store(settings) as store, terminal_hints():
            return await store.redeliver(job_id)

    job = run_or_exit(work())
    console.print(f"job #{job.id}: the running bot sends {job.result.path} to {job.source.platform} again")


def queue_stats(
    days: Annotated[float, typer.Option(metavar="DAYS", help="How far back, by the day a job was asked for.")] = 7,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Per model: how many jobs, how they ended, how long they waited and ran."""
    if not 0 < days < math.inf:
        raise usage_error(f"--days must be a number of days above 0, not {days:g}. Give one such as 7, or 0.5.")
    settings = settings_from(config)

    async def work() -> list[dict[str, Any]]:
        async with open_job_store(settings) as store:
            return await store.stats(days * 86400)

    rows = run_or_exit(work())
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


def queue_pause(config: ConfigOption = None) -> None:
    """Stop starting new jobs (the running one finishes)."""
    _set_paused(config, True)


def queue_resume(config: ConfigOption = None) -> None:
    """Start jobs again after a pause."""
    _set_paused(config, False)


def _set_paused(config: Path | None, paused: bool) -> None:
    settings = settings_from(config)

    async def work() -> None:
        async with open_job_store(settings) as store:
            await store.set_paused(paused)

    run_or_exit(work())
    console.print("queue paused" if paused else "queue resumed")
