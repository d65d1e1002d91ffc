"""What the MP4 encode costs: libx264 presets and threading at CRF 18, with each setting's size and quality.

encode_mp4 (engine/pipeline/video.py) writes H.264 with PyAV: libx264, CRF 18, yuv420p, faststart, RGB frames handed
over as `av.VideoFrame.from_ndarray(..., format="rgb24")` and converted to yuv420p by PyAV's swscale inside
`stream.encode`. This encodes the same way, on wanbot's two output sizes (1280x704x121 at 24 fps, TI2V-5B's 720p;
832x480x81 at 16 fps, the A14B models' 480p), for each x264 preset and each threading setting of the codec context:

- `pyav-default`: nothing set, as encode_mp4 does. PyAV sets thread_count 0 (auto) and thread_type SLICE on every
  codec context it makes, and FFmpeg's libx264 wrapper turns thread_type SLICE into x264's sliced threads.
- `frame` (thread_type FRAME), `auto` (FRAME|SLICE, which the wrapper also turns into frame threads), `slice`
  (SLICE, the default spelled out), each with thread_count 0; `single`: thread_count 1 (x264 and swscale on one
  thread; the CPU seconds a setting needs at all).

The threads, slices and lookahead x264 really used are read back from the options string x264 writes into the
stream. Per setting: wall seconds and CPU seconds of the process (all threads, from getrusage) for the
from_ndarray + encode + mux loop, output bytes, and PSNR of the decoded MP4 against the source frames: RGB (what a
viewer sees against the pipeline's frames, so it includes yuv420p's chroma loss) and Y (against the source's own
yuv420p, the codec's loss alone). Once per size: the float-to-uint8 conversion (encode_mp4's to_uint8), building the
VideoFrames, the rgb24-to-yuv420p conversion the encoder does, and encode_mp4's probe of the written file (with
the per-frame to_uint8 and the packet count as cheaper ways to the same result).

Content: `smooth` is a stand-in for a generated video (a drifting colour gradient, two soft moving blobs, fine
texture under a sub-pixel camera pan, noise of 1/255); `noise` is uniform random pixels, the worst case for time and
size (its first preset runs with PyAV's default threading, the others with frame threads). Each setting is encoded
`--repeat` times and the fastest run reported, with every run's wall time (on a shared 2-core machine the load of
other processes shows in the wall times, far less in the CPU seconds). Settings run in the order given; those that
start after the time budget (`--budget-s`) are skipped.

    .venv/bin/python bench/encode.py [--sizes 1280x704x121@24,832x480x81@16]
        [--presets medium,fast,faster,veryfast,superfast,ultrafast] [--threading pyav-default,frame]
        [--single medium,veryfast,ultrafast] [--auto veryfast] [--noise medium,veryfast,ultrafast]
        [--repeat 2] [--crf 18] [--budget-s 330] [--out figures.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from engine.pipeline.video import probe, to_uint8

CRF = 18  # encode_mp4's
PRESETS = ("medium", "fast", "faster", "veryfast", "superfast", "ultrafast")
# Name -> (thread_type, thread_count) set on the codec context; None leaves PyAV's value.
THREADING: dict[str, tuple[str | None, int | None]] = {
    "pyav-default": (None, None),
    "frame": ("FRAME", 0),
    "auto": ("AUTO", 0),
    "slice": ("SLICE", 0),
    "single": (None, 1),
}
X264_KEYS = ("threads", "lookahead_threads", "sliced_threads", "slices", "rc_lookahead", "bframes", "ref", "subme")


@dataclass(frozen=True)
class Size:
    width: int
    height: int
    frames: int
    fps: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"

    @classmethod
    def parse(cls, text: str) -> Size:
        shape, fps = text.split("@")
        width, height, frames = (int(part) for part in shape.split("x"))
        return cls(width, height, frames, int(fps))


@dataclass(frozen=True)
class Setting:
    content: str
    size: Size
    preset: str
    threading: str


@dataclass
class Clock:
    wall_s: float = 0.0
    cpu_s: float = 0.0


def cpu_seconds() -> float:
    """User + system time of this process, all its threads (x264's and swscale's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextmanager
def clocked() -> Iterator[Clock]:
    clock = Clock()
    wall, cpu = time.perf_counter(), cpu_seconds()
    yield clock
    clock.wall_s, clock.cpu_s = time.perf_counter() - wall, cpu_seconds() - cpu


def smooth_frames(size: Size, seed: int) -> np.ndarray:
    """Float frames in [0, 1] like a generated clip: smooth colour, moving shapes, fine texture, a little noise."""
    rng = np.random.default_rng(seed)
    pan = np.array([0.7, 2.3])  # pixels a frame (down, right), sub-pixel so that motion search has work to do
    span_y, span_x = (np.ceil(pan * size.frames).astype(int) + 2).tolist()
    # Texture mostly in brightness, as in real footage (independent texture per channel is chroma that yuv420p
    # drops), and detailed in some regions, nearly flat in others.
    canvas = (size.height + span_y, size.width + span_x)
    texture = lowpass_noise(rng, *canvas, sigma_px=2.0)
    detail = 1 / (1 + np.exp(-2 * lowpass_noise(rng, *canvas, sigma_px=60.0)[..., :1]))
    texture = (0.05 * texture[..., :1] + 0.012 * texture) * detail
    ys, xs = np.mgrid[0 : size.height, 0 : size.width].astype(np.float32)
    ys, xs = ys / size.height, xs / size.width
    phases = rng.uniform(0, 2 * np.pi, 3)
    blobs = [
        (np.array([0.3, 0.2]), np.array([0.003, 0.004]), 0.12, np.array([0.9, 0.55, 0.3])),
        (np.array([0.6, 0.8]), np.array([-0.002, -0.005]), 0.08, np.array([0.2, 0.4, 0.85])),
    ]
    frames = np.empty((size.frames, size.height, size.width, 3), np.float32)
    for index in range(size.frames):
        wave = 2 * np.pi * (0.8 * xs + 0.3 * ys - 0.004 * index)
        frame = np.stack([0.45 + 0.25 * np.sin(wave + phase) for phase in phases], axis=-1)
        aspect = size.width / size.height
        for start, velocity, radius, colour in blobs:
            centre_y, centre_x = start + velocity * index
            distance = (ys - centre_y) ** 2 + ((xs - centre_x) * aspect) ** 2
            alpha = np.exp(-distance / (2 * radius**2))[..., None]
            frame = frame * (1 - alpha) + colour * alpha
        frame += shifted(texture, pan * index, size.height, size.width)
        frame += rng.normal(0.0, 1 / 255, frame.shape).astype(np.float32)
        frames[index] = frame
    return frames


def lowpass_noise(rng: np.random.Generator, height: int, width: int, sigma_px: float) -> np.ndarray:
    """Gaussian-filtered white noise, unit standard deviation, three channels: texture a few pixels across."""
    white = rng.standard_normal((height, width, 3)).astype(np.float32)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    gain = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fy**2 + fx**2))[..., None]
    smooth = np.fft.irfft2(np.fft.rfft2(white, axes=(0, 1)) * gain, s=(height, width), axes=(0, 1))
    return (smooth / smooth.std()).astype(np.float32)


