"""Model downloads against a fake Hub on 127.0.0.1, with the faults real networks have."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from bot.cli import app
from engine.config import DownloadsConfig, Settings
from engine.errors import UserError
from engine.hub import downloads
from engine.hub.downloads import Downloader, ProgressCallback, select_files, size_text
from engine.hub.fetcher import ModelFetcher
from engine.hub.hfcache import verify_snapshot
from engine.jobs import EventKind, JobSource, JobStatus, Stage
from engine.pipeline.models import GenerationRequest
from engine.queue.jobqueue import JobQueue
from engine.service import Engine
from engine.storage.images import Mode
from tests.factories import params
from tests.fake_hub import COMMIT, FakeHub

REPO_ID = "wan-test/Tiny-T2V-Diffusers"
REPO = Path(__file__).resolve().parents[2]
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights in this machine's own Hugging Face cache must not stand in for what a test serves."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))


def repo_in(cache: Path) -> Path:
    return cache / f"models--{REPO_ID.replace('/', '--')}"


def weights_part(hub: FakeHub, cache: Path) -> Path:
    """Where a stopped download keeps the weights fetched so far: beside the blob they become."""
    return repo_in(cache) / "blobs" / f"{hub.files[WEIGHTS].sha256}.incomplete"


@pytest.fixture
def served_folder(tiny_models: Path, tmp_path: Path) -> Path:
    """The tiny t2v model as a Hub repo holds it, with what a pipeline does not need beside it."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny_models / "tiny-t2v", folder)
    (folder / "README.md").write_text("# model card")
    (folder / "assets").mkdir()
    (folder / "assets" / "example.png").write_bytes(b"\x89PNG not needed")
    weights = (folder / WEIGHTS).read_bytes()
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(weights)
    (folder / "transformer" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(weights[: len(weights) // 2])
    return folder


@pytest.fixture
async def hub(served_folder: Path) -> AsyncIterator[FakeHub]:
    server = FakeHub(REPO_ID, served_folder)
    await server.start()
    yield server
    await server.stop()


def config(hub: FakeHub, **overrides: object) -> DownloadsConfig:
    values = {
        "endpoint": hub.url,
        "timeout_s": 2.0,
        "metadata_timeout_s": 2.0,
        "retries": 4,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "reserve_bytes": 0,
        **overrides,
    }
    return DownloadsConfig.model_validate(values)


def test_only_the_pipeline_files_in_one_weight_format_are_chosen():
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "transformer_2": [None, None],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    paths = [
        "model_index.json",
        "README.md",
        "assets/x.png",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.bin",
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "transformer_2/config.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/model.safetensors",
    ]
    assert select_files(index, paths) == [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
    ]


async def test_plan_pins_the_commit_and_knows_sizes_and_what_is_here(hub: FakeHub, tmp_path: Path):
    downloader = Downloader(tmp_path / "models", config(hub))
    plan = await downloader.plan(REPO_ID)
    assert plan.commit == COMMIT
    paths = {item.path for item in plan.files}
    assert WEIGHTS in paths and "README.md" not in paths and "assets/example.png" not in paths
    assert "transformer/diffusion_pytorch_model.bin" not in paths
    assert "transformer/diffusion_pytorch_model.fp16.safetensors" not in paths
    assert plan.missing_bytes == plan.total_bytes == sum(hub.files[path].size for path in paths)
    assert next(item for item in plan.files if item.path == WEIGHTS).sha256 == hub.files[WEIGHTS].sha256


async def test_download_survives_closed_reset_stalled_and_busy_answers(hub: FakeHub, tmp_path: Path):
    hub.faults = {
        WEIGHTS: ["close", "reset", "503", "429", "stall"],
        "vae/diffusion_pytorch_model.safetensors": ["close"],
        "model_index.json": ["503"],
    }
    downloader = Downloader(tmp_path / "models", config(hub, timeout_s=0.5, retries=8))
    seen = []
    folder = await downloader.download(REPO_ID, on_progress=seen.append)
    assert verify_snapshot(folder) == []
    assert (folder / WEIGHTS).read_bytes() == (hub.folder / WEIGHTS).read_bytes()
    resumed = [rng for method, path, rng in hub.requests if path == f"cdn:{WEIGHTS}" and rng]
    assert resumed and all(int(rng[6:].split("-")[0]) > 0 for rng in resumed)  # continued, not restarted
    assert not hub.faults[WEIGHTS]
    assert not list(folder.parents[1].glob("blobs/*.incomplete"))


async def test_not_enough_disk_is_refused_before_the_first_byte(hub: FakeHub, tmp_path: Path):
    downloader = Downloader(tmp_path / "models", config(hub, reserve_bytes=1000), free_bytes=lambda path: 5000)
    # The tiny model is about 410 KB: said in KB, not as "0.0 GB".
    with pytest.raises(
        UserError, match=r"it needs 4\d\d KB more \(plus 1\.0 KB kept free .* only 5\.0 KB are free in"
    ) as caught:
        await downloader.download(REPO_ID)
    assert "WANBOT_DATA_DIR" in caught.value.hint
    assert not [path for method, path, rng in hub.requests if "resolve" in path and "model_index" not in path]


async def test_repo_not_found_fails_at_once_and_offline_mode_never_asks(hub: FakeHub, tmp_path: Path):
    downloader = Downloader(tmp_path / "models", config(hub))
    with pytest.raises(UserError, match="not found on the Hub") as caught:
        await downloader.download("wan-test/No-Such-Model")
    assert "repo id" in caught.value.hint
    assert len(hub.requests) == 1
    offline = Downloader(tmp_path / "models", config(hub, offline=True))
    with pytest.raises(UserError, match="offline mode"):
        await offline.download(REPO_ID)
    assert len(hub.requests) == 1


async def test_shared_files_are_linked_not_downloaded_twice(served_folder: Path, tmp_path: Path):
    first = FakeHub(REPO_ID, served_folder)
    second = FakeHub("wan-test/Other-Repo-Same-VAE", served_folder)
    await first.start()
    await second.start()
    try:
        root = tmp_path / "models"
        await Downloader(root, config(first)).download(REPO_ID)
        folder = await Downloader(root, config(second)).download("wan-test/Other-Repo-Same-VAE")
    finally:
        await first.stop()
        await second.stop()
    assert verify_snapshot(folder) == []
    assert not [path for method, path, rng in second.requests if path.startswith("cdn:")]
    assert (folder / WEIGHTS).stat().st_ino == (
        Downloader(root, config(first)).local_snapshot(REPO_ID) / WEIGHTS
    ).stat().st_ino


async def test_cancel_keeps_what_was_fetched_and_the_next_run_resumes(hub: FakeHub, tmp_path: Path):
    hub.faults = {WEIGHTS: ["pause"]}
    downloader = Downloader(tmp_path / "models", config(hub))
    task = asyncio.create_task(downloader.download(REPO_ID))
    await asyncio.wait_for(hub.pause_reached.wait(), timeout=30)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    part = weights_part(hub, tmp_path / "models" / "hub")
    assert 0 < part.stat().st_size < hub.files[WEIGHTS].size
    had = part.stat().st_size
    hub.paused.set()
    folder = await downloader.download(REPO_ID)
    assert verify_snapshot(folder) == []
    assert f"bytes={had}-" in [rng for method, path, rng in hub.requests if path == f"cdn:{WEIGHTS}"]


async def test_a_sigkilled_download_process_resumes_within_the_file(hub: FakeHub, tmp_path: Path):
    hub.faults = {WEIGHTS: ["pause"]}
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANBOT_")}
    env.update(
        WANBOT_DATA_DIR=str(tmp_path / "data"),
        WANBOT_DOWNLOADS__ENDPOINT=hub.url,
        WANBOT_DOWNLOADS__RESERVE_BYTES="0",
        WANBOT_DOWNLOADS__BACKOFF_S="0.01",
    )
    command = [sys.executable, "-c", "from bot.cli import main; main()", "models", "download", REPO_ID]
    child = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await asyncio.wait_for(hub.pause_reached.wait(), timeout=60)
    await asyncio.sleep(0.3)
    child.send_signal(signal.SIGKILL)
    await child.wait()
    part = weights_part(hub, tmp_path / "data" / "models" / "hub")
    had = part.stat().st_size
    assert 0 < had < hub.files[WEIGHTS].size
    hub.paused.set()
    again = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(again.communicate(), timeout=90)
    assert again.returncode == 0, err.decode()[-2000:]
    assert f"bytes={had}-" in [rng for method, path, rng in hub.requests if path == f"cdn:{WEIGHTS}"]
    verify = await asyncio.create_subprocess_exec(
        *command[:-2],
        "verify",
        REPO_ID,
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await verify.communicate()
    assert verify.returncode == 0 and b"is intact" in out, err.decode()


def hub_settings(hub: FakeHub, tmp_path: Path) -> Settings:
    # A long read timeout, so a paused transfer stays paused however slow the machine is, until the test releases it.
    downloads = config(hub, timeout_s=300.0).model_dump()
    return Settings(data_dir=tmp_path / "data", models={"t2v": REPO_ID}, downloads=downloads)


def progress_stages(inbox, job_id: int) -> list[Stage]:
    stages = []
    while not inbox._inbox.empty():
        event = inbox._inbox.get_nowait()
        if event.kind is EventKind.PROGRESS and event.job.id == job_id:
            stages.append(event.progress.stage)
    return stages


async def test_a_missing_model_downloads_in_the_background_while_other_jobs_run(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    hub.faults = {WEIGHTS: ["pause"]}
    engine = await Engine.open(hub_settings(hub, tmp_path))
    inbox = engine._queue.events.subscribe()
    worker = asyncio.create_task(engine._worker.run())
    try:
        request = GenerationRequest(mode=Mode.T2V, prompt="w1 a fox", steps=2, frames=5, resolution="64x64")
        from_hub = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="a"))
        await asyncio.wait_for(hub.pause_reached.wait(), timeout=30)
        local = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="b"), model_override="tiny")
        await ended(engine, local.result.job.id, limit_s=60)
        assert (await engine._queue.get(local.result.job.id)).status is JobStatus.SUCCEEDED
        assert (await engine._queue.get(from_hub.result.job.id)).status is JobStatus.QUEUED
        hub.paused.set()
        await ended(engine, from_hub.result.job.id, limit_s=60)
        job = await engine._queue.get(from_hub.result.job.id)
    finally:
        await engine._worker.stop()
        await worker
        await engine.close()
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    assert job.attempts == 1  # waiting for the download did not count as an attempt
    stages = progress_stages(inbox, job.id)
    assert Stage.DOWNLOADING in stages and stages.index(Stage.DOWNLOADING) < stages.index(Stage.LOADING)


async def test_cancelling_the_only_waiting_job_stops_its_download(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    hub.faults = {WEIGHTS: ["pause"]}
    engine = await Engine.open(hub_settings(hub, tmp_path))
    worker = asyncio.create_task(engine._worker.run())
    try:
        request = GenerationRequest(mode=Mode.T2V, prompt="w1 a fox", steps=2)
        submission = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="a"))
        await asyncio.wait_for(hub.pause_reached.wait(), timeout=30)
        await engine._queue.cancel(submission.result.job.id, engine.actor("cli", "a"))
        for _ in range(100):
            if not engine._worker._fetcher.busy_models:
                break
            await asyncio.sleep(0.1)
        assert not engine._worker._fetcher.busy_models
    finally:
        hub.paused.set()
        await engine._worker.stop()
        await worker
        await engine.close()
    part = weights_part(hub, tmp_path / "data" / "models" / "hub")
    assert part.stat().st_size > 0  # kept for the next attempt


