"""Builds real image files with Pillow for the tests: every format, mode and defect the validator must handle."""

from __future__ import annotations

import io

from PIL import Image, ImageCms


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 128, height: int = 96, mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)])
    return image.convert(mode) if mode != "RGB" else image


def png(width: int = 128, height: int = 96) -> bytes:
    return encode(gradient(width, height), "PNG")


def jpeg(width: int = 128, height: int = 96, **options: object) -> bytes:
    return encode(gradient(width, height), "JPEG", quality=90, **options)


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(gradient(width, height), "JPEG", exif=exif.tobytes())


def animated_gif(frames: int = 3) -> bytes:
    images = [gradient().convert("P") for _ in range(frames)]
    images[1] = Image.new("P", (128, 96), 7)
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)


def transparent_png() -> bytes:
    image = Image.new("RGBA", (100, 100), (255, 0, 0, 255))
    image.paste((0, 0, 0, 0), (0, 0, 50, 100))
    return encode(image, "PNG")


def png_16bit_grey() -> bytes:
    image = Image.new("I;16", (80, 80))
    image.putdata([65535 if x >= 40 else 0 for y in range(80) for x in range(80)])
    return encode(image, "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG")


def palette_with_transparency() -> bytes:
    image = Image.new("P", (80, 80), 1)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(0, (0, 0, 40, 80))
    return encode(image, "PNG", transparency=0)


def png_with_profile(profile: bytes | None = None) -> bytes:
    """A PNG carrying an ICC profile: sRGB by default, or the given (possibly broken) bytes."""
    icc = profile if profile is not None else ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(gradient(), "PNG", icc_profile=icc)


def declared_huge_png(width: int, height: int) -> bytes:
    """A PNG header declaring width x height with almost no pixel data: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")
    )
