"""The files workers and the serving process share: through the database on PostgreSQL, the data dir on SQLite."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.config import ImagesConfig
from engine.errors import ImageIntegrityError, UserError
from engine.jobs import ResultInfo
from engine.queue.jobqueue import JobQueue
from engine.storage import shared_files as shared_files_module
from engine.storage.cleanup import remove_delivered_videos, remove_stale_previews, remove_unused_images
from engine.storage.files import hidden_beside
from engine.storage.images import ImageStore, Mode, validate_image_bytes
from engine.storage.shared_files import DatabaseFiles, LocalFiles, SharedFiles, shared_files
from engine.worker import output_name
from tests import imagefactory
from tests.conftest import postgres_schema
from tests.factories import params, source, token_of


@pytest.fixture
async def pg_queue() -> AsyncIterator[JobQueue]:
    """A queue in a PostgreSQL schema of its own."""
    async with postgres_schema() as url:
        queue = await JobQueue.connect(url)
        try:
            yield queue
        finally:
            await queue.close()


@pytest.fixture
def files(pg_queue: JobQueue) -> SharedFiles:
    return shared_files(pg_queue)


def result(path: Path) -> ResultInfo:
    return ResultInfo(
        path=str(path), bytes=1, width=64, height=64, frames=5, fps=16, duration_s=0.3, model="tiny", seed=1
    )


async def chunk_rows(queue: JobQueue, key: str) -> list[int]:
    async with queue.database.reading() as tx:
        rows = await tx.all("SELECT seq FROM stored_file_chunks WHERE name = ? ORDER BY seq", key)
    return [row["seq"] for row in rows]


@pytest.mark.both_backends
async def test_the_backend_decides_where_files_are_shared(queue: JobQueue, database_url: str):
    expected = LocalFiles if database_url.startswith("sqlite") else DatabaseFiles
    assert isinstance(shared_files(queue), expected)


async def test_a_file_of_several_chunks_arrives_byte_for_byte_on_another_machine(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path
):
    video = tmp_path / "worker" / "job-12-3fa9c2d1.mp4"
    video.parent.mkdir()
    payload = os.urandom(5 * shared_files_module.CHUNK_BYTES // 2)
    video.write_bytes(payload)
    await files.publish("video", video)
    assert await chunk_rows(pg_queue, "video/job-12-3fa9c2d1.mp4") == [0, 1, 2]

    fetched = tmp_path / "serve" / "outputs" / video.name
    assert await files.ensure_local("video", fetched) == fetched
    assert fetched.read_bytes() == payload
    assert os.listdir(fetched.parent) == [video.name]  # no temporary file left beside it


async def test_a_file_already_here_is_not_fetched(files: SharedFiles, tmp_path: Path):
    here = tmp_path / "job-3.jpg"
    here.write_bytes(b"local")  # never published: a fetch would fail
    assert await files.ensure_local("preview", here) == here
    assert here.read_bytes() == b"local"


async def test_publishing_a_name_again_keeps_one_copy_the_second(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(shared_files_module, "CHUNK_BYTES", 1000)
    preview = tmp_path / "job-7.jpg"
    preview.write_bytes(os.urandom(3500))
    await files.publish("preview", preview)
    second = os.urandom(1500)
    preview.write_bytes(second)
    await files.publish("preview", preview)

    assert await files.names("preview") == {"job-7.jpg"}
    assert await chunk_rows(pg_queue, "preview/job-7.jpg") == [0, 1]
    assert await files.read("preview", "job-7.jpg") == second
    elsewhere = tmp_path / "elsewhere" / "job-7.jpg"
    await files.ensure_local("preview", elsewhere)
    assert elsewhere.read_bytes() == second


async def test_an_empty_file_round_trips(files: SharedFiles, tmp_path: Path):
    empty = tmp_path / "job-1.jpg"
    empty.write_bytes(b"")
    await files.publish("preview", empty)
    assert await files.read("preview", "job-1.jpg") == b""
    fetched = await files.ensure_local("preview", tmp_path / "copy" / "job-1.jpg")
    assert fetched.read_bytes() == b""


async def test_a_damaged_chunk_is_refused_and_leaves_no_partial_file(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(shared_files_module, "CHUNK_BYTES", 1000)
    video = tmp_path / "job-5-aa.mp4"
    video.write_bytes(os.urandom(2500))
    await files.publish("video", video)
    async with pg_queue.database.transaction() as tx:
        await tx.run(
            "UPDATE stored_file_chunks SET data = ? WHERE name = ? AND seq = 1", b"x" * 1000, "video/" + video.name
        )

    target = tmp_path / "serve" / video.name
    with pytest.raises(UserError, match="damaged") as refused:
        await files.ensure_local("video", target)
    assert refused.value.hint
    assert not target.exists() and os.listdir(target.parent) == []
    with pytest.raises(UserError, match="damaged"):
        await files.read("video", video.name)


async def test_a_missing_chunk_or_a_damaged_image_is_refused(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(shared_files_module, "CHUNK_BYTES", 1000)
    sha = "ab" * 32
    image = tmp_path / "worker" / sha[:2] / sha
    image.parent.mkdir(parents=True)
    image.write_bytes(os.urandom(2100))
    await files.publish("image", image)
    async with pg_queue.database.transaction() as tx:
        await tx.run("DELETE FROM stored_file_chunks WHERE name = ? AND seq = 2", f"image/{sha}")

    target = tmp_path / "images" / sha[:2] / sha
    with pytest.raises(ImageIntegrityError, match="damaged"):
        await files.ensure_local("image", target)
    assert os.listdir(target.parent) == []


@pytest.mark.both_backends
async def test_a_file_nobody_has_is_a_clear_user_error(queue: JobQueue, tmp_path: Path):
    files = shared_files(queue)
    with pytest.raises(UserError, match="neither on this machine nor in the job database") as missing:
        await files.ensure_local("video", tmp_path / "job-4-ff.mp4")
    assert "again" in missing.value.hint
    with pytest.raises(ImageIntegrityError, match="neither on this machine"):
        await files.ensure_local("image", tmp_path / "cd" / ("cd" * 32))
    assert not (tmp_path / "cd").exists() or os.listdir(tmp_path / "cd") == []


async def test_read_remove_and_names(files: SharedFiles, tmp_path: Path):
    for name in ("job-1.jpg", "job-2.jpg"):
        (tmp_path / name).write_bytes(name.encode())
        await files.publish("preview", tmp_path / name)
    (tmp_path / "job-1-aa.mp4").write_bytes(b"video")
    await files.publish("video", tmp_path / "job-1-aa.mp4")

    assert await files.read("preview", "job-2.jpg") == b"job-2.jpg"
    assert await files.read("preview", "job-3.jpg") is None
    assert await files.read("video", "job-1.jpg") is None  # kinds are apart
    assert await files.names("preview") == {"job-1.jpg", "job-2.jpg"}
    assert await files.names("video") == {"job-1-aa.mp4"}
    assert await files.names("preview", older_than_s=3600) == set()

    assert await files.remove("preview", ["job-1.jpg", "job-9.jpg"]) == 1
    assert await files.remove("preview", []) == 0
    assert await files.names("preview") == {"job-2.jpg"}
    assert await files.names("video") == {"job-1-aa.mp4"}
    with pytest.raises(ValueError, match="kind"):
        await files.names("model")
    with pytest.raises(ValueError, match="not a path"):
        await files.read("video", "../job-1-aa.mp4")


async def test_local_files_are_the_data_dir_and_nothing_else(tmp_path: Path):
    queue = await JobQueue.open(tmp_path / "queue.sqlite3")
    try:
        files = shared_files(queue)
        video = tmp_path / "job-1-aa.mp4"
        video.write_bytes(b"video")
        await files.publish("video", video)
        assert await files.ensure_local("video", video) == video
        assert await files.read("video", video.name) is None
        assert await files.names("video") == set()
        assert await files.remove("video", [video.name]) == 0
        assert video.read_bytes() == b"video"
    finally:
        await queue.close()


async def test_clean_up_removes_the_shared_copies_of_unused_images(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path
):
    store = ImageStore(tmp_path / "images")
    config = ImagesConfig()
    kept, gone, orphan = (
        store.put(validate_image_bytes(imagefactory.png(width, height), config))
        for width, height in ((128, 96), (96, 128), (100, 100))
    )
    for image in (kept, gone, orphan):
        await files.publish("image", store.path_for(image.sha256))
    store.delete(orphan.sha256)  # this machine never had it, or lost it: its shared copy goes all the same
    await pg_queue.enqueue(source("a", "1"), Mode.I2V, "tiny", params(), [kept])
    await pg_queue.enqueue(source("b", "2"), Mode.I2V, "tiny", params(), [gone])
    job = await pg_queue.claim_next()
    finished = job.id if job.images[0].sha256 == gone.sha256 else (await pg_queue.claim_next()).id
    await pg_queue.mark_failed(finished, "x", token=await token_of(pg_queue, finished))

    # Within the grace an image may be about to be enqueued: it stays.
    assert await remove_unused_images(pg_queue, store, retention_s=-1, grace_s=3600, files=files) == 0
    assert await files.names("image") == {kept.sha256, gone.sha256, orphan.sha256}
    for path in store.root.glob("*/*"):
        old = time.time() - 7200
        os.utime(path, (old, old))
    assert await remove_unused_images(pg_queue, store, retention_s=3600, grace_s=0, files=files) == 1
    assert await files.names("image") == {kept.sha256, gone.sha256}
    assert await remove_unused_images(pg_queue, store, retention_s=-1, grace_s=0, files=files) == 1
    assert await files.names("image") == {kept.sha256}
    assert store.stored_hashes() == {kept.sha256}


async def test_clean_up_removes_the_shared_copies_of_delivered_videos(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path
):
    worker = tmp_path / "worker"
    outputs = tmp_path / "serve" / "outputs"
    worker.mkdir()
    outputs.mkdir(parents=True)
    jobs = [(await pg_queue.enqueue(source(user, user), Mode.T2V, "tiny", params())).job.id for user in "abc"]
    videos = {}
    for _ in jobs:
        job = await pg_queue.claim_next()
        videos[job.id] = worker / f"job-{job.id}-{job.id:08x}.mp4"
        videos[job.id].write_bytes(b"video")
        await files.publish("video", videos[job.id])
        await pg_queue.mark_succeeded(job.id, result(videos[job.id]), token=job.claim_token)
    fetched, never_here, waiting = jobs
    await files.ensure_local("video", outputs / videos[fetched].name)  # the serving process delivered it from here
    await pg_queue.mark_delivered(fetched)
    await pg_queue.mark_delivered(never_here)  # delivered by another serving process, say
    another_queues = worker / f"job-{fetched}-ffffffff.mp4"  # a queue that started over numbered its job the same
    no_job = worker / "job-999-aa.mp4"
    for path in (another_queues, no_job):
        path.write_bytes(b"video")
        await files.publish("video", path)

    assert await remove_delivered_videos(pg_queue, outputs, retention_s=3600, files=files) == 0
    # The fetched video and its shared copy count once.
    assert await remove_delivered_videos(pg_queue, outputs, retention_s=-1, files=files) == 2
    assert os.listdir(outputs) == []
    assert await files.names("video") == {videos[waiting].name, another_queues.name, no_job.name}


async def test_clean_up_removes_the_shared_previews_of_jobs_that_ended(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path
):
    running = (await pg_queue.enqueue(source("a"), Mode.T2V, "tiny", params())).job.id
    await pg_queue.claim_next()
    ended = (await pg_queue.enqueue(source("b"), Mode.T2V, "tiny", params())).job.id
    claimed = await pg_queue.claim_next()
    await pg_queue.mark_failed(claimed.id, "no", token=claimed.claim_token)
    worker = tmp_path / "worker"
    worker.mkdir()
    for job_id in (running, ended, 999):
        (worker / f"job-{job_id}.jpg").write_bytes(b"jpeg")
        await files.publish("preview", worker / f"job-{job_id}.jpg")
    previews = tmp_path / "serve" / "previews"
    previews.mkdir(parents=True)
    crashed_fetch = previews / f".job-{running}.jpg.k2j4.part"
    crashed_fetch.write_bytes(b"jp")
    old = time.time() - 7200
    os.utime(crashed_fetch, (old, old))

    assert await remove_stale_previews(pg_queue, previews, files=files) == 3
    assert await files.names("preview") == {f"job-{running}.jpg"}
    assert os.listdir(previews) == []


async def test_a_fetch_a_crash_left_behind_is_swept_with_the_videos(queue: JobQueue, tmp_path: Path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    stale = outputs / ".job-3-3fa9c2d1.mp4.x8a7.part"
    fresh = outputs / ".job-4-3fa9c2d1.mp4.y9b8.part"
    encoding = hidden_beside(outputs / output_name(5))  # a video encoded while decoding when the worker died
    for path in (stale, fresh, encoding):
        path.write_bytes(b"half")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(encoding, (old, old))
    assert await remove_delivered_videos(queue, outputs, retention_s=-1, files=shared_files(queue)) == 2
    assert os.listdir(outputs) == [fresh.name]


async def test_redeliver_finds_a_video_that_only_the_database_holds(
    pg_queue: JobQueue, files: SharedFiles, tmp_path: Path
):
    """`queue redeliver` on the serving machine: the video is on a worker's machine and in the database."""
    made = tmp_path / "worker" / "job-1-0a1b2c3d.mp4"
    made.parent.mkdir()
    made.write_bytes(b"an mp4")
    job = (await pg_queue.enqueue(source("alice"), Mode.T2V, "tiny", params())).job
    claimed = await pg_queue.claim_next()
    await files.publish("video", made)
    await pg_queue.mark_succeeded(job.id, result(made), token=claimed.claim_token)
    await pg_queue.mark_delivery_failed(job.id, "too large", attempts_at_least=5)
    made.unlink()  # not on this machine
    assert (await pg_queue.redeliver(job.id)).delivery_status.value == "pending"

    await pg_queue.mark_delivery_failed(job.id, "too large", attempts_at_least=5)
    await files.remove("video", [made.name])
    with pytest.raises(UserError, match="no longer on disk"):
        await pg_queue.redeliver(job.id)


