"""Counting the transformer passes a run really makes, with the timestep each one saw.

The count is what a video cost, and what proves a preset ran as intended (a fast A14B video: 2 passes per expert,
none unconditional); computing it from the settings would only repeat the assumption it is meant to check.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch

from engine.pipeline.loras import EXPERTS


class PassCounter:
    """Forward pre-hooks on the pipeline's transformers while the block runs; `timesteps[name]` lists, per pass, the
    largest timestep the transformer was given (TI2V gives one per token, 0 for the start image's)."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.timesteps: dict[str, list[float]] = {}

    @property
    def calls(self) -> dict[str, int]:
        return {name: len(seen) for name, seen in self.timesteps.items()}

    def __enter__(self) -> PassCounter:
        for name in EXPERTS:
            module = getattr(self._pipeline, name, None)
            if module is None:
                continue
            seen = self.timesteps.setdefault(name, [])
            self._handles.append(module.register_forward_pre_hook(_recorder(seen), with_kwargs=True))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _recorder(seen: list[float]) -> Any:
    def record(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(float(kwargs["timestep"].max()))

    return record
