"""The MP4 encoded while the VAE decodes: each chunk of frames the decoder makes goes to an encoder thread at once,
so the encode costs next to nothing after the decode.

The Wan VAEs decode one latent frame at a time (the first into one video frame, each later one into four), calling
`vae.decoder` once per latent frame: a forward hook on it sees every chunk as it is made. A tiled decode calls the
decoder per tile instead, so it is encoded afterwards, as before.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from engine.pipeline.video import Mp4Stream

_DONE = None


class EncodeWhileDecoding:
    """Within the block, the frames `pipeline`'s VAE decodes are encoded into `part` (an MP4 without metadata)."""

    def __init__(self, pipeline: Any, fps: int, part: Path) -> None:
        self._vae = pipeline.vae
        self._part = part
        self._fps = fps
        self._chunks: queue.Queue[np.ndarray | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode, name="wanbot-encode", daemon=True)
        self._hook: Any = None
        self.frames = 0

    def __enter__(self) -> EncodeWhileDecoding:
        self._hook = self._vae.decoder.register_forward_hook(self._on_chunk)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._hook.remove()
        self._chunks.put(_DONE)
        self._thread.join()
        if self._error is not None and kind is None:
            raise self._error

    def _on_chunk(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        """Post-processed as the pipeline does (unpatchified, clamped, to [0, 1]), in 8 bits, off the device."""
        patch = self._vae.config.get("patch_size")
        video = unpatchify(output, patch_size=patch) if patch is not None else output
        video = (video.clamp(-1.0, 1.0).float() / 2 + 0.5).clamp(0.0, 1.0)
        frames = (video[0].permute(1, 2, 3, 0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        self._chunks.put(frames)

    def _encode(self) -> None:
        try:
            with Mp4Stream(self._part, self._fps) as stream:
                while (chunk := self._chunks.get()) is not _DONE:
                    stream.add(chunk)
                self.frames = stream.frames
        except BaseException as error:  # raised in the run's thread when the block ends
            self._error = error
            while self._chunks.get() is not _DONE:  # let the decode finish without blocking on a full queue
                pass
