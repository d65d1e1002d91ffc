"""Validation, normalisation and content-addressed storage of the images a job starts (and ends) from.

Checks run on the raw bytes before anything is stored: size, format (by content, and against the file name),
declared pixel count (so a decompression bomb is refused before decoding), the memory the decode will take (estimated
from the header; a JPEG over its share of the budget is decoded smaller, anything else over the budget refused), then
a full decode. The image is then normalised to 8-bit sRGB RGB, upright, with transparency composited on a background.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pillow_heif
from PIL import Image, ImageCms, ImageFile, ImageOps
from pydantic import BaseModel, Field

from engine.config import ImagesConfig
from engine.errors import ImageIntegrityError, ImageRejected, quoted
from engine.storage.files import write_atomically

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own pixel limit is checked first and is configurable; Pillow's global guard must not pre-empt it with a
# different number or a mere warning.
Image.MAX_IMAGE_PIXELS = None
# Pillow holds an image in blocks, of 16 MiB by default. glibc serves blocks that small from its heaps (a decode
# thread's arena among them) and keeps them there when they are freed: after a few bursts of 64 MP pictures a serving
# process held 600 MiB more than before them. As one block, a picture of over 32 MiB (glibc's highest mmap threshold)
# is mapped for itself and unmapped when it is freed, whichever thread frees it; 1 GiB holds any picture max_pixels
# lets in (64 MP at 4 bytes a pixel is 256 MB), and Pillow allocates only what an image needs.
Image.core.set_block_size(2**30)
# What stays are the smaller buffers of a decode (libjpeg's, a colour conversion's) in the arena of the thread that
# decoded, which glibc keeps until told: give_back_memory tells it after each decode.
_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None), "malloc_trim", None)


def give_back_memory() -> None:
    """Free what a decode left in reference cycles (a decoder's image can sit in one until the collector runs, tens
    of MB), then return the heap memory freed (every arena's) to the system, where glibc has malloc_trim."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# Phones save HEIC (iPhone) and AVIF; sent as files, Telegram keeps them as they are.
pillow_heif.register_heif_opener()

ALLOWED_FORMATS = {
    "PNG": "PNG",
    "JPEG": "JPEG",
    "WEBP": "WebP",
    "HEIF": "HEIC",
    "AVIF": "AVIF",
    "BMP": "BMP",
    "GIF": "GIF",
}
SEND_SUPPORTED = "Send a PNG, JPEG, WebP, HEIC, AVIF, BMP or GIF picture."
EXTENSIONS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".webp": "WEBP",
    ".heic": "HEIF",
    ".heif": "HEIF",
    ".hif": "HEIF",
    ".avif": "AVIF",
    ".bmp": "BMP",
    ".dib": "BMP",
    ".gif": "GIF",
}
# The peak memory of decoding and normalising a picture, in bytes a pixel, is the sum of three parts, each known from
# the header (tests/storage/test_image_memory.py holds them against the real peaks; at 64 MP with Pillow 13 a WebP
# peaked at 16, a 16-bit grey PNG at 10, a CMYK JPEG at 8):
# - the decoded image as Pillow holds it: one band takes 1 byte (16-bit grey 2), several take 4, RGB too;
STORED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# - what the decoder holds besides: Pillow decodes every WebP with libwebp's animation decoder, which keeps two RGBA
#   canvases as long as the file is open and hands each frame over as a copy; libheif its planes while it decodes;
DECODER_HELD_BYTES_PER_PIXEL = {"WEBP": 8}
DECODER_BYTES_PER_PIXEL = {"WEBP": 4, "HEIF": 6, "AVIF": 6}
# - what normalising adds once the decoder's own buffers are gone: an RGB copy (a rotation, a colour profile or the
#   conversion makes one); for transparency also an RGBA copy and the alpha band it is flattened with; for 16- and
#   32-bit grey a 32-bit copy to scale.
NORMALISE_BYTES_PER_PIXEL = {
    **dict.fromkeys(("RGBA", "RGBa", "LA", "La", "PA"), 9),
    **dict.fromkeys(("I;16", "I;16B", "I;16L", "I;16N", "I", "F"), 8),
}