# -- answers nobody expected, full disks, long files -------------------------------------------------------------


def test_sizes_are_said_in_the_unit_that_fits():
    assert [size_text(count) for count in (0, 999, 5000, 410_123, 12_345_678, 1_500_000_000, 57e9, 3.2e12)] == [
        "0 B",
        "999 B",
        "5.0 KB",
        "410 KB",
        "12 MB",
        "1.5 GB",
        "57 GB",
        "3.2 TB",
    ]


async def test_a_hub_answering_html_or_fieldless_entries_is_a_clear_user_error(hub: FakeHub, tmp_path: Path):
    hub.api_faults = {"tree": "html"}
    downloader = Downloader(tmp_path / "models", config(hub))
    with pytest.raises(UserError) as caught:
        await downloader.download(REPO_ID)
    assert caught.value.message == (
        f"The Hub at {hub.url} answered the model's file list of {REPO_ID} with something that is not JSON (text/html)."
    )
    assert "HF_ENDPOINT" in caught.value.hint
    assert [path for method, path, rng in hub.requests if "/tree/" in path] == [f"/api/models/{REPO_ID}/tree/{COMMIT}"]
    hub.api_faults = {"tree": "fieldless"}
    with pytest.raises(UserError, match=r"file list .* with a file entry without a path and a size"):
        await downloader.download(REPO_ID)
    hub.api_faults = {"revision": "html"}
    with pytest.raises(UserError, match=r"answered the model's revision .* not JSON"):
        await downloader.download(REPO_ID)


