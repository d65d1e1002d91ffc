"""What a Wan model takes: each component's bytes as wanbot loads it, and what a job of a given size adds.

Component sizes come from the model's own configs, built on the meta device (no memory, no download): the folder's
when it is on disk, else the real Wan 2.2 configs below. What a job adds on top (the transformer's activations, the
VAE decode) cannot be computed that way; those figures were measured on an H200 with bench/gpu.py (BENCHMARKS.md)
and scale linearly with the job's tokens (attention runs in SDPA's memory-efficient kernels) and, for the decode,
with the frame's pixels: the Wan VAEs decode one latent frame (four video frames) at a time, carrying a cache.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
TEXT_TOKENS = 512

# The real configurations, for sizes before a model is downloaded (bench/gpu.py builds the same at full size).
A14B_TRANSFORMER: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
I2V_TRANSFORMER = {**A14B_TRANSFORMER, "in_channels": 36}  # 16 noise + 4 mask + 16 image-condition channels
TI2V_TRANSFORMER = {
    **A14B_TRANSFORMER,
    "num_attention_heads": 24,
    "in_channels": 48,
    "out_channels": 48,
    "ffn_dim": 14336,
    "num_layers": 30,
}
A14B_VAE: dict[str, Any] = {}  # the Wan 2.1 VAE is AutoencoderKLWan's default
TI2V_VAE: dict[str, Any] = {
    "base_dim": 160,
    "decoder_base_dim": 256,
    "z_dim": 48,
    "is_residual": True,
    "in_channels": 12,
    "out_channels": 12,
    "patch_size": 2,
    "scale_factor_spatial": 16,
    "latents_mean": [0.0] * 48,
    "latents_std": [1.0] * 48,
}
UMT5_XXL: dict[str, Any] = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
}


@dataclass(frozen=True)
class Measured:
    """A family's figures from the H200 run (bench/results/gpu-h200-2026-11-30.jsonl), per unit of job size."""

    denoise_bytes_per_token: float  # activation peak of one pass above the resident weights
    decode_bytes_per_pixel: float  # untiled VAE decode peak above the VAE's weights and the video, per frame pixel
    tiled_decode_bytes: float  # tiled decode's working set above the video, whatever the size
    decode_s_per_pixel_frame: float  # untiled fp32 decode on an H200
    tiled_decode_s_per_pixel_frame: float
    mfu: float  # share of the card's dense bf16 peak a pass reaches with SDPA


# A14B: both experts and the VAE resident 53.9 GiB; a pass at 32,760 tokens peaked 3.5 GiB above that (fast) and 3.7
# GiB with one expert resident (quality, model offload); the untiled decode of 832x480x81 peaked 8.8 GiB above the
# weights (0.36 GiB of it the fp32 video), in 3.26 s. TI2V-5B: 12.0 GiB resident, a pass at 27,280 tokens 5.2 GiB
# above (its per-token timesteps make its activations larger per token than A14B's), the tiled 1280x704x121 decode
# at most 5.9 GiB above (1.2 GiB of it the video), in 19.4 s. bench/vae.py on a CPU (bench/results/vae-cpu-*.jsonl)
# gave the rest: both VAEs take about 23 KB per frame pixel decoding whole (the Wan 2.2 VAE 4% more), whatever the
# frame count; tiles take about half that at 384x384 and about twice the time; bf16 takes 0.5 to 0.7 of fp32's.
A14B_480P = 832 * 480 * 81
TI2V_720P = 1280 * 704 * 121
A14B_MEASURED = Measured(
    denoise_bytes_per_token=3.7 * GIB / 32760,
    decode_bytes_per_pixel=8.45 * GIB / (832 * 480),
    tiled_decode_bytes=1.6 * GIB,  # from the CPU: a 256-pixel tile's working set in fp32
    decode_s_per_pixel_frame=3.26 / A14B_480P,
    tiled_decode_s_per_pixel_frame=1.8 * 3.26 / A14B_480P,  # the CPU's ratio of tiled to whole
    mfu=0.57,
)
MEASURED = {
    "wan2.2-t2v-a14b": A14B_MEASURED,
    "wan2.2-i2v-a14b": Measured(**{**A14B_MEASURED.__dict__, "mfu": 0.44}),
    "wan2.2-ti2v-5b": Measured(
        denoise_bytes_per_token=5.2 * GIB / 27280,
        decode_bytes_per_pixel=1.04 * 8.45 * GIB / (832 * 480),  # the CPU's ratio of the two VAEs
        tiled_decode_bytes=4.6 * GIB,
        decode_s_per_pixel_frame=19.4 / 1.9 / TI2V_720P,  # the CPU's ratio of tiled to whole
        tiled_decode_s_per_pixel_frame=19.4 / TI2V_720P,
        mfu=0.46,
    ),
}
BF16_DECODE_SHARE = 0.7  # of the fp32 decode's working set (0.51 to 0.69 measured on the CPU)


