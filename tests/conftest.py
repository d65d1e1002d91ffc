from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from engine.config import ImagesConfig, Settings
from engine.queue.jobqueue import JobQueue
from engine.queue.url import parse_database_url, sqlite_url
from tests.postgres import temporary_schema


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def images_config() -> ImagesConfig:
    return ImagesConfig()


@pytest.fixture
async def queue(database_url: str) -> AsyncIterator[JobQueue]:
    """The queue in SQLite, or in each backend for tests marked `both_backends` (see `database_url`)."""
    opened = await JobQueue.connect(database_url)
    yield opened
    await opened.close()


@pytest.fixture
async def telegram() -> AsyncIterator[object]:
    """The fake Telegram Bot API on 127.0.0.1."""
    from tests.fake_telegram import TEST_TOKEN, FakeTelegram

    server = FakeTelegram(TEST_TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def discord_server() -> AsyncIterator[object]:
    """The fake Discord (REST, gateway, CDN) on 127.0.0.1."""
    from tests.fake_discord import TEST_TOKEN, FakeDiscord

    server = FakeDiscord(TEST_TOKEN)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The three tiny models, built once per test run and shared read-only: under pytest-xdist the first worker
    process builds them in the run's common temporary folder while the others wait on its lock."""
    from engine.pipeline.tiny import make_tiny_model
    from engine.storage.images import Mode

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root = shared / "models"
    with (shared / "models.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built").exists():
            for mode in Mode:
                make_tiny_model(root / f"tiny-{mode.value}", mode)
            (root / "built").touch()
    return root


@pytest.fixture
def tiny_settings(tmp_path: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.delenv("WANBOT_CONFIG", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    (data / "models").symlink_to(tiny_models, target_is_directory=True)
    # Previews turn a job's live message into a photo; the tests of previews turn them on
    # (tests/chat/test_live_previews.py).
    return Settings(data_dir=data, models={"t2v": "tiny", "i2v": "tiny", "ti2v": "tiny"}, previews={"enabled": False})


@pytest.fixture
async def engine(tiny_settings: Settings) -> AsyncIterator[object]:
    from engine.service import Engine

    opened = await Engine.open(tiny_settings)
    yield opened
    await opened.close()


# -- the queue's database: SQLite, or PostgreSQL for tests marked both_backends ------------------------------------

TEST_POSTGRES_ENV = "WANBOT_TEST_DATABASE_URL"
REQUIRE_POSTGRES_ENV = "WANBOT_REQUIRE_POSTGRES"
# The local server of these machines (trust authentication); CI sets WANBOT_REQUIRE_POSTGRES=1 so it cannot be missed.
DEFAULT_TEST_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
_postgres_problem: list[str] = []  # why the server cannot be used, once found out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`database_url` is SQLite's, or each backend's in turn where the test is marked `both_backends`."""
    if "database_url" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_backends"):
        metafunc.parametrize("database_url", ["sqlite", "postgres"], indirect=True)


@pytest.fixture
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, empty queue database's URL: a file in tmp_path, or a schema of its own on the test PostgreSQL server
    (dropped afterwards). No reachable server: the test is skipped, or fails under WANBOT_REQUIRE_POSTGRES=1."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield sqlite_url(tmp_path / "queue.sqlite3")
        return
    async with postgres_schema() as url:
        yield url


@contextlib.asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    import asyncpg

    server = os.environ.get(TEST_POSTGRES_ENV, DEFAULT_TEST_POSTGRES)
    if not _postgres_problem:
        try:
            admin = await asyncpg.connect(server, timeout=5)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            _postgres_problem.append(f"PostgreSQL at {parse_database_url(server).shown()} is not reachable: {exc}")
        else:
            await admin.close()
    if _postgres_problem:
        reason = f"{_postgres_problem[0]} (set {TEST_POSTGRES_ENV} to a server the tests may use)"
        if os.environ.get(REQUIRE_POSTGRES_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_POSTGRES_ENV}=1 requires it", pytrace=False)
        pytest.skip(reason)
    async with temporary_schema(server) as url:
        yield url