async def test_retry_after_as_an_http_date_is_honoured_and_a_bad_or_huge_one_is_not_obeyed(
    hub: FakeHub, tmp_path: Path
):
    asked = "Wed, 21 Oct 2015 07:28:00 GMT"
    hub.faults = {WEIGHTS: [f"429 {asked}", "429 soon, promise", "429 Fri, 01 Jan 2100 00:00:00 GMT"]}
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    seven_seconds_before = parsedate_to_datetime(asked).timestamp() - 7
    downloader = Downloader(
        tmp_path / "models",
        config(hub, backoff_s=1.0, max_backoff_s=30.0),
        sleep=sleep,
        wall_clock=lambda: seven_seconds_before,
    )
    folder = await downloader.download(REPO_ID)
    assert verify_snapshot(folder) == []
    assert waits[0] == 7.0  # the date, less the time now
    assert 1.0 <= waits[1] <= 3.0  # unreadable: the second step of the usual backoff (2 s, with jitter)
    assert waits[2] == 30.0  # 85 years away: capped at downloads.max_backoff_s


async def test_drops_after_progress_do_not_use_up_the_retries(hub: FakeHub, tmp_path: Path):
    hub.faults = {WEIGHTS: ["drop"] * 8}  # 8 x 10 KB of the 120 KB file, each time cut off
    downloader = Downloader(tmp_path / "models", config(hub, retries=2))
    folder = await downloader.download(REPO_ID)
    assert verify_snapshot(folder) == []
    starts = [
        int(rng[6:].split("-")[0]) if rng else 0 for method, path, rng in hub.requests if path == f"cdn:{WEIGHTS}"
    ]
    assert starts == [hub.drop_after * tries for tries in range(9)]


