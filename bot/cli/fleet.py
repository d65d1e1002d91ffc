"""`wanbot workers` (the fleet of worker processes as the database knows it) and `wanbot backup`."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from bot.chat.texts import making, worker_doing, worker_names
from bot.cli.common import ConfigOption, JsonOption, console, cut, run_or_exit, settings_from, usage_error
from engine.errors import JobNotFound, UserError, counted, duration_text
from engine.jobs import Job, WorkerRecord, WorkerState
from engine.operator import open_job_store
from engine.service import size_text

NO_WORKERS = (
    "No worker has started yet: queued videos wait until one does. Start one with `wanbot worker` (a GPU worker "
    "alone) or `wanbot run` (the chats and a worker)."
)


NONE_ONLINE = "None is online: queued videos wait until a worker starts (`wanbot worker` or `wanbot run`)."


WORKER_COLUMNS = ("worker", "GPU", "state", "model", "job", "free GPU", "up")
STOPPED_SHOWN_S = 3600.0  # stopped workers older than this are left out unless --all


def workers(
    as_json: JsonOption = False,
    show_all: Annotated[
        bool, typer.Option("--all", metavar="", help="Also workers stopped more than an hour ago (default: not).")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """The worker processes the job store has heard from in the last week: online ones with what they do (their
    job, model and free GPU memory), then those offline (silent past queue.lease_s) and stopped. Names, states and
    jobs as /status says them."""
    settings = settings_from(config)

    async def work() -> tuple[list[WorkerRecord], dict[int, Job]]:
        async with open_job_store(settings) as store:
            records = await store.workers()
            jobs: dict[int, Job] = {}
            for record in records:
                if record.current_job is not None:
                    with contextlib.suppress(JobNotFound):  # deleted since the worker said it runs it
                        jobs[record.current_job] = await store.job(record.current_job)
            return records, jobs

    records, jobs = run_or_exit(work())
    now, lease_s = time.time(), settings.queue.lease_s
    online = {record.id: record.online(now, lease_s) for record in records}
    long_stopped = [
        record
        for record in records
        if record.state is WorkerState.STOPPED and now - record.heartbeat_at > STOPPED_SHOWN_S and not show_all
    ]
    records = [record for record in records if record not in long_stopped]
    # Online first, then offline (silent: worth a look), then stopped; each part as the store lists it.
    records.sort(key=lambda record: 0 if online[record.id] else 2 if record.state is WorkerState.STOPPED else 1)
    if as_json:
        rows = [{**record.model_dump(mode="json"), "online": online[record.id]} for record in records]
        console.print_json(json.dumps(rows))
        return
    if not records and not long_stopped:
        console.print(NO_WORKERS, highlight=False, markup=False)
        return
    # The names /status uses for the online ones; a past process always with its pid.
    names = worker_names([record for record in records if online[record.id]])
    table = Table()
    for column in WORKER_COLUMNS:
        table.add_column(column, overflow="fold")  # ids and model names wrap on a narrow terminal, never cut
    for record in records:
        name = names.get(record.id) or f"{record.host}/{record.device} (pid {record.pid})"
        job = jobs.get(record.current_job) if record.current_job is not None else None
        cells = _worker_cells(record, job, online[record.id], now)
        table.add_row(*(Text(cell) for cell in [name, *cells]))  # Text: a prompt's [brackets] are not rich markup
    console.print(table)
    if long_stopped:
        hidden = counted(len(long_stopped), "worker")
        console.print(f"{hidden} stopped more than an hour ago not shown (--all shows them).", highlight=False)
    if not any(online.values()):
        console.print(NONE_ONLINE, highlight=False, markup=False)


def _worker_cells(record: WorkerRecord, job: Job | None, online: bool, now: float) -> list[str]:
    """A row of `wanbot workers` after its name, in WORKER_COLUMNS' order; "-" for what is not known."""
    job = making(record, job) if online else None
    if online:
        state = worker_doing(record, job)
        if record.downloading:
            downloads = f"downloading {', '.join(sorted(record.downloading))}"
            state = downloads if state == "downloading" else f"{state}, {downloads}"
    elif record.state is WorkerState.STOPPED:
        state = "stopped"
    else:
        state = f"offline (last heard {_ago(now - record.heartbeat_at)} ago)"
    current = f"#{job.id} {cut(job.params.prompt, 24)}" if job is not None else "-"
    free = size_text(record.free_memory_bytes) if record.free_memory_bytes is not None else "-"
    uptime = duration_text(now - record.started_at) if online else "-"
    gpu = (record.gpu_name or "-").removeprefix("NVIDIA ")
    return [gpu, state, record.loaded_model or "-", current, free, uptime]


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


def backup(
    target: Annotated[Path, typer.Argument(help="The file to write the copy to; an existing one is replaced.")],
    config: ConfigOption = None,
) -> None:
    """Copy the job database, consistently, even while wanbot runs (SQLite's online backup)."""
    settings = settings_from(config)
    if target.is_dir():
        raise usage_error(f"{target} is a folder; name the file to write, such as {target / 'wanbot-backup.db'}.")

    async def work() -> Path | None:
        async with open_job_store(settings) as store:
            try:
                await store.backup(target)
            except OSError as exc:
                raise UserError(f"Could not write {target}: {exc.strerror}.", "Choose another place.") from None
            return store.path

    console.print(f"Copied {run_or_exit(work())} to {target}.", highlight=False)