def shifted(texture: np.ndarray, offset: np.ndarray, height: int, width: int) -> np.ndarray:
    """A height x width window of `texture` at a fractional offset, bilinear."""
    (top, left), (fy, fx) = np.floor(offset).astype(int), offset - np.floor(offset)
    window = texture[top : top + height + 1, left : left + width + 1]
    rows = window[:-1] * (1 - fy) + window[1:] * fy
    return rows[:, :-1] * (1 - fx) + rows[:, 1:] * fx


def noise_frames(size: Size, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((size.frames, size.height, size.width, 3), dtype=np.float32)


def encode(pixels: np.ndarray, fps: int, crf: int, preset: str, threading: str, target: Path) -> Clock:
    """encode_mp4's loop (without its to_uint8 and probe), with the codec context's threading set as named."""
    thread_type, thread_count = THREADING[threading]
    height, width = pixels.shape[1:3]
    with (
        clocked() as clock,
        av.open(str(target), mode="w", format="mp4", options={"movflags": "+faststart"}) as container,
    ):
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        if thread_type is not None:
            stream.codec_context.thread_type = thread_type
        if thread_count is not None:
            stream.codec_context.thread_count = thread_count
        for index in range(len(pixels)):
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels[index]), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode(None))
    return clock


def x264_options(path: Path) -> dict[str, Any]:
    """The settings x264 used, from the options string it writes into the stream (an SEI message)."""
    data = path.read_bytes()
    start = data.find(b"x264 - core")
    if start < 0:
        return {}
    text = data[start : data.find(b"\x00", start)].decode("ascii", "replace")
    core = text.split(" - ")[1]
    pairs = dict(item.split("=", 1) for item in text.split("options: ", 1)[-1].split() if "=" in item)
    return {"core": core, **{key: pairs[key] for key in X264_KEYS if key in pairs}}


