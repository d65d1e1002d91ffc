"""Style and character LoRAs per job ([loras], `lora=NAME[:WEIGHT]`): loaded as peft adapters beside the fast
preset's fused weights, weighted per job, and kept loaded but inactive for the next job that names them (a small LRU,
generation.lora_cache).

Unlike the fast preset's pair they are never fused: peft adds an inactive adapter's output to nothing, so a job
without LoRAs computes exactly what it would have if they had never been loaded, and each job sets its own weights.
An adapter's weights live where the blocks compute (a swapped expert's base weights come and go; its adapters stay on
the GPU, a few hundred MB at most); fp8 plans and diffusers' offload hooks are not planned for a job with LoRAs
(engine/pipeline/generate.py).
"""

from __future__ import annotations

import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import UserError
from engine.jobs import LoraUse
from engine.pipeline.loras import EXPERTS

log = logging.getLogger(__name__)
ADAPTER_PREFIX = "style_"
# peft warns whenever a model gets a second adapter; holding several (the cache, a job with two) is the point here.
warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)


@dataclass(frozen=True)
class StyleFiles:
    """A job's LoRA and its files on disk: one for every expert, or the high-noise then the low-noise one."""

    use: LoraUse
    paths: tuple[Path, ...]

    @property
    def adapter(self) -> str:
        """The adapter's name in peft: the same files make the same adapter, whatever the weight or [loras] name."""
        return f"{ADAPTER_PREFIX}{self.use.key}"


class StyleAdapters:
    """The style adapters a loaded pipeline holds, the job's active at its weights, the rest inactive."""

    def __init__(self, pipeline: Any, device: torch.device, cache_size: int) -> None:
        self._pipeline = pipeline
        self._device = device
        self._cache_size = cache_size
        self._loaded: OrderedDict[str, list[str]] = OrderedDict()  # adapter -> the experts holding it, oldest first

    @property
    def loaded(self) -> list[str]:
        return list(self._loaded)

    @property
    def held(self) -> set[str]:
        """The keys (LoraUse.key) of the LoRAs loaded: a job needing only these starts without loading one."""
        return {name.removeprefix(ADAPTER_PREFIX) for name in self._loaded}

    def apply(self, styles: list[StyleFiles]) -> None:
        """Make `styles` the active adapters at their weights (none: every adapter inactive). A file that cannot be
        loaded raises a UserError and leaves no part of its adapter behind."""
        for style in styles:
            if style.adapter not in self._loaded:
                self._load(style)
            self._loaded.move_to_end(style.adapter)
        active = {style.adapter: style.use.weight for style in styles}
        for expert in self._experts():
            names = [name for name, held in self._loaded.items() if expert in held and name in active]
            module = getattr(self._pipeline, expert)
            if names:
                module.enable_adapters()
                module.set_adapters(names, [active[name] for name in names])
            elif any(expert in held for held in self._loaded.values()):
                module.disable_adapters()
        self._forget_oldest(keep=set(active))

    def drop_all(self) -> None:
        """Take every adapter out, wrappers and all (before the fast preset's pair is fused in or taken out, which
        must see plain layers)."""
        if self._loaded:
            self._pipeline.unload_lora_weights()
            self._loaded.clear()

    def _experts(self) -> list[str]:
        return [name for name in EXPERTS if getattr(self._pipeline, name, None) is not None]

    def _load(self, style: StyleFiles) -> None:
        experts = self._experts()
        paths = style.paths if len(style.paths) == len(experts) else style.paths[:1] * len(experts)
        held: list[str] = []
        try:
            for expert, path in zip(experts, paths, strict=True):
                second = expert == "transformer_2"
                self._pipeline.load_lora_weights(str(path), adapter_name=style.adapter, load_into_transformer_2=second)
                held.append(expert)
                self._onto_device(getattr(self._pipeline, expert))
        except Exception as exc:
            # Half an adapter (a file that failed in peft's injection) cannot be told apart from a whole one:
            # every adapter goes, and the cached ones load again when a job names them.
            self._loaded[style.adapter] = held
            self.drop_all()
            log.warning("LoRA %s (%s) could not be loaded", style.use.name, style.use.repo, exc_info=True)
            raise UserError(
                f"The LoRA {style.use.name} could not be loaded, so this video was not made.",
                "Ask again without it; the admin can see why in the log.",
            ) from exc
        self._loaded[style.adapter] = held
        log.info("LoRA %s loaded as %s into %s", style.use.name, style.adapter, ", ".join(held))

    def _onto_device(self, expert: torch.nn.Module) -> None:
        # peft makes an adapter where its layer's weights are now: a swapped expert's are in host memory between
        # steps, while its adapters must be where the layer computes.
        for name, parameter in expert.named_parameters():
            if ".lora_" in name and parameter.device != self._device:
                parameter.data = parameter.data.to(self._device)

    def _forget_oldest(self, keep: set[str]) -> None:
        while len(self._loaded) > max(self._cache_size, len(keep)):
            oldest = next(name for name in self._loaded if name not in keep)
            for expert in self._loaded.pop(oldest):
                getattr(self._pipeline, expert).delete_adapters([oldest])
            log.info("LoRA adapter %s unloaded (generation.lora_cache is %s)", oldest, self._cache_size)
