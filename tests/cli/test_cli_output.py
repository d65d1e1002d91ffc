"""What the `wanbot` command prints for people: help, validation notes, the queue, and its one-line refusals."""

from __future__ import annotations

import asyncio
import json
import re
import socket
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bot.cli import app
from bot.cli.queue import _place_text
from engine.config import load_settings
from engine.jobs import JobSource, QueuePosition, WorkerRecord
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode
from tests import imagefactory
from tests.cli.test_cli import wanbot
from tests.factories import params

pytestmark = pytest.mark.timeout(180)

LONG_MODEL = "/srv/models/a/rather/long/folder/name/that/a/table/would/cut/Wan2.2-T2V-A14B-Diffusers-copy"


def command_paths() -> list[list[str]]:
    """Every command and group of the app, as the words that call it ([] is `wanbot` itself)."""
    paths: list[list[str]] = []

    def walk(command: object, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def help_entries(text: str) -> list[str]:
    """The entries of the Options and Arguments sections, each with its continuation lines joined."""
    entries: list[str] = []
    section = None
    for line in text.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":") if line.endswith(":") else None
        elif section in ("Options", "Arguments") and line.strip():
            if re.match(r"  \S", line):
                entries.append(line.strip())
            else:
                entries[-1] += "  " + line.strip()
    return entries


def test_every_help_gives_each_option_a_text_and_a_default_and_no_bool_metavar(tmp_path: Path):
    paths = command_paths()
    assert ["queue", "show"] in paths and ["generate"] in paths
    # In this process: --help runs no command, and a process per help would take a minute of the suite.
    runner = CliRunner()
    for path in paths:
        done = runner.invoke(app, [*path, "--help"], prog_name="wanbot", env={"COLUMNS": "200"})
        assert done.exit_code == 0, (path, done.output)
        assert "<bool>" not in done.stdout, path
        entries = help_entries(done.stdout)
        assert any(entry.startswith("--help") for entry in entries), path
        for entry in entries:
            name, _, described = entry.partition("  ")
            assert described.strip(), f"wanbot {' '.join(path)}: {entry!r} has no help text"
            takes_value = entry.startswith("--") and " " in name
            if takes_value and "[required]" not in entry:
                assert "default" in entry, f"wanbot {' '.join(path)}: {entry!r} does not say its default"


def test_validate_says_what_generate_would_say_about_the_same_pictures(tmp_path: Path):
    wide, square, clear = tmp_path / "wide.png", tmp_path / "square.png", tmp_path / "clear.png"
    wide.write_bytes(imagefactory.png(400, 100))
    square.write_bytes(imagefactory.png(160, 120))
    clear.write_bytes(imagefactory.transparent_png())
    settings = load_settings(None)

    async def notes_of_submit(mode: Mode, start: Path, end: Path | None) -> set[str]:
        from engine.pipeline.models import GenerationRequest
        from engine.service import Engine, Upload

        engine = await Engine.open(settings.model_copy(update={"data_dir": tmp_path / "engine"}))
        try:
            uploads = [Upload(path.read_bytes(), path.name) if path else None for path in (start, end)]
            source = JobSource(platform="cli", chat_id="terminal", user_id="admin")
            submission = await engine.submit(GenerationRequest(mode=mode), source, *uploads)
            return set(submission.notes)
        finally:
            await engine.close()

    for mode, start, end in ((Mode.TI2V, square, square), (Mode.I2V, wide, None)):
        args = ["--start", str(start), *(["--end", str(end)] if end else [])]
        done = wanbot("validate", "--mode", mode.value, *args, "--json", data=tmp_path)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        said = {*report["warnings"], *report["adjustments"]}
        assert said == asyncio.run(notes_of_submit(mode, start, end))
    ignored = wanbot("validate", "--mode", "ti2v", "--start", str(square), "--end", str(square), data=tmp_path)
    assert "does not use an end image" in ignored.stdout
    cropped = wanbot("validate", "--mode", "i2v", "--start", str(wide), data=tmp_path)
    assert "made from its middle at 2.4:1" in cropped.stdout
    flattened = wanbot("validate", "--mode", "ti2v", "--start", str(clear), data=tmp_path)
    assert flattened.returncode == 0
    assert "The start image has transparent parts; the video shows them filled with white." in flattened.stdout


