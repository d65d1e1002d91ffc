"""Several worker processes claiming from one queue: every job is claimed exactly once, in the fair order."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from engine.jobs import JobStatus
from engine.queue.jobqueue import JobQueue
from engine.storage.images import Mode
from tests.factories import params, source

REPO = Path(__file__).resolve().parents[2]
USERS = 50
JOBS_PER_USER = 10

CLAIMER = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, {repo!r})
    from engine.queue.jobqueue import JobQueue
    from tests.factories import result_for_child

    async def main():
        queue = await JobQueue.connect({url!r})
        print("ready", flush=True)
        sys.stdin.readline()  # all workers start claiming together
        while (job := await queue.claim_next()) is not None:
            print(job.id, flush=True)
            await queue.mark_succeeded(job.id, result_for_child(), token=job.claim_token)
            # A real job takes a while: without a pause one process, back first from its write, can take every
            # job of a SQLite file before the other gets the lock once (seen on a loaded machine).
            await asyncio.sleep(0.002)
        await queue.close()

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(("database_url", "workers"), [("postgres", 4), ("sqlite", 2)], indirect=["database_url"])
async def test_worker_processes_claim_every_job_exactly_once_and_fairly(database_url: str, workers: int):
    queue = await JobQueue.connect(database_url)
    try:
        for index in range(USERS * JOBS_PER_USER):
            user = f"u{index % USERS}"
            await queue.enqueue(
                source(user, f"m{index}"), Mode.T2V, "tiny", params(), per_user_limit=JOBS_PER_USER, global_limit=1000
            )
        children = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLAIMER.format(repo=str(REPO), url=database_url),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            for _ in range(workers)
        ]
        for child in children:
            assert await child.stdout.readline() == b"ready\n"
        for child in children:
            child.stdin.write(b"go\n")
        done = await asyncio.wait_for(asyncio.gather(*(child.communicate() for child in children)), timeout=120)
        outputs = [stdout.decode() for stdout, _ in done]
        assert [child.returncode for child in children] == [0] * workers

        claimed = Counter(int(line) for output in outputs for line in output.split())
        jobs = await queue.list_jobs(limit=1000)
        assert sorted(claimed) == sorted(job.id for job in jobs)
        assert set(claimed.values()) == {1}  # no job twice
        assert all(job.status is JobStatus.SUCCEEDED and job.attempts == 1 for job in jobs)
        assert sum(1 for output in outputs if output) >= 2  # the claims really were made side by side

        # Round-robin across the processes: at any moment, no user is more than one job ahead of another (strictly
        # one after the other it would be 1; a claim racing another may take the job after the next).
        served = Counter[str]({f"telegram:u{user}": 0 for user in range(USERS)})
        for job in sorted(jobs, key=lambda job: job.started_at):
            served[job.source.user_key] += 1
            assert max(served.values()) - min(served.values()) <= 2
    finally:
        await queue.close()


LEASE_S = 3.0
# A worker on another machine (its host is not this one, so only the lease can tell it is gone): it claims the one
# job, says so, and heartbeats until it is killed.
FAR_WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    sys.path.insert(0, {repo!r})
    from engine.jobs import WorkerRecord, WorkerState
    from engine.queue.jobqueue import JobQueue

    async def main():
        queue = await JobQueue.connect({url!r})
        me = WorkerRecord(id="far/cuda:0/1", host="another-machine", pid=1, device="cuda:0", started_at=time.time())
        await queue.heartbeat(me)
        job = await queue.claim_next(worker_id=me.id)
        print(job.id, flush=True)
        while True:
            await queue.heartbeat(me.model_copy(update={{"current_job": job.id, "state": WorkerState.WORKING}}),
                                  job.claim_token)
            await asyncio.sleep(0.2)

    asyncio.run(main())
    """
)
# A live worker of this machine: heartbeats, puts back what workers that are gone left, and finishes what it claims.
NEAR_WORKER = textwrap.dedent(
    """
    import asyncio, socket, sys, time
    sys.path.insert(0, {repo!r})
    from engine.queue.processes import pid_alive, this_machine
    from engine.jobs import WorkerRecord
    from engine.queue.jobqueue import JobQueue
    from tests.factories import result_for_child

    async def main():
        queue = await JobQueue.connect({url!r})
        me = WorkerRecord(id="near/cuda:0/2", host=socket.gethostname(), machine=this_machine(), pid=2,
                          device="cuda:0", started_at=time.time())
        while True:
            await queue.heartbeat(me)
            for job in await queue.recover_interrupted(3, {lease_s}, this_machine(), pid_alive):
                print("requeued", job.id, flush=True)
            if (job := await queue.claim_next(worker_id=me.id)) is not None:
                await queue.mark_succeeded(job.id, result_for_child(), token=job.claim_token)
                print("finished", job.id, flush=True)
                return
            await asyncio.sleep(0.2)

    asyncio.run(main())
    """
)


@pytest.mark.both_backends
async def test_a_killed_worker_of_another_machine_loses_its_job_after_the_lease(database_url: str):
    queue = await JobQueue.connect(database_url)
    far = near = None
    try:
        job = (await queue.enqueue(source("alice"), Mode.T2V, "tiny", params())).job
        far = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FAR_WORKER.format(repo=str(REPO), url=database_url), stdout=asyncio.subprocess.PIPE
        )
        assert int(await asyncio.wait_for(far.stdout.readline(), 60)) == job.id
        near = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            NEAR_WORKER.format(repo=str(REPO), url=database_url, lease_s=LEASE_S),
            stdout=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(1.0)
        assert (await queue.get(job.id)).status is JobStatus.RUNNING  # heartbeating: the live worker leaves it be
        far.kill()  # kill -9
        await far.wait()
        output, _ = await asyncio.wait_for(near.communicate(), timeout=60)
        assert output.decode().split() == ["requeued", str(job.id), "finished", str(job.id)]
        done = await queue.get(job.id)
        assert done.status is JobStatus.SUCCEEDED and done.attempts == 2 and done.worker_id == "near/cuda:0/2"
        history = await queue.events_of(job.id)
        assert [kind for kind, _ in history].count("succeeded") == 1
        assert any(kind == "requeued" and "was not heard from" in (detail or "") for kind, detail in history)
    finally:
        for child in (far, near):
            if child is not None and child.returncode is None:
                child.kill()
                await child.wait()
        await queue.close()
