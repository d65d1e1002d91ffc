from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from engine.config import ImagesConfig
from engine.errors import ImageIntegrityError, ImageRejected
from engine.storage.images import ImageInfo, ImageStore, Mode, check_mode, validate_image_bytes
from tests import imagefactory as make


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (make.png(), "PNG"),
        (make.jpeg(), "JPEG"),
        (make.encode(make.gradient(), "WEBP"), "WebP"),
        (make.encode(make.gradient(), "BMP"), "BMP"),
        (make.encode(make.gradient().convert("P"), "GIF"), "GIF"),
        (make.encode(make.gradient(), "HEIF", quality=90), "HEIC"),
        (make.encode(make.gradient(), "AVIF", quality=90), "AVIF"),
    ],
)
def test_every_allowed_format_is_accepted_and_normalised_to_rgb(data: bytes, fmt: str, images_config: ImagesConfig):
    image = validate_image_bytes(data, images_config)
    assert image.info.format == fmt
    assert image.pixels.mode == "RGB"
    assert (image.info.width, image.info.height) == (128, 96)
    assert image.info.aspect_ratio == pytest.approx(128 / 96, rel=1e-3)
    assert image.info.file_size == len(data)
    assert image.info.source_sha256 == hashlib.sha256(data).hexdigest()
    assert image.info.decoded_bytes >= 128 * 96 * 3


def test_other_formats_are_refused_with_the_accepted_list(images_config: ImagesConfig):
    tiff = make.encode(make.gradient(), "TIFF")
    with pytest.raises(ImageRejected, match="TIFF file, which is not supported") as caught:
        validate_image_bytes(tiff, images_config)
    assert "PNG, JPEG, WebP, HEIC, AVIF, BMP or GIF" in caught.value.hint


def test_text_is_not_an_image(images_config: ImagesConfig):
    with pytest.raises(ImageRejected, match="not an image we can read"):
        validate_image_bytes(b"hello, this is a text file", images_config, filename="notes.txt")


def test_empty_file_is_refused(images_config: ImagesConfig):
    with pytest.raises(ImageRejected, match="empty file"):
        validate_image_bytes(b"", images_config)


def test_wrong_extension_is_refused_naming_the_real_format(images_config: ImagesConfig):
    with pytest.raises(ImageRejected, match=r"named '\.png' but its content is JPEG"):
        validate_image_bytes(make.jpeg(), images_config, filename="holiday.png")


def test_non_image_extension_is_refused(images_config: ImagesConfig):
    with pytest.raises(ImageRejected, match=r"'\.pdf'"):
        validate_image_bytes(make.png(), images_config, filename="scan.pdf")


def test_matching_extension_and_no_extension_pass(images_config: ImagesConfig):
    assert validate_image_bytes(make.jpeg(), images_config, filename="IMG_1.JPEG").info.format == "JPEG"
    assert validate_image_bytes(make.jpeg(), images_config, filename="photo").info.format == "JPEG"
    iphone = make.encode(make.gradient(), "HEIF")
    assert validate_image_bytes(iphone, images_config, filename="IMG_0042.HEIC").info.format == "HEIC"


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_files_are_refused(cut: float, images_config: ImagesConfig):
    for data in (make.png(), make.jpeg()):
        with pytest.raises(ImageRejected, match=r"damaged or incomplete|not an image"):
            validate_image_bytes(data[: int(len(data) * cut)], images_config)


def test_corrupt_png_data_is_refused(images_config: ImagesConfig):
    data = bytearray(make.png())
    middle = len(data) // 2
    data[middle : middle + 40] = b"\xff" * 40
    with pytest.raises(ImageRejected):
        validate_image_bytes(bytes(data), images_config)


def test_decompression_bomb_is_refused_by_declared_size_before_decoding(images_config: ImagesConfig):
    bomb = make.declared_huge_png(50_000, 50_000)
    assert len(bomb) < 1000
    with pytest.raises(ImageRejected, match=r"50000x50000 \(2500\.0 MP\); the limit is 64\.0 MP"):
        validate_image_bytes(bomb, images_config)


