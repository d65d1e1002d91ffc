"""A worker whose database goes away: it keeps its job running, tries the connection again, and either resumes its
lease or, when the job was given away meanwhile, drops it without writing. It never exits. Real PostgreSQL, reached
through a link the test cuts."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit, urlunsplit

import pytest

from engine.config import Settings
from engine.jobs import EventKind, JobStatus
from engine.queue import postgres as queue_postgres
from engine.queue.core import DATABASE_DOWN
from engine.queue.follower import EventFollower
from engine.queue.jobqueue import JobQueue
from engine.service import Engine
from engine.storage.images import Mode
from tests.conftest import postgres_schema
from tests.factories import params, source
from tests.fake_faults import CuttableLink

LEASE_S = 2.0


def through(link: CuttableLink, url: str) -> str:
    parts = urlsplit(url)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit((parts.scheme, f"{user}127.0.0.1:{link.port}", parts.path, parts.query, ""))


async def running_job_with_progress(queue: JobQueue, job_id: int, step: int) -> bool:
    job = await queue.get(job_id)
    return job.status is JobStatus.RUNNING and job.progress is not None and (job.progress.step or 0) >= step


async def wait_for(check, limit_s: float = 60) -> None:
    for _ in range(int(limit_s / 0.05)):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("given_away", [False, True], ids=["resumes its lease", "drops the job given away"])
async def test_a_worker_that_loses_its_database_goes_on(tiny_settings: Settings, given_away: bool, caplog):
    async with postgres_schema() as url:
        server = urlsplit(url)
        direct = await JobQueue.connect(url)
        async with CuttableLink(server.hostname, server.port or 5432) as link:
            settings = tiny_settings.model_copy(
                update={
                    "database": tiny_settings.database.model_copy(update={"url": through(link, url)}),
                    "queue": tiny_settings.queue.model_copy(update={"heartbeat_s": 0.2, "lease_s": LEASE_S}),
                }
            )
            engine = await Engine.open(settings)
            worker = asyncio.create_task(engine._worker.run())
            try:
                # Long enough to be seen running before it ends, on a fast machine too.
                asked = await direct.enqueue(source("alice"), Mode.T2V, "tiny", params(steps=400, width=64))
                job_id = asked.job.id
                await wait_for(lambda: running_job_with_progress(direct, job_id, 2))

                link.cut()
                await asyncio.sleep(LEASE_S + 0.5)
                if given_away:
                    # Another process finds the silent worker's job and queues it again.
                    (requeued,) = await direct.recover_interrupted(3, LEASE_S)
                    assert requeued.status is JobStatus.QUEUED
                assert not worker.done()
                link.mend()

                await wait_for(lambda: _succeeded(direct, job_id), limit_s=120)
            finally:
                await engine._worker.stop()
                await worker
                await engine.close()
        job = await direct.get(job_id)
        history = [kind for kind, _ in await direct.events_of(job_id)]
        await direct.close()
    assert history.count(EventKind.SUCCEEDED.value) == 1
    if given_away:
        # Claimed again (by the same worker, now free) and made once more; the lost run wrote nothing.
        assert job.attempts == 2 and EventKind.REQUEUED.value in history
        # Told at its heartbeat (it drops the run), or at its last write if the run ended during the outage.
        told = ("dropped job", "queued again while this worker was silent", "is no longer this worker's")
        assert any(words in caplog.text for words in told)
    else:
        assert job.attempts == 1 and EventKind.REQUEUED.value not in history
    assert any("heartbeat failed" in record.message for record in caplog.records)


async def _succeeded(queue: JobQueue, job_id: int) -> bool:
    return (await queue.get(job_id)).status is JobStatus.SUCCEEDED


async def test_the_event_follower_outlives_a_lost_database():
    """A serving process whose database goes away for a while hears the other processes again once it is back."""
    async with postgres_schema() as url:
        server = urlsplit(url)
        direct = await JobQueue.connect(url)
        async with CuttableLink(server.hostname, server.port or 5432) as link:
            serving = await JobQueue.connect(through(link, url))
            serving.share_events()
            direct.share_events()
            heard = serving.events.subscribe()
            follower = asyncio.create_task(EventFollower(serving).follow())
            try:
                await asyncio.sleep(0.5)
                link.cut()
                await asyncio.sleep(3)
                assert not follower.done()
                link.mend()
                asked = await direct.enqueue(source("alice"), Mode.T2V, "tiny", params())
                event = await asyncio.wait_for(heard.get(), timeout=60)
                assert event.kind is EventKind.ENQUEUED and event.job.id == asked.job.id
            finally:
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower
                await serving.close()
        await direct.close()


async def test_a_database_that_drops_packets_fails_a_query_instead_of_hanging(monkeypatch):
    """No reset, no refusal: packets just vanish. A query fails after the command timeout, and closing does not hang."""
    monkeypatch.setattr(queue_postgres, "COMMAND_TIMEOUT_S", 1.0)
    monkeypatch.setattr(queue_postgres, "CLOSE_TIMEOUT_S", 1.0)
    async with postgres_schema() as url:
        server = urlsplit(url)
        async with CuttableLink(server.hostname, server.port or 5432) as link:
            queue = await JobQueue.connect(through(link, url))
            link.stall()
            with pytest.raises(DATABASE_DOWN):
                await asyncio.wait_for(queue.counts(), timeout=30)
            await asyncio.wait_for(queue.close(), timeout=30)


async def test_a_session_stalled_inside_a_transaction_cannot_pin_a_job(monkeypatch):
    """A worker's link stalls while it holds its job's row lock: recovery passes locked rows by, so the server ends
    that session after the idle limit, and the next recovery round puts the job back."""
    import asyncpg

    monkeypatch.setattr(queue_postgres, "IDLE_IN_TRANSACTION_S", 1.0)
    async with postgres_schema() as url:
        queue = await JobQueue.connect(url)
        try:
            job_id = (await queue.enqueue(source("alice"), Mode.T2V, "tiny", params())).job.id
            await queue.claim_next(worker_id="gpu-a/cuda:0/7-ab")  # no heartbeat: the lease is long gone
            # The worker's session, as wanbot opens it, holding the job's row in a transaction when its link stalls.
            stalled = await asyncpg.connect(queue.database.url.dsn, server_settings=queue_postgres.session_settings())
            await stalled.execute("BEGIN")
            await stalled.execute("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", job_id)
            assert await queue.recover_interrupted(3, lease_s=0.1) == []  # the row is locked: passed by
            for _ in range(100):
                if recovered := await queue.recover_interrupted(3, lease_s=0.1):
                    break
                await asyncio.sleep(0.1)
            assert [job.id for job in recovered] == [job_id]
            assert (await queue.get(job_id)).status is JobStatus.QUEUED
            with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
                await stalled.fetchval("SELECT 1")  # the server ended the stalled session
            stalled.terminate()
        finally:
            await queue.close()