class Mode(StrEnum):
    T2V = "t2v"
    I2V = "i2v"
    TI2V = "ti2v"


Role = Literal["start", "end"]


class ImageInfo(BaseModel):
    """What we learnt about one uploaded image; stored with the job."""

    role: Role
    format: str
    width: int
    height: int
    mode: str
    has_transparency: bool
    animated: bool
    aspect_ratio: float
    pixel_count: int
    file_size: int
    decoded_bytes: int = Field(description="Estimated peak memory of decoding and normalising it, from its header.")
    reduced_to: tuple[int, int] | None = Field(
        None, description="The size a JPEG over images.max_decode_bytes was asked to decode at; None: full size."
    )
    source_sha256: str = Field(description="Hash of the bytes as uploaded.")
    sha256: str = Field("", description="Hash of the stored file (the upload as received); the storage key.")
    background: tuple[int, int, int] | None = Field(
        None, description="RGB the transparent pixels were flattened onto; None in rows from before it was recorded."
    )
    warnings: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    stored_at: str | None = None
    restored_at: str | None = None


@dataclass
class ValidatedImage:
    """A decoded, normalised image with its metadata; `pixels` is 8-bit RGB, `upload` the bytes it came from."""

    pixels: Image.Image
    info: ImageInfo
    upload: bytes


@dataclass
class ModeCheck:
    """The outcome of checking a job's images against its mode."""

    images: list[ValidatedImage]
    warnings: list[str]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _label(role: Role) -> str:
    return f"The {role} image"


def validate_image_bytes(
    data: bytes, config: ImagesConfig, role: Role = "start", filename: str | None = None
) -> ValidatedImage:
    """Check raw upload bytes and return the normalised image, or raise ImageRejected saying why."""
    label = _label(role)
    if not data:
        raise ImageRejected(f"{label} is an empty file (0 bytes).", "Send the picture again.")
    if len(data) > config.max_bytes:
        raise ImageRejected(
            f"{label} is {len(data) / 1e6:.1f} MB; the limit is {config.max_bytes / 1e6:.1f} MB.",
            "Send a smaller or more compressed picture (JPEG or WebP).",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, OSError, ValueError):
        raise ImageRejected(f"{label} is not an image we can read.", SEND_SUPPORTED) from None
    with opened:
        return _validate_opened(opened, data, config, role, filename)


def _validate_opened(
    opened: Image.Image, data: bytes, config: ImagesConfig, role: Role, filename: str | None
) -> ValidatedImage:
    label = _label(role)
    fmt = opened.format or "unknown"
    if fmt not in ALLOWED_FORMATS:
        raise ImageRejected(f"{label} is a {fmt} file, which is not supported.", SEND_SUPPORTED)
    _check_extension(filename, fmt, label)
    width, height = opened.size
    if width * height > config.max_pixels:
        raise ImageRejected(
            f"{label} is {width}x{height} ({width * height / 1e6:.1f} MP); the limit is "
            f"{config.max_pixels / 1e6:.1f} MP.",
            "Scale it down and send it again.",
        )
    if min(width, height) < config.min_side:
        raise ImageRejected(
            f"{label} is only {width}x{height}; each side must be at least {config.min_side} px.",
            "Send a larger picture.",
        )
    found_warnings: list[str] = []
    reduced_to = _fit_decode_budget(opened, fmt, config, label)
    decoded_bytes = _decode_bytes(opened, fmt)
    if reduced_to is not None:
        found_warnings.append(
            f"{label} is {width}x{height}; it was read at {opened.width}x{opened.height} to save memory."
        )
    animated = bool(getattr(opened, "is_animated", False))
    if animated:
        found_warnings.append(f"{label} is animated; only its first frame is used.")
        opened.seek(0)
    original_mode = opened.mode
    try:
        opened.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(
            f"{label} is damaged or incomplete ({exc}).", "Export it again, or send it as a file, not a link."
        ) from None
    has_transparency = _has_transparency(opened)
    pixels = _normalise(opened, config.background)
    info = ImageInfo(
        role=role,
        format=ALLOWED_FORMATS[fmt],
        width=pixels.width,
        height=pixels.height,
        mode=original_mode,
        has_transparency=has_transparency,
        animated=animated,
        aspect_ratio=round(pixels.width / pixels.height, 4),
        pixel_count=pixels.width * pixels.height,
        file_size=len(data),
        decoded_bytes=decoded_bytes,
        reduced_to=reduced_to,
        source_sha256=hashlib.sha256(data).hexdigest(),
        background=config.background if has_transparency else None,
        warnings=found_warnings,
    )
    return ValidatedImage(pixels=pixels, info=info, upload=data)


