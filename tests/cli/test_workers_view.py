"""The fleet as people see it: `wanbot workers` in a terminal and /status in the chats, from the workers' heartbeats
in the job store (stored here as a worker stores them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from bot.chat import texts
from engine.config import Settings
from engine.jobs import JobSource, Progress, Stage, WorkerRecord, WorkerState
from engine.pipeline.models import GenerationRequest
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode
from tests.chat.test_core import ALICE, HERE, core_for
from tests.cli.test_cli import wanbot
from tests.factories import params, result_for_child

pytestmark = pytest.mark.timeout(180)
MINUTE = 60.0


def record(name: str, **fields: object) -> WorkerRecord:
    """A worker on host `name`'s first GPU, started ten minutes ago."""
    values: dict[str, object] = {
        "id": f"{name}-1234",
        "host": name,
        "pid": 1234,
        "device": "cuda:0",
        "state": WorkerState.IDLE,
        "started_at": time.time() - 10 * MINUTE,
    }
    values.update(fields)
    return WorkerRecord.model_validate(values)


async def heartbeat(database_url: str, *workers: WorkerRecord, ago_s: float = 0.0) -> None:
    """Store the workers' heartbeats as the job store would have stored them `ago_s` seconds ago."""
    queue = await JobQueue.connect(database_url, clock=lambda: time.time() - ago_s)
    try:
        for worker in workers:
            await queue.heartbeat(worker)
    finally:
        await queue.close()


# -- wanbot workers ------------------------------------------------------------------------------------------------


async def seed_fleet(data: Path) -> int:
    """Four workers: one making a job, one downloading, one stopped, one silent for three minutes. The job's id."""
    url = Settings(data_dir=data).database_url
    queue = await JobQueue.connect(url)
    try:
        source = JobSource(platform="telegram", chat_id="c1", user_id="u1")
        prompt = "a [red] fox running far over the snowy hills at dawn"
        job = (await queue.enqueue(source, Mode.T2V, "tiny-t2v", params(prompt))).job
        await queue.claim_next()  # running: the worker below makes it
    finally:
        await queue.close()
    working = record(
        "gpu-a",
        gpu_name="NVIDIA H200",
        free_memory_bytes=120_000_000_000,
        loaded_model="tiny-t2v",
        current_job=job.id,
        state=WorkerState.WORKING,
        started_at=time.time() - 2 * 3600,
    )
    downloading = record("gpu-b", downloading=["Wan-AI/Wan2.2-T2V-A14B-Diffusers"])
    stopped = record("gpu-c", state=WorkerState.STOPPED)
    await heartbeat(url, working, downloading, stopped)
    await heartbeat(url, record("gpu-d", device="cuda:1"), ago_s=3 * MINUTE)
    return job.id


def rows_of(table: str) -> dict[str, list[str]]:
    """The table's rows by worker name, each its cells (rich draws each row on one line at COLUMNS=200)."""
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("│ ").split("│")]
        if len(cells) == 7 and cells[0].startswith("gpu-"):
            rows[cells[0]] = cells
    return rows


