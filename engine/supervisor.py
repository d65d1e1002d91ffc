"""Keeps the process's long-lived tasks alive, or stops the process loudly: never a task that dies unseen.

A task that raises is logged with its traceback and started again after a doubling wait. One that keeps failing
without a healthy stretch in between, or that must not be restarted (a chat connection whose client ended), makes
the supervisor `failed`: the runtime then stops everything and exits non-zero with one line, so systemd restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class RestartPolicy:
    first_wait_s: float = 1.0
    max_wait_s: float = 60.0
    # Failures in a row (none after a healthy stretch) before the process gives up on the task.
    max_failures: int = 8
    # A task that ran this long before failing counts as healthy: its failure count starts again.
    healthy_after_s: float = 300.0


# A task that failed for an outage and then ran this long again: the outage is over.
OUTAGE_OVER_AFTER_S = 10.0


class Supervisor:
    def __init__(
        self,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        outage_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        """`outage_errors`: what a task raises while the database is out of reach. Such a failure is waited out,
        however long (with the same doubling wait), never counted towards giving up: one line when the outage
        begins, one when it ends."""
        self._policy = policy or RestartPolicy()
        self._clock = clock
        self._outage_errors = outage_errors
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._failed = asyncio.Event()
        self.failure: str | None = None
        self.outage: str | None = None  # why the database is out of reach, while it is
        self._outage_since = 0.0
        self._out: dict[str, int] = {}  # tasks failing for the outage -> their attempt

    @property
    def failed(self) -> bool:
        return self.failure is not None

    async def wait_failed(self) -> None:
        await self._failed.wait()

    def start(self, name: str, factory: TaskFactory, restart: bool = True) -> None:
        """Run `factory()` as task `name`. It may end by returning; if it raises it is restarted (`restart`), or the
        supervisor fails."""
        if name in self._tasks and not self._tasks[name].done():
            raise ValueError(f"a task named {name} is already running")
        self._tasks[name] = asyncio.create_task(self._keep(name, factory, restart), name=f"wanbot:{name}")

    def watch(self, name: str, task: asyncio.Task[object]) -> None:
        """A task someone else started (a chat client's connection) that must run until `stop`: if it ends before,
        the supervisor fails."""

        async def wait() -> None:
            await asyncio.wait([task])
            if task.cancelled():
                raise RuntimeError(f"{name} was cancelled")
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
            raise RuntimeError(f"{name} ended")

        self.start(name, wait, restart=False)

    async def join(self, name: str) -> None:
        """Wait for a task asked to end on its own (the worker re-queueing its job), without cancelling it."""
        task = self._tasks.pop(name, None)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def cancel(self, *names: str) -> None:
        """End these tasks (a part of the process stopping on purpose), waiting until they have."""
        tasks = [self._tasks.pop(name) for name in names if name in self._tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def stop(self) -> None:
        self._stopping = True
        await self.cancel(*self._tasks)

    def fail(self, reason: str) -> None:
        """Give up: the runtime sees `failed` and stops the process with `reason`."""
        if self.failure is None:
            self.failure = reason
            log.critical("stopping: %s", reason)
        self._failed.set()

    async def _keep(self, name: str, factory: TaskFactory, restart: bool) -> None:
        failures = 0
        wait_s = self._policy.first_wait_s
        attempt = 0
        while not self._stopping:
            started = self._clock()
            attempt += 1
            if name in self._out:
                self._out[name] = attempt
                asyncio.get_running_loop().call_later(OUTAGE_OVER_AFTER_S, self._maybe_over, name, attempt)
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except self._outage_errors as exc:
                self._outage_began(name, exc)
                log.debug("task %s waits out the outage; again in %.0f s", name, wait_s, exc_info=True)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, self._policy.max_wait_s)
            except Exception as exc:
                if self._clock() - started >= self._policy.healthy_after_s:
                    failures, wait_s = 0, self._policy.first_wait_s
                failures += 1
                if not restart or failures >= self._policy.max_failures:
                    log.error("task %s failed (%d in a row); not restarting it", name, failures, exc_info=True)
                    self.fail(f"{name} failed: {type(exc).__name__}: {exc}"[:300])
                    return
                log.error("task %s failed; restarting it in %.0f s", name, wait_s, exc_info=True)
                await asyncio.sleep(wait_s)
                wait_s = min(wait_s * 2, self._policy.max_wait_s)

    def _outage_began(self, name: str, error: BaseException) -> None:
        self._out.setdefault(name, 0)
        if self.outage is None:
            self.outage = f"the database is out of reach: {type(error).__name__}: {error}"[:300]
            self._outage_since = self._clock()
            log.error("%s; every task waits and tries again until it is back", self.outage)

    def _maybe_over(self, name: str, attempt: int) -> None:
        """`name`'s attempt `attempt` has run OUTAGE_OVER_AFTER_S without an outage: it is through it."""
        if self._out.get(name) != attempt:
            return
        del self._out[name]
        if not self._out and self.outage is not None:
            log.warning("the database is reachable again, after %.0f s", self._clock() - self._outage_since)
            self.outage = None