def _decode_bytes(image: Image.Image, fmt: str) -> int:
    """The peak memory of decoding and normalising `image` at its current size, from its header alone."""
    mode = image.mode
    alpha = mode == "P" and "transparency" in image.info
    normalise = 9 if alpha else NORMALISE_BYTES_PER_PIXEL.get(mode, 4)
    per_pixel = (
        STORED_BYTES_PER_PIXEL.get(mode, 4)
        + DECODER_HELD_BYTES_PER_PIXEL.get(fmt, 0)
        + max(DECODER_BYTES_PER_PIXEL.get(fmt, 0), normalise)
    )
    return image.width * image.height * per_pixel


def _fit_decode_budget(opened: Image.Image, fmt: str, config: ImagesConfig, label: str) -> tuple[int, int] | None:
    """Keep the decode within images.max_decode_bytes, before decoding; anything over it is refused, but a JPEG, which
    libjpeg decodes at 1/2, 1/4 or 1/8 of its size, is read smaller instead. Returns the size asked of `draft`, which
    a restore asks again, or None for a full decode.

    A JPEG is held to its share of the budget (max_concurrent_decodes run at once), so that a burst of large ones
    stays within the budget together: at 64 MP a CMYK or rotated JPEG takes 8 bytes a pixel, two at once 1 GB. The
    other formats cannot be read smaller, so each one keeps the whole budget (a 50 MP HEIC photo needs 500 MB)."""
    full = _decode_bytes(opened, fmt)
    if fmt == "JPEG":
        share = config.max_decode_bytes // config.max_concurrent_decodes
        scale = _jpeg_scale(opened.size, full, share, config.min_side) or _jpeg_scale(
            opened.size, full, config.max_decode_bytes, config.min_side
        )
        if scale == 1:
            return None
        if scale is not None:
            request = (opened.width // scale, opened.height // scale)
            if opened.draft(None, request) is not None:
                return request
    elif full <= config.max_decode_bytes:
        return None
    width, height = opened.size
    fit = math.sqrt(config.max_decode_bytes / full)
    depth = " with 16 bits a channel" if opened.mode.startswith("I;16") else ""
    # Of what we accept, a JPEG takes the least memory to read (8 bytes a pixel at most) and can be read smaller.
    as_jpeg = "" if fmt == "JPEG" else ", or save it as a JPEG,"
    raise ImageRejected(
        f"{label} ({width}x{height} {ALLOWED_FORMATS[fmt]}{depth}) would take about {full / 1e6:.0f} MB of memory "
        f"to read; the limit is {config.max_decode_bytes / 1e6:.0f} MB.",
        f"Scale it down to {int(width * fit)}x{int(height * fit)} or less{as_jpeg} and send it again.",
    )


def _jpeg_scale(size: tuple[int, int], full: int, limit: int, min_side: int) -> int | None:
    """The first of full size, 1/2, 1/4 and 1/8 whose decode of a JPEG (`full` bytes at full size) is within `limit`
    and keeps min_side; None if none is."""
    width, height = size
    for scale in (1, 2, 4, 8):
        reduced = (-(-width // scale), -(-height // scale))
        if min(reduced) < min_side:
            return None
        if full * reduced[0] * reduced[1] / (width * height) <= limit:
            return scale
    return None


def _check_extension(filename: str | None, fmt: str, label: str) -> None:
    if not filename or "." not in filename:
        return
    extension = Path(filename).suffix.lower()
    claimed = EXTENSIONS.get(extension)
    if claimed is None:
        raise ImageRejected(
            f"{label} is named {quoted(extension)}, which is not an image type we accept.",
            SEND_SUPPORTED,
        )
    if claimed != fmt:
        raise ImageRejected(
            f"{label} is named {quoted(extension)} but its content is {ALLOWED_FORMATS[fmt]}.",
            "Save it again with the right extension, or re-export it from your image editor.",
        )


def _has_transparency(image: Image.Image) -> bool:
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return image.getextrema()[-1][0] < 255
    return image.mode == "P" and "transparency" in image.info


def _normalise(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Upright, sRGB, 8-bit RGB with transparency flattened onto `background`; may change `image` in place.

    In place, and no conversion of what is already RGB: each copy of a 40 MP image is 160 MB, as Pillow keeps RGB at
    4 bytes a pixel (bench/images.py).
    """
    ImageOps.exif_transpose(image, in_place=True)
    upright = image
    profile = upright.info.get("icc_profile")
    if upright.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and 32-bit greyscale: scale to 0..255 instead of clipping everything above 255 to white.
        upright = upright.convert("I").point(lambda value: value / 256).convert("L")
    if upright.mode == "P":
        upright = upright.convert("RGBA" if "transparency" in upright.info else "RGB")
    if upright.mode in ("LA", "La", "PA", "RGBa"):
        upright = upright.convert("RGBA")
    if profile and upright.mode in ("RGB", "RGBA", "L", "CMYK"):
        upright = _to_srgb(upright, profile)
    if upright.mode == "RGBA":
        flattened = Image.new("RGB", upright.size, background)
        flattened.paste(upright, mask=upright.getchannel("A"))
        return flattened
    return upright if upright.mode == "RGB" else upright.convert("RGB")


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        target_mode = "RGBA" if image.mode == "RGBA" else "RGB"
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=target_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        # A broken embedded profile is common in the wild; the pixels are still usable as they are.
        return image
    return converted if converted is not None else image


def flattening_note(info: ImageInfo) -> str | None:
    """What a user is told about a picture with transparent parts: the video cannot show them, they get a colour."""
    if not info.has_transparency or info.background is None:
        return None
    names = {(255, 255, 255): "white", (0, 0, 0): "black"}
    colour = names.get(tuple(info.background), "RGB {}, {}, {}".format(*info.background))
    return f"{_label(info.role)} has transparent parts; the video shows them filled with {colour}."


def jpeg_of(path: Path, quality: int = 85) -> bytes:
    """A stored picture as JPEG bytes (a video's cover)."""
    with Image.open(path) as picture:
        buffer = io.BytesIO()
        picture.convert("RGB").save(buffer, "JPEG", quality=quality)
        return buffer.getvalue()


def check_mode(mode: Mode, start: ValidatedImage | None, end: ValidatedImage | None, config: ImagesConfig) -> ModeCheck:
    """Apply the per-mode rules and the start/end compatibility check."""
    if mode is Mode.T2V:
        if start is not None or end is not None:
            raise ImageRejected(
                "t2v makes a video from text alone and takes no images.",
                "Remove the picture, or use mode i2v or ti2v to start from it.",
            )
        return ModeCheck(images=[], warnings=[])
    if start is None:
        if end is not None:
            raise ImageRejected(
                f"{mode} needs a start image, but only an end image was given.",
                "Attach the start picture as well (or send it alone as the start).",
            )
        raise ImageRejected(f"{mode} needs a start image.", "Attach a photo, or use mode t2v for text only.")
    found = list(start.info.warnings)
    images = [start]
    if end is not None:
        end = _match_end_to_start(start, end, config)
        found.extend(end.info.warnings)
        images.append(end)
        if mode is Mode.I2V:
            found.append("i2v was not trained with end images: the end frame is a best effort and may drift.")
    found.extend(note for note in (flattening_note(image.info) for image in images) if note)
    return ModeCheck(images=images, warnings=found)


def _match_end_to_start(start: ValidatedImage, end: ValidatedImage, config: ImagesConfig) -> ValidatedImage:
    start_ratio = start.info.width / start.info.height
    end_ratio = end.info.width / end.info.height
    if abs(start_ratio - end_ratio) / start_ratio > config.aspect_tolerance:
        raise ImageRejected(
            f"The start image is {start.info.width}x{start.info.height} (aspect {start_ratio:.2f}) but the end "
            f"image is {end.info.width}x{end.info.height} (aspect {end_ratio:.2f}); they must have the same shape "
            f"within {config.aspect_tolerance:.0%}.",
            "Crop the end image to the start image's shape and send both again.",
        )
    if end.pixels.size == start.pixels.size:
        return end
    resized = end.pixels.resize(start.pixels.size, Image.Resampling.LANCZOS)
    note = (
        f"The end image was resized from {end.info.width}x{end.info.height} to "
        f"{start.info.width}x{start.info.height} to match the start image."
    )
    info = end.info.model_copy(
        update={
            "width": resized.width,
            "height": resized.height,
            "warnings": [*end.info.warnings, note],
            "pixel_count": resized.width * resized.height,
        }
    )
    return ValidatedImage(pixels=resized, info=info, upload=end.upload)


class ImageStore:
    """Uploads as received, named by their sha256, written atomically and never duplicated.

    Keeping the upload rather than a lossless re-encode of the normalised pixels makes storing a photo one file
    write: a PNG of a 5 MP photo takes 0.3 to 1.8 s to encode on a small CPU, and the user waits for it before
    seeing "queued" (bench/chat_latency.py). A restore decodes and normalises the upload again, the same way, to the
    size recorded at validation.
    """

    def __init__(self, root: Path, background: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.root = root
        # Only for rows stored before ImageInfo recorded the background the image was validated with.
        self._background = background

    def path_for(self, sha256: str) -> Path:
        path = self.root / sha256[:2] / sha256
        # Before uploads were kept as received, the normalised image was stored as <sha256>.png.
        legacy = path.with_suffix(".png")
        return legacy if legacy.exists() and not path.exists() else path

    def put(self, image: ValidatedImage) -> ImageInfo:
        """Store the image; return its metadata with `sha256` and `stored_at` filled in."""
        digest = hashlib.sha256(image.upload).hexdigest()
        target = self.path_for(digest)
        if not target.exists():
            write_atomically(target, image.upload)
        return image.info.model_copy(update={"sha256": digest, "stored_at": _now()})

    def restore(self, info: ImageInfo) -> ValidatedImage:
        """Load a stored image, checking its hash; raise ImageIntegrityError if it is gone or altered."""
        path = self.path_for(info.sha256)
        try:
            payload = path.read_bytes()
        except FileNotFoundError:
            raise ImageIntegrityError(
                f"The {info.role} image of this job is no longer stored.", "Send the picture again with a new job."
            ) from None
        if hashlib.sha256(payload).hexdigest() != info.sha256:
            raise ImageIntegrityError(
                f"The stored {info.role} image of this job was altered on disk.",
                "Send the picture again with a new job.",
            )
        with Image.open(io.BytesIO(payload)) as opened:
            if info.reduced_to is not None:
                # The same reduced decode validation made, so the same pixels.
                opened.draft(None, info.reduced_to)
            pixels = _normalise(opened, info.background or self._background)
        if pixels.size != (info.width, info.height):
            pixels = pixels.resize((info.width, info.height), Image.Resampling.LANCZOS)
        return ValidatedImage(pixels=pixels, info=info.model_copy(update={"restored_at": _now()}), upload=payload)

    def stored_hashes(self) -> set[str]:
        return {path.name.removesuffix(".png") for path in self.root.glob("*/*") if not path.name.startswith(".")}

    def delete(self, sha256: str) -> None:
        self.path_for(sha256).unlink(missing_ok=True)


def frame_picture(pixels: Any, config: ImagesConfig) -> ValidatedImage:
    """A video frame (8-bit RGB, height x width x 3) as a picture stored like an upload (a lossless PNG), for a
    video that starts from it."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, format="PNG")
    # Any frame a video has is a frame a video may start from: the tiny models make sides under images.min_side.
    return validate_image_bytes(buffer.getvalue(), config.model_copy(update={"min_side": 1}), "start", "last-frame.png")