async def test_workers_lists_each_worker_with_its_state_job_model_and_memory(tmp_path: Path):
    job_id = await seed_fleet(tmp_path)
    done = wanbot("workers", data=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = rows_of(done.stdout)
    # Online ones first (named as /status names them), then offline, then stopped; each part the most recently
    # started first.
    assert list(rows) == ["gpu-b/cuda:0", "gpu-a/cuda:0", "gpu-d/cuda:1 (pid 1234)", "gpu-c/cuda:0 (pid 1234)"]
    working = rows["gpu-a/cuda:0"]
    assert working[1:4] == ["H200", "working", "tiny-t2v"]
    assert working[4] == f"#{job_id} a [red] fox running far…"  # the prompt cut short, brackets as written
    assert working[5] == "120 GB" and working[6] == "2h 00m"
    assert rows["gpu-b/cuda:0"][2] == "downloading Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert rows["gpu-c/cuda:0 (pid 1234)"][2] == "stopped" and rows["gpu-c/cuda:0 (pid 1234)"][6] == "-"
    assert rows["gpu-d/cuda:1 (pid 1234)"][2] == "offline (last heard 3 min ago)"
    assert "None is online" not in done.stdout


async def test_workers_and_status_agree_on_names_counts_and_a_finished_job(tmp_path: Path, engine):
    """A worker's record still names a job for a heartbeat after the job ended: neither view shows it working."""
    source = JobSource(platform="cli", chat_id="c", user_id="u")
    done_job = (await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="a fox"), source)).result.job
    claimed = await engine._queue.claim_next()
    await engine._queue.mark_succeeded(done_job.id, result_for_child(), token=claimed.claim_token)
    stale = record("gpu-a", state=WorkerState.WORKING, current_job=done_job.id, loaded_model="tiny-t2v")
    await heartbeat(engine.settings.database_url, stale, record("gpu-b"))
    status = (await core_for(engine).status_text(ALICE, HERE)).splitlines()
    assert status[0] == "Workers: 2 online (2 idle)."
    assert "Worker gpu-a/cuda:0: idle, tiny-t2v loaded." in status
    listed = wanbot(
        "workers", data=engine.settings.data_dir, env={"WANBOT_DATABASE__URL": engine.settings.database_url}
    )
    rows = rows_of(listed.stdout)
    assert sorted(rows) == ["gpu-a/cuda:0", "gpu-b/cuda:0"]  # the names /status uses
    assert rows["gpu-a/cuda:0"][2:5] == ["idle", "tiny-t2v", "-"]


async def test_workers_leaves_out_those_stopped_over_an_hour_ago_unless_all_and_fits_100_columns(tmp_path: Path):
    url = Settings(data_dir=tmp_path).database_url
    long_model = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    await heartbeat(url, record("gpu-a", gpu_name="NVIDIA H100 80GB HBM3", loaded_model=long_model))
    await heartbeat(url, record("gpu-old", state=WorkerState.STOPPED), ago_s=2 * 3600)
    done = wanbot("workers", data=tmp_path, env={"COLUMNS": "100"})
    assert done.returncode == 0, done.stderr
    assert "gpu-old" not in done.stdout
    assert "1 worker stopped more than an hour ago not shown (--all shows them)." in done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 100
    assert "H100 80GB HBM3" in done.stdout.replace("│", " ") or "H100" in done.stdout
    everything = wanbot("workers", "--all", data=tmp_path)
    assert "gpu-old/cuda:0 (pid 1234)" in everything.stdout and "not shown" not in everything.stdout


async def test_workers_as_json_has_every_field_and_whether_each_is_online(tmp_path: Path):
    job_id = await seed_fleet(tmp_path)
    done = wanbot("workers", "--json", data=tmp_path)
    assert done.returncode == 0, done.stderr
    listed = {worker["id"]: worker for worker in json.loads(done.stdout)}
    assert {name: worker["online"] for name, worker in listed.items()} == {
        "gpu-a-1234": True,
        "gpu-b-1234": True,
        "gpu-c-1234": False,
        "gpu-d-1234": False,
    }
    working = listed["gpu-a-1234"]
    assert set(working) == set(WorkerRecord.model_fields) | {"online"}
    assert working["current_job"] == job_id and working["state"] == "working"
    assert working["free_memory_bytes"] == 120_000_000_000 and working["gpu_name"] == "NVIDIA H200"
    assert listed["gpu-b-1234"]["downloading"] == ["Wan-AI/Wan2.2-T2V-A14B-Diffusers"]
    assert listed["gpu-c-1234"]["state"] == "stopped"


async def test_workers_says_when_none_is_online(tmp_path: Path):
    url = Settings(data_dir=tmp_path).database_url
    await heartbeat(url, record("gpu-a", state=WorkerState.STOPPED))
    await heartbeat(url, record("gpu-b"), ago_s=2 * 3600)
    done = wanbot("workers", data=tmp_path)
    assert done.returncode == 0, done.stderr
    assert rows_of(done.stdout)["gpu-b/cuda:0 (pid 1234)"][2] == "offline (last heard 2h 00m ago)"
    assert "None is online: queued videos wait until a worker starts (`wanbot worker` or `wanbot run`)." in done.stdout


