"""A tiny, randomly initialised Wan 2.2 pipeline built from the real diffusers classes.

It has the same components and shapes of wiring as the real models (two experts and an end-image path for the A14B
kinds; a single transformer with expanded timesteps and the 48-channel VAE for TI2V-5B), saved with
`save_pretrained`, so it loads through exactly the code path a Hub model uses, but runs in a fraction of a second
on a CPU. Used by the tests, the demo and the benchmarks; it produces noise, not pictures.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from engine.pipeline.loras import random_lightx2v_lora, random_style_lora, write_lora
from engine.storage.files import build_folder_aside
from engine.storage.images import Mode

# The fast preset's stand-ins: a random LoRA pair in LightX2V's layout for each A14B kind, and a second TI2V
# pipeline (another draw of weights) for FastWan's distilled model; neither makes better videos, but both run
# through exactly the code a real one does.
TINY_LORA_FILES = ("high_noise_lora.safetensors", "low_noise_lora.safetensors")
TINY_LORA_RANK = 4
TINY_FAST_SEED = 1
TEXT_DIM = 32
VOCAB = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(61)]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _text_encoder() -> UMT5EncoderModel:
    config = UMT5Config(
        vocab_size=len(VOCAB),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _transformer(in_channels: int, out_channels: int) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        # As in the real models: positions for frames up to 1024 patches a side, so any size a request may ask for.
        rope_max_seq_len=1024,
    ).eval()


def _vae(kind: Mode) -> AutoencoderKLWan:
    if kind is Mode.TI2V:
        # The Wan 2.2 VAE: 48 latent channels, a 2x2 patchify in front, 16x spatial compression.
        return AutoencoderKLWan(
            base_dim=8,
            decoder_base_dim=8,
            z_dim=48,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
        ).eval()
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


def _scheduler() -> UniPCMultistepScheduler:
    # flow_shift=3.0 is what the conversion script wrote into the real A14B repos; the registry corrects it on load,
    # so the tiny model exercises that path too.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )


def build_tiny_pipeline(kind: Mode, seed: int = 0) -> WanPipeline | WanImageToVideoPipeline:
    """Build the tiny pipeline for `kind` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    common = {"tokenizer": _tokenizer(), "text_encoder": _text_encoder(), "vae": _vae(kind), "scheduler": _scheduler()}
    if kind is Mode.T2V:
        return WanPipeline(
            **common, transformer=_transformer(16, 16), transformer_2=_transformer(16, 16), boundary_ratio=0.875
        )
    if kind is Mode.I2V:
        # 16 noise + 4 mask + 16 image-condition channels, as in Wan2.2-I2V-A14B; no CLIP image encoder.
        return WanImageToVideoPipeline(
            **common,
            transformer=_transformer(36, 16),
            transformer_2=_transformer(36, 16),
            boundary_ratio=0.9,
            image_encoder=None,
            image_processor=None,
        )
    return WanPipeline(**common, transformer=_transformer(48, 48), expand_timesteps=True)


def make_tiny_model(target: Path, kind: Mode, seed: int = 0) -> Path:
    """Save a tiny pipeline as a diffusers folder at `target`, atomically (built aside, then renamed)."""
    return build_folder_aside(
        target, ("model_index.json",), lambda staging: build_tiny_pipeline(kind, seed).save_pretrained(staging)
    )


def make_tiny_loras(target: Path, kind: Mode, seed: int = 0) -> Path:
    """Save a random LoRA pair for the tiny `kind` (t2v or i2v) in LightX2V's layout at `target`, atomically."""

    def build(staging: Path) -> None:
        shapes = _transformer(36 if kind is Mode.I2V else 16, 16)  # only its layer shapes matter
        generator = torch.Generator().manual_seed(seed)
        for name in TINY_LORA_FILES:
            write_lora(random_lightx2v_lora(shapes, TINY_LORA_RANK, generator), staging / name)

    return build_folder_aside(target, TINY_LORA_FILES, build)


def make_tiny_style_lora(folder: Path, name: str) -> Path:
    """A random style LoRA for every tiny model (their blocks share one shape) at `folder / name`, atomically; the
    file name seeds it, so two names are two different LoRAs."""
    target = folder / name
    if not target.exists():
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_lora(random_style_lora(_transformer(16, 16), TINY_LORA_RANK, generator), target)
    return target
