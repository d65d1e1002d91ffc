"""Live previews: a running job's video taking shape, as one JPEG of its first, middle and last frame.

What is shown is the denoiser's current estimate of the finished video, x0 = x_t - sigma * v (flow matching), not
the noisy latent x_t, which stays mostly noise until the last steps. x0 needs the model's output v, which the
pipelines' step callback does not pass (`callback_on_step_end` gets only the latents after the scheduler's step),
and only UniPC keeps x0 in its state (FlowMatchEuler, used by the fast presets, keeps none). So a forward hook on the
transformers reads x_t and t from their input and v from their output, whatever the scheduler. With classifier-free
guidance the first call of a step (the conditional one) is taken; its x0 differs from the guided one only in detail.

A linear map (ComfyUI's latent-to-RGB factors for the Wan 2.1 and Wan 2.2 VAEs) turns the normalised latents the
pipelines hold into rough RGB; it is blurry and a little off in colour, and costs milliseconds.

The denoising thread does as little as possible: at most once per `interval_s`, and only once the previous preview
is written, it copies the three latent frames' x0 to the CPU and hands them to a thread of their own, which projects,
encodes and writes the JPEG and publishes a `PreviewInfo`. A failing preview is logged once and costs the job nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.config import PreviewsConfig
from engine.jobs import PreviewInfo
from engine.storage.files import write_atomically

log = logging.getLogger(__name__)

# A frame's longer side in the preview: readable in a chat message, small as a JPEG.
FRAME_SIDE = 384
FRAME_GAP = 4
JPEG_QUALITIES = (85, 70, 55, 40)


@dataclass(frozen=True)
class LatentRGB:
    """A VAE's latents to RGB, roughly: rgb = latent @ factors + bias, in [-1, 1], one factor row per channel."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]


# ComfyUI comfy/latent_formats.py, class Wan21: the Wan 2.1 VAE (16 channels), used by the A14B models.
WAN21 = LatentRGB(
    factors=(
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    ),
    bias=(-0.1835, -0.0868, -0.3360),
)

# ComfyUI comfy/latent_formats.py, class Wan22: the Wan 2.2 VAE (48 channels), used by TI2V-5B.
WAN22 = LatentRGB(
    factors=(
        (0.0119, 0.0103, 0.0046),
        (-0.1062, -0.0504, 0.0165),
        (0.0140, 0.0409, 0.0491),
        (-0.0813, -0.0677, 0.0607),
        (0.0656, 0.0851, 0.0808),
        (0.0264, 0.0463, 0.0912),
        (0.0295, 0.0326, 0.0590),
        (-0.0244, -0.0270, 0.0025),
        (0.0443, -0.0102, 0.0288),
        (-0.0465, -0.0090, -0.0205),
        (0.0359, 0.0236, 0.0082),
        (-0.0776, 0.0854, 0.1048),
        (0.0564, 0.0264, 0.0561),
        (0.0006, 0.0594, 0.0418),
        (-0.0319, -0.0542, -0.0637),
        (-0.0268, 0.0024, 0.0260),
        (0.0539, 0.0265, 0.0358),
        (-0.0359, -0.0312, -0.0287),
        (-0.0285, -0.1032, -0.1237),
        (0.1041, 0.0537, 0.0622),
        (-0.0086, -0.0374, -0.0051),
        (0.0390, 0.0670, 0.2863),
        (0.0069, 0.0144, 0.0082),
        (0.0006, -0.0167, 0.0079),
        (0.0313, -0.0574, -0.0232),
        (-0.1454, -0.0902, -0.0481),
        (0.0714, 0.0827, 0.0447),
        (-0.0304, -0.0574, -0.0196),
        (0.0401, 0.0384, 0.0204),
        (-0.0758, -0.0297, -0.0014),
        (0.0568, 0.1307, 0.1372),
        (-0.0055, -0.0310, -0.0380),
        (0.0239, -0.0305, 0.0325),
        (-0.0663, -0.0673, -0.0140),
        (-0.0416, -0.0047, -0.0023),
        (0.0166, 0.0112, -0.0093),
        (-0.0211, 0.0011, 0.0331),
        (0.1833, 0.1466, 0.2250),
        (-0.0368, 0.0370, 0.0295),
        (-0.3441, -0.3543, -0.2008),
        (-0.0479, -0.0489, -0.0420),
        (-0.0660, -0.0153, 0.0800),
        (-0.0101, 0.0068, 0.0156),
        (-0.0690, -0.0452, -0.0927),
        (-0.0145, 0.0041, 0.0015),
        (0.0421, 0.0451, 0.0373),
        (0.0504, -0.0483, -0.0356),
        (-0.0837, 0.0168, 0.0055),
    ),
    bias=(0.0317, -0.0878, -0.1388),
)

