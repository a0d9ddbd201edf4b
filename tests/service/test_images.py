"""Untrusted image input, below HTTP: base64 / data URIs, the format whitelist, EXIF, caps, JPEG draft."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import open_clip
import pytest
from PIL import Image, ImageOps

from models.backbone import PreprocessConfig
from service.errors import BadImage, ImageTooLarge, InvalidInput
from service.images import EncodedImage, ImageLimits, ImagePreprocessor, decode_base64_image
from tests.service.conftest import ROOT, jpeg_bytes, png_bytes

CFG = PreprocessConfig(size=(224, 224), mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
LIMITS = ImageLimits(max_bytes=16 << 20, max_pixels=40_000_000, min_side=16)


def _saved(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_base64_plain_wrapped_and_data_uri(photos: list[Any]) -> None:
    raw = png_bytes(photos[0].resize((32, 32)))
    b64 = base64.b64encode(raw).decode()
    assert decode_base64_image(b64, 0, 1 << 20) == EncodedImage(raw)
    wrapped = "\n".join(textwrap.wrap(b64, 76))  # MIME-style line breaks are still base64
    assert decode_base64_image(wrapped, 0, 1 << 20).data == raw
    uri = decode_base64_image("data:image/png;base64," + b64, 0, 1 << 20)
    assert uri == EncodedImage(raw, "image/png")
    for bad in ("@@@" + b64, b64[:-1], "ünïcode", b64[:8] + "=" + b64[8:]):
        with pytest.raises(InvalidInput, match="base64"):
            decode_base64_image(bad, 0, 1 << 20)


@pytest.mark.parametrize(
    ("uri", "error"),
    [
        ("data:text/plain;base64,", InvalidInput),
        ("data:;base64,", InvalidInput),
        ("data:application/pdf;base64,", InvalidInput),
        ("data:image/x-icon;base64,", BadImage),
        ("data:image/png,", InvalidInput),
    ],
)
def test_data_uri_types(uri: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_base64_image(uri + "AAAA", 0, 1 << 20)


def test_data_uri_type_must_match_the_bytes(photos: list[Any]) -> None:
    pre = ImagePreprocessor(CFG, LIMITS)
    jpeg = jpeg_bytes(photos[0])
    assert pre(EncodedImage(jpeg, "image/jpeg")).shape == (3, 224, 224)
    with pytest.raises(BadImage, match="says 'image/png' but the bytes are JPEG"):
        pre(EncodedImage(jpeg, "image/png"))


def test_only_whitelisted_formats_open(photos: list[Any]) -> None:
    pre = ImagePreprocessor(CFG, LIMITS)
    im = photos[0].resize((64, 48))
    for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
        assert pre(_saved(im, fmt)).shape == (3, 224, 224), fmt
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n"  # Ghostscript would run this
    refused = {"EPS": eps, **{fmt: _saved(im, fmt) for fmt in ("ICO", "TGA", "PCX", "PPM", "SGI")}}
    for data in refused.values():
        with pytest.raises(BadImage, match="not an accepted image format"):
            pre(data)
        assert Image.open(io.BytesIO(data)).format  # Pillow itself would have opened it


def test_exif_orientation_is_applied(photos: list[Any]) -> None:
    """A phone photo stored sideways with Orientation=6 is classified upright (as HF's load_image does)."""
    photo = photos[0].convert("RGB")  # 640 x 427
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _saved(photo, "JPEG", quality=95, exif=exif.tobytes())
    pre = ImagePreprocessor(CFG, LIMITS)
    decoded = pre.decode(EncodedImage(data), 0)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert decoded.size == (427, 640) == upright.size
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(upright.convert("RGB")))
    plain = ImagePreprocessor(CFG, LIMITS).decode(EncodedImage(_saved(photo, "JPEG")), 0)
    assert plain.size == (640, 427)


def test_header_caps_refuse_before_decoding() -> None:
    pre = ImagePreprocessor(CFG, ImageLimits(16 << 20, 40_000_000, 16, max_aspect_ratio=32, max_decoded_bytes=64 << 20))
    strip = _saved(Image.new("1", (16, 1000)), "PNG")
    with pytest.raises(BadImage, match="aspect ratio"):
        pre(strip)
    big_rgba = _saved(Image.new("RGBA", (4500, 4000)), "PNG")  # 18 M pixels x 4 bytes = 68 MiB decoded
    with pytest.raises(ImageTooLarge, match="MiB"):
        pre(big_rgba)


def test_jpeg_draft_decodes_fewer_pixels_and_stays_close(photos: list[Any]) -> None:
    big = photos[0].convert("RGB").resize((1920, 1281), Image.Resampling.BICUBIC)
    data = jpeg_bytes(big, quality=95)
    exact = ImagePreprocessor(CFG, LIMITS, draft_factor=0)
    draft = ImagePreprocessor(CFG, LIMITS, draft_factor=2)
    assert exact.decode(EncodedImage(data), 0).size == (1920, 1281)
    assert draft.decode(EncodedImage(data), 0).size == (960, 641)  # 1/2 scale: short side >= 2 x 224
    diff = np.abs(exact(data) - draft(data))
    assert float(diff.mean()) < 2 / 255 / min(CFG.std), f"mean |diff| {diff.mean():.4f}"


HOSTILE = """
import io, json, resource
from PIL import Image
from models.backbone import PreprocessConfig
from service.images import ImageLimits, ImagePreprocessor
buf = io.BytesIO()
Image.new("1", (16, 2_400_000)).save(buf, "PNG")  # the red team's 7 KB strip
data = buf.getvalue()
del buf

def hwm_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")

cfg = PreprocessConfig(size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
pre = ImagePreprocessor(cfg, ImageLimits(1 << 24, 40_000_000, 16, max_aspect_ratio=1e9))
before = hwm_kib()
out = pre(data)
print(json.dumps({"bytes": len(data), "shape": list(out.shape), "peak_growth_mib": (hwm_kib() - before) / 1024}))
"""


@pytest.mark.slow
def test_aspect_amplification_is_bounded_even_without_the_cap() -> None:
    """The 16 x 2,400,000 1-bit PNG with the aspect cap lifted: the crop-first path stays small.

    Resizing the whole strip first took +3.7 GB; the decoded 1-bit bitmap itself is ~38 MB.
    A fresh interpreter, so the peak is this work's and no other test's.
    """
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", HOSTILE], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["bytes"] < 10_000 and out["shape"] == [3, 224, 224]
    assert out["peak_growth_mib"] < 100, out