def test_workers_says_none_has_started_and_how_to_start_one(tmp_path: Path):
    done = wanbot("workers", data=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("No worker has started yet")
    assert "wanbot worker" in done.stdout and "wanbot run" in done.stdout
    as_json = wanbot("workers", "--json", data=tmp_path)
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == []


# -- /status -------------------------------------------------------------------------------------------------------


async def test_status_with_no_worker_online_says_videos_wait(engine):
    await heartbeat(engine.settings.database_url, record("gpu-a"), ago_s=5 * MINUTE)  # silent past the lease
    await heartbeat(engine.settings.database_url, record("gpu-b", state=WorkerState.STOPPED))
    await engine.submit(
        GenerationRequest(mode=Mode.T2V, prompt="a fox"), JobSource(platform="cli", chat_id="c", user_id="u")
    )
    answer = await core_for(engine).status_text(ALICE, HERE)
    assert answer.splitlines() == [
        "Workers: none online. Videos wait in the queue until a worker starts.",
        "Queued: 1, running: 0.",
    ]


async def test_status_shows_each_online_worker_and_what_it_does(engine):
    source = JobSource(platform="cli", chat_id="c", user_id="u")
    making = (await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="a fox", steps=20), source)).result.job
    await engine.submit(GenerationRequest(mode=Mode.T2V, prompt="a hare"), source)
    claimed = await engine._queue.claim_next()
    assert claimed is not None and claimed.id == making.id
    await engine._queue.update_progress(
        making.id, Progress(stage=Stage.DENOISING, step=5, total=20), token=claimed.claim_token
    )
    url = engine.settings.database_url
    await heartbeat(
        url,
        record("gpu-a", state=WorkerState.WORKING, current_job=making.id, loaded_model="tiny-t2v"),
        record("gpu-b", loaded_model="tiny-t2v"),
        record("gpu-c", downloading=["Wan-AI/Wan2.2-I2V-A14B-Diffusers"]),
        record("gpu-d", state=WorkerState.STARTING),
    )
    await heartbeat(url, record("gpu-e"), ago_s=5 * MINUTE)  # offline: not shown
    job = await engine.job(making.id)
    answer = await core_for(engine).status_text(ALICE, HERE)
    assert answer.splitlines() == [
        "Workers: 4 online (1 working, 1 downloading, 1 idle, 1 starting).",
        "Queued: 1, running: 1.",
        "Worker gpu-d/cuda:0: starting.",
        "Worker gpu-c/cuda:0: downloading Wan-AI/Wan2.2-I2V-A14B-Diffusers.",
        "Worker gpu-b/cuda:0: idle, tiny-t2v loaded.",
        "Worker gpu-a/cuda:0: making " + " · ".join(texts.progress_lines(job, job.progress)) + ".",
    ]  # in the order the store lists them: the most recently started first
    assert f"making Job #{making.id}, quality preset: generating" in answer and " 5/20 · " in answer


async def test_status_when_paused_says_so_and_names_two_workers_on_one_host_apart(engine):
    await engine.set_paused(True)
    await heartbeat(
        engine.settings.database_url,
        record("gpu-a", state=WorkerState.PAUSED, loaded_model="tiny-t2v"),
        record("gpu-a", id="gpu-a-77", pid=77, state=WorkerState.PAUSED),
    )
    lines = (await core_for(engine).status_text(ALICE, HERE)).splitlines()
    assert lines[:3] == ["Workers: 2 online (2 paused).", texts.QUEUE_PAUSED, "Queued: 0, running: 0."]
    assert sorted(lines[3:]) == [
        "Worker gpu-a/cuda:0 (pid 1234): paused, tiny-t2v loaded.",
        "Worker gpu-a/cuda:0 (pid 77): paused, no model loaded.",
    ]