@dataclass(frozen=True)
class Footprint:
    """A model's components as loaded: bf16 text encoder and transformers, fp32 VAE (bytes), and its figures."""

    family: str
    text_encoder: int
    experts: tuple[int, ...]  # one transformer, or the high- and low-noise experts
    vae: int
    expert_params: int  # of one expert, for its FLOPs a pass
    width: int  # attention width (heads x head size)
    layers: int
    multiple: int  # pixels per token side (VAE scale x patch)
    decode_share: float = 1.0  # of the fp32 decode's working set: BF16_DECODE_SHARE when the VAE runs in bf16

    def in_bf16_vae(self) -> Footprint:
        """The same model with its VAE in bf16: half the weights, a smaller decode."""
        return replace(self, vae=self.vae // 2, decode_share=BF16_DECODE_SHARE)

    @property
    def largest_expert(self) -> int:
        return max(self.experts)

    def tokens(self, width: int, height: int, frames: int) -> int:
        latent_frames = (frames - 1) // 4 + 1
        return latent_frames * (height // self.multiple) * (width // self.multiple)

    def pass_flops(self, tokens: int) -> float:
        """One transformer pass: 2 FLOPs per parameter per token, plus self- and cross-attention scores."""
        attention = self.layers * 4 * self.width * (tokens * tokens + tokens * TEXT_TOKENS)
        return 2 * self.expert_params * tokens + attention

    @property
    def measured(self) -> Measured:
        return MEASURED.get(self.family.removeprefix("tiny-"), A14B_MEASURED)


def footprint(family: str, folder: Path | None) -> Footprint:
    """The footprint of the model in `folder` (read from its configs), or of the real model of `family`."""
    if folder is not None and (folder / "model_index.json").exists():
        return _from_folder(family, str(folder))
    return _real(family)


@functools.lru_cache(maxsize=4)
def _real(family: str) -> Footprint:
    real = {
        "wan2.2-t2v-a14b": (A14B_TRANSFORMER, 2, A14B_VAE),
        "wan2.2-i2v-a14b": (I2V_TRANSFORMER, 2, A14B_VAE),
        "wan2.2-ti2v-5b": (TI2V_TRANSFORMER, 1, TI2V_VAE),
    }
    transformer, experts, vae = real[family]
    return _from_configs(family, UMT5_XXL, (transformer,) * experts, vae)


@functools.lru_cache(maxsize=8)
def _from_folder(family: str, folder: str) -> Footprint:
    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    names = [name for name in ("transformer", "transformer_2") if (index.get(name) or [None])[0]]
    transformers = tuple(json.loads((root / name / "config.json").read_text()) for name in names)
    text = json.loads((root / "text_encoder" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    return _from_configs(family, text, transformers, vae)


def _from_configs(
    family: str, text: dict[str, Any], transformers: tuple[dict[str, Any], ...], vae: dict[str, Any]
) -> Footprint:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        experts = [WanTransformer3DModel.from_config(config) for config in transformers]
        decoder = AutoencoderKLWan.from_config(vae)
        known = {key: value for key, value in text.items() if not key.startswith("_")}
        encoder = UMT5EncoderModel(UMT5Config(**known))
    first = experts[0].config
    vae_scale = 2 ** len(decoder.config.get("temperal_downsample", [False, True, True]))
    return Footprint(
        family=family,
        text_encoder=_params(encoder) * 2,
        experts=tuple(_params(expert) * 2 for expert in experts),
        vae=_params(decoder) * 4,
        expert_params=_params(experts[0]),
        width=first.num_attention_heads * first.attention_head_dim,
        layers=first.num_layers,
        multiple=int(decoder.config.get("scale_factor_spatial", vae_scale)) * first.patch_size[1],
    )


def _params(module: torch.nn.Module) -> int:
    return sum(tensor.numel() for tensor in module.parameters()) + sum(tensor.numel() for tensor in module.buffers())
