"""Opt-in capture of classified images: the unlabeled in-domain data re-distillation learns from.

Off unless ``capture_dir`` is set. Then a ``capture_rate`` fraction of the images of successful
classify requests is kept, unless the request says ``"capture": false`` (then nothing of it is
kept). Kept images are re-encoded (RGB JPEG, long side at most ``MAX_SIDE``: no original bytes,
no metadata) off the request path, on one background thread with a bounded queue (full: the image
is skipped, never waited for), and written atomically (a temporary file renamed into place) under
``<capture_dir>/<sha[:2]>/<sha>.jpg``, ``sha`` being the SHA-256 of the uploaded bytes: the same image
sent twice is kept once, and many replicas can share one folder (a mounted volume).

Caps: ``capture_max_images`` and ``capture_max_bytes`` (capture pauses at either), and
``capture_retention_days`` (older files are deleted at start-up and then hourly). A full disk, an
unwritable folder or any other write error never fails a classify request: capture stops, and
``/readyz`` (``checks.capture``, informational) and ``promptdistill_capture_*`` metrics say why.
``promptdistill captures list | export | delete`` manages the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import queue
import random
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from models.captures import SUFFIX, Kept, scan
from service.errors import ServiceError
from service.images import EncodedImage, decode_base64_image

log = logging.getLogger(__name__)
MAX_SIDE = 512  # long side of a kept image (distillation trains at 224; room for crops)
QUALITY = 90
QUEUE = 64  # sampled images waiting to be written at most (then further samples are skipped)
SWEEP_S = 3600.0  # retention sweep interval


@dataclass(frozen=True)
class CaptureCfg:
    folder: Path
    rate: float
    max_images: int
    max_bytes: int
    retention_days: float
    max_image_bytes: int  # an upload's byte limit (base64 fields are decoded with it)


def reencode(data: bytes) -> bytes:
    """The kept form of an image: RGB JPEG, EXIF orientation applied, long side <= MAX_SIDE, no metadata."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (MAX_SIDE, MAX_SIDE))
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    rgb.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=QUALITY)
    return out.getvalue()