def test_pixel_limit_is_configurable():
    with pytest.raises(ImageRejected, match=r"limit is 0\.0 MP"):
        validate_image_bytes(make.png(128, 96), ImagesConfig(max_pixels=10_000))


def test_files_over_the_size_limit_are_refused():
    data = make.png()
    with pytest.raises(ImageRejected, match="the limit is"):
        validate_image_bytes(data, ImagesConfig(max_bytes=len(data) - 1))


def test_images_below_the_minimum_side_are_refused(images_config: ImagesConfig):
    with pytest.raises(ImageRejected, match="only 200x40; each side must be at least 64 px"):
        validate_image_bytes(make.png(200, 40), images_config)


def test_animated_gif_uses_first_frame_with_a_warning(images_config: ImagesConfig):
    image = validate_image_bytes(make.animated_gif(), images_config)
    assert image.info.animated
    assert any("animated" in warning for warning in image.info.warnings)
    assert image.pixels.getpixel((127, 0))[0] > 200


@pytest.mark.parametrize(("orientation", "size"), [(1, (120, 80)), (3, (120, 80)), (6, (80, 120)), (8, (80, 120))])
def test_exif_orientation_is_applied(orientation: int, size: tuple[int, int], images_config: ImagesConfig):
    image = validate_image_bytes(make.jpeg_with_orientation(120, 80, orientation), images_config)
    assert image.pixels.size == size
    assert (image.info.width, image.info.height) == size


def test_transparency_is_composited_on_the_configured_background():
    image = validate_image_bytes(make.transparent_png(), ImagesConfig(background=(0, 255, 0)))
    assert image.info.has_transparency
    assert image.info.mode == "RGBA"
    assert image.pixels.getpixel((10, 50)) == (0, 255, 0)
    assert image.pixels.getpixel((90, 50)) == (255, 0, 0)


def test_palette_with_transparency_is_composited(images_config: ImagesConfig):
    image = validate_image_bytes(make.palette_with_transparency(), images_config)
    assert image.info.has_transparency
    assert image.pixels.getpixel((10, 10)) == (255, 255, 255)
    assert image.pixels.getpixel((70, 10)) == (0, 0, 255)


def test_sixteen_bit_grey_is_scaled_not_clipped(images_config: ImagesConfig):
    image = validate_image_bytes(make.png_16bit_grey(), images_config)
    assert image.pixels.mode == "RGB"
    assert image.pixels.getpixel((10, 10)) == (0, 0, 0)
    assert image.pixels.getpixel((70, 10)) == (255, 255, 255)


def test_cmyk_and_greyscale_become_rgb(images_config: ImagesConfig):
    cmyk = validate_image_bytes(make.cmyk_jpeg(), images_config)
    assert cmyk.info.mode == "CMYK"
    red, green, blue = cmyk.pixels.getpixel((40, 40))
    assert red > 200 and green < 60 and blue < 60
    grey = validate_image_bytes(make.encode(make.gradient(mode="L"), "PNG"), images_config)
    assert grey.info.mode == "L" and grey.pixels.mode == "RGB"


def test_colour_profile_is_converted_and_a_broken_one_tolerated(images_config: ImagesConfig):
    with_profile = validate_image_bytes(make.png_with_profile(), images_config)
    plain = validate_image_bytes(make.png(), images_config)
    assert with_profile.pixels.tobytes() == plain.pixels.tobytes()
    broken = validate_image_bytes(make.png_with_profile(b"not a real icc profile"), images_config)
    assert broken.pixels.mode == "RGB"


def _valid(data: bytes, config: ImagesConfig, role: str = "start"):
    return validate_image_bytes(data, config, role=role)


