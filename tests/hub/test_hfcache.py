"""Models people already have: the standard Hugging Face cache, filled by huggingface_hub itself against the fake
Hub, is used as it is; wanbot's own downloads land in the same layout, which huggingface_hub reads back."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from huggingface_hub import constants, scan_cache_dir, snapshot_download, try_to_load_from_cache
from huggingface_hub.file_download import repo_folder_name
from typer.testing import CliRunner

from bot.cli import app
from engine.config import DownloadsConfig, Settings
from engine.errors import UserError
from engine.hub.downloads import Downloader, select_files
from engine.hub.hfcache import MANIFEST, hub_cache, repo_folder, verify_snapshot
from engine.jobs import JobSource, JobStatus
from engine.pipeline.models import GenerationRequest
from engine.service import Engine
from engine.storage.images import Mode
from tests.fake_hub import COMMIT, FakeHub

REPO_ID = "wan-test/Tiny-T2V-Diffusers"
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
SCHEDULER = "scheduler/scheduler_config.json"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def hub(tiny_models: Path, tmp_path: Path) -> AsyncIterator[FakeHub]:
    folder = tmp_path / "repo"
    shutil.copytree(tiny_models / "tiny-t2v", folder)
    (folder / "README.md").write_text("# model card")  # in the cache, never needed by the pipeline
    server = FakeHub(REPO_ID, folder)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The standard cache of this test: where HF_HUB_CACHE says, as huggingface-cli and diffusers read it."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


async def fill_with_huggingface_hub(hub: FakeHub, cache: Path) -> Path:
    """What `huggingface-cli download` leaves: huggingface_hub's own snapshot_download, then no request counted."""
    folder = await asyncio.to_thread(snapshot_download, REPO_ID, cache_dir=cache, endpoint=hub.url)
    hub.requests.clear()
    return Path(folder)


def config(hub: FakeHub, **overrides: object) -> DownloadsConfig:
    values = {"endpoint": hub.url, "retries": 2, "backoff_s": 0.01, "max_backoff_s": 0.05, "reserve_bytes": 0}
    return DownloadsConfig.model_validate({**values, **overrides})


def pipeline_files(hub: FakeHub) -> list[str]:
    return select_files(json.loads((hub.folder / "model_index.json").read_text()), list(hub.files))


def bodies_fetched(hub: FakeHub) -> set[str]:
    """The files whose content was asked for (an LFS file's request is redirected to the CDN, and counts once)."""
    resolve = f"/{REPO_ID}/resolve/{COMMIT}/"
    return {
        path.removeprefix("cdn:").removeprefix(resolve)
        for method, path, _ in hub.requests
        if method == "GET" and (path.startswith("cdn:") or path.startswith(resolve))
    }


