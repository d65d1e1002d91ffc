"""The one reach around diffusers for context parallelism on the CPU.

diffusers 0.42.1 picks each rank's device as `rank % torch.accelerator.device_count()`, which is 0 on a machine
without an accelerator: enabling parallelism there divides by zero, though gloo runs the collectives well. While it
is enabled, the count is read as at least 1. tests/parallel/test_seam.py fails once diffusers no longer needs this."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def accelerator_count_at_least_one() -> Iterator[None]:
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(real(), 1)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.accelerator.device_count = real  # type: ignore[assignment]


def enable_context_parallel(transformer: Any, degree: int) -> None:
    """Split `transformer`'s sequence over `degree` ranks (Ulysses): every rank of the group calls it alike."""
    from diffusers import ContextParallelConfig

    with accelerator_count_at_least_one():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
