"""Which wanbot processes are alive: a process id means something only on its own machine (host and PID namespace),
and elsewhere a process is alive while it keeps its heartbeat."""

from __future__ import annotations

import functools
import json
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@functools.cache
def this_machine() -> str:
    """Where a process id means this process: the host, and its PID namespace (containers on one host, even with
    the host's name, each have their own)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}|{namespace}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (one of another user counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A process heard from this recently may still be running (queue.lease_s's default): an upgrade waits for it.
HEARD_RECENTLY_S = 60.0


@dataclass(frozen=True)
class Heard:
    """A process as the database last heard from it."""

    what: str
    host: str
    machine: str
    pid: int
    heard_at: float


def still_running(workers: Iterable[Mapping[str, Any]], serving: str | None, now: float) -> list[Heard]:
    """The processes that may still use a database: its workers that did not stop, and its serving process (the
    serving flag's JSON), less those heard from too long ago and those of this machine that ended."""
    heard = [
        Heard(f"worker {row['id']}", row["host"], row["machine"], row["pid"], row["heartbeat_at"]) for row in workers
    ]
    if serving is not None:
        record = json.loads(serving)
        heard.append(Heard("serve", record["host"], record["machine"], record["pid"], record.get("heartbeat_at", 0.0)))
    return [
        process
        for process in heard
        if now - process.heard_at <= HEARD_RECENTLY_S and (process.machine != this_machine() or pid_alive(process.pid))
    ]
