"""Image validation + normalisation, store and restore: time and peak memory for a 4K JPEG and a 40 MP PNG.

Each case runs in a fresh child process; its peak resident memory (VmHWM, reset through /proc/self/clear_refs once
the upload's bytes are in memory) minus what it held then is the figure printed. The test images are photo-like
(gradients, shapes and grain) and made once per run.

    .venv/bin/python bench/images.py [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from engine.config import ImagesConfig
from engine.storage.images import ImageStore, validate_image_bytes

CASES = {"4K JPEG (3840x2160)": ((3840, 2160), "JPEG"), "40 MP PNG (7744x5160)": ((7744, 5160), "PNG")}


def photo_like(size: tuple[int, int], fmt: str) -> bytes:
    width, height = size
    rng = np.random.default_rng(1)
    x = np.linspace(0, 1, width, dtype=np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    base = np.stack([200 * x + 30 * y, 120 + 80 * y - 40 * x, 180 - 150 * y + 0 * x], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (left, top, left + int(rng.integers(20, width // 4)), top + int(rng.integers(20, height // 4)))
        draw.ellipse(box, fill=tuple(int(value) for value in rng.integers(0, 256, 3)))
    image = image.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float32) + grain, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    image.save(out, fmt, **({"quality": 92} if fmt == "JPEG" else {"compress_level": 1}))
    return out.getvalue()


def status_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def measure_one(path: Path) -> dict[str, float]:
    """In this (child) process: validate, store and restore the image once; time and peak memory of each."""
    data = path.read_bytes()
    config = ImagesConfig(max_pixels=40_000_000, max_bytes=200_000_000)
    figures: dict[str, float] = {"file_mb": len(data) / 1e6}
    with tempfile.TemporaryDirectory() as folder:
        store = ImageStore(Path(folder))
        before = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current resident set
        started = time.perf_counter()
        image = validate_image_bytes(data, config, "start", path.name)
        figures["validate_s"] = time.perf_counter() - started
        figures["validate_mib"] = (status_kib("VmHWM") - before) / 1024
        figures["estimate_mib"] = image.info.decoded_bytes / 2**20
        started = time.perf_counter()
        info = store.put(image)
        figures["store_s"] = time.perf_counter() - started
        del image, data  # the worker restores in another process, long after
        before = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        started = time.perf_counter()
        store.restore(info)
        figures["restore_s"] = time.perf_counter() - started
        figures["restore_mib"] = (status_kib("VmHWM") - before) / 1024
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(args.child)))
        return
    with tempfile.TemporaryDirectory() as folder:
        for name, (size, fmt) in CASES.items():
            path = Path(folder) / f"image.{fmt.lower()}"
            path.write_bytes(photo_like(size, fmt))
            runs = [
                json.loads(
                    subprocess.run(
                        [sys.executable, __file__, "--child", str(path)], check=True, capture_output=True, text=True
                    ).stdout
                )
                for _ in range(args.runs)
            ]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            print(
                f"{name}, {median['file_mb']:.1f} MB: validate + normalise {median['validate_s'] * 1000:.0f} ms "
                f"(peak +{median['validate_mib']:.0f} MiB, estimated {median['estimate_mib']:.0f} MiB), "
                f"store {median['store_s'] * 1000:.0f} ms, restore {median['restore_s'] * 1000:.0f} ms "
                f"(peak +{median['restore_mib']:.0f} MiB); median of {args.runs}"
            )


if __name__ == "__main__":
    main()