async def test_failures_in_a_row_without_progress_still_give_up(hub: FakeHub, tmp_path: Path):
    hub.faults = {WEIGHTS: ["drop", "503", "503", "503"]}
    downloader = Downloader(tmp_path / "models", config(hub, retries=2))
    with pytest.raises(UserError, match=r"failed 3 times in a row \(HTTP 503\)") as caught:
        await downloader.download(REPO_ID)
    assert "what was fetched is kept" in caught.value.hint


async def test_a_hub_answering_html_fails_the_waiting_job_once_instead_of_retrying_in_a_loop(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    hub.api_faults = {"tree": "html"}
    engine = await Engine.open(hub_settings(hub, tmp_path))
    worker = asyncio.create_task(engine._worker.run())
    try:
        request = GenerationRequest(mode=Mode.T2V, prompt="w1 a fox", steps=2)
        submission = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="a"))
        await ended(engine, submission.result.job.id, limit_s=10)
        job = await engine._queue.get(submission.result.job.id)
    finally:
        await engine._worker.stop()
        await worker
        await engine.close()
    assert job.status is JobStatus.FAILED
    # The chat user is told it failed; why, and the hint about HF_ENDPOINT, are for the operator.
    assert job.error_user == (
        f"Sorry, the model {REPO_ID} could not be downloaded, so this video cannot be made. The admin has been told."
    )
    assert "not JSON (text/html)" in job.error_detail and hub.url in job.error_detail
    assert "HF_ENDPOINT" not in job.error_user and "HF_ENDPOINT" in job.error_detail
    assert len([path for method, path, rng in hub.requests if "/tree/" in path]) == 1


async def ended(engine: Engine, job_id: int, limit_s: float) -> None:
    """Wait until the job has ended (or `limit_s` has passed: the assertions after say what it became)."""
    for _ in range(int(limit_s * 10)):
        if (await engine._queue.get(job_id)).status.terminal:
            return
        await asyncio.sleep(0.1)


class BrokenDownloader:
    """Fails the way today's surprises do: not a UserError, not a network error."""

    def __init__(self) -> None:
        self.calls = 0

    async def download(self, repo_id: str, revision: str = "main", on_progress: ProgressCallback | None = None) -> Path:
        self.calls += 1
        raise KeyError("sha")


