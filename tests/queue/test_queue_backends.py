"""`database.url`: the queue in the SQLite file it always was, or in PostgreSQL; what each says when it cannot."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg
import pytest

from engine.config import Settings, load_settings
from engine.errors import ConfigError, Unavailable, UserError
from engine.jobs import EventKind
from engine.queue.follower import EventFollower
from engine.queue.jobqueue import JobQueue
from engine.queue.postgres import MIGRATIONS
from engine.queue.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from engine.storage.images import Mode
from tests.conftest import postgres_schema
from tests.factories import params, source

ONLY_POSTGRES = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


@pytest.fixture(autouse=True)
def no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANBOT_CONFIG", "WANBOT_DATABASE__URL", "WANBOT_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


async def test_the_default_is_the_sqlite_file_in_the_data_dir(tmp_path: Path):
    settings = Settings(data_dir=tmp_path / "data")
    assert settings.database_url == f"sqlite:///{tmp_path}/data/wanbot.sqlite3"
    queue = await JobQueue.connect(settings.database_url)
    await queue.close()
    assert queue.path == settings.db_path and settings.db_path.is_file()


def test_a_postgres_url_is_taken_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("WANBOT_DATABASE__URL", "postgresql://bot:secret@db.internal:5432/wanbot")
    assert load_settings().database_url == "postgresql://bot:secret@db.internal:5432/wanbot"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("mysql://bot:s3cret@db/wanbot", "the scheme is 'mysql'; give sqlite:///"),
        ("db.internal/wanbot", "the scheme is none"),
        ("postgresql://bot:s3cret@db:port/wanbot", "port of the PostgreSQL URL is not a number"),
        ("postgresql://bot:s3cret@db.internal:5432", "names no database"),
        ("postgresql:///wanbot", "names no host"),
        ("sqlite:///", "a SQLite URL names a file"),
    ],
)
def test_a_bad_url_is_a_config_error_naming_the_key_and_never_the_password(
    monkeypatch: pytest.MonkeyPatch, url: str, says: str
):
    monkeypatch.setenv("WANBOT_DATABASE__URL", url)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith("config error: database.url: ") and "WANBOT_DATABASE__URL" in message
    assert says in message
    assert "s3cret" not in message


async def test_an_unreachable_server_is_a_user_error_that_names_it_without_the_password():
    with pytest.raises(UserError) as caught:
        await JobQueue.connect("postgresql://bot:s3cret@127.0.0.1:1/wanbot")
    assert "Cannot use the job database postgresql://bot@127.0.0.1:1/wanbot" in str(caught.value)
    assert "database.url" in caught.value.hint
    assert "s3cret" not in str(caught.value) + caught.value.hint


@pytest.mark.parametrize(
    ("refusal", "temporary"),
    [
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"), True),
        (asyncpg.exceptions.InvalidPasswordError("password authentication failed"), False),
    ],
)
async def test_a_server_that_is_starting_up_is_out_of_reach_and_a_refused_login_a_mistake(
    refusal: Exception, temporary: bool, monkeypatch: pytest.MonkeyPatch
):
    """Exit 1 (systemd tries again) while the server restarts; exit 2 (a restart cannot help) for the settings."""

    async def refused(*args: object, **kwargs: object) -> None:
        raise refusal

    monkeypatch.setattr(asyncpg, "create_pool", refused)
    with pytest.raises(UserError) as caught:
        await JobQueue.connect("postgresql://bot@127.0.0.1:5432/wanbot")
    assert isinstance(caught.value, Unavailable) is temporary


@ONLY_POSTGRES
async def test_processes_starting_at_once_apply_each_migration_once(database_url: str):
    queues = await asyncio.gather(*(JobQueue.connect(database_url) for _ in range(3)))
    for queue in queues:
        await queue.close()
    connection = await asyncpg.connect(database_url)
    try:
        applied = [row["version"] for row in await connection.fetch("SELECT version FROM schema_version")]
    finally:
        await connection.close()
    assert sorted(applied) == list(range(1, len(MIGRATIONS) + 1))


@ONLY_POSTGRES
async def test_sqlite_only_features_say_what_to_do_on_postgres(database_url: str, tmp_path: Path):
    queue = await JobQueue.connect(database_url)
    try:
        with pytest.raises(UserError, match="this queue is in PostgreSQL") as caught:
            await queue.backup(tmp_path / "copy.db")
        assert "pg_dump --format=custom --file=wanbot.dump" in caught.value.hint
        assert "videos and previews of a scale-out are inside it too" in caught.value.hint
        assert "pg_restore --dbname=" in caught.value.hint and not (tmp_path / "copy.db").exists()
        assert queue.path is None and not queue.file_is_gone()  # nothing for the file watch to watch
    finally:
        await queue.close()


@ONLY_POSTGRES
async def test_a_claim_passes_by_a_job_another_process_is_claiming_and_never_waits_for_it(database_url: str):
    queue = await JobQueue.connect(database_url)
    other = await asyncpg.connect(database_url)
    try:
        first, second = [
            await queue.enqueue(source("alice", f"a{index}"), Mode.T2V, "tiny", params()) for index in (0, 1)
        ]
        async with other.transaction():
            await other.execute("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", first.job.id)  # mid-claim elsewhere
            claimed = await asyncio.wait_for(queue.claim_next(), timeout=30)
            assert claimed.id == second.job.id
        assert (await queue.claim_next()).id == first.job.id
    finally:
        await other.close()
        await queue.close()


@ONLY_POSTGRES
async def test_a_user_without_the_right_to_create_tables_is_told_what_it_needs(database_url: str):
    role = f"wanbot_test_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f"CREATE ROLE {role} LOGIN")
    await admin.execute(f"GRANT USAGE ON SCHEMA {parse_qs(urlsplit(database_url).query)['search_path'][0]} TO {role}")
    try:
        parts = urlsplit(database_url)
        as_role = urlunsplit(parts._replace(netloc=parts.netloc.replace(parts.username, role, 1)))
        with pytest.raises(UserError, match="Cannot create or update the tables of the job database") as caught:
            await JobQueue.connect(as_role)
        assert "permission denied for schema" in str(caught.value) and "GRANT USAGE, CREATE" in caught.value.hint
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE {role}")
        await admin.close()


async def test_an_event_committed_behind_newer_ones_is_still_heard():
    """On PostgreSQL an event's id is taken at insert and seen at commit: one held back while hundreds of newer ones
    commit is published when it commits, not skipped."""
    async with postgres_schema() as url:
        worker = await JobQueue.connect(url)
        serving = await JobQueue.connect(url)
        worker.share_events()
        heard = serving.events.subscribe()
        follower = asyncio.create_task(EventFollower(serving).follow())
        try:
            await asyncio.sleep(0.5)
            held = (await worker.enqueue(source("held"), Mode.T2V, "tiny", params())).job
            async with worker.database.transaction() as slow:  # a cancel whose transaction takes its time
                await slow.run("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", held.id)
                await worker._share(slow, EventKind.CANCEL_REQUESTED, held.id)
                for n in range(250):
                    await worker.enqueue(source(f"u{n}"), Mode.T2V, "tiny", params(), global_limit=1000)
                await asyncio.sleep(1.5)  # the follower has read all of those meanwhile
            kinds = []
            while EventKind.CANCEL_REQUESTED not in kinds:
                kinds.append((await asyncio.wait_for(heard.get(), timeout=20)).kind)
            assert kinds.count(EventKind.ENQUEUED) >= 1
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await serving.close()
            await worker.close()


@pytest.mark.both_backends
async def test_a_database_a_newer_wanbot_migrated_is_refused_in_one_sentence(database_url: str):
    queue = await JobQueue.connect(database_url)
    await queue.enqueue(source(), Mode.T2V, "tiny", params())
    newer = len(SQLITE_MIGRATIONS if queue.path is not None else MIGRATIONS) + 1
    async with queue.database.transaction() as db:  # as a newer wanbot's next migration would leave it
        if queue.path is not None:
            await db.run(f"PRAGMA user_version = {newer}")
        else:
            await db.run("INSERT INTO schema_version (version) VALUES (?)", newer)
    await queue.close()
    with pytest.raises(UserError) as refused:
        await JobQueue.connect(database_url)
    assert f"was made by a newer wanbot (schema {newer};" in str(refused.value)
    assert "restore the backup taken before the upgrade" in str(refused.value)


@ONLY_POSTGRES
async def test_a_worker_whose_clock_is_behind_keeps_its_lease_on_the_database_clock(
    database_url: str, caplog: pytest.LogCaptureFixture
):
    """Its heartbeats are written on the server's clock: two minutes behind, it is not taken for gone (it was,
    and failed every job it touched), and the difference is said once with its size."""
    import time

    from engine.jobs import JobStatus, WorkerRecord, WorkerState

    behind = await JobQueue.connect(database_url, clock=lambda: time.time() - 120)
    others = await JobQueue.connect(database_url)
    try:
        assert await behind.measure_clock_skew() == pytest.approx(120, abs=2)
        assert "this machine's clock is 120." in caplog.text and "behind the database server's" in caplog.text
        assert await others.measure_clock_skew() == 0.0  # within the tolerance: nothing said, nothing changed
        job_id = (await others.enqueue(source("alice"), Mode.T2V, "tiny", params())).job.id
        claimed = await behind.claim_next(worker_id="late/cuda:0/1-ab")
        record = WorkerRecord(
            id="late/cuda:0/1-ab", host="late", pid=1, device="cuda:0", state=WorkerState.WORKING, started_at=0
        )
        await behind.heartbeat(record.model_copy(update={"current_job": job_id}), token=claimed.claim_token)
        assert await others.recover_interrupted(3, lease_s=60) == []
        assert (await others.get(job_id)).status is JobStatus.RUNNING
    finally:
        await behind.close()
        await others.close()


@pytest.mark.both_backends
async def test_an_upgrade_waits_until_the_older_wanbot_processes_have_stopped(
    database_url: str, monkeypatch: pytest.MonkeyPatch
):
    """A newer wanbot (one migration more) opening a database that a live older worker and serve still use refuses
    in one sentence naming them; once they stopped (or a killed one's last heartbeat is old enough), it migrates."""
    from engine.jobs import ServingRecord, WorkerRecord, WorkerState
    from engine.queue import postgres, sqlite

    older = await JobQueue.connect(database_url)
    now = older.lease_now()
    gpu = WorkerRecord(id="gpu-a/cuda:0/7-ab", host="gpu-a", machine="gpu-a|ns", pid=7, device="cuda:0", started_at=0)
    await older.heartbeat(gpu)
    serve = ServingRecord(id="chat-host/9-cd", host="chat-host", machine="chat-host|ns", pid=9, started_at=now)
    assert await older.take_serving(serve, lease_s=60) is None
    backend = sqlite if older.path is not None else postgres
    newer = [*backend.MIGRATIONS, "CREATE TABLE upgrade_probe (x INTEGER)"]
    monkeypatch.setattr(backend, "MIGRATIONS", newer)

    with pytest.raises(UserError) as refused:
        await JobQueue.connect(database_url)
    known = len(newer)
    said = str(refused.value)
    where = older.path if older.path is not None else older.database.url.shown()
    assert f"Not started: this wanbot would upgrade the job database {where} (schema {known - 1} to {known})" in said
    assert "worker gpu-a/cuda:0/7-ab (pid 7 on gpu-a); serve (pid 9 on chat-host)." in said
    assert "Stop every wanbot process on this database first, back it up" in said

    await older.heartbeat(gpu.model_copy(update={"state": WorkerState.STOPPED}))
    await older.release_serving(serve)
    await older.close()
    upgraded = await JobQueue.connect(database_url)
    try:
        async with upgraded.database.reading() as db:
            assert await db.all("SELECT x FROM upgrade_probe") == []
    finally:
        await upgraded.close()