class Capture:
    """Samples, re-encodes and writes classified images; every failure stops it, none reaches a request."""

    def __init__(self, cfg: CaptureCfg | None) -> None:
        self.cfg = cfg
        self.problem: str | None = None
        self.kept = self.bytes = self.skipped = self.errors = 0
        self._queue: queue.Queue[EncodedImage | str | None] = queue.Queue(QUEUE)
        self._thread: threading.Thread | None = None
        self._next_sweep = 0.0

    @property
    def active(self) -> bool:
        return self.cfg is not None and self.problem is None

    def start(self) -> None:
        if self.cfg is None:
            log.info("capture: off (set PROMPTDISTILL_CAPTURE_DIR to keep a sample of classified images)")
            return
        c = self.cfg
        try:
            c.folder.mkdir(parents=True, exist_ok=True)
            self._sweep()
            for k in scan(c.folder):
                self.kept, self.bytes = self.kept + 1, self.bytes + k.size
        except OSError as e:
            self._stop(f"cannot use {c.folder}: {e.strerror or e}")
        log.info(
            "capture: ON into %s, %.0f%% of classified images (opt out per request with \"capture\": false), "
            "at most %d images / %d MiB, kept %g days; holds %d images now",
            c.folder, 100 * c.rate, c.max_images, c.max_bytes // 2**20, c.retention_days, self.kept,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)

    def offer(self, images: Sequence[EncodedImage | str]) -> None:
        """Called after a successful classify that did not opt out; never blocks, never raises."""
        if not self.active:
            return
        assert self.cfg is not None
        for image in images:
            if random.random() >= self.cfg.rate:
                continue
            try:
                self._queue.put_nowait(image)
            except queue.Full:
                self.skipped += 1

    def status(self) -> str:
        if self.cfg is None:
            return "off"
        state = f"stopped: {self.problem}" if self.problem else "on"
        return f"{state} ({self.kept} images, {self.bytes // 2**20} MiB in {self.cfg.folder})"

    def _run(self) -> None:
        while (image := self._queue.get()) is not None:
            if self.active:
                self._keep(image)

    def _keep(self, image: EncodedImage | str) -> None:
        assert self.cfg is not None
        c = self.cfg
        try:
            raw = image if isinstance(image, EncodedImage) else decode_base64_image(image, 0, c.max_image_bytes)
            sha = hashlib.sha256(raw.data).hexdigest()
            path = c.folder / sha[:2] / (sha + SUFFIX)
            if path.exists():
                os.utime(path)  # seen again: its retention starts over
                return
            if self.kept >= c.max_images or self.bytes >= c.max_bytes:
                self._stop(f"full: {self.kept} images / {self.bytes // 2**20} MiB reach the capture caps")
                return
            data = reencode(raw.data)
            path.parent.mkdir(exist_ok=True)
            tmp = path.parent / f".{sha}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: a reader sees the whole file or none
            self.kept, self.bytes = self.kept + 1, self.bytes + len(data)
            if time.monotonic() >= self._next_sweep:
                self._sweep()
        except OSError as e:  # a full disk, a read-only or vanished folder: stop, say why
            self.errors += 1
            self._stop(f"write failed in {c.folder}: {e.strerror or e}")
        except (ServiceError, ValueError, Image.DecompressionBombError) as e:
            self.errors += 1  # an image the classifier accepted but PIL cannot re-read: skip it
            log.debug("capture skipped an image: %s", e)

    def _sweep(self) -> None:
        assert self.cfg is not None
        self._next_sweep = time.monotonic() + SWEEP_S
        cutoff = time.time() - self.cfg.retention_days * 86400
        for k in scan(self.cfg.folder):
            if k.mtime < cutoff:
                k.path.unlink(missing_ok=True)
                self.kept, self.bytes = max(0, self.kept - 1), max(0, self.bytes - k.size)

    def _stop(self, why: str) -> None:
        if self.problem is None:
            log.error("capture stopped (classification goes on): %s", why)
        self.problem = why


# ----------------------------------------------------------------- CLI
def register(sub: Any) -> None:
    p = sub.add_parser("captures", help="list, export or delete the images a service captured")
    csub = p.add_subparsers(dest="captures_cmd", required=True)
    for name, helptext in (
        ("list", "count, size and age of the kept images (--json: one line per image)"),
        ("export", "copy the kept images into a folder (an unlabeled image folder for train distill)"),
        ("delete", "delete kept images by age (--older-than DAYS) or by hash (--hash SHA, repeatable)"),
    ):
        c = csub.add_parser(name, help=helptext)
        c.add_argument("--dir", required=True, help="the capture folder (PROMPTDISTILL_CAPTURE_DIR of the service)")
        c.add_argument("--older-than", type=float, metavar="DAYS", help="only images older than this")
        c.add_argument("--hash", action="append", default=[], help="only this image (sha256; repeatable)")
        if name == "list":
            c.add_argument("--json", action="store_true")
        if name == "export":
            c.add_argument("out", help="folder to copy into (created)")
        c.set_defaults(func=_cli, captures_cmd=name)


def _select(args: argparse.Namespace) -> list[Kept]:
    cutoff = time.time() - args.older_than * 86400 if args.older_than is not None else None
    wanted = {h.lower() for h in args.hash}
    return [
        k for k in scan(Path(args.dir)) if (cutoff is None or k.mtime < cutoff) and (not wanted or k.sha256 in wanted)
    ]


def _cli(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        print(f"promptdistill captures: error: {folder} is not a folder", file=sys.stderr)  # noqa: T201
        return 2
    if args.captures_cmd == "delete" and args.older_than is None and not args.hash:
        print("promptdistill captures: error: say what to delete: --older-than DAYS or --hash SHA", file=sys.stderr)  # noqa: T201
        return 2
    chosen = _select(args)
    if args.captures_cmd == "list":
        if args.json:
            for k in chosen:
                print(json.dumps({"sha256": k.sha256, "bytes": k.size, "mtime": k.mtime}))  # noqa: T201
        else:
            ages = [(time.time() - k.mtime) / 86400 for k in chosen]
            summary = {"images": len(chosen), "bytes": sum(k.size for k in chosen),
                       "oldest_days": round(max(ages), 2) if ages else None}  # fmt: skip
            print(json.dumps(summary))  # noqa: T201
    elif args.captures_cmd == "export":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for k in chosen:
            shutil.copyfile(k.path, out / k.path.name)
        print(json.dumps({"exported": len(chosen), "to": str(out)}))  # noqa: T201
    else:
        for k in chosen:
            k.path.unlink(missing_ok=True)
        print(json.dumps({"deleted": len(chosen)}))  # noqa: T201
    return 0
