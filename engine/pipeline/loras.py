"""Step-distilled LoRAs (LightX2V's Wan 2.2 A14B 4-step pair): made at random in their key layout, fused into both
experts, and taken out again exactly.

Fusing changes the experts' weights in place, so a quality job after a fast one would run on distilled weights.
Unfusing subtracts the delta again, which in bf16 does not give the original bits back, and keeping a copy of every
tensor the LoRA changes costs host memory the size of the model (about 55 GB for A14B). So the originals are read
back from the model's own safetensors files, tensor by tensor through safetensors' memory map, and copied in place:
exact, no lasting host memory, and compiled blocks stay valid because the parameters stay the same objects. Each
expert is changed where its weights compute (`editing`: a swapped expert comes onto the GPU for it).
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.storage.files import atomic_target

EXPERTS = ("transformer", "transformer_2")  # high-noise, low-noise
HIGH_ADAPTER = "fast_high"
LOW_ADAPTER = "fast_low"
# LightX2V's names (the original Wan code's) for each block's linear layers, as diffusers' converter maps them.
BLOCK_LINEARS = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# Norm weights the real files carry as zeroed `diff` keys; diffusers drops them, and so must they load here.
BLOCK_NORMS = ("norm3", "self_attn.norm_q", "self_attn.norm_k", "cross_attn.norm_q", "cross_attn.norm_k")


@dataclass(frozen=True)
class LoraPair:
    """A distilled LoRA pair on the Hub: the high-noise file goes into `transformer`, the low-noise one into
    `transformer_2`."""

    repo: str
    high: str
    low: str


@dataclass(frozen=True)
class LoraFiles:
    """A LoRA pair as it is on disk."""

    pair: LoraPair
    high: Path
    low: Path

    @property
    def names(self) -> list[str]:
        return [f"{self.pair.repo}/{self.pair.high}", f"{self.pair.repo}/{self.pair.low}"]


def random_lightx2v_lora(
    transformer: torch.nn.Module,
    rank: int,
    generator: torch.Generator,
    std: float = 0.05,
    dtype: Any = None,
    blocks: int | None = None,
) -> dict[str, torch.Tensor]:
    """Random weights in LightX2V's layout for `transformer`'s shapes: per linear layer lora_down/lora_up with alpha
    and a diff_b bias, zeroed norm diffs, and a full-rank head diff; a stand-in of the real rank and shapes. With
    `blocks`, only the first that many blocks (a benchmark that scales a part up to the whole)."""

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(dtype or torch.float32)

    state: dict[str, torch.Tensor] = {}
    for index, block in enumerate(transformer.blocks[:blocks]):
        prefix = f"diffusion_model.blocks.{index}"
        for theirs, ours in BLOCK_LINEARS.items():
            layer = block.get_submodule(ours)
            state[f"{prefix}.{theirs}.lora_down.weight"] = randn(rank, layer.in_features)
            state[f"{prefix}.{theirs}.lora_up.weight"] = randn(layer.out_features, rank)
            state[f"{prefix}.{theirs}.alpha"] = torch.tensor(float(rank), dtype=dtype or torch.float32)
            state[f"{prefix}.{theirs}.diff_b"] = randn(layer.out_features)
        width = block.attn1.to_q.out_features  # every norm here is over the model's width
        for norm in BLOCK_NORMS:
            state[f"{prefix}.{norm}.diff"] = torch.zeros(width, dtype=dtype or torch.float32)
    head = transformer.proj_out
    state["diffusion_model.head.head.diff"] = randn(head.out_features, head.in_features)
    state["diffusion_model.head.head.diff_b"] = randn(head.out_features)
    return state


def random_style_lora(
    transformer: torch.nn.Module, rank: int, generator: torch.Generator, std: float = 0.5
) -> dict[str, torch.Tensor]:
    """Random weights for `transformer`'s shapes in the layout style LoRAs trained for Wan 2.2 are shared in
    (ComfyUI's and musubi-tuner's: lora_A/lora_B on each block's linear layers, nothing else): a stand-in that
    loads through the same converter a real one does."""
    state: dict[str, torch.Tensor] = {}
    for index, block in enumerate(transformer.blocks):
        for theirs, ours in BLOCK_LINEARS.items():
            layer = block.get_submodule(ours)
            prefix = f"diffusion_model.blocks.{index}.{theirs}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * std
            state[f"{prefix}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * std
    return state


def write_lora(state: dict[str, torch.Tensor], target: Path) -> Path:
    with atomic_target(target) as temp_path:
        save_file({key: value.contiguous() for key, value in state.items()}, str(temp_path))
    return target


def load_pair(pipeline: Any, high: Path, low: Path) -> None:
    """Load the pair as peft adapters: high-noise into `transformer`, low-noise into `transformer_2`."""
    pipeline.load_lora_weights(str(high), adapter_name=HIGH_ADAPTER)
    pipeline.load_lora_weights(str(low), adapter_name=LOW_ADAPTER, load_into_transformer_2=True)


class SavedWeights:
    """The weights of a diffusers folder's components as saved, read a tensor at a time."""

    WEIGHTS = "diffusion_pytorch_model.safetensors"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def read(self, component: str, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        files = self._files(component)
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            by_file[files(name)].append(name)
        for file, wanted in by_file.items():
            with safe_open(str(self.folder / component / file), framework="pt", device="cpu") as saved:
                for name in wanted:
                    yield name, saved.get_tensor(name)

    def _files(self, component: str) -> Callable[[str], str]:
        index = self.folder / component / f"{self.WEIGHTS}.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            return weight_map.__getitem__
        return lambda _name: self.WEIGHTS


Editing = Callable[[str], AbstractContextManager[None]]


def _in_place(_name: str) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


class FusedLoras:
    """A LoRA pair fused into both experts; `restore` reads the tensors it changed back from the saved model."""

    def __init__(self, pipeline: Any, files: LoraFiles, saved: SavedWeights, editing: Editing = _in_place) -> None:
        self._pipeline = pipeline
        self._saved = saved
        self._editing = editing
        self._changed: dict[str, list[str]] = {}
        try:
            for expert, path, adapter in zip(
                EXPERTS, (files.high, files.low), (HIGH_ADAPTER, LOW_ADAPTER), strict=True
            ):
                with editing(expert):
                    second = expert == "transformer_2"
                    pipeline.load_lora_weights(str(path), adapter_name=adapter, load_into_transformer_2=second)
                    self._changed[expert] = _lora_targets(getattr(pipeline, expert))
                    pipeline.fuse_lora(components=[expert], adapter_names=[adapter], lora_scale=1.0)
                    # Without the adapter the fused expert is a plain module again: nothing extra runs in a pass,
                    # and fp8 or compiling sees ordinary linear layers.
                    pipeline.unload_lora_weights()
        except BaseException:
            # A file that fails to load (or a fuse that fails) halfway must not leave an adapter or part of a fused
            # pair behind for the next quality job.
            pipeline.unload_lora_weights()
            self.restore()
            raise

    def restore(self) -> None:
        """Copy the saved tensors back in place (the parameters stay the same objects)."""
        for expert, names in self._changed.items():
            module = getattr(self._pipeline, expert)
            with self._editing(expert), torch.no_grad():
                for name, saved in self._saved.read(expert, names):
                    parameter = module.get_parameter(name)
                    parameter.copy_(saved.to(parameter.dtype))
        self._changed = {}


def _lora_targets(transformer: torch.nn.Module) -> list[str]:
    """The weights and biases of every layer a LoRA adapter wraps, by their names once unwrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: list[str] = []
    for name, module in transformer.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        names.extend(f"{name}.{kind}" for kind in ("weight", "bias") if getattr(base, kind) is not None)
    return names


class LoraSlot:
    """The LoRA pair a loaded pipeline carries fused (or none), switched in place between jobs."""

    def __init__(self, pipeline: Any, saved: SavedWeights, editing: Editing = _in_place) -> None:
        self._pipeline = pipeline
        self._saved = saved
        self.editing = editing
        self._fused: FusedLoras | None = None
        self.files: LoraFiles | None = None

    @property
    def names(self) -> list[str]:
        return self.files.names if self.files else []

    def switch(self, files: LoraFiles | None) -> None:
        """Carry `files` fused (None: the model's own weights), taking out what was fused before, exactly."""
        if files == self.files:
            return
        if self._fused is not None:
            self._fused.restore()
            self._fused, self.files = None, None
        if files is not None:
            # Through the slot: a pipeline placed again since (another plan) edits through its new placement.
            self._fused = FusedLoras(self._pipeline, files, self._saved, lambda name: self.editing(name))
            self.files = files
