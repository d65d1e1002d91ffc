"""Step-distilled LoRAs (LightX2V's Wan 2.2 A14B 4-step pair): made at random in their key layout, fused into both
experts, and taken out again exactly.

Fusing changes the experts' weights in place, so a quality job after a fast one would run on distilled weights.
Unfusing subtracts the delta again, which in bf16 does not give the original bits back; reloading from disk takes a
minute for 57 GB. So the original of every tensor the LoRA changes is kept (on the CPU) while it is fused and copied
back in place for a quality job: exact, seconds, and compiled blocks stay valid because the parameters stay the same
objects. The cost is host memory for those tensors (the linear layers of both experts: about 55 GB for A14B in
bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
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
    transformer: torch.nn.Module, rank: int, generator: torch.Generator, std: float = 0.05, dtype: Any = None
) -> dict[str, torch.Tensor]:
    """Random weights in LightX2V's layout for `transformer`'s shapes: per linear layer lora_down/lora_up with alpha
    and a diff_b bias, zeroed norm diffs, and a full-rank head diff; a stand-in of the real rank and shapes."""

    def randn(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * std).to(dtype or torch.float32)

    state: dict[str, torch.Tensor] = {}
    for index, block in enumerate(transformer.blocks):
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


def write_lora(state: dict[str, torch.Tensor], target: Path) -> Path:
    with atomic_target(target) as temp_path:
        save_file({key: value.contiguous() for key, value in state.items()}, str(temp_path))
    return target


def load_pair(pipeline: Any, high: Path, low: Path) -> None:
    """Load the pair as peft adapters: high-noise into `transformer`, low-noise into `transformer_2`."""
    pipeline.load_lora_weights(str(high), adapter_name=HIGH_ADAPTER)
    pipeline.load_lora_weights(str(low), adapter_name=LOW_ADAPTER, load_into_transformer_2=True)


class FusedLoras:
    """A LoRA pair fused into both experts, with the original tensors it changed, to put them back exactly."""

    def __init__(self, pipeline: Any, high: Path, low: Path) -> None:
        self._pipeline = pipeline
        self._originals: dict[str, dict[str, torch.Tensor]] = {}
        try:
            load_pair(pipeline, high, low)
            self._originals = {name: _lora_targets(getattr(pipeline, name)) for name in EXPERTS}
            pipeline.fuse_lora(components=list(EXPERTS), lora_scale=1.0)
        except BaseException:
            # A file that fails to load (or a fuse that fails) halfway must not leave an adapter or part of a fused
            # pair behind for the next quality job.
            pipeline.unload_lora_weights()
            self.restore()
            raise
        # Without the adapters the fused experts are plain modules again: nothing extra runs in a pass, and fp8 or
        # compiling sees ordinary linear layers.
        pipeline.unload_lora_weights()

    def restore(self) -> None:
        """Copy the original tensors back in place (the parameters stay the same objects)."""
        with torch.no_grad():
            for component, originals in self._originals.items():
                module = getattr(self._pipeline, component)
                for name, original in originals.items():
                    module.get_parameter(name).copy_(original)
        self._originals = {}


def _lora_targets(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the weights and biases of every layer a LoRA adapter wraps, by their names once unwrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    originals: dict[str, torch.Tensor] = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        for kind, tensor in (("weight", base.weight), ("bias", base.bias)):
            if tensor is not None:
                originals[f"{name}.{kind}"] = tensor.detach().to("cpu", copy=True)
    return originals


class LoraSlot:
    """The LoRA pair a loaded pipeline carries fused (or none), switched in place between jobs."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline
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
            self._fused = FusedLoras(self._pipeline, files.high, files.low)
            self.files = files