def test_t2v_takes_no_images(images_config: ImagesConfig):
    assert check_mode(Mode.T2V, None, None, images_config).images == []
    with pytest.raises(ImageRejected, match="t2v makes a video from text alone") as caught:
        check_mode(Mode.T2V, _valid(make.png(), images_config), None, images_config)
    assert "i2v or ti2v" in caught.value.hint


@pytest.mark.parametrize("mode", [Mode.I2V, Mode.TI2V])
def test_image_modes_need_a_start_image(mode: Mode, images_config: ImagesConfig):
    with pytest.raises(ImageRejected, match=f"{mode} needs a start image") as caught:
        check_mode(mode, None, None, images_config)
    assert "attach a photo" in str(caught.value).lower()
    with pytest.raises(ImageRejected, match="only an end image"):
        check_mode(mode, None, _valid(make.png(), images_config, "end"), images_config)


def test_i2v_accepts_an_end_image_with_a_warning(images_config: ImagesConfig):
    result = check_mode(
        Mode.I2V, _valid(make.png(), images_config), _valid(make.png(), images_config, "end"), images_config
    )
    assert [image.info.role for image in result.images] == ["start", "end"]
    assert any("not trained with end images" in warning for warning in result.warnings)


def test_ti2v_accepts_an_end_image_without_the_i2v_warning(images_config: ImagesConfig):
    result = check_mode(
        Mode.TI2V, _valid(make.png(), images_config), _valid(make.png(), images_config, "end"), images_config
    )
    assert len(result.images) == 2
    assert not any("not trained" in warning for warning in result.warnings)


def test_mismatched_aspect_ratios_name_both(images_config: ImagesConfig):
    start = _valid(make.png(160, 90), images_config)
    end = _valid(make.png(100, 100), images_config, "end")
    with pytest.raises(ImageRejected, match=r"aspect 1\.78.*aspect 1\.00"):
        check_mode(Mode.I2V, start, end, images_config)


def test_end_image_of_same_ratio_is_resized_to_the_start(images_config: ImagesConfig):
    start = _valid(make.png(160, 90), images_config)
    end = _valid(make.png(320, 182), images_config, "end")
    result = check_mode(Mode.TI2V, start, end, images_config)
    assert result.images[1].pixels.size == (160, 90)
    assert any("resized from 320x182 to 160x90" in warning for warning in result.warnings)


def test_store_is_content_addressed_atomic_and_never_duplicated(tmp_path, images_config: ImagesConfig):
    store = ImageStore(tmp_path / "images")
    image = _valid(make.png(), images_config)
    first = store.put(image)
    second = store.put(_valid(make.png(), images_config))
    assert first.sha256 == second.sha256
    assert first.stored_at is not None
    files = [path for path in (tmp_path / "images").rglob("*") if path.is_file()]
    assert [path.name for path in files] == [first.sha256]
    assert files[0].read_bytes() == make.png()  # the upload as received: storing is a file write, no re-encode
    restored = store.restore(first)
    assert restored.pixels.tobytes() == image.pixels.tobytes()
    assert restored.info.restored_at is not None


@pytest.mark.parametrize(
    "upload",
    [
        make.jpeg_with_orientation(96, 128, 6),
        make.transparent_png(),
        make.cmyk_jpeg(),
        make.animated_gif(),
        make.encode(make.gradient(), "HEIF"),
    ],
    ids=["exif-rotated", "transparent", "cmyk", "animated", "heic"],
)
def test_restore_gives_exactly_the_pixels_validation_gave(tmp_path, images_config: ImagesConfig, upload: bytes):
    store = ImageStore(tmp_path / "images", images_config.background)
    image = _valid(upload, images_config)
    restored = store.restore(store.put(image))
    assert restored.pixels.mode == "RGB" and restored.pixels.size == image.pixels.size
    assert restored.pixels.tobytes() == image.pixels.tobytes()


