"""The `wanbot` command as a user runs it: a subprocess, its exit code, its output."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.jobs import JobSource
from engine.pipeline.video import probe
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode
from tests import imagefactory
from tests.factories import params

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(180)


def wanbot(*args: str, data: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("WANBOT_")}
    # Never a real Hub: a closed port on loopback, unless a test names its fake one.
    environment.update(
        {"WANBOT_DATA_DIR": str(data), "COLUMNS": "200", "WANBOT_DOWNLOADS__ENDPOINT": "http://127.0.0.1:9"},
        **(env or {}),
    )
    return subprocess.run(
        [sys.executable, "-c", "from bot.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=170,
    )


def test_validate_reports_valid_images_as_json(tmp_path: Path):
    start = tmp_path / "start.png"
    start.write_bytes(imagefactory.png(160, 120))
    end = tmp_path / "end.jpg"
    end.write_bytes(imagefactory.jpeg(320, 240))
    done = wanbot("validate", "--mode", "i2v", "--start", str(start), "--end", str(end), "--json", data=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["valid"] is True and report["errors"] == []
    assert any("not trained with end images" in warning for warning in report["warnings"])
    assert [image["role"] for image in report["images"]] == ["start", "end"]
    assert report["images"][1]["width"] == 160 and report["images"][1]["format"] == "JPEG"


def test_validate_refuses_bad_input_with_exit_2_and_no_traceback(tmp_path: Path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(imagefactory.png()[:200])
    done = wanbot("validate", "--mode", "ti2v", "--start", str(broken), "--json", data=tmp_path)
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert report["valid"] is False and report["errors"]
    missing = wanbot("validate", "--mode", "ti2v", data=tmp_path)
    assert missing.returncode == 2 and "ti2v needs a start image" in missing.stdout
    unreadable = wanbot("validate", "--mode", "i2v", "--start", str(tmp_path / "nope.png"), data=tmp_path)
    assert unreadable.returncode == 2 and "cannot be read" in unreadable.stdout
    assert "Traceback" not in missing.stderr + unreadable.stderr + done.stderr


def test_bad_configuration_is_one_clear_line(tmp_path: Path):
    done = wanbot("queue", "list", data=tmp_path, env={"WANBOT_QUEUE__PER_USER_LIMIT": "-1"})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "queue.per_user_limit" in done.stderr and "WANBOT_QUEUE__PER_USER_LIMIT" in done.stderr


def test_generate_then_manage_the_queue(tmp_path: Path):
    data = tmp_path / "data"
    start = tmp_path / "start.png"
    start.write_bytes(imagefactory.png(128, 128))
    out = tmp_path / "clip.mp4"
    env = {"WANBOT_MODELS__TI2V": "tiny"}
    done = wanbot(
        "generate",
        "--mode",
        "ti2v",
        "--prompt",
        "w1 waves",
        "--start",
        str(start),
        "--seed",
        "5",
        "--frames",
        "5",
        "--out",
        str(out),
        data=data,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    video = probe(out)
    assert (video.frames, video.fps) == (5, 24)
    assert json.loads(video.comment)["seed"] == 5

    listed = json.loads(wanbot("queue", "list", "--json", data=data).stdout)
    assert [(job["id"], job["status"], job["mode"]) for job in listed] == [(1, "succeeded", "ti2v")]
    shown = json.loads(wanbot("queue", "show", "1", "--json", data=data).stdout)
    assert [entry["event"] for entry in shown["history"]] == ["enqueued", "started", "succeeded"]

    retried = wanbot("queue", "retry", "1", data=data)
    assert retried.returncode == 0 and "job #2 queued as a retry of job #1" in retried.stdout
    cancelled = wanbot("queue", "cancel", "2", data=data)
    assert cancelled.returncode == 0 and "job #2 cancelled" in cancelled.stdout
    again = wanbot("queue", "cancel", "2", data=data)
    assert again.returncode == 2 and "already been cancelled" in again.stderr
    unknown = wanbot("queue", "show", "99", data=data)
    assert unknown.returncode == 2 and "There is no job #99" in unknown.stderr

    [stats] = json.loads(wanbot("queue", "stats", "--json", data=data).stdout)
    assert stats["model"] == "tiny-ti2v" and stats["jobs"] == 2
    assert (stats["succeeded"], stats["cancelled"], stats["failed"], stats["active"]) == (1, 1, 0, 0)
    assert stats["mean_run_s"] > 0 and stats["longest_run_s"] == stats["mean_run_s"]
    table = wanbot("queue", "stats", data=data).stdout
    assert "tiny-ti2v: 2 jobs (1 done, 0 failed, 1 cancelled, 0 active, 0 undelivered); mean wait" in table
    assert "No jobs in the last 7 days." in wanbot("queue", "stats", data=tmp_path / "empty").stdout


def test_queue_show_never_prints_an_interaction_token(tmp_path: Path):
    data = tmp_path / "data"

    async def enqueue_from_discord() -> None:
        queue = await JobQueue.open(data / "wanbot.sqlite3")
        source = JobSource(platform="discord", chat_id="1", user_id="2", message_id="3")
        source.reply = {"interaction_token": "secret-interaction-token", "application_id": "9"}
        await queue.enqueue(source, Mode.T2V, "tiny", params())
        await queue.close()

    asyncio.run(enqueue_from_discord())
    shown = wanbot("queue", "show", "1", "--json", data=data)
    assert shown.returncode == 0, shown.stderr
    assert "secret-interaction-token" not in shown.stdout
    assert json.loads(shown.stdout)["source"]["reply"] == {"interaction_token": "<redacted>", "application_id": "9"}


def test_make_tiny_writes_a_loadable_diffusers_folder(tmp_path: Path):
    target = tmp_path / "tiny-i2v"
    done = wanbot("models", "make-tiny", str(target), "--kind", "i2v", data=tmp_path)
    assert done.returncode == 0, done.stderr
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "WanImageToVideoPipeline"
    assert index["transformer_2"][1] == "WanTransformer3DModel"
