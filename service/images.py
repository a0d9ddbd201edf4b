"""Untrusted image input: base64 / data URIs to bytes, bytes to a checked RGB PIL image.

Every failure becomes a :class:`~service.errors.BadImage` (422) or
:class:`~service.errors.ImageTooLarge` (413) naming the problem; nothing here fetches URLs.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from service.errors import BadImage, ImageTooLarge, InvalidInput

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)
_URL = re.compile(r"^\s*(https?|ftp|file|s3|gs)://", re.I)
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


def decode_base64_image(value: str, index: int, max_bytes: int) -> bytes:
    """A JSON image field (plain base64 or a ``data:`` URI) -> raw bytes. URLs are refused."""
    if _URL.match(value):
        raise InvalidInput(
            f"image {index}: URLs are not fetched by this server (SSRF protection); "
            "send the image itself as base64, a data: URI, or a multipart upload"
        )
    payload = value.strip()
    match = _DATA_URI.match(payload)
    if match:
        if not match.group("b64"):
            raise InvalidInput(f"image {index}: data: URIs must be base64-encoded (';base64,')")
        payload = payload[match.end() :]
    if len(payload) > (max_bytes * 4) // 3 + 8:
        raise ImageTooLarge(f"image {index}: larger than the {max_bytes} byte limit per image")
    try:
        data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"image {index}: not valid base64 ({e}); send base64 or a data:image/...;base64, URI") from e
    if not data:
        raise BadImage(f"image {index}: empty")
    return data


def decode_image(data: bytes, index: int, limits: ImageLimits) -> Image.Image:
    """Bytes -> loaded RGB image, refusing oversized, undersized, truncated and non-image input."""
    if not data:
        raise BadImage(f"image {index}: empty upload")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"image {index}: {len(data)} bytes, limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # header only: nothing decoded yet
            if width * height > limits.max_pixels:
                raise ImageTooLarge(
                    f"image {index}: {width}x{height} = {width * height} pixels exceeds the limit of "
                    f"{limits.max_pixels} (decompression-bomb protection)"
                )
            if min(width, height) < limits.min_side:
                raise BadImage(f"image {index}: {width}x{height} is too small; each side needs >= {limits.min_side} px")
            img.load()  # full decode: truncated / corrupt data fails here
            rgb = img.convert("RGB")
    except ImageTooLarge:
        raise
    except BadImage:
        raise
    except Image.DecompressionBombWarning as e:
        raise ImageTooLarge(f"image {index}: {e}") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"image {index}: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImage(f"image {index}: not a recognised image format (JPEG, PNG, WebP, GIF, BMP, TIFF, ...)") from e
    except _DECODE_ERRORS as e:
        raise BadImage(
            f"image {index}: cannot be decoded ({type(e).__name__}: {e}); is it truncated or corrupt?"
        ) from e
    return rgb


def configure_pil(max_pixels: int) -> None:
    """PIL's own bomb guard: warn above ``max_pixels``, error above twice that (we turn warnings into 413)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