def test_an_end_image_resized_to_the_start_restores_at_the_start_size(tmp_path, images_config: ImagesConfig):
    store = ImageStore(tmp_path / "images")
    start = _valid(make.png(160, 90), images_config)
    end = check_mode(Mode.TI2V, start, _valid(make.png(320, 182), images_config, "end"), images_config).images[1]
    restored = store.restore(store.put(end))
    assert restored.pixels.size == (160, 90)
    assert restored.pixels.tobytes() == end.pixels.tobytes()


def test_images_stored_as_png_by_an_older_version_still_restore(tmp_path, images_config: ImagesConfig):
    store = ImageStore(tmp_path / "images")
    image = _valid(make.jpeg(128, 96), images_config)
    buffer = io.BytesIO()
    image.pixels.save(buffer, format="PNG")
    old_sha = hashlib.sha256(buffer.getvalue()).hexdigest()
    legacy = tmp_path / "images" / old_sha[:2] / f"{old_sha}.png"
    legacy.parent.mkdir(parents=True)
    legacy.write_bytes(buffer.getvalue())
    restored = store.restore(image.info.model_copy(update={"sha256": old_sha}))
    assert restored.pixels.tobytes() == image.pixels.tobytes()
    assert store.stored_hashes() == {old_sha}
    store.delete(old_sha)
    assert not legacy.exists()


def test_restore_detects_missing_and_altered_files(tmp_path, images_config: ImagesConfig):
    store = ImageStore(tmp_path / "images")
    info = store.put(_valid(make.png(), images_config))
    path = store.path_for(info.sha256)
    Image.new("RGB", (128, 96), "red").save(path, format="PNG")
    with pytest.raises(ImageIntegrityError, match="altered"):
        store.restore(info)
    path.unlink()
    with pytest.raises(ImageIntegrityError, match="no longer stored") as caught:
        store.restore(info)
    assert "Send the picture again" in caught.value.hint


def test_restore_uses_the_background_the_image_was_validated_with(tmp_path, images_config: ImagesConfig):
    black = images_config.model_copy(update={"background": (0, 0, 0)})
    image = _valid(make.transparent_png(), black)
    store = ImageStore(tmp_path / "images", background=(255, 255, 255))  # the setting changed after the job was queued
    info = store.put(image)
    restored = store.restore(ImageInfo.model_validate_json(info.model_dump_json()))  # as the queue keeps it
    assert info.background == (0, 0, 0)
    assert restored.pixels.tobytes() == image.pixels.tobytes()


def _declared_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG header declaring width x height at this depth and colour type, with no pixel data behind it."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_the_decode_budget_is_checked_from_the_header_before_decoding():
    # 16-bit grey: 2 bytes a pixel as decoded, 8 more to scale it to 8 bits; 3000x2000 is 60 MB. No pixel data
    # follows the header, so a decode would fail as damaged: the refusal shows nothing was decoded.
    sixteen_bit_grey = _declared_png(3000, 2000, 16, 0)
    with pytest.raises(ImageRejected) as caught:
        validate_image_bytes(sixteen_bit_grey, ImagesConfig(max_decode_bytes=50_000_000))
    assert str(caught.value.message) == (
        "The start image (3000x2000 PNG with 16 bits a channel) would take about 60 MB of memory to read; "
        "the limit is 50 MB."
    )
    assert caught.value.hint == "Scale it down to 2738x1825 or less, or save it as a JPEG, and send it again."
    with pytest.raises(ImageRejected, match="damaged or incomplete"):
        validate_image_bytes(sixteen_bit_grey, ImagesConfig(max_decode_bytes=60_000_000))


