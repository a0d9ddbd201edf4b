"""Untrusted image input: base64 / data URIs to bytes, bytes to the network's input array.

Every failure becomes a :class:`~service.errors.BadImage` (422), :class:`~service.errors.ImageTooLarge`
(413) or :class:`~service.errors.InvalidInput` (422) naming the problem; nothing here fetches URLs.

The work per image is bounded before any pixel is decoded: only whitelisted formats open (no
EPS/PS through Ghostscript, no exotic plugins), the header's size is checked against the pixel
cap, the aspect-ratio cap and the decoded-bytes cap, JPEGs are decoded at a reduced DCT scale
when that still leaves enough pixels (``draft``), and preprocessing resamples only the centre
crop's source box (:mod:`models.preprocess`).
"""

from __future__ import annotations

import binascii
import io
import re
import struct
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.backbone import PreprocessConfig
from models.preprocess import check_config, normalise, resample_rgb
from service.errors import BadImage, ImageTooLarge, InvalidInput

_URL = re.compile(r"^\s*(https?|ftp|file|s3|gs)://", re.I)
# Pillow plugin id -> the MIME types a data: URI may declare for it. Nothing else is opened.
FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": ("image/jpeg", "image/jpg", "image/pjpeg"),
    "MPO": ("image/jpeg", "image/jpg", "image/mpo"),  # phone JPEGs with a second picture
    "PNG": ("image/png", "image/apng"),
    "WEBP": ("image/webp",),
    "GIF": ("image/gif",),
    "BMP": ("image/bmp", "image/x-ms-bmp", "image/x-bmp"),
    "TIFF": ("image/tiff", "image/tiff-fx"),
}
_OPENERS = ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"]  # Pillow's JPEG opener also returns MPO files
ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "LA": 2, "La": 2, "PA": 2, "I;16": 2, "I;16B": 2, "I;16L": 2}
_WHITESPACE = str.maketrans("", "", " \t\r\n\f\v")
_EXIF_ORIENTATION = 0x0112
# Exceptions PIL decoders raise on malformed input (besides its own), all mean "not a usable image".
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    ZeroDivisionError,
    struct.error,
    Image.DecompressionBombError,
)


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    min_side: int
    max_aspect_ratio: float = 32.0
    max_decoded_bytes: int = 192 * 1024 * 1024


@dataclass(frozen=True)
class EncodedImage:
    """One image as it arrived: bytes plus the MIME type its data: URI declared (if any)."""

    data: bytes
    mime: str | None = None


