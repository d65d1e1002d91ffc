"""The fixed schedules the step-distilled models were trained with, as diffusers schedulers a Wan pipeline can run.

Diffusers' Wan pipelines ask the scheduler for `num_inference_steps` steps and pass no sigmas, and the default
schedulers give other sigmas at 4 steps (FlowMatchEuler with shift 5: 1, 0.91, 0.72, 0.02, a 3+1 expert split).
A distilled model only works on the exact schedule it was distilled on, so these schedulers ignore how the default
spacing would place the steps and always run the one schedule they were built with.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from engine.pipeline.presets import Sampling


class FixedScheduleScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching Euler (or DMD re-noising) on one fixed schedule, with its own seeded noise generator.

    The pipelines call `scheduler.step` without a generator, so DMD's fresh noise would come from the global RNG;
    here it comes from `generator`, seeded with the job's seed, so a seed gives the same video every time."""

    fixed_sigmas: tuple[float, ...] = ()
    generator: torch.Generator | None = None

    def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **_: Any) -> None:
        if num_inference_steps is not None and num_inference_steps != len(self.fixed_sigmas):
            raise ValueError(
                f"This schedule has exactly {len(self.fixed_sigmas)} steps; {num_inference_steps} were asked for."
            )
        super().set_timesteps(sigmas=list(self.fixed_sigmas), device=device)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("generator") is None:
            kwargs["generator"] = self.generator
        return super().step(*args, **kwargs)


def fixed_scheduler(sampling: Sampling, seed: int, train_timesteps: int = 1000) -> FixedScheduleScheduler:
    """A scheduler that runs `sampling` exactly; its re-noising (DMD) draws from a CPU generator seeded by `seed`."""
    scheduler = FixedScheduleScheduler(
        num_train_timesteps=train_timesteps, shift=sampling.shift, stochastic_sampling=sampling.renoise
    )
    scheduler.fixed_sigmas = sampling.sigmas
    scheduler.generator = torch.Generator(device="cpu").manual_seed(seed)
    return scheduler


@contextmanager
def scheduled(pipeline: Any, sampling: Sampling | None, seed: int) -> Iterator[Any]:
    """Run the block on `sampling`'s fixed scheduler (None: the pipeline's own), the own one put back after; yields
    the scheduler that runs."""
    own = pipeline.scheduler
    if sampling is not None:
        pipeline.scheduler = fixed_scheduler(sampling, seed, own.config.num_train_timesteps)
    try:
        yield pipeline.scheduler
    finally:
        pipeline.scheduler = own


def scheduler_name(scheduler: Any, sampling: Sampling | None) -> str:
    if sampling is not None:
        return sampling.name
    shift = scheduler.config.get("flow_shift") or scheduler.config.get("shift")
    return f"{type(scheduler).__name__}(flow_shift={shift:g})" if shift else type(scheduler).__name__