def psnr_db(reference: np.ndarray, decoded: np.ndarray) -> float:
    error = np.mean((reference.astype(np.float32) - decoded.astype(np.float32)) ** 2)
    return float(10 * np.log10(255.0**2 / error)) if error > 0 else 100.0


def quality(path: Path, pixels: np.ndarray, luma: np.ndarray) -> tuple[float, float, int]:
    """Mean PSNR over frames of the decoded MP4: RGB against the source pixels, Y against the source's yuv420p."""
    height = pixels.shape[1]
    rgb_db, y_db = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # only to decode faster here; not timed
        for index, frame in enumerate(container.decode(stream)):
            rgb_db.append(psnr_db(pixels[index], frame.to_ndarray(format="rgb24")))
            y_db.append(psnr_db(luma[index], frame.to_ndarray(format="yuv420p")[:height]))
    return float(np.mean(rgb_db)), float(np.mean(y_db)), len(rgb_db)


def prepare(
    content: str, size: Size, frames: np.ndarray, emit: Callable[[dict[str, Any]], None]
) -> tuple[np.ndarray, np.ndarray]:
    """Time encode_mp4's conversions once per size; returns the RGB pixels and their Y planes (the encoder's input)."""
    # The first call in a process also pays for first touching the memory of its array-sized temporaries (on a
    # fresh VM far more than on a warm server); the warm figure is the best of two more calls.
    with clocked() as first_clock:
        pixels = to_uint8(frames)
    warm_clocks = []
    for _ in range(2):
        with clocked() as clock:
            pixels = to_uint8(frames)
        warm_clocks.append(clock)
    warm_clock = min(warm_clocks, key=lambda clock: clock.wall_s)
    with clocked() as per_frame_clock:  # the same result, a frame at a time: no array-sized temporaries
        for index in range(len(frames)):
            pixels[index] = to_uint8(frames[index])
    with clocked() as build_clock:
        images = [av.VideoFrame.from_ndarray(np.ascontiguousarray(pixel), format="rgb24") for pixel in pixels]
    with clocked() as yuv_clock:
        converted = [image.reformat(format="yuv420p", threads=0) for image in images]
    with clocked() as yuv_single_clock:
        for image in images:
            image.reformat(format="yuv420p", threads=1)
    # The best RGB PSNR any encode can reach: to yuv420p and back, no codec.
    back = [frame.to_ndarray(format="rgb24") for frame in converted]
    ceiling_db = float(np.mean([psnr_db(pixels[index], back[index]) for index in range(len(back))]))
    emit(
        {
            "what": "prepare",
            "content": content,
            "size": size.name,
            "to_uint8_first_s": first_clock.wall_s,
            "to_uint8_s": warm_clock.wall_s,
            "to_uint8_cpu_s": warm_clock.cpu_s,
            "to_uint8_per_frame_s": per_frame_clock.wall_s,
            "from_ndarray_s": build_clock.wall_s,
            "rgb24_to_yuv420p_s": yuv_clock.wall_s,
            "rgb24_to_yuv420p_cpu_s": yuv_clock.cpu_s,
            "rgb24_to_yuv420p_1_thread_s": yuv_single_clock.wall_s,
            "psnr_rgb_yuv420p_only_db": ceiling_db,
        }
    )
    return pixels, np.stack([frame.to_ndarray()[: size.height] for frame in converted])


def time_probe(content: str, size: Size, path: Path, emit: Callable[[dict[str, Any]], None]) -> None:
    """encode_mp4 ends with probe(), which decodes every frame to count them; counting packets needs no decode."""
    with clocked() as probe_clock:
        info = probe(path)
    with clocked() as demux_clock, av.open(str(path)) as container:
        packets = sum(1 for packet in container.demux(video=0) if packet.size)
    emit(
        {
            "what": "probe",
            "content": content,
            "size": size.name,
            "probe_s": probe_clock.wall_s,
            "probe_cpu_s": probe_clock.cpu_s,
            "frames": info.frames,
            "count_packets_s": demux_clock.wall_s,
            "packets": packets,
        }
    )


