"""The workers' leases: each worker's heartbeat in the workers table, the fleet as stored, and putting back
the running jobs whose worker is gone."""

from __future__ import annotations

import json
from collections.abc import Callable

from engine.errors import duration_text
from engine.jobs import (
    EventKind,
    Job,
    JobStatus,
    ServingRecord,
    WorkerRecord,
    WorkerState,
)
from engine.queue.backend import Row, Tx
from engine.queue.core import (
    DAY_S,
    QueueCore,
    claim_held,
)

WORKER_RECORDS_KEEP_S = 7 * DAY_S  # a stopped or silent worker stays listed this long


class Leases(QueueCore):
    async def recover_interrupted(
        self,
        max_attempts: int,
        lease_s: float = 60.0,
        machine: str | None = None,
        is_alive: Callable[[int], bool] = lambda pid: True,
    ) -> list[Job]:
        """Running jobs whose worker is gone go back to the queue, or fail once they used their attempts (the attempt
        they were on counts). Gone: stopped, not heard from for `lease_s`, unknown (a claim made without a worker, by
        an older wanbot), or on `machine` (this one: WorkerRecord.machine) with a process that `is_alive` says has ended
        (a crash seen at once, without waiting out the lease). Any live process may call it, as often as it likes."""
        now = self.lease_now()
        # Looked for without locks first: every live process asks every few seconds, and mostly nothing is gone.
        async with self._db.reading() as db:
            running = await db.all("SELECT id, worker_id FROM jobs WHERE status = 'running' ORDER BY id")
            gone = {}
            for row in running:
                worker = await db.one("SELECT * FROM workers WHERE id = ?", row["worker_id"])
                why = _why_gone(worker, now, lease_s, machine, is_alive)
                if why is not None:
                    gone[row["id"]] = (row["worker_id"], why)
        if not gone:
            return []
        recovered = []
        async with self._transaction() as db:
            for job_id, (worker_id, why) in gone.items():
                # Still running for the same claim: a job that ended, or moved on, meanwhile is left alone.
                row = await db.one(
                    f"""SELECT id, attempts FROM jobs WHERE id = ? AND status = 'running'
                        AND (worker_id = ? OR (worker_id IS NULL AND CAST(? AS TEXT) IS NULL)){db.skip_locked}""",
                    job_id,
                    worker_id,
                    worker_id,
                )
                worker = await db.one("SELECT * FROM workers WHERE id = ?", worker_id)
                if row is None or _why_gone(worker, now, lease_s, machine, is_alive) is None:
                    continue  # ended meanwhile, or its worker was heard from again
                if row["attempts"] < max_attempts:
                    await db.run(
                        """UPDATE jobs SET status = 'queued', started_at = NULL, progress_json = NULL,
                                  claim_token = NULL WHERE id = ?""",
                        row["id"],
                    )
                    await self._log(db, row["id"], EventKind.REQUEUED, why)
                else:
                    await db.run(
                        """UPDATE jobs SET status = 'failed', finished_at = ?, error_user = ?, error_detail = ?,
                                  claim_token = NULL WHERE id = ?""",
                        now,
                        f"The bot stopped while making this video {row['attempts']} times, so it was given up. "
                        "Send the request again if you like; if it keeps failing, try fewer frames or a lower "
                        "resolution.",
                        f"interrupted after {row['attempts']} attempts ({why})",
                        row["id"],
                    )
                    await self._log(db, row["id"], EventKind.FAILED, "too many interrupted attempts")
                recovered.append(await self._get(db, row["id"]))
        for job in recovered:
            self._publish(EventKind.REQUEUED if job.status is JobStatus.QUEUED else EventKind.FAILED, job)
        return recovered

    async def heartbeat(self, worker: WorkerRecord, token: str | None = None) -> bool:
        """Store the worker's state as of now. False when the job it runs (`worker.current_job`, claimed with
        `token`) is no longer its own: it was silent past the lease and the job went back to the queue."""
        async with self._transaction() as db:
            await db.run(
                """INSERT INTO workers (id, host, machine, pid, device, gpu_name, free_memory_bytes, loaded_model,
                                        downloading_json, current_job, state, started_at, heartbeat_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET gpu_name = excluded.gpu_name,
                       free_memory_bytes = excluded.free_memory_bytes, loaded_model = excluded.loaded_model,
                       downloading_json = excluded.downloading_json, current_job = excluded.current_job,
                       state = excluded.state, heartbeat_at = excluded.heartbeat_at""",
                worker.id,
                worker.host,
                worker.machine,
                worker.pid,
                worker.device,
                worker.gpu_name,
                worker.free_memory_bytes,
                worker.loaded_model,
                json.dumps(worker.downloading),
                worker.current_job,
                worker.state.value,
                worker.started_at,
                self.lease_now(),
            )
            if worker.current_job is None or token is None:
                return True
            return await claim_held(db, worker.current_job, token)

    async def workers(self) -> list[WorkerRecord]:
        """Every worker heard from in the last week, the most recently started first."""
        rows = await self._read_all(
            "SELECT * FROM workers WHERE heartbeat_at >= ? ORDER BY started_at DESC, id",
            self._clock() - WORKER_RECORDS_KEEP_S,
        )
        return [_row_to_worker(row) for row in rows]


