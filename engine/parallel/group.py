"""A group of ranks making one video together: rank 0 is the worker's own process and starts the others (one
process per further device, torch.multiprocessing's spawn), all joined in one torch.distributed process group
(NCCL on GPUs, gloo on the CPU).

Rank 0 sends each job and its pictures to the others before it runs it; from then on every rank makes the same calls
in the same order (the pipeline's collectives), and once per step they agree, by rank 0's word, whether to go on or
stop (a cancel, a shutdown, the time limit). A rank that dies or hangs makes the next collective fail on the others
within `timeout_s`: the group is then broken for good, and the process that holds it stops so that its supervisor
starts a new group (the job goes back to the queue through its lease, like any crash)."""

from __future__ import annotations

import logging
import multiprocessing
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.process import BaseProcess
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from engine.config import GenerationConfig, Settings
from engine.errors import UserError
from engine.jobs import Job
from engine.parallel.seam import enable_context_parallel
from engine.pipeline.hooks import GroupBroken

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupPlan:
    """Which devices the ranks use (rank r: devices[r]) and how long a collective may wait."""

    devices: list[str]
    timeout_s: float

    @property
    def size(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"


def group_plan(config: GenerationConfig) -> GroupPlan:
    """The group `generation.parallel` and `generation.device` ask for: the devices listed (one per rank), or N of
    the one named: 'cpu' N times, 'cuda' (or 'auto' on a GPU machine) cuda:0 to cuda:N-1, 'cuda:K' K onwards."""
    size = config.parallel
    listed = [name.strip() for name in config.device.split(",") if name.strip()]
    if len(listed) > 1:
        if len(listed) != size:
            raise UserError(
                f"generation.device lists {len(listed)} devices for a group of generation.parallel = {size} ranks.",
                "Give one device per rank, such as --device cuda:0,cuda:1 --parallel 2.",
            )
        return GroupPlan(listed, config.parallel_timeout_s)
    one = listed[0] if listed else "auto"
    if one == "auto":
        one = "cuda" if torch.cuda.is_available() else "cpu"
    if one == "cpu":
        return GroupPlan(["cpu"] * size, config.parallel_timeout_s)
    first = int(one.partition(":")[2] or 0)
    devices = [f"cuda:{first + index}" for index in range(size)]
    if torch.cuda.device_count() < first + size:
        raise UserError(
            f"A group of {size} ranks from {one} needs {', '.join(devices)}, and this machine has "
            f"{torch.cuda.device_count()} GPUs.",
            "Lower --parallel, or name the devices with --device.",
        )
    return GroupPlan(devices, config.parallel_timeout_s)


def split_over_ranks(transformer: Any, size: int) -> None:
    """A loaded transformer's sequence split over the group's `size` ranks (every rank alike), where its heads allow."""
    check_heads(transformer.config.num_attention_heads, size)
    enable_context_parallel(transformer, size)


def check_heads(heads: int, size: int) -> None:
    """Ulysses splits the attention heads over the ranks: a count they cannot share is refused in one sentence."""
    if heads % size:
        shares = [n for n in range(2, heads + 1) if heads % n == 0 and n <= 8]
        raise UserError(
            f"This model has {heads} attention heads, which {size} ranks cannot share evenly.",
            f"Use --parallel {' or '.join(map(str, shares)) or '1'}.",
        )


@dataclass
class RankGroup:
    """This process's place in a group: rank 0 (which starts and watches the others) or a follower."""

    plan: GroupPlan
    rank: int
    device: torch.device
    _followers: list[BaseProcess] = field(default_factory=list, repr=False)
    _broken: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def size(self) -> int:
        return self.plan.size

    @property
    def broken(self) -> bool:
        return self._broken.is_set()

    @classmethod
    def start(cls, plan: GroupPlan, settings: Settings, follow: Callable[..., None]) -> RankGroup:
        """Rank 0: start a process for each further device, running `follow(rank, plan, address, settings_json)`
        (engine/parallel/follower.py), and join them in one group; GroupBroken if they do not all join within the
        timeout."""
        address = f"tcp://127.0.0.1:{_free_port()}"
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no CUDA state or threads inherited
        followers = []
        for rank in range(1, plan.size):
            process = context.Process(
                target=follow,
                args=(rank, plan, address, settings.model_dump_json()),
                name=f"wanbot-rank-{rank}",
                daemon=True,  # a follower never outlives rank 0
            )
            process.start()
            followers.append(process)
        group = cls(plan, 0, device_of(plan.devices[0]), followers)
        try:
            group._join(address)
        except Exception as error:
            group.close()
            raise GroupBroken(f"the ranks of the parallel group did not all start: {error}") from error
        threading.Thread(target=group._watch, name="wanbot-rank-watch", daemon=True).start()
        log.info("parallel group of %d ranks on %s (%s)", plan.size, ", ".join(plan.devices), plan.backend)
        return group

    @classmethod
    def joined(cls, plan: GroupPlan, rank: int, address: str) -> RankGroup:
        """A follower's place in the group rank 0 started at `address`."""
        group = cls(plan, rank, device_of(plan.devices[rank]))
        group._join(address)
        return group

    def _join(self, address: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            self.plan.backend,
            init_method=address,
            rank=self.rank,
            world_size=self.plan.size,
            timeout=timedelta(seconds=self.plan.timeout_s),
        )

    def _watch(self) -> None:
        """Rank 0: a follower that exits breaks the group at once (not at the next collective's timeout)."""
        while not self._broken.is_set() and self._followers_alive():
            self._broken.wait(0.5)

    def _followers_alive(self) -> bool:
        for process in self._followers:
            if not process.is_alive():
                code = process.exitcode
                log.error("rank process %s exited (code %s): the parallel group is broken", process.name, code)
                self._broken.set()
                return False
        return True

    def lost(self, error: BaseException) -> bool:
        """Whether `error` means a rank is gone: a follower that exited, or a failed collective (gloo and NCCL say so
        in a RuntimeError of their own); the group is broken from then on."""
        said = str(error)
        collective = isinstance(error, dist.DistError) or (
            isinstance(error, RuntimeError) and any(word in said for word in ("gloo", "NCCL", "Connection closed"))
        )
        if collective or not self._followers_alive() or self.broken:
            self._broken.set()
            return True
        return False

    def send(self, job: Job, images: list[Image.Image]) -> None:
        """Rank 0: the next job and its pictures to every rank; the others wait for it in `receive`."""
        self._collective(lambda: dist.broadcast_object_list([(job.model_dump_json(), images)], src=0))

    def stop_followers(self) -> None:
        """Rank 0: the others leave their loop (a clean stop)."""
        if not self.broken:
            self._collective(lambda: dist.broadcast_object_list([None], src=0))

    def receive(self) -> tuple[Job, list[Image.Image]] | None:
        """A follower: the next job rank 0 sends, or None when the group stops."""
        box: list[Any] = [None]
        self._collective(lambda: dist.broadcast_object_list(box, src=0))
        if box[0] is None:
            return None
        job_json, images = box[0]
        return Job.model_validate_json(job_json), images

    def agree(self, decision: int) -> int:
        """Every rank, once a step: rank 0's decision (go on, or how to stop) becomes everyone's."""
        if self.broken:
            raise GroupBroken("a rank of the parallel group is gone")
        word = torch.tensor([decision], dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.broadcast(word, src=0))
        return int(word.item())

    def _collective(self, call: Any) -> None:
        try:
            call()
        except (RuntimeError, dist.DistBackendError) as error:
            self._broken.set()
            raise GroupBroken(f"a rank of the parallel group failed or hung: {error}") from error

    def close(self) -> None:
        self._broken.set()
        if dist.is_initialized():
            dist.destroy_process_group()
        for process in self._followers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def device_of(name: str) -> torch.device:
    return torch.device(name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