def test_a_place_in_queue_show_says_when_its_wait_is_not_known_and_never_0s():
    assert _place_text(QueuePosition(position=3, eta_s=None), []) == "3, wait not known yet"
    assert _place_text(QueuePosition(position=1, eta_s=0.2), []) == "1, next to start"
    assert _place_text(QueuePosition(position=2, eta_s=0.4), []) == "2, about 1s to wait"


def enqueue_jobs(data: Path) -> None:
    """Job 1 waits for its model's download; job 2 failed."""

    async def work() -> None:
        queue = await JobQueue.open(data / "wanbot.sqlite3")
        source = JobSource(platform="telegram", chat_id="1", user_id="42")
        await queue.enqueue(source, Mode.T2V, LONG_MODEL, params("a fox"))
        await queue.enqueue(source, Mode.T2V, "tiny-t2v", params("a hare", seed=77, width=96, height=64))
        waiting = await queue.claim_next()
        assert waiting is not None
        await queue.requeue(waiting.id, "waiting for the model download", token=waiting.claim_token)
        await queue.heartbeat(WorkerRecord(id="gpu-a/cuda:0/7-ab", host="gpu-a", pid=7, device="cuda:0", started_at=0))
        failed = await queue.claim_next(exclude_models=[LONG_MODEL], worker_id="gpu-a/cuda:0/7-ab")
        assert failed is not None
        await queue.mark_failed(failed.id, "The model ran out of memory.", "CUDA OOM", token=failed.claim_token)
        await queue.close()

    asyncio.run(work())


def test_queue_show_in_text_gives_seed_size_times_and_error_and_never_none(tmp_path: Path):
    enqueue_jobs(tmp_path)
    failed = wanbot("queue", "show", "2", data=tmp_path)
    assert failed.returncode == 0, failed.stderr
    assert "seed: 77" in failed.stdout
    assert "size: 96x64, 5 frames at 16 fps" in failed.stdout and "steps: 2" in failed.stdout
    assert re.search(r"asked: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", failed.stdout)
    assert "started: " in failed.stdout and "finished: " in failed.stdout
    assert "error: The model ran out of memory." in failed.stdout
    assert "cause: CUDA OOM" in failed.stdout and "worker: gpu-a/cuda:0/7-ab on gpu-a" in failed.stdout
    waiting = wanbot("queue", "show", "1", data=tmp_path)
    assert "position: 1, waiting for its model to download" in waiting.stdout
    assert "eta" not in waiting.stdout
    for shown in (failed.stdout, waiting.stdout):
        assert "None" not in shown


def test_queue_show_of_a_missing_job_points_to_queue_list_not_a_chat_command(tmp_path: Path):
    enqueue_jobs(tmp_path)
    for command in (["show"], ["cancel"], ["retry"]):
        done = wanbot("queue", *command, "999", data=tmp_path)
        assert done.returncode == 2
        assert done.stderr.strip() == "There is no job #999. Try wanbot queue list to see the jobs there are."


def test_queue_stats_refuses_days_below_zero_in_one_line(tmp_path: Path):
    for days in ("-1", "0", "nan"):
        done = wanbot("queue", "stats", "--days", days, data=tmp_path)
        assert done.returncode == 2
        assert done.stderr.strip().count("\n") == 0 and "--days" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_queue_list_shows_model_and_user_and_cuts_no_path(tmp_path: Path):
    enqueue_jobs(tmp_path)
    done = wanbot("queue", "list", data=tmp_path, env={"COLUMNS": "60"})
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first.startswith("#2 · failed · t2v · tiny-t2v · telegram:42 · a hare")
    assert first.endswith("The model ran out of memory.")
    assert f"#1 · queued · t2v · {LONG_MODEL} · telegram:42 · a fox" == second


def test_generate_names_the_model_option_it_refuses(tmp_path: Path):
    done = wanbot("generate", "--model", "nosuch", "--mode", "t2v", "--prompt", "a fox", data=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("--model 'nosuch' is neither a folder on this machine nor a Hub repo id.")
    assert "models." not in done.stderr and done.stderr.strip().count("\n") == 0


def test_a_database_server_out_of_reach_exits_1_so_that_systemd_starts_it_again(tmp_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    url = f"postgresql://wanbot@127.0.0.1:{closed_port}/wanbot"
    down = wanbot("queue", "list", data=tmp_path, env={"WANBOT_DATABASE__URL": url})
    assert down.returncode == 1, down.stderr
    assert down.stderr.startswith("Cannot use the job database") and "Traceback" not in down.stderr
