"""GPU speed-ups for the transformers: a faster attention kernel, fp8 weights and activations, compiled blocks.

Each is `auto|on|off` in `generation.*`; what was chosen and why is decided once, logged at start-up and written
into every video's metadata. They change nothing a CPU install needs: torchao and the attention kernels are extras
(`pip install wanbot[gpu]`), imported only when a GPU asks for them. They are applied after any LoRA is fused, so
fp8 and the compiler see the final weights.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import GenerationConfig

log = logging.getLogger(__name__)

# Kernels diffusers can dispatch to, fastest first, with the package each needs. Without any of them PyTorch's own
# SDPA ("native") is the fastest that needs nothing (BENCHMARKS.md: ahead of _native_cudnn and _native_flash).
ATTENTION_KERNELS = (("_flash_3", "flash_attn_interface"), ("flash", "flash_attn"), ("sage", "sageattention"))
FP8_CAPABILITY = (8, 9)  # Ada and Hopper onwards have fp8 tensor cores


@dataclass(frozen=True)
class Choice:
    value: str
    reason: str


@dataclass(frozen=True)
class Speedups:
    attention: Choice  # a diffusers attention backend name; "native" is PyTorch's SDPA
    fp8: Choice  # "on" or "off"
    compile: Choice  # "on" or "off"

    @property
    def changes_weights(self) -> bool:
        """fp8 replaces the weights with quantized ones: a LoRA can then be neither fused in nor taken out."""
        return self.fp8.value == "on"

    def metadata(self) -> dict[str, str]:
        return {"attention": self.attention.value, "fp8": self.fp8.value, "compile": self.compile.value}

    def describe(self) -> str:
        parts = (("attention", self.attention), ("fp8", self.fp8), ("compile", self.compile))
        return "; ".join(f"{name}={choice.value} ({choice.reason})" for name, choice in parts)


def choose_speedups(config: GenerationConfig, device: torch.device) -> Speedups:
    """What `config` asks for, on this device; each with the reason it is on or off."""
    if device.type != "cuda":
        reason = "no CUDA GPU"
        return Speedups(Choice("native", reason), Choice("off", reason), Choice("off", reason))
    return Speedups(_attention(config.attention, device), _fp8(config.fp8, device), _compile(config.compile))


def apply_speedups(pipeline: Any, speedups: Speedups, quantize: bool = True) -> None:
    """Set the attention kernel, quantize to fp8 (where the plan keeps the transformers on the GPU: `quantize`) and
    compile the blocks of every transformer of `pipeline`."""
    for name in ("transformer", "transformer_2"):
        module = getattr(pipeline, name, None)
        if module is None:
            continue
        if speedups.attention.value != "native":
            module.set_attention_backend(speedups.attention.value)
        if speedups.fp8.value == "on" and quantize:
            quantize_fp8(module)
        if speedups.compile.value == "on":
            module.compile_repeated_blocks(fullgraph=True)


def quantize_fp8(module: torch.nn.Module) -> None:
    """The module's linear layers in fp8 weights and activations (torchao, on the module's device)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, quantize_

    quantize_(module, Float8DynamicActivationFloat8WeightConfig())


def _attention(setting: str, device: torch.device) -> Choice:
    if setting == "off":
        return Choice("native", "generation.attention is off")
    problems = []
    for backend, package in ATTENTION_KERNELS:
        if importlib.util.find_spec(package) is None:
            problems.append(f"{package} is not installed")
            continue
        if problem := _check_kernel(backend, device):
            problems.append(f"{backend}: {problem}")
            continue
        return Choice(backend, f"{package} is installed and matches PyTorch's attention on this GPU")
    if setting == "on":
        log.warning("generation.attention is on but no faster kernel works here: %s", "; ".join(problems))
    return Choice("native", "PyTorch's SDPA; no faster kernel works here (" + "; ".join(problems) + ")")


def _check_kernel(backend: str, device: torch.device) -> str:
    """Run the kernel once on a small problem against PyTorch's own attention; a problem as text, or ""."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    generator = torch.Generator(device=device).manual_seed(0)
    query, key, value = (
        torch.randn(1, 256, 8, 64, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(3)
    )
    try:
        got = dispatch_attention_fn(query, key, value, backend=backend)
    except Exception as error:  # a kernel built for another GPU or torch fails in many ways
        return f"{type(error).__name__}: {error}"
    expected = dispatch_attention_fn(query, key, value, backend="native")
    difference = (got.float() - expected.float()).abs().max().item()
    return "" if difference < 0.05 else f"differs from PyTorch's attention by {difference:.3f}"


def _fp8(setting: str, device: torch.device) -> Choice:
    if setting == "off":
        return Choice("off", "generation.fp8 is off")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        problem = f"compute capability {capability[0]}.{capability[1]} has no fp8 (8.9 or newer has)"
    elif importlib.util.find_spec("torchao") is None:
        problem = "torchao is not installed (pip install wanbot[gpu])"
    else:
        return Choice("on", f"torchao float8 on compute capability {capability[0]}.{capability[1]}")
    if setting == "on":
        log.warning("generation.fp8 is on but cannot be used: %s", problem)
    return Choice("off", problem)


def _compile(setting: str) -> Choice:
    if setting == "on":
        return Choice("on", "generation.compile is on: the first job per size compiles for a minute or two")
    if setting == "off":
        return Choice("off", "generation.compile is off")
    return Choice("off", "auto keeps it off: each new size would compile for minutes before its first video")
