"""`wanbot run` and the database it lives on: a damaged or vanished file, backups, videos that never overwrite."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.queue.jobqueue import JobQueue
from engine.storage.cleanup import remove_delivered_videos
from engine.storage.images import Mode
from engine.worker import output_name
from tests.cli.test_cli import REPO, wanbot
from tests.factories import params, result_for_child, source

pytestmark = pytest.mark.timeout(120)


def _run_env(data: Path) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "TELEGRAM_"))}
    environment.pop("DISCORD_BOT_TOKEN", None)
    environment.update({"WANBOT_DATA_DIR": str(data), "WANBOT_MODELS__T2V": "tiny", "PYTHONUNBUFFERED": "1"})
    environment["WANBOT_DOWNLOADS__ENDPOINT"] = "http://127.0.0.1:9"  # never a real Hub: a closed port
    return environment


def test_a_damaged_database_stops_start_up_with_one_line_and_exit_2(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "wanbot.sqlite3").write_bytes(b"this is not a database, it was overwritten by a careless copy" * 100)
    done = wanbot("run", data=data)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert f"The job database {data / 'wanbot.sqlite3'} cannot be used" in lines[0] and "backup" in lines[0]
    listing = wanbot("queue", "list", data=data)
    assert listing.returncode == 2 and "cannot be used" in listing.stderr and "Traceback" not in listing.stderr


def test_a_database_deleted_while_running_stops_the_bot_with_a_clear_line(tmp_path: Path):
    data = tmp_path / "data"
    process = _start_run(data)
    try:
        started = _read_until(process, "wanbot running", 60)
        assert "wanbot running" in started
        (data / "wanbot.sqlite3").unlink()
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1, output
    database = data / "wanbot.sqlite3"
    assert f"wanbot stopped: the job database {database} was deleted or replaced while wanbot ran" in output


def _start_run(data: Path) -> subprocess.Popen[str]:
    """`wanbot run` with no chat token, its output readable line by line."""
    return subprocess.Popen(
        [sys.executable, "-c", "from bot.cli import main; main()", "run"],
        cwd=REPO,
        env=_run_env(data),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _read_until(process: subprocess.Popen[str], marker: str, limit_s: float) -> str:
    seen = ""
    deadline = time.monotonic() + limit_s
    while marker not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += process.stdout.readline()
    return seen


def test_sigterm_still_stops_the_bot_cleanly(tmp_path: Path):
    data = tmp_path / "data"
    process = _start_run(data)
    try:
        started = _read_until(process, "wanbot running", 60)
        # No chat token at all: the operator hears that this process is a worker only.
        assert "as a worker only (no chat token set: TELEGRAM_BOT_TOKEN or DISCORD_BOT_TOKEN" in started
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Traceback" not in output
    assert "received SIGTERM: stopping; a running job goes back to the queue" in output


async def test_backup_copies_the_live_database_and_the_copy_opens(tmp_path: Path):
    data = tmp_path / "data"
    live = await JobQueue.open(data / "wanbot.sqlite3")
    try:
        created = await live.enqueue(source(), Mode.T2V, "tiny", params("a fox kept safe"))
        done = await asyncio.to_thread(wanbot, "backup", str(tmp_path / "copy.db"), data=data)
        assert done.returncode == 0, done.stderr
        assert f"Copied {data / 'wanbot.sqlite3'} to {tmp_path / 'copy.db'}." in done.stdout
    finally:
        await live.close()
    copy = await JobQueue.open(tmp_path / "copy.db")
    try:
        assert (await copy.get(created.job.id)).params.prompt == "a fox kept safe"
    finally:
        await copy.close()
    into_folder = await asyncio.to_thread(wanbot, "backup", str(tmp_path), data=data)
    assert into_folder.returncode == 2 and "is a folder" in into_folder.stderr


async def test_video_names_are_unique_and_clean_up_keeps_another_queues_video_with_the_same_number(tmp_path: Path):
    assert output_name(1) != output_name(1)
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    queue = await JobQueue.open(tmp_path / "new.db")
    try:
        await queue.enqueue(source(), Mode.T2V, "tiny", params())
        job = await queue.claim_next()
        ours = outputs / output_name(job.id)
        theirs = outputs / output_name(job.id)  # made by a queue that was started over; its job 1 was another video
        for video in (ours, theirs, ours.with_name(f"{ours.stem}.fit-10485760.mp4")):
            video.write_bytes(b"video")
        await queue.mark_succeeded(
            job.id, result_for_child().model_copy(update={"path": str(ours)}), token=job.claim_token
        )
        await queue.mark_delivered(job.id)
        assert await remove_delivered_videos(queue, outputs, retention_s=-1) == 2
        assert sorted(os.listdir(outputs)) == [theirs.name]
    finally:
        await queue.close()


async def test_quick_check_runs_on_a_healthy_database_and_a_truncated_one_is_refused(tmp_path: Path):
    path = tmp_path / "queue.db"
    queue = await JobQueue.open(path)
    for user in "abcdefgh":
        await queue.enqueue(source(user), Mode.T2V, "tiny", params("x" * 2000))
    await queue.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2)
    from engine.errors import UserError

    with pytest.raises(UserError, match="cannot be used"):
        await JobQueue.open(path)