async def test_unexpected_download_errors_back_off_then_fail_the_waiting_jobs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    queue = await JobQueue.open(tmp_path / "queue.sqlite3")
    waiting = await queue.enqueue(JobSource(platform="cli", chat_id="c", user_id="a"), Mode.T2V, REPO_ID, params())
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    ready = asyncio.Event()
    downloader = BrokenDownloader()
    fetcher = ModelFetcher(queue, downloader, ready.set, tries=3, backoff_s=10.0, max_backoff_s=15.0, sleep=sleep)
    with caplog.at_level(logging.ERROR, logger="engine.hub.fetcher"):
        fetcher.start(REPO_ID)
        fetcher.start(REPO_ID)  # the worker asking again meanwhile does not start a second download
        await asyncio.wait_for(ready.wait(), timeout=10)
    job = await queue.get(waiting.job.id)
    await queue.close()
    assert downloader.calls == 3
    assert waits == [10.0, 15.0]  # doubling, bounded
    assert job.status is JobStatus.FAILED
    assert job.error_user.startswith(f"Sorry, downloading the model {REPO_ID} failed 3 times")
    logged = [record for record in caplog.records if record.name == "engine.hub.fetcher"]
    assert len(logged) == 3 and all(record.exc_info for record in logged)
    assert not fetcher.busy_models


def download_command(hub: FakeHub, data: Path) -> Result:
    """`wanbot models download` in this process, so a test can stand in for the disk; with the bar of a pipe."""
    env = {
        "WANBOT_DATA_DIR": str(data),
        "WANBOT_LOG_LEVEL": "WARNING",
        "WANBOT_DOWNLOADS__ENDPOINT": hub.url,
        "WANBOT_DOWNLOADS__RESERVE_BYTES": "0",
        "WANBOT_DOWNLOADS__BACKOFF_S": "0.01",
        "WANBOT_DOWNLOADS__MAX_BACKOFF_S": "0.05",
    }
    return CliRunner().invoke(app, ["models", "download", REPO_ID], env=env)


