"""Without a network, or with a name that is no repo id, wanbot says so in seconds, not after minutes of retries.

"No network" is a closed port on 127.0.0.1, or a loopback server that accepts and never answers; nothing here
contacts a real network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.config import DownloadsConfig, Settings
from engine.errors import UserError
from engine.hub.downloads import Downloader
from engine.hub.fetcher import ModelFetcher
from engine.jobs import JobSource, JobStatus
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode
from tests.factories import params
from tests.fake_hub import FakeHub
from tests.hub.test_downloads import REPO_ID

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)

UNREACHABLE = "cannot be reached from here"
WHAT_TO_DO = "Check the network or HF_ENDPOINT (downloads.endpoint), or use a local model folder."


def closed_port_url() -> str:
    """An endpoint on this machine where nothing listens: a connection is refused at once, as without a network."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
async def silent_server() -> AsyncIterator[str]:
    """A server that accepts connections and never answers, like a firewall that swallows packets."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    for writer in held:
        writer.close()
    server.close()


@pytest.fixture
async def hub(tiny_models: Path) -> AsyncIterator[FakeHub]:
    server = FakeHub(REPO_ID, tiny_models / "tiny-t2v")
    await server.start()
    yield server
    await server.stop()


def real_config(endpoint: str, **overrides: object) -> DownloadsConfig:
    """The shipped timeouts and retries, which take many minutes to give up on a Hub that is not there."""
    return DownloadsConfig.model_validate({"endpoint": endpoint, "reserve_bytes": 0, **overrides})


async def test_without_a_network_a_plan_fails_in_seconds_saying_what_to_do(tmp_path: Path):
    endpoint = closed_port_url()
    downloader = Downloader(tmp_path / "models", real_config(endpoint))
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        await asyncio.wait_for(downloader.plan(REPO_ID), timeout=10)
    assert time.monotonic() - started < 5
    assert caught.value.message.startswith(f"The Hub at {endpoint} {UNREACHABLE} (")
    assert caught.value.hint == WHAT_TO_DO


async def test_a_hub_that_accepts_and_never_answers_is_given_up_after_the_probe_timeout(
    silent_server: str, tmp_path: Path
):
    downloader = Downloader(tmp_path / "models", real_config(silent_server), probe_timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(UserError) as caught:
        await asyncio.wait_for(downloader.download(REPO_ID), timeout=10)
    assert time.monotonic() - started < 3
    assert caught.value.message == f"The Hub at {silent_server} {UNREACHABLE} (no answer within 0.5 s)."


@pytest.mark.parametrize(
    "name", ["notarepo", "a/b/c", "../etc", "owner/na me", "owner/name--x", "owner/name..x", "-owner/x", "o/x.git", "/"]
)
async def test_a_name_that_is_no_repo_id_is_refused_before_any_request_or_folder(name: str, tmp_path: Path):
    # A closed port: had the downloader asked anything, the answer would be "cannot be reached", not this.
    downloader = Downloader(tmp_path / "models", real_config(closed_port_url()))
    for attempt in (downloader.plan(name), downloader.download(name)):
        with pytest.raises(UserError) as caught:
            await asyncio.wait_for(attempt, timeout=5)
        assert caught.value.message.endswith(
            "is not a Hub repo id: one is owner/name, made of letters, digits, '-', '_' and '.'."
        )
        assert "Wan-AI/Wan2.2-T2V-A14B-Diffusers" in caught.value.hint
    assert not (tmp_path / "models").exists()


async def test_well_formed_repo_ids_get_past_the_check(tmp_path: Path):
    downloader = Downloader(tmp_path / "models", real_config(closed_port_url()))
    for name in ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "a/b", "user_1/model.v2", "x" * 96 + "/" + "y" * 96):
        with pytest.raises(UserError, match=UNREACHABLE):  # it got as far as asking the Hub
            await asyncio.wait_for(downloader.plan(name), timeout=5)


async def test_an_unreachable_hub_fails_the_waiting_jobs_at_once_and_the_log_says_why(
    queue: JobQueue, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    waiting = await queue.enqueue(JobSource(platform="cli", chat_id="c", user_id="a"), Mode.T2V, REPO_ID, params())
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    ready = asyncio.Event()
    downloader = Downloader(tmp_path / "models", real_config(closed_port_url()))
    fetcher = ModelFetcher(queue, downloader, ready.set, sleep=sleep)
    with caplog.at_level(logging.WARNING, logger="engine.hub.fetcher"):
        fetcher.start(REPO_ID)
        await asyncio.wait_for(ready.wait(), timeout=10)
    job = await queue.get(waiting.job.id)
    assert job.status is JobStatus.FAILED and waits == []  # told at once, no backoff rounds
    # The chat user cannot set HF_ENDPOINT: they read that it failed and that the admin knows.
    assert job.error_user == (
        f"Sorry, the model {REPO_ID} could not be downloaded, so this video cannot be made. The admin has been told."
    )
    assert UNREACHABLE in job.error_detail and WHAT_TO_DO in job.error_detail
    [record] = [record for record in caplog.records if record.name == "engine.hub.fetcher"]
    assert record.levelno >= logging.WARNING
    assert REPO_ID in record.getMessage() and UNREACHABLE in record.getMessage() and WHAT_TO_DO in record.getMessage()


# -- the command line --------------------------------------------------------------------------------------------


def wanbot_env(data: Path, endpoint: str, **values: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WANBOT_", "HF_", "TELEGRAM_"))}
    env.pop("DISCORD_BOT_TOKEN", None)
    env.update(
        WANBOT_DATA_DIR=str(data),
        WANBOT_DOWNLOADS__ENDPOINT=endpoint,
        COLUMNS="240",  # one table row a line
        PYTHONUNBUFFERED="1",
        **values,
    )
    return env


def wanbot(*args: str, env: dict[str, str], limit_s: float = 60) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from bot.cli import main; main()", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit_s)


def test_models_list_without_a_network_answers_from_disk_and_marks_what_it_could_not_check(
    tiny_models: Path, tmp_path: Path
):
    data = tmp_path / "data"
    shutil.copytree(tiny_models / "tiny-i2v", data / "models" / "tiny-i2v")
    env = wanbot_env(data, closed_port_url(), WANBOT_MODELS__T2V=REPO_ID, WANBOT_MODELS__I2V="tiny")
    started = time.monotonic()
    listed = wanbot("models", "list", env=env)
    took = time.monotonic() - started
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1]: line for line in listed.stdout.splitlines() if line.split()[1:2] in (["t2v"], ["i2v"])}
    assert "not checked: the Hub cannot be reached" in rows["t2v"] and " no " in rows["t2v"]
    assert " yes " in rows["i2v"] and "not checked" not in rows["i2v"]
    assert "unknown" not in listed.stdout
    # t2v and the default ti2v, each with its fast preset's weights (the tiny i2v has its own)
    assert listed.stdout.count("not checked: the Hub cannot be reached") == 4
    as_json = json.loads(wanbot("models", "list", "--json", env=env).stdout)
    t2v = next(row for row in as_json if row["mode"] == "t2v")
    assert t2v["bytes_to_download"] is None and t2v["not_checked"] == "the Hub cannot be reached"
    assert took < 30  # the import of the CLI included; before, minutes of retries


async def test_models_list_says_what_is_still_to_download_when_the_hub_answers(hub: FakeHub, tmp_path: Path):
    env = wanbot_env(tmp_path / "data", hub.url, WANBOT_MODELS__T2V=REPO_ID, WANBOT_MODELS__I2V="tiny")
    listed = await asyncio.to_thread(wanbot, "models", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    t2v = next(row for row in json.loads(listed.stdout) if row["mode"] == "t2v")
    assert t2v["bytes_to_download"] > 0 and t2v["not_checked"] is None


def test_models_download_and_verify_of_a_name_that_is_no_repo_id_is_one_line_and_exit_2(tmp_path: Path):
    env = wanbot_env(tmp_path / "data", closed_port_url())
    for command in ("download", "verify"):
        done = wanbot("models", command, "notarepo", env=env)
        assert done.returncode == 2, done.stderr
        [line] = done.stderr.splitlines()
        assert line.startswith("'notarepo' is not a Hub repo id: one is owner/name"), line
    assert not (tmp_path / "data" / "models" / "hub").exists()


def test_models_download_without_a_network_is_one_line_in_seconds(tmp_path: Path):
    env = wanbot_env(tmp_path / "data", closed_port_url())
    done = wanbot("models", "download", REPO_ID, env=env, limit_s=30)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert UNREACHABLE in line and line.endswith(WHAT_TO_DO)


# -- wanbot run --------------------------------------------------------------------------------------------------


async def test_the_start_warns_of_each_model_not_on_disk_with_its_size(hub: FakeHub, tmp_path: Path):
    settings = Settings(
        data_dir=tmp_path / "data",
        models={"t2v": REPO_ID, "i2v": "tiny", "ti2v": "wan-test/No-Such-Model"},
        downloads={"endpoint": hub.url, "reserve_bytes": 0},
    )
    said: list[str] = []
    await asyncio.wait_for(warn_missing(settings, said), timeout=30)
    assert len(said) == 2, said
    assert re.fullmatch(
        rf"The t2v model {REPO_ID} is not on disk \(\d+ KB to download\)\. Run `wanbot models download t2v` now, or "
        r"its first job waits for the download\.",
        said[0],
    )
    assert said[1].startswith("The ti2v model wan-test/No-Such-Model is not on disk, and its size could not be checked")


async def test_without_a_network_the_start_says_quickly_that_it_could_not_check_sizes(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data", models={"i2v": "tiny"}, downloads={"endpoint": closed_port_url()})
    said: list[str] = []
    started = time.monotonic()
    await asyncio.wait_for(warn_missing(settings, said), timeout=10)
    assert time.monotonic() - started < 5
    assert said == [
        f"The {mode} model {getattr(settings.models, mode)} is not on disk, and its size could not be checked (the "
        f"Hub cannot be reached). Run `wanbot models download {mode}` before its first job, or that job waits for "
        "the download."
        for mode in ("t2v", "ti2v")
    ]


async def warn_missing(settings: Settings, said: list[str]) -> None:
    from engine.hub.downloads import warn_missing_models

    await warn_missing_models(settings, said.append)


def test_wanbot_run_warns_on_stderr_at_start_of_models_not_on_disk(tmp_path: Path):
    env = wanbot_env(tmp_path / "data", closed_port_url(), WANBOT_MODELS__T2V="tiny")
    process = subprocess.Popen(
        [sys.executable, "-c", "from bot.cli import main; main()", "run"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while sum("is not on disk" in line for line in seen) < 2 and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(seen) + rest
    assert process.returncode == 0, output
    warnings = [line for line in output.splitlines() if "is not on disk" in line]
    assert [line.split()[1] for line in warnings] == ["i2v", "ti2v"], output
    assert all("could not be checked (the Hub cannot be reached)" in line for line in warnings)