@pytest.mark.parametrize(
    ("data", "bytes_per_pixel"),
    [
        (make.png(400, 300), 8),  # RGB, held at 4 bytes a pixel, and the copy a rotation or profile makes
        (make.encode(make.gradient(400, 300, "L"), "PNG"), 5),
        (make.encode(make.gradient(400, 300).convert("RGBA"), "PNG"), 13),  # and the alpha flattened
        (make.encode(make.gradient(400, 300), "WEBP"), 16),  # and libwebp's two canvases and its frame copy
        (make.encode(make.gradient(400, 300), "HEIF"), 10),
        (make.encode(Image.new("CMYK", (400, 300)), "JPEG"), 8),
        (make.encode(Image.new("I;16", (400, 300)), "PNG"), 10),
    ],
    ids=["rgb", "grey", "rgba", "webp", "heic", "cmyk-jpeg", "16-bit-grey"],
)
def test_the_decode_estimate_counts_the_format_and_mode(data: bytes, bytes_per_pixel: int):
    estimate = 400 * 300 * bytes_per_pixel
    alone = ImagesConfig(max_decode_bytes=estimate, max_concurrent_decodes=1)  # a JPEG's share is the whole budget
    assert validate_image_bytes(data, alone).info.decoded_bytes == estimate
    over = alone.model_copy(update={"max_decode_bytes": estimate - 1})
    if data.startswith(b"\xff\xd8"):  # a JPEG is read at half the size instead
        assert validate_image_bytes(data, over).pixels.size == (200, 150)
    else:
        with pytest.raises(ImageRejected, match="of memory to read"):
            validate_image_bytes(data, over)


def test_a_jpeg_over_the_decode_budget_is_read_smaller_and_restores_the_same(tmp_path):
    config = ImagesConfig(max_decode_bytes=1600 * 1200 * 8 // 4, max_concurrent_decodes=1)  # half the sides fit
    image = validate_image_bytes(make.jpeg(1600, 1200), config)
    assert image.pixels.size == (800, 600)
    assert image.info.reduced_to == (800, 600)
    assert image.info.decoded_bytes <= config.max_decode_bytes
    assert image.info.warnings == ["The start image is 1600x1200; it was read at 800x600 to save memory."]
    assert image.pixels.getpixel((799, 0))[0] > 240  # the whole picture, smaller; not a crop
    store = ImageStore(tmp_path / "images")
    assert store.restore(store.put(image)).pixels.tobytes() == image.pixels.tobytes()


def test_a_jpeg_is_held_to_its_share_of_the_budget_and_other_formats_to_the_whole():
    # Two decodes at once: a JPEG that takes the whole budget is read at half its size, so two stay within it
    # together; a PNG cannot be read smaller and is read whole.
    config = ImagesConfig(max_decode_bytes=1600 * 1200 * 8, max_concurrent_decodes=2)
    jpeg = validate_image_bytes(make.jpeg(1600, 1200), config)
    assert jpeg.info.reduced_to == (800, 600)
    assert jpeg.info.decoded_bytes <= config.max_decode_bytes // 2
    assert validate_image_bytes(make.png(1600, 1200), config).info.reduced_to is None
    # One that half its size would take below the minimum side (64) takes the whole budget, as before.
    narrow = validate_image_bytes(make.jpeg(1600, 100), ImagesConfig(max_decode_bytes=1600 * 100 * 8))
    assert narrow.info.reduced_to is None


def test_a_rotated_jpeg_read_at_an_eighth_restores_the_same(tmp_path):
    config = ImagesConfig(max_decode_bytes=640 * 1280 * 8 // 60, max_concurrent_decodes=1)  # a quarter is too big
    image = validate_image_bytes(make.jpeg_with_orientation(1280, 640, 6), config)
    assert image.pixels.size == (80, 160)
    store = ImageStore(tmp_path / "images")
    restored = store.restore(ImageInfo.model_validate_json(store.put(image).model_dump_json()))
    assert restored.pixels.tobytes() == image.pixels.tobytes()


def test_a_jpeg_is_not_read_smaller_than_the_minimum_side():
    # At half the size, 400x300, it would fit the budget but not the minimum side.
    with pytest.raises(ImageRejected, match=r"\(800x600 JPEG\) would take about 4 MB") as caught:
        validate_image_bytes(make.jpeg(800, 600), ImagesConfig(max_decode_bytes=1_000_000, min_side=301))
    assert caught.value.hint == "Scale it down to 408x306 or less and send it again."