TABLES = {16: WAN21, 48: WAN22}


def latent_rgb(channels: int) -> LatentRGB:
    if channels not in TABLES:
        raise ValueError(f"no latent-to-RGB factors for {channels}-channel latents (Wan 2.1 VAE: 16, Wan 2.2: 48)")
    return TABLES[channels]


def project(latents: torch.Tensor) -> np.ndarray:
    """Normalised latent frames [C, T, H, W] (as the pipelines hold them) as RGB frames [T, H, W, 3], uint8."""
    table = latent_rgb(latents.shape[0])
    factors = torch.tensor(table.factors, dtype=torch.float32)
    rgb = torch.einsum("cthw,cr->thwr", latents.float(), factors) + torch.tensor(table.bias)
    return ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def key_frames(count: int) -> list[int]:
    """The first, middle and last of `count` latent frames (fewer when there are fewer)."""
    return sorted({0, count // 2, count - 1})


def sigma_grid(
    timestep: torch.Tensor, shape: torch.Size, patch: tuple[int, int, int], train_timesteps: int
) -> torch.Tensor:
    """Each latent position's noise level sigma = t / train_timesteps, as [B, 1, T, H, W].

    The transformers get one t per video, or with expanded timesteps (TI2V-5B) one per patch, 0 where a conditioning
    frame is kept clean; those are spread back over the positions of their patch."""
    batch, _, frames, height, width = shape
    sigma = timestep.to(torch.float32) / train_timesteps
    if sigma.ndim == 1:
        return sigma.view(batch, 1, 1, 1, 1).expand(batch, 1, frames, height, width)
    pt, ph, pw = patch
    sigma = sigma.view(batch, 1, frames // pt, height // ph, width // pw)
    return sigma.repeat_interleave(pt, 2).repeat_interleave(ph, 3).repeat_interleave(pw, 4)


def clean_estimate(
    noisy: torch.Tensor, velocity: torch.Tensor, timestep: torch.Tensor, patch: tuple[int, int, int], train: int
) -> torch.Tensor:
    """x0 = x_t - sigma * v of the first video's key frames, as [C, frames, H, W] float32 on the tensors' device."""
    frames = key_frames(noisy.shape[2])
    sigma = sigma_grid(timestep, noisy.shape, patch, train).to(noisy.device)
    return noisy[0, :, frames].float() - sigma[0, :, frames] * velocity[0, :, frames].float()


def strip(frames: np.ndarray, side: int = FRAME_SIDE) -> Image.Image:
    """RGB frames [T, H, W, 3] side by side, each scaled up so its longer side is `side` pixels."""
    count, height, width, _ = frames.shape
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new("RGB", (count * size[0] + (count - 1) * FRAME_GAP, size[1]))
    for index, frame in enumerate(frames):
        scaled = Image.fromarray(frame).resize(size, Image.Resampling.BICUBIC)
        canvas.paste(scaled, (index * (size[0] + FRAME_GAP), 0))
    return canvas


def fit_jpeg(image: Image.Image, max_bytes: int) -> tuple[bytes, Image.Image]:
    """`image` as a JPEG of at most `max_bytes`: lower qualities first, then half the size; with the image encoded."""
    while True:
        for quality in JPEG_QUALITIES:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=quality)
            if buffer.tell() <= max_bytes:
                return buffer.getvalue(), image
        if min(image.size) < 32:
            raise ValueError(f"a preview does not fit in {max_bytes} bytes even at {image.width}x{image.height}")
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)


def render(latents: torch.Tensor, max_bytes: int) -> tuple[bytes, Image.Image]:
    """The preview JPEG of x0 key frames [C, frames, H, W], with the picture it encodes."""
    return fit_jpeg(strip(project(latents)), max_bytes)


@dataclass(frozen=True)
class Capture:
    """What the denoising thread hands over: x0 of the key latent frames, on the CPU."""

    latents: torch.Tensor  # [C, frames, H, W], float32
    step: int  # steps done once the step it comes from ends


class LivePreviews:
    """One job's previews: forward hooks on the transformers capture x0, a thread of its own renders and publishes.

    `publish` is called from the rendering thread."""

    def __init__(
        self,
        job_id: int,
        config: PreviewsConfig,
        target: Path,
        renderer: Executor,
        publish: Callable[[PreviewInfo], None],
        clock: Callable[[], float],
    ) -> None:
        self._job_id = job_id
        self._config = config
        self._target = target
        self._renderer = renderer
        self._publish = publish
        self._clock = clock
        # Captures happen when the clock reaches this: at once at first, never while one is being rendered, then
        # `interval_s` after the last one was published, so previews are at least that far apart.
        self._next_due = float("-inf")
        self._rendering: Future[None] | None = None
        self._seq = 0
        self._failed = False

    @contextlib.contextmanager
    def attached(self, pipeline: Any) -> Iterator[None]:
        """Watch the pipeline's transformers (both experts of the A14B models) while the block runs."""
        experts = [pipeline.transformer, getattr(pipeline, "transformer_2", None)]
        handles = [
            expert.register_forward_hook(self._forward_hook(pipeline), with_kwargs=True)
            for expert in experts
            if expert is not None
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    async def finish(self) -> None:
        """Wait for the preview being rendered, so that none is written or published after the job has ended."""
        if self._rendering is not None:
            await asyncio.wrap_future(self._rendering)

    def _forward_hook(self, pipeline: Any) -> Callable[..., None]:
        # Were the whole transformer compiled, its hooks would run inside the compiled call: this one stays Python.
        @torch.compiler.disable
        def on_forward(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self._clock() < self._next_due:
                return
            self._next_due = float("inf")
            try:
                capture = self._capture(pipeline, module, kwargs, output)
                self._rendering = self._renderer.submit(self._render, capture)
            except Exception:
                self._failure()
                self._next_due = self._clock() + self._config.interval_s

        return on_forward

    def _capture(self, pipeline: Any, module: Any, kwargs: dict[str, Any], output: Any) -> Capture:
        velocity = output[0] if isinstance(output, tuple) else output.sample
        # I2V's input is the noisy latent, then the mask and the image condition: the output has the latent's channels.
        noisy = kwargs["hidden_states"][:, : velocity.shape[1]]
        train = pipeline.scheduler.config.num_train_timesteps
        x0 = clean_estimate(noisy, velocity, kwargs["timestep"], tuple(module.config.patch_size), train)
        # A blocking copy of three latent frames: the pipeline waits for each step's output anyway (it compares the
        # timestep on the host), so this costs at most one early wait per interval.
        latents = x0.to("cpu")
        return Capture(latents=latents, step=(pipeline.scheduler.step_index or 0) + 1)

    def _render(self, capture: Capture) -> None:
        try:
            jpeg, image = render(capture.latents, self._config.max_bytes)
            write_atomically(self._target, jpeg)
            self._seq += 1
            info = PreviewInfo(
                seq=self._seq, step=capture.step, path=str(self._target), width=image.width, height=image.height
            )
            self._publish(info)
        except Exception:
            self._failure()
        finally:
            self._next_due = self._clock() + self._config.interval_s

    def _failure(self) -> None:
        if self._failed:
            log.debug("preview failed again job=%s", self._job_id, exc_info=True)
            return
        self._failed = True
        log.warning(
            "preview failed job=%s; the job goes on, and further preview failures are not logged",
            self._job_id,
            exc_info=True,
        )
