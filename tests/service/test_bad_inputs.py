"""Hostile and broken input: every case is a 4xx with a message, never a 500, and the server stays ready."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any

import pytest
from PIL import Image

from tests.service.conftest import jpeg_bytes, png_bytes

MiB = 1024 * 1024
JSON = {"content-type": "application/json"}


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (valid CRC, almost no data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat)) + b"IDAT" + idat + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
        + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    )  # fmt: skip


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, "PNG")  # 1e8 pixels in ~12 KB
    return buf.getvalue()


def _strip_png(width: int, height: int) -> bytes:
    """The red team's aspect-ratio amplifier: a real 1-bit PNG of a few KB (16 x 2,400,000: 7 KB)."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


def _saved(image: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto showpage\n%%EOF\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _upload(data: bytes, ctype: str = "image/png") -> dict[str, Any]:
    return {"files": [("files", ("x", data, ctype))]}


def _cases(photo: Any) -> list[tuple[str, str, dict[str, Any], tuple[int, ...]]]:
    jpeg = jpeg_bytes(photo)
    small = png_bytes(photo.resize((32, 32)))
    names_url = "/v1/label-sets/default/classes"
    return [
        ("garbage bytes", "/v1/classify", _upload(b"\x00\x01garbage" * 100), (422,)),
        ("truncated jpeg", "/v1/classify", _upload(jpeg[: len(jpeg) // 2], "image/jpeg"), (422,)),
        ("empty file", "/v1/classify", _upload(b""), (422,)),
        ("1x1 image", "/v1/classify", _upload(png_bytes(Image.new("RGB", (1, 1)))), (422,)),
        ("enormous dimensions", "/v1/classify", _upload(_png_claiming(100_000, 100_000)), (413,)),
        ("decompression bomb", "/v1/classify", _upload(_bomb()), (413,)),
        ("bomb as base64", "/v1/classify", {"json": {"images": [_b64(_bomb())]}}, (413,)),
        ("text file as image", "/v1/classify", _upload(b"hello, I am text", "text/plain"), (422,)),
        ("wrong content type", "/v1/classify", {"content": b"abc", "headers": {"content-type": "text/plain"}}, (415,)),
        ("no content type", "/v1/classify", {"content": b"abc"}, (415,)),
        ("xml", "/v1/classify", {"content": b"<a/>", "headers": {"content-type": "application/xml"}}, (415,)),
        ("invalid json", "/v1/classify", {"content": b"{nope", "headers": JSON}, (422,)),
        ("unknown json field", "/v1/classify", {"json": {"images": [_b64(small)], "bogus": 1}}, (422,)),
        ("no images", "/v1/classify", {"json": {"images": []}}, (422,)),
        ("images and inputs", "/v1/classify", {"json": {"images": [_b64(small)], "inputs": _b64(small)}}, (422,)),
        ("http url", "/v1/classify", {"json": {"images": ["http://169.254.169.254/latest/meta-data"]}}, (422,)),
        ("https url (HF)", "/v1/classify", {"json": {"inputs": "https://example.com/cat.jpg"}}, (422,)),
        ("bad base64", "/v1/classify", {"json": {"images": ["@@@not base64@@@"]}}, (422,)),
        ("data uri not base64", "/v1/classify", {"json": {"images": ["data:image/png,abc"]}}, (422,)),
        ("too many images", "/v1/classify", {"json": {"images": [_b64(small)] * 5}}, (422,)),
        ("top_k 0", "/v1/classify", {"json": {"images": [_b64(small)], "top_k": 0}}, (422,)),
        ("top_k huge", "/v1/classify", {"json": {"images": [_b64(small)], "top_k": 10**9}}, (422,)),
        ("top_k not a number", "/v1/classify", {"files": _upload(small)["files"], "data": {"top_k": "x"}}, (422,)),
        ("unknown label set", "/v1/classify", {"json": {"images": [_b64(small)], "label_set": "nope"}}, (404,)),
        ("empty candidate labels", "/v1/classify", {"json": {"images": [_b64(small)], "candidate_labels": []}}, (422,)),
        ("10k candidate labels", "/v1/classify",
         {"json": {"images": [_b64(small)], "candidate_labels": [f"l{i}" for i in range(10_000)]}}, (422,)),
        ("template without {}", "/v1/classify",
         {"json": {"images": [_b64(small)], "candidate_labels": ["a"], "hypothesis_template": "x"}}, (422,)),
        ("body over the cap", "/v1/classify", {"json": {"images": [_b64(b"\xff" * (2 * MiB))]}}, (413,)),
        ("image over the byte cap", "/v1/classify", _upload(b"\x89PNG" + b"\x00" * (MiB + 10)), (413,)),
        ("empty names", names_url, {"json": {"names": []}}, (422,)),
        ("10k names", names_url, {"json": {"names": [f"n{i}" for i in range(10_000)]}}, (422,)),
        ("blank name", names_url, {"json": {"names": ["   "]}}, (422,)),
        ("NUL in name", names_url, {"json": {"names": ["ca\x00t"]}}, (422,)),
        ("control char name", names_url, {"json": {"names": ["\x1b[31mred"]}}, (422,)),
        ("bidi override name", names_url, {"json": {"names": ["\u202egnp.exe"]}}, (422,)),
        ("zero-width-only name", names_url, {"json": {"names": ["\u200b\u200b"]}}, (422,)),
        ("lone surrogate name", names_url,
         {"content": b'{"names": ["\\ud800"]}', "headers": JSON}, (422,)),
        ("private-use name", names_url, {"json": {"names": ["\ue000"]}}, (422,)),
        ("overlong name", names_url, {"json": {"names": ["x" * 201]}}, (422,)),
        ("name not a string", names_url, {"json": {"names": [42]}}, (422,)),
        ("duplicate names", names_url, {"json": {"names": ["café", "cafe\u0301"]}}, (409,)),
        ("bad label-set name", "/v1/label-sets", {"json": {"name": "../etc", "names": ["a"]}}, (422,)),
        # issue 10: aspect amplification, plugin formats, strict top_k, data-URI types, text work
        ("16x2.4M 1-bit strip", "/v1/classify", _upload(_strip_png(16, 2_400_000)), (422,)),
        ("200000x16 strip as base64", "/v1/classify", {"json": {"images": [_b64(_strip_png(200_000, 16))]}}, (422,)),
        ("EPS (Ghostscript)", "/v1/classify", _upload(EPS, "application/postscript"), (422,)),
        ("ICO", "/v1/classify", _upload(_saved(photo.resize((32, 32)), "ICO"), "image/x-icon"), (422,)),
        ("TGA", "/v1/classify", _upload(_saved(photo.resize((32, 32)), "TGA")), (422,)),
        ("top_k true", "/v1/classify", {"json": {"images": [_b64(small)], "top_k": True}}, (422,)),
        ("top_k '3'", "/v1/classify", {"json": {"images": [_b64(small)], "top_k": "3"}}, (422,)),
        ("top_k 3.0", "/v1/classify", {"json": {"images": [_b64(small)], "top_k": 3.0}}, (422,)),
        ("HF top_k '3'", "/v1/classify",
         {"json": {"inputs": _b64(small), "parameters": {"candidate_labels": ["a"], "top_k": "3"}}}, (422,)),
        ("form top_k '+3'", "/v1/classify", {"files": _upload(small)["files"], "data": {"top_k": "+3"}}, (422,)),
        ("form top_k '3_0'", "/v1/classify", {"files": _upload(small)["files"], "data": {"top_k": "3_0"}}, (422,)),
        ("unknown_threshold true", "/v1/classify",
         {"json": {"images": [_b64(small)], "unknown_threshold": True}}, (422,)),
        ("data uri says png, bytes are jpeg", "/v1/classify",
         {"json": {"images": ["data:image/png;base64," + _b64(jpeg)]}}, (422,)),
        ("data uri text/plain", "/v1/classify",
         {"json": {"images": ["data:text/plain;base64," + _b64(small)]}}, (422,)),
        ("data uri image/svg+xml", "/v1/classify",
         {"json": {"images": ["data:image/svg+xml;base64," + _b64(b"<svg/>")]}}, (422,)),
        ("candidate prompts over the bound", "/v1/classify",
         {"json": {"images": [_b64(small)], "candidate_labels": [f"l{i}" for i in range(100)]}}, (422,)),
    ]  # fmt: skip


@pytest.fixture
def hostile_server(live: Any) -> Any:
    return live(max_request_bytes=2 * MiB, max_image_bytes=MiB, max_images_per_request=4, max_top_k=50)


def test_bad_inputs_get_4xx_with_a_message(hostile_server: Any, photos: list[Any]) -> None:
    failures = []
    with hostile_server as server, server.client() as http:
        for name, url, kwargs, statuses in _cases(photos[0]):
            resp = http.post(url, **kwargs)
            detail = (  # every refusal is an RFC 9457 problem (service/errors.py)
                resp.json().get("detail") if resp.headers.get("content-type") == "application/problem+json" else None
            )
            if resp.status_code not in statuses or not detail:
                failures.append(f"{name}: {resp.status_code} {resp.text[:200]}")
        assert http.get("/readyz").status_code == 200
        odd_but_fine = http.post("/v1/label-sets/default/classes", json={"names": ["café 猫", "🐈‍⬛ black cat"]})
        assert odd_but_fine.status_code == 201, odd_but_fine.text
    assert not failures, "\n".join(failures)
