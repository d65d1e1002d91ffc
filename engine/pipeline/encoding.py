"""The MP4 encoded while the VAE decodes: each chunk of frames the decoder makes goes to an encoder thread at once,
so the encode costs next to nothing after the decode.

The Wan VAEs decode one latent frame at a time (the first into one video frame, each later one into four), calling
`vae.decoder` once per latent frame: a forward hook on it sees every chunk as it is made. A tiled decode calls the
decoder per tile instead, so it is encoded afterwards, as before.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

from engine.pipeline.video import Mp4Stream

log = logging.getLogger(__name__)
_DONE = None


class EncodeWhileDecoding:
    """Within the block, the frames `pipeline`'s VAE decodes are encoded into `part` (an MP4 without metadata).
    `encoded` says afterwards whether all of them were: an encode that fails (a full disk) is logged and leaves the
    video to be encoded from the frames after the run, where the worker reports it as for any encode."""

    def __init__(self, pipeline: Any, fps: int, part: Path) -> None:
        self._vae = pipeline.vae
        self._part = part
        self._fps = fps
        self._chunks: queue.Queue[np.ndarray | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._encode, name="wanbot-encode", daemon=True)
        self._hook: Any = None
        self.encoded = False

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
            log.warning("encoding while decoding failed; encoding afterwards: %s", self._error)

    def _on_chunk(self, _module: Any, _args: Any, output: torch.Tensor) -> None:
        """Post-processed as the pipeline does (unpatchified, clamped, to [0, 1]), in 8 bits, off the device."""
        patch = self._vae.config.get("patch_size")
        video = unpatchify(output, patch_size=patch) if patch is not None else output
        # In the VAE's dtype, as the pipeline's post-processing computes it, then to floats as it hands them out.
        video = (video.clamp(-1.0, 1.0) * 0.5 + 0.5).clamp(0.0, 1.0).float()
        frames = (video[0].permute(1, 2, 3, 0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        self._chunks.put(frames)

    def _encode(self) -> None:
        ended = False
        try:
            with Mp4Stream(self._part, self._fps) as stream:
                while (chunk := self._chunks.get()) is not _DONE:
                    stream.add(chunk)
                ended = True
            self.encoded = True
        except Exception as error:  # said in the run's thread when the block ends
            self._error = error
            while not ended and self._chunks.get() is not _DONE:  # the rest of the decode, dropped
                pass