async def test_the_video_of_a_worker_killed_before_it_recorded_the_end_is_swept_once_the_job_ended(
    files: SharedFiles, pg_queue: JobQueue, tmp_path: Path
):
    worker = tmp_path / "worker"
    worker.mkdir()
    job_id = (await pg_queue.enqueue(source("a"), Mode.T2V, "tiny", params())).job.id
    await pg_queue.claim_next()
    left = worker / f"job-{job_id}-0000dead.mp4"  # stored, and then the worker was killed
    left.write_bytes(b"a video nobody recorded")
    await files.publish("video", left)
    await pg_queue.recover_interrupted(3, lease_s=-1)  # its lease ran out: the job runs again, elsewhere
    await pg_queue.claim_next()
    made = worker / f"job-{job_id}-0000beef.mp4"
    made.write_bytes(b"the video")
    await files.publish("video", made)
    assert await remove_delivered_videos(pg_queue, worker, 3600, temp_grace_s=0, files=files) == 0  # still running
    await pg_queue.mark_succeeded(job_id, result(made), token=await token_of(pg_queue, job_id))
    assert await remove_delivered_videos(pg_queue, worker, 3600, temp_grace_s=0, files=files) == 1
    assert os.listdir(worker) == [made.name]
    assert await files.names("video") == {made.name}
