"""The first hour with `wanbot`: what a new user trips over, run as a subprocess the way they run it."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from engine.jobs import EventKind, Job, JobEvent, JobStatus, Stage
from engine.jobs import Progress as JobProgress
from engine.queue.jobqueue import JobQueue

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(240)
# An unusable path for root too, who may write anywhere a chmod would forbid.
UNWRITABLE = Path("/proc/wanbot-test")


def environment(data: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("WANBOT_")}
    return {**environment, "WANBOT_DATA_DIR": str(data), "COLUMNS": "200", **(env or {})}


def wanbot(*args: str, data: Path, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-c", "from bot.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=environment(data, env),
        cwd=REPO,
        timeout=timeout,
    )


def start_wanbot(*args: str, data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from bot.cli import main; main()", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(data),
        cwd=REPO,
    )


def jobs_in(data: Path) -> list[Job]:
    async def read() -> list[Job]:
        queue = await JobQueue.open(data / "wanbot.sqlite3")
        try:
            return await queue.list_jobs((), limit=10)
        finally:
            await queue.close()

    return asyncio.run(read())


def pause(data: Path) -> None:
    async def write() -> None:
        queue = await JobQueue.open(data / "wanbot.sqlite3")
        await queue.set_paused(True)
        await queue.close()

    asyncio.run(write())


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)


def one_line(text: str) -> bool:
    return text.strip() != "" and "\n" not in text.strip() and "Traceback" not in text


SLOW_TINY_JOB = (
    "generate",
    "--mode",
    "t2v",
    "--prompt",
    "w1 fox",
    "--model",
    "tiny",
    "--steps",
    "60",
    "--frames",
    "41",
)


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGINT, 130, "Ctrl+C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_an_interrupted_generate_cancels_its_job_and_says_so(tmp_path: Path, signum: int, code: int, said: str):
    running = start_wanbot(*SLOW_TINY_JOB, data=tmp_path)
    try:

        def denoising() -> bool:
            assert running.poll() is None, running.communicate()
            jobs = jobs_in(tmp_path) if (tmp_path / "wanbot.sqlite3").exists() else []
            return bool(jobs and jobs[0].progress and jobs[0].progress.stage is Stage.DENOISING)

        wait_for(denoising, "the job's first steps")
        running.send_signal(signum)
        _, stderr = running.communicate(timeout=60)
    finally:
        running.kill()
    assert running.returncode == code, stderr
    last = stderr.strip().splitlines()[-1]
    assert last == f"Interrupted by {said}: job #1 was cancelled and makes no video. Run the command again for it."
    assert "Traceback" not in stderr
    [job] = jobs_in(tmp_path)
    assert job.status is JobStatus.CANCELLED  # not queued again, for the next command to make first


def test_generate_on_a_paused_queue_queues_nothing_and_says_how_to_resume(tmp_path: Path):
    pause(tmp_path)  # a pause stored long ago is as paused as one from a minute ago
    done = wanbot("generate", "--mode", "t2v", "--prompt", "w1 fox", "--model", "tiny", data=tmp_path, timeout=60)
    assert done.returncode == 2
    assert one_line(done.stderr) and "the queue is paused (wanbot queue resume)" in done.stderr
    assert jobs_in(tmp_path) == []


def hold_the_worker_lock(data: Path):
    """Stand in for another wanbot process that runs the worker."""
    data.mkdir(parents=True, exist_ok=True)
    handle = (data / "worker.lock").open("w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def test_generate_waiting_on_another_worker_stops_when_the_queue_is_paused(tmp_path: Path):
    lock = hold_the_worker_lock(tmp_path)
    try:
        pause(tmp_path)
        refused = wanbot(
            "generate", "--mode", "t2v", "--prompt", "w1 fox", "--model", "tiny", data=tmp_path, timeout=60
        )
        assert refused.returncode == 2 and "the queue is paused (wanbot queue resume)" in refused.stderr
        assert jobs_in(tmp_path) == []

        asyncio.run(_resume(tmp_path))
        waiting = start_wanbot("generate", "--mode", "t2v", "--prompt", "w1 fox", "--model", "tiny", data=tmp_path)
        wait_for(lambda: (tmp_path / "wanbot.sqlite3").exists() and len(jobs_in(tmp_path)) == 1, "the job")
        pause(tmp_path)  # while the other process's worker is paused, the job would wait for ever
        _, stderr = waiting.communicate(timeout=60)
    finally:
        lock.close()
    assert waiting.returncode == 2, stderr
    assert stderr.strip().splitlines()[-1].startswith("Cancelled job #1: the queue is paused (wanbot queue resume).")
    assert [job.status for job in jobs_in(tmp_path)] == [JobStatus.CANCELLED]


async def _resume(data: Path) -> None:
    queue = await JobQueue.open(data / "wanbot.sqlite3")
    await queue.set_paused(False)
    await queue.close()


def test_pause_on_start_does_not_pause_the_queue_under_generate(tmp_path: Path):
    env = {"WANBOT_QUEUE__PAUSE_ON_START": "true"}
    args = ("generate", "--mode", "t2v", "--prompt", "w1 fox", "--model", "tiny", "--frames", "5", "--steps", "2")
    done = wanbot(*args, data=tmp_path, env=env, timeout=90)
    assert done.returncode == 0, done.stderr
    assert [job.status for job in jobs_in(tmp_path)] == [JobStatus.SUCCEEDED]


def test_generate_says_the_settings_it_used_and_keeps_the_libraries_quiet(tmp_path: Path):
    args = ("generate", "--mode", "t2v", "--prompt", "w1 fox", "--model", "tiny", "--frames", "5", "--steps", "3")
    done = wanbot(*args, "--seed", "5", data=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "job #1: 64x64, 5 frames at 16 fps, 3 steps, seed 5, model tiny-t2v" in done.stderr
    for noise in ("Writing model shards", "Loading weights", "Loading pipeline components", "it/s", "None"):
        assert noise not in done.stderr


def test_the_progress_display_shows_no_step_count_before_there_is_one():
    from bot.cli.generate import _progress_display

    def shown(*progress: JobProgress) -> str:
        console = Console(record=True, width=120, force_terminal=False)
        with _progress_display(True, console) as display:
            job = job_for_display()
            display.show(JobEvent(kind=EventKind.STARTED, job=job))
            for update in progress:
                display.show(JobEvent(kind=EventKind.PROGRESS, job=job, progress=update))
        return console.export_text()

    loading = shown(JobProgress(stage=Stage.LOADING))
    assert "job #7 loading" in loading and "None" not in loading and "0/" not in loading
    denoising = shown(JobProgress(stage=Stage.LOADING), JobProgress(stage=Stage.DENOISING, step=3, total=8))
    assert "job #7 denoising" in denoising and "3/8" in denoising


def job_for_display() -> Job:
    from tests.factories import params

    return Job.model_validate(
        {
            "id": 7,
            "source": {"platform": "cli", "chat_id": "terminal", "user_id": "admin"},
            "mode": "t2v",
            "model": "tiny-t2v",
            "params": params().model_dump(),
            "images": [],
            "status": "running",
            "priority": 0,
            "attempts": 1,
            "cancel_requested": False,
            "error_user": None,
            "error_detail": None,
            "progress": None,
            "result": None,
            "delivery_status": None,
            "delivery_attempts": 0,
            "delivery_error": None,
            "retry_of": None,
            "created_at": 0.0,
            "started_at": 0.0,
            "finished_at": None,
            "delivered_at": None,
        }
    )


@pytest.mark.parametrize(
    ("case", "args", "env", "said"),
    [
        ("a bad log level", ("queue", "list"), {"WANBOT_LOG_LEVEL": "loud"}, "log_level"),
        ("a file as data folder", ("queue", "list"), {"WANBOT_DATA_DIR": "{file}"}, "is a file, not a folder"),
        ("a file above it", ("queue", "list"), {"WANBOT_DATA_DIR": "{file}/data"}, "cannot be created"),
        ("an unwritable data folder", ("queue", "list"), {"WANBOT_DATA_DIR": str(UNWRITABLE)}, str(UNWRITABLE)),
        ("--out a folder", ("generate", "--mode", "t2v", "--prompt", "w1", "--out", "{dir}"), {}, "is a folder"),
        ("make-tiny onto a file", ("models", "make-tiny", "{file}"), {}, "is a file, not a folder"),
        ("make-tiny unwritable", ("models", "make-tiny", str(UNWRITABLE / "tiny")), {}, "could not be written"),
    ],
)
def test_what_the_user_gets_wrong_is_one_line_and_exit_2(tmp_path: Path, case, args, env, said):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    a_dir = tmp_path / "a-dir"
    a_dir.mkdir()

    def filled(text: str) -> str:
        return text.format(file=a_file, dir=a_dir)

    data = tmp_path / "data"
    env = {key: filled(value) for key, value in env.items()}
    done = wanbot(*map(filled, args), data=data, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert one_line(done.stderr), done.stderr
    assert said in done.stderr
    if args[0] == "generate":
        assert jobs_in(data) == []  # refused before anything was queued or made


def test_an_unknown_environment_variable_is_warned_about(tmp_path: Path):
    env = {"WANBOT_QEUE__PER_USER_LIMIT": "1", "WANBOT_FOO__BAR": "x", "WANBOT_ENHANCER_KEY": "sk-secret"}
    done = wanbot("queue", "list", data=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "WANBOT_ENHANCER_KEY" not in done.stderr  # prompts.enhancer_key_env names it: a key, not a setting
    assert (
        "WANBOT_QEUE__PER_USER_LIMIT is not a wanbot setting and is ignored; did you mean WANBOT_QUEUE__PER_USER_LIMIT?"
        in done.stderr
    )
    assert "WANBOT_FOO__BAR is not a wanbot setting" in done.stderr
    assert "WANBOT_DATA_DIR" not in done.stderr


def test_make_tiny_never_claims_a_model_it_did_not_make(tmp_path: Path):
    target = tmp_path / "tiny"
    assert wanbot("models", "make-tiny", str(target), data=tmp_path).returncode == 0
    index = (target / "model_index.json").read_text()

    refused = wanbot("models", "make-tiny", str(target), "--kind", "ti2v", data=tmp_path)
    assert refused.returncode == 2 and one_line(refused.stderr)
    assert f"{target} already holds a t2v model (WanPipeline)" in refused.stderr and "--force" in refused.stderr
    assert "ti2v model in" not in refused.stdout
    assert (target / "model_index.json").read_text() == index

    replaced = wanbot("models", "make-tiny", str(target), "--kind", "ti2v", "--force", data=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert json.loads((target / "model_index.json").read_text())["expand_timesteps"] is True
    assert "Writing model shards" not in replaced.stderr

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    kept = wanbot("models", "make-tiny", str(other), "--force", data=tmp_path)
    assert kept.returncode == 2 and "already holds 1 entry (todo.txt), not a model" in kept.stderr
    assert (other / "todo.txt").read_text() == "keep me"
