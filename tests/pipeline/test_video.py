from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.errors import UserError
from engine.pipeline.video import encode_mp4, fit_to_limit, probe, read_frames


@pytest.fixture
def noisy_video(tmp_path: Path) -> Path:
    # Random noise does not compress: a small clip is large, which is what the re-encoder must handle.
    frames = np.random.default_rng(0).random((33, 128, 160, 3)).astype(np.float32)
    encode_mp4(frames, 16, tmp_path / "noise.mp4", {"prompt": "noise", "seed": 1})
    return tmp_path / "noise.mp4"


def test_encoded_mp4_is_h264_yuv420p_faststart_with_metadata(noisy_video: Path):
    import av

    with av.open(str(noisy_video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    head = noisy_video.read_bytes()[:4096]
    assert head.find(b"moov") != -1 and (head.find(b"mdat") == -1 or head.find(b"moov") < head.find(b"mdat"))
    info = probe(noisy_video)
    assert (info.frames, info.width, info.height, info.fps) == (33, 160, 128, 16)
    assert json.loads(info.comment) == {"prompt": "noise", "seed": 1}
    assert not list(noisy_video.parent.glob(".*.mp4")), "the temporary file was left behind"


def test_odd_sizes_are_cropped_to_even_for_yuv420p(tmp_path: Path):
    frames = np.zeros((5, 65, 67, 3), dtype=np.uint8)
    info = encode_mp4(frames, 24, tmp_path / "odd.mp4")
    assert (info.width, info.height) == (66, 64)


def test_a_video_that_fits_is_returned_untouched(noisy_video: Path):
    assert fit_to_limit(noisy_video, noisy_video.stat().st_size) == noisy_video


def test_an_oversized_video_is_reencoded_under_the_limit(noisy_video: Path):
    limit = noisy_video.stat().st_size // 5
    fitted = fit_to_limit(noisy_video, limit)
    assert fitted != noisy_video and fitted.stat().st_size <= limit
    info = probe(fitted)
    assert info.frames == 33 and info.fps == 16
    assert json.loads(info.comment)["seed"] == 1
    assert read_frames(fitted).shape[0] == 33
    assert noisy_video.exists()


def test_an_impossible_limit_is_a_clear_error(noisy_video: Path):
    with pytest.raises(UserError, match="could not be made smaller than") as caught:
        fit_to_limit(noisy_video, 2_000)
    assert "fewer frames" in caught.value.hint
    assert not list(noisy_video.parent.glob("*.fit-*"))


def test_the_encoder_keeps_crf_18_on_veryfast_with_frame_threads(noisy_video: Path):
    # x264 writes the settings it ran with into the stream: what bench/encode.py chose, not PyAV's sliced threads.
    settings = noisy_video.read_bytes().split(b"options: ", 1)[1].split(b"\x00", 1)[0].decode()
    assert "sliced_threads=0" in settings and "crf=18.0" in settings
    assert "subme=2" in settings and "ref=1" in settings  # veryfast's motion search
    assert probe(noisy_video).frames == 33