def decode_base64_image(value: str, index: int, max_bytes: int) -> EncodedImage:
    """A JSON image field (plain base64 or a ``data:`` URI) -> raw bytes. URLs are refused."""
    if _URL.match(value[:16]):
        raise InvalidInput(
            f"image {index}: URLs are not fetched by this server (SSRF protection); "
            "send the image itself as base64, a data: URI, or a multipart upload"
        )
    payload, mime = value, None
    if value[:5].lower() == "data:":
        header, comma, payload = value.partition(",")
        if not comma:
            raise InvalidInput(f"image {index}: a data: URI needs a ',' before its payload")
        mime = _data_uri_mime(header, index)
    if len(payload) > (max_bytes * 4) // 3 + 8 and len(payload.translate(_WHITESPACE)) > (max_bytes * 4) // 3 + 8:
        raise ImageTooLarge(f"image {index}: larger than the {max_bytes} byte limit per image")
    try:
        data = binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError) as first:
        # Line-wrapped base64 (MIME style) is still base64: drop whitespace once and retry strictly.
        stripped = payload.translate(_WHITESPACE)
        try:
            if stripped == payload:
                raise first
            data = binascii.a2b_base64(stripped, strict_mode=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidInput(
                f"image {index}: not valid base64 ({e}); send base64 or a data:image/...;base64, URI"
            ) from e
    if not data:
        raise BadImage(f"image {index}: empty")
    return EncodedImage(data, mime)


def _data_uri_mime(header: str, index: int) -> str:
    """``data:image/png;base64`` -> ``image/png``; only base64 payloads of image/* types."""
    parts = [p.strip().lower() for p in header[5:].split(";")]
    if parts[-1] != "base64":
        raise InvalidInput(f"image {index}: data: URIs must be base64-encoded (';base64,')")
    mime = parts[0]
    if not mime.startswith("image/"):
        raise InvalidInput(
            f"image {index}: data: URI type {mime or '(none)'!r} is not an image type; "
            f"use data:image/jpeg, image/png, image/webp, image/gif, image/bmp or image/tiff"
        )
    if not any(mime in types for types in FORMATS.values()):
        raise BadImage(f"image {index}: {mime!r} is not an accepted image type ({ACCEPTED})")
    return mime


class ImagePreprocessor:
    """Bytes -> float32 [3, H, W] network input for one image encoder, built once from its bundle.

    ``draft_factor``: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter
    side still has ``draft_factor`` x the network's input size; 0 decodes at full size (exact).
    """

    def __init__(self, cfg: PreprocessConfig, limits: ImageLimits, draft_factor: float = 0.0) -> None:
        check_config(cfg)
        self.cfg = cfg
        self.limits = limits
        self.draft_factor = draft_factor

    def __call__(self, image: EncodedImage | bytes, index: int = 0) -> np.ndarray:
        if isinstance(image, bytes):
            image = EncodedImage(image)
        return normalise(resample_rgb(self.decode(image, index), self.cfg), self.cfg)

    def from_pil(self, image: Image.Image) -> np.ndarray:
        """An already decoded image (the readiness probe, tests) -> [3, H, W]."""
        return normalise(resample_rgb(image, self.cfg), self.cfg)

    def decode(self, image: EncodedImage, index: int) -> Image.Image:
        """Checked, loaded, upright PIL image in its own mode (RGB conversion comes after the crop)."""
        data, limits = image.data, self.limits
        if not data:
            raise BadImage(f"image {index}: empty upload")
        if len(data) > limits.max_bytes:
            raise ImageTooLarge(f"image {index}: {len(data)} bytes, limit is {limits.max_bytes}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data), formats=_OPENERS)
                self._check_header(img, image.mime, index)
                if self.draft_factor > 0 and img.format in ("JPEG", "MPO"):
                    side = round(max(self.cfg.size) * self.draft_factor)
                    img.draft(img.mode, (side, side))  # DCT-domain downscale: fewer pixels decoded
                self._check_memory(img, index)
                img.load()  # full decode: truncated / corrupt data fails here
                return _upright(img)
        except (ImageTooLarge, BadImage):
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ImageTooLarge(f"image {index}: {e}") from e
        except UnidentifiedImageError as e:
            raise BadImage(f"image {index}: not an accepted image format ({ACCEPTED})") from e
        except _DECODE_ERRORS as e:
            raise BadImage(
                f"image {index}: cannot be decoded ({type(e).__name__}: {e}); is it truncated or corrupt?"
            ) from e

    def _check_header(self, img: Image.Image, mime: str | None, index: int) -> None:
        """Everything knowable before decoding: format vs declared type, size, shape, memory."""
        limits = self.limits
        if mime is not None and mime not in FORMATS.get(str(img.format), ()):
            raise BadImage(f"image {index}: the data: URI says {mime!r} but the bytes are {img.format}")
        width, height = img.size  # header only: nothing decoded yet
        if width * height > limits.max_pixels:
            raise ImageTooLarge(
                f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit of "
                f"{limits.max_pixels} (decompression-bomb protection)"
            )
        if min(width, height) < limits.min_side:
            raise BadImage(f"image {index}: {width}x{height} is too small; each side needs >= {limits.min_side} px")
        if max(width, height) > limits.max_aspect_ratio * min(width, height):
            raise BadImage(
                f"image {index}: {width}x{height} has an aspect ratio over {limits.max_aspect_ratio:g}:1; "
                "the model sees only a centred square, so crop the image first"
            )

    def _check_memory(self, img: Image.Image, index: int) -> None:
        """The bitmap about to be decoded (after any draft scaling) must fit the per-image memory cap."""
        width, height = img.size
        decoded = width * height * _BYTES_PER_PIXEL.get(img.mode, 4)  # Pillow keeps RGB as 4 bytes
        if decoded > self.limits.max_decoded_bytes:
            raise ImageTooLarge(
                f"image {index}: {width}x{height} {img.mode} decodes to {decoded >> 20} MiB, over the "
                f"{self.limits.max_decoded_bytes >> 20} MiB limit; send a smaller image"
            )


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (as Hugging Face's image loading does); no copy when there is none."""
    orientation = img.getexif().get(_EXIF_ORIENTATION)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        return ImageOps.exif_transpose(img)
    return img


def configure_pil(max_pixels: int) -> None:
    """PIL's own bomb guard: warn above ``max_pixels``, error above twice that (we turn warnings into 413)."""
    Image.MAX_IMAGE_PIXELS = max_pixels


async def read_uploads(form: Any, max_bytes: int) -> list[EncodedImage | str]:
    """A multipart form's ``files`` parts as encoded images, each read no further than ``max_bytes`` + 1."""
    from starlette.datastructures import UploadFile

    files: list[EncodedImage | str] = []
    for i, item in enumerate(form.getlist("files")):
        if not isinstance(item, UploadFile):
            raise InvalidInput(f"files[{i}]: must be a file upload (multipart part with a filename)")
        data = await item.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ImageTooLarge(f"image {i}: larger than the {max_bytes} byte limit per image")
        files.append(EncodedImage(data))
    return files