async def test_a_model_in_the_hugging_face_cache_is_used_with_no_request_to_the_hub(
    hub: FakeHub, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    snapshot = await fill_with_huggingface_hub(hub, hf_cache)
    settings = Settings(data_dir=tmp_path / "data", models={"t2v": REPO_ID}, downloads=config(hub).model_dump())
    engine = await Engine.open(settings)
    try:
        request = GenerationRequest(mode=Mode.T2V, prompt="w1 a fox", steps=2, frames=5, resolution="64x64")
        submission = await engine.submit(request, JobSource(platform="cli", chat_id="c", user_id="a"))
        await asyncio.wait_for(engine._worker.run(stop_after=0), timeout=90)
        job = await engine._queue.get(submission.result.job.id)
    finally:
        await engine.close()
    assert job.status is JobStatus.SUCCEEDED, job.error_detail
    assert hub.requests == []  # not a file, not even the revision: the cache answered everything
    assert Downloader(settings.models_dir, settings.downloads).local_snapshot(REPO_ID) == snapshot
    assert not (settings.models_dir / "hub").exists()  # nothing copied into wanbot's own folder either


async def test_a_cache_snapshot_missing_files_downloads_only_those_into_it(
    hub: FakeHub, hf_cache: Path, tmp_path: Path
):
    snapshot = await fill_with_huggingface_hub(hub, hf_cache)
    (snapshot / WEIGHTS).resolve().unlink()  # a stopped download: the link is there, its blob is not
    scheduler_blob = (snapshot / SCHEDULER).resolve()
    (snapshot / SCHEDULER).unlink()  # a download limited to some files: no link, no blob
    scheduler_blob.unlink()
    (snapshot / "README.md").resolve().unlink()  # gone too, but no pipeline loads it: it must not block anything
    downloader = Downloader(tmp_path / "models", config(hub))
    assert downloader.local_snapshot(REPO_ID) is None

    folder = await downloader.download(REPO_ID)
    assert folder == snapshot  # completed where it was, not copied into wanbot's folder
    assert bodies_fetched(hub) == {"model_index.json", SCHEDULER, WEIGHTS}  # model_index.json: the plan reads it
    assert downloader.local_snapshot(REPO_ID) == snapshot
    assert (snapshot / WEIGHTS).read_bytes() == (hub.folder / WEIGHTS).read_bytes()
    assert verify_snapshot(snapshot) == []


async def test_a_wanbot_download_is_a_complete_repo_to_huggingface_hub(hub: FakeHub, hf_cache: Path, tmp_path: Path):
    shared = tmp_path / "shared"
    downloader = Downloader(tmp_path / "models", config(hub, cache_dir=shared))
    folder = await downloader.download(REPO_ID)

    report = scan_cache_dir(shared)
    assert report.warnings == [] and report.incomplete_files == frozenset()
    [repo] = report.repos
    [revision] = repo.revisions
    needed = pipeline_files(hub)
    assert (repo.repo_id, revision.commit_hash, revision.refs) == (REPO_ID, COMMIT, frozenset({"main"}))
    assert sorted(file.file_path.relative_to(folder).as_posix() for file in revision.files) == sorted(needed)
    assert all(
        file.blob_path.parent == shared / f"models--{REPO_ID.replace('/', '--')}" / "blobs" for file in revision.files
    )
    assert all(not os.path.isabs(os.readlink(folder / path)) for path in needed)  # the cache may move as a whole
    assert [try_to_load_from_cache(REPO_ID, path, cache_dir=shared) for path in needed] == [
        str(folder / path) for path in needed
    ]
    assert verify_snapshot(folder) == []  # each file has the content its blob is named by
    # huggingface_hub, offline, takes the snapshot as its own.
    assert await asyncio.to_thread(snapshot_download, REPO_ID, cache_dir=shared, local_files_only=True) == str(folder)


async def test_a_model_pinned_to_a_commit_is_used_though_no_branch_names_it(
    hub: FakeHub, hf_cache: Path, tmp_path: Path
):
    downloader = Downloader(tmp_path / "models", config(hub))
    folder = await downloader.download(REPO_ID, revision=COMMIT)  # `wanbot models download t2v --revision <commit>`
    assert not (folder.parents[1] / "refs").exists()  # as with huggingface_hub: a commit needs no ref
    assert downloader.local_snapshot(REPO_ID) == folder


async def test_models_list_and_verify_read_the_shared_layout(
    hub: FakeHub, hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    data = tmp_path / "data"
    await Downloader(data / "models", config(hub)).download(REPO_ID)
    env = {
        "WANBOT_DATA_DIR": str(data),
        "WANBOT_MODELS__T2V": REPO_ID,
        "WANBOT_DOWNLOADS__OFFLINE": "true",
        "WANBOT_LOG_LEVEL": "WARNING",
    }
    runner = CliRunner()
    listed = await asyncio.to_thread(runner.invoke, app, ["models", "list", "--json"], env=env)
    [row] = [row for row in json.loads(listed.stdout) if row["mode"] == "t2v"]
    assert (row["on_disk"], row["bytes_to_download"]) == (True, 0)
    assert row["bytes_on_disk"] == sum(hub.files[path].size for path in pipeline_files(hub))
    verified = await asyncio.to_thread(runner.invoke, app, ["models", "verify", "t2v"], env=env)
    assert verified.exit_code == 0 and "is intact" in verified.stdout, verified.output

    snapshot = data / "models" / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    blob = (snapshot / WEIGHTS).resolve()
    with blob.open("r+b") as handle:  # one byte changed on disk, its size the same
        first = handle.read(1)[0]
        handle.seek(0)
        handle.write(bytes([first ^ 0xFF]))
    failed = await asyncio.to_thread(runner.invoke, app, ["models", "verify", "t2v"], env=env)
    assert failed.exit_code == 2
    assert f"{REPO_ID}: {WEIGHTS} does not match its sha256" in failed.stderr


async def test_a_model_downloaded_in_the_old_layout_is_still_found(hub: FakeHub, hf_cache: Path, tmp_path: Path):
    models = tmp_path / "models"
    old = models / "hub" / REPO_ID.replace("/", "--") / COMMIT
    shutil.copytree(hub.folder, old)
    manifest = [{"path": path, "size": served.size, "sha256": served.sha256} for path, served in hub.files.items()]
    (old / MANIFEST).write_text(json.dumps({"repo_id": REPO_ID, "commit": COMMIT, "files": manifest}))
    (old.parent / "current").write_text(COMMIT)
    downloader = Downloader(models, config(hub))
    assert downloader.local_snapshot(REPO_ID) == old
    assert downloader.local_files(REPO_ID, [WEIGHTS]) == old
    assert verify_snapshot(old) == []
    # Downloaded again into the shared layout, its weights come from the old store: linked, not fetched.
    (models / "blobs").mkdir()
    for path, served in hub.files.items():
        if served.lfs:  # the old store held the files with a sha256
            os.link(old / path, models / "blobs" / served.sha256)
    await downloader.download(REPO_ID)
    assert not [path for path in bodies_fetched(hub) if hub.files[path].lfs]
    assert any(not hub.files[path].lfs for path in bodies_fetched(hub))  # the small files did come from the Hub


def test_the_cache_is_where_huggingface_hub_looks():
    assert hub_cache() == Path(constants.HF_HUB_CACHE)  # this process's environment, read by both
    assert hub_cache({"HF_HUB_CACHE": "/a", "HF_HOME": "/b"}) == Path("/a")
    assert hub_cache({"HUGGINGFACE_HUB_CACHE": "/old", "HF_HOME": "/b"}) == Path("/old")
    assert hub_cache({"HF_HOME": "/b", "XDG_CACHE_HOME": "/x"}) == Path("/b/hub")
    assert hub_cache({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")
    assert hub_cache({}) == Path(os.path.expanduser("~/.cache/huggingface/hub"))
    assert repo_folder(Path("/c"), REPO_ID) == Path("/c") / repo_folder_name(repo_id=REPO_ID, repo_type="model")


async def test_hf_hub_offline_keeps_downloads_off_unless_the_config_says_otherwise(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = Downloader(tmp_path / "models", config(hub))
    with pytest.raises(UserError, match="offline mode"):
        await offline.download(REPO_ID)
    assert hub.requests == []
    assert config(hub, offline=False).offline is False  # downloads.offline, when set, wins