def plan(args: argparse.Namespace) -> list[Setting]:
    sizes = [Size.parse(text) for text in args.sizes.split(",")]
    presets, threadings = args.presets.split(","), args.threading.split(",")
    settings = []
    for position, size in enumerate(sizes):
        settings += [Setting("smooth", size, preset, threading) for preset in presets for threading in threadings]
        if position == 0:  # the extra checks at the first (largest) size only
            settings += [Setting("smooth", size, preset, "single") for preset in split(args.single)]
            settings += [Setting("smooth", size, preset, "auto") for preset in split(args.auto)]
            settings += [Setting("smooth", size, "medium", "slice")] if args.slice else []
    if noise := split(args.noise):
        size = sizes[0]
        settings += [Setting("noise", size, noise[0], "pyav-default")]
        settings += [Setting("noise", size, preset, "frame") for preset in noise[1:]]
    return settings


def split(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1280x704x121@24,832x480x81@16", help="WxHxFRAMES@FPS, comma-separated")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--threading", default="pyav-default,frame", help=f"any of {', '.join(THREADING)}")
    parser.add_argument("--single", default="medium,veryfast,ultrafast", help="presets also run on one thread")
    parser.add_argument("--auto", default="veryfast", help="presets also run with thread_type AUTO")
    parser.add_argument("--slice", action="store_true", help="also run medium with thread_type SLICE spelled out")
    parser.add_argument("--noise", default="medium,veryfast,ultrafast", help="presets on random pixels")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip the settings that start after this")
    parser.add_argument("--repeat", type=int, default=2, help="encodes a setting; the fastest is reported")
    parser.add_argument("--crf", type=int, default=CRF)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="append each figure here as a JSON line")
    args = parser.parse_args()

    def emit(figures: dict[str, Any]) -> None:
        print(json.dumps(figures), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as file:
                file.write(json.dumps(figures) + "\n")

    started = time.perf_counter()
    emit(
        {
            "what": "machine",
            "cores": os.cpu_count(),
            "av": av.__version__,
            "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
            "crf": args.crf,
        }
    )
    sources: dict[tuple[str, Size], tuple[np.ndarray, np.ndarray]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for setting in plan(args):
            if time.perf_counter() - started > args.budget_s:
                emit({"what": "skipped", **describe(setting)})
                continue
            key = (setting.content, setting.size)
            if key not in sources:
                sources.clear()  # one source in memory at a time: 1.3 GB of float frames at 720p
                make = smooth_frames if setting.content == "smooth" else noise_frames
                frames = make(setting.size, args.seed)
                sources[key] = prepare(setting.content, setting.size, frames, emit)
                del frames
            pixels, luma = sources[key]
            target = Path(folder) / f"{setting.content}-{setting.size.name}-{setting.preset}-{setting.threading}.mp4"
            load = os.getloadavg()[0]
            runs = [
                encode(pixels, setting.size.fps, args.crf, setting.preset, setting.threading, target)
                for _ in range(args.repeat)
            ]
            clock = min(runs, key=lambda run: run.wall_s)
            psnr_rgb, psnr_y, decoded = quality(target, pixels, luma)
            size_bytes = target.stat().st_size
            emit(
                {
                    "what": "encode",
                    **describe(setting),
                    "crf": args.crf,
                    "wall_s": clock.wall_s,
                    "cpu_s": clock.cpu_s,
                    "wall_runs_s": [run.wall_s for run in runs],
                    "bytes": size_bytes,
                    "mbit_s": size_bytes * 8 / (setting.size.frames / setting.size.fps) / 1e6,
                    "psnr_rgb_db": psnr_rgb,
                    "psnr_y_db": psnr_y,
                    "frames_decoded": decoded,
                    "x264": x264_options(target),
                    "load1_before": load,
                }
            )
            if setting.threading == "pyav-default" and setting.preset == "medium":
                time_probe(setting.content, setting.size, target, emit)
            target.unlink()
    emit({"what": "total", "wall_s": time.perf_counter() - started})


def describe(setting: Setting) -> dict[str, Any]:
    return {
        "content": setting.content,
        "size": setting.size.name,
        "fps": setting.size.fps,
        "preset": setting.preset,
        "threading": setting.threading,
    }


if __name__ == "__main__":
    main()