# The queue flag that names the serving process (a ServingRecord as JSON); absent while none serves.
SERVING_FLAG = "serving"


class Serving(QueueCore):
    """The serving process's lease: taken at start, renewed with each heartbeat, released at a clean stop."""

    async def take_serving(
        self, me: ServingRecord, lease_s: float, is_alive: Callable[[int], bool] = lambda pid: True
    ) -> ServingRecord | None:
        """Make `me` the serving process of this database; the live one that already is, if any (then nothing
        changes). One gone (released, silent past `lease_s`, or an ended process of `me.machine`) is replaced."""
        async with self._transaction() as db:
            other, now = await _serving_holder(db), self.lease_now()
            if other is not None and other.id != me.id:
                alive = {**other.model_dump(), "state": WorkerState.IDLE.value}
                if _why_gone(alive, now, lease_s, me.machine, is_alive) is None:
                    return other
                # Gone: the uploads it had begun are for its successor to look for and finish.
                await db.run("UPDATE jobs SET delivery_holder = NULL WHERE delivery_holder = ?", other.id)
            await _write_serving(db, me.model_copy(update={"heartbeat_at": now}))
        return None

    async def renew_serving(self, me: ServingRecord) -> ServingRecord | None:
        """Renew `me`'s lease; None while it holds, else the process that took over (this one was silent too long)."""
        async with self._transaction() as db:
            holder = await _serving_holder(db)
            if holder is not None and holder.id != me.id:
                return holder
            await _write_serving(db, me.model_copy(update={"heartbeat_at": self.lease_now()}))
        return None

    async def release_serving(self, me: ServingRecord) -> None:
        """A clean stop: the next serving process may start at once."""
        async with self._transaction() as db:
            holder = await _serving_holder(db)
            if holder is not None and holder.id == me.id:
                await db.run("DELETE FROM queue_flags WHERE name = ?", SERVING_FLAG)


async def _serving_holder(db: Tx) -> ServingRecord | None:
    """The serving process as stored, with the lease locked until the transaction ends (one change at a time)."""
    await db.serialize(SERVING_FLAG)
    row = await db.one("SELECT value FROM queue_flags WHERE name = ?", SERVING_FLAG)
    return ServingRecord.model_validate_json(row["value"]) if row is not None else None


async def _write_serving(db: Tx, record: ServingRecord) -> None:
    await db.run(
        "INSERT INTO queue_flags (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        SERVING_FLAG,
        record.model_dump_json(),
    )


def _why_gone(
    worker: Row | None, now: float, lease_s: float, machine: str | None, is_alive: Callable[[int], bool]
) -> str | None:
    """Why a running job's worker is gone (its job is to be queued again), or None while it runs."""
    if worker is None:
        return "the bot restarted while it ran"
    if worker["state"] == WorkerState.STOPPED.value:
        return f"its worker {worker['id']} stopped"
    if now - worker["heartbeat_at"] > lease_s:
        return f"its worker {worker['id']} was not heard from for {duration_text(now - worker['heartbeat_at'])}"
    if machine and worker["machine"] == machine and not is_alive(worker["pid"]):
        return f"its worker {worker['id']} ended"
    return None


def _row_to_worker(row: Row) -> WorkerRecord:
    stored = set(WorkerRecord.model_fields) - {"downloading"}
    return WorkerRecord(**{name: row[name] for name in stored}, downloading=json.loads(row["downloading_json"]))
