"""MP4 output with PyAV: H.264, yuv420p, faststart, metadata in the comment; and re-encoding to fit a byte limit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from engine.errors import UserError
from engine.storage.files import atomic_target


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    bytes: int
    width: int
    height: int
    frames: int
    fps: float
    duration_s: float
    comment: str


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Pipeline output (float in [0, 1], frames x H x W x 3) to 8-bit RGB."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_mp4(
    frames: np.ndarray,
    fps: int,
    target: Path,
    metadata: dict[str, Any] | None = None,
    crf: int = 18,
    bitrate: int | None = None,
) -> VideoInfo:
    """Write RGB frames as an H.264 MP4 that plays everywhere (yuv420p, even sizes, moov atom first)."""
    with atomic_target(target) as temp_path, Mp4Stream(temp_path, fps, metadata, crf, bitrate) as stream:
        for index in range(frames.shape[0]):
            # A frame at a time: converting the whole video at once allocates temporaries of its full size.
            stream.add(frames[index : index + 1])
    return probe(target)


class Mp4Stream:
    """An MP4 written as its frames come (in any number at a time, from any one thread).

    x264's `veryfast` at CRF 18 takes half the CPU of `medium` for a file no larger (bench/encode.py), and frame
    threads replace the sliced threads PyAV asks for, which use fewer cores. A byte limit keeps `medium`: there
    every bit counts."""

    def __init__(
        self, path: Path, fps: int, metadata: dict[str, Any] | None = None, crf: int = 18, bitrate: int | None = None
    ) -> None:
        self._container = av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"})
        if metadata:
            # UTF-8 as written: a prompt in Chinese (like Wan's default negative prompt) stays readable in players.
            self._container.metadata["comment"] = json.dumps(metadata, sort_keys=True, ensure_ascii=False)
        self._fps, self._crf, self._bitrate = fps, crf, bitrate
        self._stream: Any = None
        self.frames = 0

    def add(self, frames: np.ndarray) -> None:
        """Frames x height x width x 3, 8-bit or float in [0, 1]."""
        if self._stream is None:
            self._open(frames.shape[1], frames.shape[2])
        width, height = self._stream.width, self._stream.height
        for frame in frames:
            pixels = np.ascontiguousarray(to_uint8(frame[:height, :width]))
            self._container.mux(self._stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            self.frames += 1

    def _open(self, height: int, width: int) -> None:
        stream = self._container.add_stream("libx264", rate=Fraction(self._fps, 1))
        stream.width, stream.height, stream.pix_fmt = width - width % 2, height - height % 2, "yuv420p"
        stream.codec_context.thread_type = "FRAME"
        if self._bitrate:
            stream.bit_rate = self._bitrate
            stream.options = {"preset": "medium"}
        else:
            stream.options = {"crf": str(self._crf), "preset": "veryfast"}
        self._stream = stream

    def close(self) -> None:
        try:
            if self._stream is not None:
                self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def __enter__(self) -> Mp4Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def finish_mp4(part: Path, target: Path, metadata: dict[str, Any]) -> VideoInfo:
    """`part` (an MP4 written while its frames were decoded, before the run's facts were known) as `target`, with
    `metadata` in its comment: the packets copied, not encoded again."""
    with (
        av.open(str(part)) as source,
        atomic_target(target) as temp_path,
        av.open(str(temp_path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container,
    ):
        container.metadata["comment"] = json.dumps(metadata, sort_keys=True, ensure_ascii=False)
        original = source.streams.video[0]
        copy = container.add_stream_from_template(original)
        for packet in source.demux(original):
            if packet.dts is None:
                continue  # the flushing packet
            packet.stream = copy
            container.mux(packet)
    part.unlink(missing_ok=True)
    return probe(target)


def probe(path: Path | str) -> VideoInfo:
    path = Path(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        # One packet per frame in an MP4 (the last, empty one flushes): counted without decoding the video.
        frames = sum(1 for packet in container.demux(stream) if packet.size)
        fps = float(stream.average_rate or stream.base_rate or 0)
        comment = container.metadata.get("comment", "")
        return VideoInfo(
            path=path,
            bytes=path.stat().st_size,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            frames=frames,
            fps=fps,
            duration_s=frames / fps if fps else 0.0,
            comment=comment,
        )


def read_frames(path: Path | str) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def fit_to_limit(source: Path, max_bytes: int, max_tries: int = 4) -> Path:
    """Return `source` if it fits in `max_bytes`, else a re-encoded copy that does.

    The bitrate follows from the limit and the duration; if the result is still too large (container overhead,
    very short clips), the frame is scaled down by a quarter and the bitrate tightened, a few times at most.
    """
    if source.stat().st_size <= max_bytes:
        return source
    info = probe(source)
    frames = read_frames(source)
    metadata = json.loads(info.comment) if info.comment else {}
    target = source.with_name(f"{source.stem}.fit-{max_bytes}.mp4")
    budget_bits = max_bytes * 8 * 0.85
    scale = 1.0
    for _ in range(max_tries):
        bitrate = max(int(budget_bits / max(info.duration_s, 0.1)), 20_000)
        scaled = frames if scale == 1.0 else _resize(frames, scale)
        fitted = encode_mp4(
            scaled, round(info.fps), target, {**metadata, "refit_for_bytes": max_bytes}, bitrate=bitrate
        )
        if fitted.bytes <= max_bytes:
            return target
        scale *= 0.75
        budget_bits *= 0.8
    target.unlink(missing_ok=True)
    raise UserError(
        f"The video could not be made smaller than {max_bytes / 1e6:.1f} MB.",
        "Ask for fewer frames or a lower resolution.",
    )


def _resize(frames: np.ndarray, scale: float) -> np.ndarray:
    from PIL import Image

    height, width = frames.shape[1:3]
    size = (max(2, int(width * scale) // 2 * 2), max(2, int(height * scale) // 2 * 2))
    return np.stack([np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.LANCZOS)) for frame in frames])