async def test_cli_download_from_a_hub_answering_html_is_one_line_and_exit_2(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    hub.api_faults = {"tree": "html"}
    done = await asyncio.to_thread(download_command, hub, tmp_path / "data")
    assert done.exit_code == 2, done.output
    [line] = done.stderr.splitlines()
    assert "something that is not JSON (text/html). Check downloads.endpoint (HF_ENDPOINT)" in line


class SmallDisk:
    """A 1 MB tmpfs on `folder` where this machine lets the test mount one (root on Linux); elsewhere part-file
    writes that fail with ENOSPC once filled. The downloader sees a full disk the same way either way."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self._monkeypatch = monkeypatch
        mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
        self.mounted = shutil.which("mount") is not None and subprocess.run(mount, capture_output=True).returncode == 0

    def fill(self) -> None:
        if not self.mounted:
            self._monkeypatch.setattr(downloads, "_write_all", _no_space_left)
            return
        with (self.folder / "filler").open("wb", buffering=0) as filler, pytest.raises(OSError) as caught:
            while True:
                filler.write(bytes(64 * 1024))
        assert caught.value.errno == errno.ENOSPC

    def free(self) -> None:
        if self.mounted:
            (self.folder / "filler").unlink()
        else:
            self._monkeypatch.undo()

    def remove(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], check=True)


def _no_space_left(handle: object, data: bytes) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    disk = SmallDisk(tmp_path / "data" / "models", monkeypatch)
    yield disk
    disk.remove()


async def test_cli_download_on_a_disk_that_fills_is_one_line_and_the_next_run_resumes(
    hub: FakeHub, tmp_path: Path, small_disk: SmallDisk, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    hub.faults = {WEIGHTS: ["hold"]}
    data = tmp_path / "data"
    part = weights_part(hub, data / "models" / "hub")
    first = asyncio.create_task(asyncio.to_thread(download_command, hub, data))
    await asyncio.wait_for(hub.pause_reached.wait(), timeout=30)
    for _ in range(100):  # the bytes sent before the hold are on disk
        if part.exists() and part.stat().st_size > 0:
            break
        await asyncio.sleep(0.05)
    small_disk.fill()  # something else takes the space the download was counting on
    hub.paused.set()
    done = await first
    assert done.exit_code == 2, done.output
    [line] = done.stderr.splitlines()
    assert f"The disk holding {data / 'models' / 'hub'} filled up while downloading {REPO_ID}: it needs " in line
    assert "KB more" in line and "run the download again" in line
    had = part.stat().st_size
    assert 0 < had < hub.files[WEIGHTS].size  # kept for the next run

    small_disk.free()
    again = await asyncio.to_thread(download_command, hub, data)
    assert again.exit_code == 0, again.output
    assert f"bytes={had}-" in [rng for method, path, rng in hub.requests if path == f"cdn:{WEIGHTS}"]
    assert verify_snapshot(repo_in(data / "models" / "hub") / "snapshots" / COMMIT) == []


async def test_models_download_of_a_mode_fetches_the_fast_presets_weights_too(
    served_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """After `wanbot models download t2v` a worker has what a default (fast) video needs, with no network."""
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    (served_folder / "lora").mkdir()
    for name in ("high.safetensors", "low.safetensors"):
        (served_folder / "lora" / name).write_bytes(os.urandom(2048))
    server = FakeHub(REPO_ID, served_folder)
    await server.start()
    data = tmp_path / "data"
    env = {
        "WANBOT_DATA_DIR": str(data),
        "WANBOT_LOG_LEVEL": "WARNING",
        "WANBOT_DOWNLOADS__ENDPOINT": server.url,
        "WANBOT_DOWNLOADS__RESERVE_BYTES": "0",
        "WANBOT_MODELS__T2V": REPO_ID,
        "WANBOT_MODELS__FAST_LORAS__T2V__REPO": REPO_ID,
        "WANBOT_MODELS__FAST_LORAS__T2V__HIGH": "lora/high.safetensors",
        "WANBOT_MODELS__FAST_LORAS__T2V__LOW": "lora/low.safetensors",
    }
    try:
        fast = await asyncio.to_thread(CliRunner().invoke, app, ["models", "download", "t2v"], env=env)
        quality_data = tmp_path / "quality"
        quality = await asyncio.to_thread(
            CliRunner().invoke,
            app,
            ["models", "download", "t2v", "--preset", "quality"],
            env={**env, "WANBOT_DATA_DIR": str(quality_data)},
        )
    finally:
        await server.stop()
    assert fast.exit_code == 0, fast.output
    lines = fast.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{REPO_ID} is complete in") and lines[0].endswith("the t2v model")
    assert lines[1].startswith(f"{REPO_ID} (lora/high.safetensors, lora/low.safetensors) is complete in")
    assert lines[1].endswith("the fast preset's LoRA pair for t2v")
    downloader = Downloader(data / "models", config(server))
    files = ["lora/high.safetensors", "lora/low.safetensors"]
    assert downloader.local_files(REPO_ID, files) is not None and downloader.local_snapshot(REPO_ID) is not None
    assert quality.exit_code == 0, quality.output
    assert len(quality.stdout.splitlines()) == 1  # the model alone
    assert Downloader(quality_data / "models", config(server)).local_files(REPO_ID, files) is None


class RefusingDownloader:
    """This worker's disk is full: every download of it is refused with a sentence."""

    async def download(self, repo_id: str, revision: str = "main", on_progress: ProgressCallback | None = None) -> Path:
        raise UserError("Not enough disk space to download the model.", "Free some space.")


async def test_a_download_one_worker_cannot_make_leaves_the_jobs_to_another_until_none_is_left(tmp_path: Path):
    from engine.jobs import WorkerRecord, WorkerState

    queue = await JobQueue.open(tmp_path / "queue.sqlite3")
    for name in ("gpu-a", "gpu-b"):
        await queue.heartbeat(
            WorkerRecord(
                id=f"{name}/cuda:0/1-ab", host=name, pid=1, device="cuda:0", state=WorkerState.IDLE, started_at=0
            )
        )
    waiting = await queue.enqueue(JobSource(platform="cli", chat_id="c", user_id="a"), Mode.T2V, REPO_ID, params())
    told = queue.events.subscribe()
    left: list[str] = []
    for worker in ("gpu-a/cuda:0/1-ab", "gpu-b/cuda:0/1-ab"):
        ready = asyncio.Event()
        fetcher = ModelFetcher(queue, RefusingDownloader(), ready.set, worker_id=worker, on_unfetchable=left.append)
        fetcher.start(REPO_ID)
        await asyncio.wait_for(ready.wait(), timeout=10)
        job = await queue.get(waiting.job.id)
        if worker.startswith("gpu-a"):
            # Another worker may still get it: the job waits for that one, and the user is told.
            assert job.status is JobStatus.QUEUED and left == [REPO_ID]
            said = []
            while not told._inbox.empty():
                event = told._inbox.get_nowait()
                said += [event.progress.detail] if event.progress is not None else []
            assert "one worker could not get the model; another will try" in said
    await queue.close()
    assert job.status is JobStatus.FAILED  # no online worker is left that has not failed to get it
    assert job.error_user.startswith(f"Sorry, the model {REPO_ID} could not be downloaded")
    assert "Not enough disk space" in job.error_detail and left == [REPO_ID]
