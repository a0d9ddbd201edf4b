"""Datasets for prompt tuning and distillation: records, splits, samplers, transforms.

Everything labeled is a list of :class:`ImageRecord` (path, label id, class name) so every source
(image folders, CoOp split JSON, CSV) goes through the same base/novel split and k-shot sampler.
In-memory images (scikit-learn digits, used by the demo and the tests) use :class:`InMemoryDataset`.

Base/novel protocol (CoCoOp, algorithms.md §0): sort the label ids, ``m = ceil(N/2)``; the first
``m`` ids are base, the rest novel; each subset is relabelled to ``0..size-1`` in id order.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import models  # noqa: F401  (fixes the torchvision import before it happens)
from models.backbone import PreprocessConfig
from models.class_vectors import class_name

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
Subset = Literal["base", "new", "all"]
Transform = Callable[[Image.Image], torch.Tensor]


class DataError(ValueError):
    """A dataset cannot be built; the message names the file or folder and what to fix."""


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int
    classname: str


# ----------------------------------------------------------------------------------------------
# Sources


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS


def prompt_name(name: str) -> str:
    """A class name as it goes into a prompt: :func:`models.class_vectors.class_name`, the same
    normalisation the service applies to names it is sent ("apple_pie" is "apple pie")."""
    return class_name(name)


def image_folder_records(
    root: str | Path, rename: Mapping[str, str] | None = None
) -> tuple[list[ImageRecord], list[str]]:
    """``root/<class>/<image>`` -> records; classes sorted by folder name get ids ``0..N-1``.

    Names are the folder names (``_`` -> space) or, with ``rename``, ``rename[folder]``; the mapping
    is keyed by the folder name exactly as on disk (ImageNet's ``n01440764``, ``ankle_boot``).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders (expected root/<class>/<image>)")
    if rename is not None:
        missing = [c for c in classes if c not in rename]
        if missing:
            raise DataError(f"{root}: the class-name mapping has no name for folders {missing[:5]}")
    names = [prompt_name(rename[c] if rename is not None else c) for c in classes]
    records: list[ImageRecord] = []
    for label, folder in enumerate(classes):
        files = sorted(p for p in (root / folder).rglob("*") if _is_image(p))
        if not files:
            raise DataError(f"class folder {root / folder} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
        records += [ImageRecord(p, label, names[label]) for p in files]
    return records, names


def read_folder_names(path: str | Path) -> dict[str, str]:
    """``"<folder> <class name>"`` lines (CoOp's ImageNet classnames.txt) -> {folder: name}."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class-name file {path} does not exist")
    out: dict[str, str] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        folder, sep, name = line.strip().partition(" ")
        if not sep or not name.strip():
            raise DataError(f"{path}:{i}: expected '<folder> <class name>', got {line!r}")
        out[folder] = name.strip()
    return out


def coop_split_records(split_file: str | Path, image_root: str | Path) -> dict[str, list[ImageRecord]]:
    """CoOp split JSON ``{"train"|"val"|"test": [[relative_path, label, classname], ...]}``."""
    split_file, image_root = Path(split_file), Path(image_root)
    if not split_file.is_file():
        raise DataError(f"split file {split_file} does not exist")
    raw = json.loads(split_file.read_text())
    out: dict[str, list[ImageRecord]] = {}
    for part in ("train", "val", "test"):
        items = raw.get(part, [])
        recs = []
        for i, item in enumerate(items):
            if not (isinstance(item, list | tuple) and len(item) == 3):
                raise DataError(f"{split_file}: {part}[{i}] must be [relative_path, label, classname], got {item!r}")
            recs.append(ImageRecord(image_root / item[0], int(item[1]), prompt_name(str(item[2]))))
        out[part] = recs
    if not out["train"] and not out["test"]:
        raise DataError(f"split file {split_file} has empty train and test lists")
    return out


def csv_records(
    csv_file: str | Path, image_root: str | Path | None = None, classnames: Sequence[str] | None = None
) -> list[ImageRecord]:
    """CSV with a header ``path,label`` (optional ``classname`` column); paths relative to ``image_root``."""
    csv_file = Path(csv_file)
    if not csv_file.is_file():
        raise DataError(f"CSV file {csv_file} does not exist")
    root = Path(image_root) if image_root is not None else csv_file.parent
    records = []
    with csv_file.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise DataError(f"{csv_file}: header must contain 'path' and 'label' columns, got {reader.fieldnames}")
        for row in reader:
            label = int(row["label"])
            name = row.get("classname") or (
                classnames[label] if classnames and 0 <= label < len(classnames) else str(label)
            )
            records.append(ImageRecord(root / row["path"], label, prompt_name(name)))
    if not records:
        raise DataError(f"CSV file {csv_file} lists no images")
    return records


def class_names_of(records: Sequence[ImageRecord]) -> list[str]:
    """Class names indexed by label id (ids must be 0..N-1 without gaps)."""
    names: dict[int, str] = {}
    for r in records:
        names.setdefault(r.label, r.classname)
    check_label_ids(list(names), len(names))
    return [names[i] for i in range(len(names))]


def check_label_ids(labels: Sequence[int], n_classes: int) -> None:
    """Raise :class:`DataError` if any label id is outside ``0..n_classes-1``."""
    bad = sorted({int(x) for x in labels if not 0 <= int(x) < n_classes})
    if bad:
        raise DataError(f"label ids {bad[:10]} are out of range 0..{n_classes - 1} ({n_classes} classes)")


# ----------------------------------------------------------------------------------------------
# Base / novel split and k-shot sampling


@dataclass(frozen=True)
class BaseNovelSplit:
    """The CoCoOp split over sorted label ids: ids[:m] base, ids[m:] novel, m = ceil(N/2)."""

    label_ids: tuple[int, ...]  # sorted unique ids

    @classmethod
    def from_labels(cls, labels: Sequence[int]) -> BaseNovelSplit:
        ids = tuple(sorted({int(x) for x in labels}))
        if not ids:
            raise DataError("no labels to split")
        return cls(ids)

    @property
    def m(self) -> int:
        return math.ceil(len(self.label_ids) / 2)

    def ids(self, subset: Subset) -> tuple[int, ...]:
        if subset == "base":
            return self.label_ids[: self.m]
        if subset == "new":
            return self.label_ids[self.m :]
        if subset == "all":
            return self.label_ids
        raise ValueError(f"subset must be 'base', 'new' or 'all', got {subset!r}")

    def relabel(self, subset: Subset) -> dict[int, int]:
        """Original id -> new id (0..size-1, in sorted-id order) for the subset's classes."""
        return {old: new for new, old in enumerate(self.ids(subset))}

    def select(self, labels: Sequence[int], subset: Subset) -> tuple[list[int], list[int]]:
        """(indices of samples whose label is in the subset, their relabelled ids)."""
        mapping = self.relabel(subset)
        idx = [i for i, y in enumerate(labels) if int(y) in mapping]
        return idx, [mapping[int(labels[i])] for i in idx]


def subsample_classes(
    records: Sequence[ImageRecord], subset: Subset, split: BaseNovelSplit | None = None
) -> list[ImageRecord]:
    """Keep the subset's classes and relabel them (``split`` defaults to the records' own labels)."""
    split = split or BaseNovelSplit.from_labels([r.label for r in records])
    idx, new = split.select([r.label for r in records], subset)
    return [ImageRecord(records[i].path, y, records[i].classname) for i, y in zip(idx, new, strict=True)]


def few_shot_indices(labels: Sequence[int], k: int, seed: int) -> list[int]:
    """k indices per class, seeded; classes with fewer than k samples keep all of theirs (sorted)."""
    if k <= 0:
        return list(range(len(labels)))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for y in sorted(by_class):
        pool = by_class[y]
        chosen += pool if len(pool) <= k else rng.sample(pool, k)
    return sorted(chosen)


def few_shot(records: Sequence[ImageRecord], k: int, seed: int) -> list[ImageRecord]:
    """Seeded k-shot subset of labeled records (k <= 0: all)."""
    return [records[i] for i in few_shot_indices([r.label for r in records], k, seed)]


# ----------------------------------------------------------------------------------------------
# Datasets


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def scan_images(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[Path]]:
    """Open every image once; returns (readable records, unreadable paths)."""
    good, bad = [], []
    for r in records:
        try:
            with Image.open(r.path) as im:
                im.verify()
            good.append(r)
        except (OSError, SyntaxError, ValueError):
            bad.append(r.path)
    if bad:
        log.warning("skipped %d unreadable images (first: %s)", len(bad), bad[0])
    return good, bad


class RecordDataset(Dataset[tuple[torch.Tensor, int]]):
    """(transformed image, label) from records. An unreadable image is skipped and counted.

    The skip is deterministic (the next readable record is returned), so a bad file neither stops
    a 20-epoch run nor changes the batch size. Use :func:`scan_images` to drop them up front.
    """

    def __init__(self, records: Sequence[ImageRecord], transform: Transform, n_classes: int | None = None) -> None:
        if not records:
            raise DataError("dataset is empty")
        self.records = list(records)
        if n_classes is not None:
            check_label_ids([r.label for r in self.records], n_classes)
        self.transform = transform
        self.unreadable: set[Path] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for step in range(len(self.records)):
            r = self.records[(index + step) % len(self.records)]
            if r.path in self.unreadable:
                continue
            try:
                return self.transform(_load_rgb(r.path)), r.label
            except (OSError, SyntaxError, ValueError) as e:
                self.unreadable.add(r.path)
                log.warning("skipping unreadable image %s (%s); %d skipped so far", r.path, e, len(self.unreadable))
        raise DataError("no readable image in the dataset")


class UnlabeledImageFolder(Dataset[tuple[torch.Tensor, int]]):
    """Every image under ``root`` (recursive, sorted); label is -1 (never used)."""

    def __init__(self, root: str | Path, transform: Transform) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"unlabeled image folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if _is_image(p))
        if not files:
            raise DataError(f"unlabeled image folder {root} holds no images")
        self.inner = RecordDataset([ImageRecord(p, -1, "") for p in files], transform)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inner[index]


@dataclass(frozen=True)
class CaptureSet:
    """The training part of a service's capture folder (models/captures.py) that one run reads.

    The folder keeps growing while a run trains (the service writes on), so a run fixes its list at
    its start (``listing``, one ``<sha[:2]>/<sha>.jpg`` a line, in its output folder) and a resumed run
    reads that list again: resuming gives the same images, hence the same weights. The held-out tenth
    is never listed. Foreign files (another shape of name) and damaged captures (the name of a capture,
    but not a readable image) are skipped, counted and logged on one line each.
    """

    folder: Path
    paths: list[Path]
    held_out: int
    foreign: list[Path]
    damaged: list[Path]
    resumed: bool

    def dataset(self, transform: Transform) -> Dataset[tuple[torch.Tensor, int]]:
        return RecordDataset([ImageRecord(p, -1, "") for p in self.paths], transform)

    def summary(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "images": len(self.paths), "held_out_not_read": self.held_out,
                "foreign_skipped": len(self.foreign), "damaged_skipped": len(self.damaged),
                "list_reused_on_resume": self.resumed}  # fmt: skip


def readable_image(path: Path) -> bool:
    """Whether ``path`` decodes as an image (all of it read; a JPEG decoded at a fraction of its size)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # a JPEG decodes at a fraction of its size: every byte still read
            im.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def capture_set(folder: str | Path, listing: Path, reuse: bool) -> CaptureSet:
    """The capture folder's training images for one run (see :class:`CaptureSet`); ``reuse``: a resumed
    run reads ``listing`` as its first start wrote it. Raises :class:`DataError` (one line) when the
    folder is missing or holds no readable capture."""
    from models.captures import capture_images, foreign_files, is_capture_name, is_held_out, scan
    from models.staging import staged_file

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"capture folder {folder} does not exist (data.capture_dir)")
    held_out = sum(1 for k in scan(folder) if is_held_out(k.sha256))
    if reuse and listing.is_file():
        names = [n for n in listing.read_text().splitlines() if n]
        bad = [n for n in names if not is_capture_name(n) or is_held_out(n.split("/")[1])]
        if bad:
            raise DataError(f"{listing}: {len(bad)} lines are not training captures (first: {bad[0]!r})")
        log.info("capture folder %s: resuming with the %d images listed in %s", folder, len(names), listing)
        return CaptureSet(folder, [folder / n for n in names], held_out, [], [], True)
    if reuse:
        log.warning("%s is missing: the resumed run reads the capture folder as it is now", listing)
    foreign = foreign_files(folder)
    paths: list[Path] = []
    damaged: list[Path] = []
    for p in capture_images(folder, held_out=False):
        (paths if readable_image(p) else damaged).append(p)
    if foreign:
        log.warning("capture folder %s: skipped %d foreign files, not <sha[:2]>/<sha>.jpg (first: %s)",
                    folder, len(foreign), foreign[0])  # fmt: skip
    if damaged:
        log.warning("capture folder %s: skipped %d damaged captures, not readable images (first: %s)",
                    folder, len(damaged), damaged[0])  # fmt: skip
    if not paths:
        raise DataError(
            f"capture folder {folder} holds no readable capture outside its held-out tenth ({held_out} held out, "
            f"{len(foreign)} foreign files, {len(damaged)} damaged); captures are <sha[:2]>/<sha>.jpg as "
            "`promptdistill serve` writes them (a plain image folder goes in data.unlabeled_root)"
        )
    with staged_file(listing) as tmp:
        tmp.write_text("".join(p.relative_to(folder).as_posix() + "\n" for p in paths))
    log.info("capture folder %s: %d training images (%d held out, never read)", folder, len(paths), held_out)
    return CaptureSet(folder, paths, held_out, foreign, damaged, False)


class InMemoryDataset(Dataset[tuple[torch.Tensor, int]]):
    """(transformed PIL image, label) from images held in memory."""

    def __init__(self, images: Sequence[Image.Image], labels: Sequence[int], transform: Transform) -> None:
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        if not images:
            raise DataError("dataset is empty")
        self.images, self.labels, self.transform = list(images), [int(y) for y in labels], transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]

    def subset(
        self, indices: Sequence[int], labels: Sequence[int] | None = None, transform: Transform | None = None
    ) -> InMemoryDataset:
        """A view on some items, optionally relabelled / with another transform."""
        ys = list(labels) if labels is not None else [self.labels[i] for i in indices]
        return InMemoryDataset([self.images[i] for i in indices], ys, transform or self.transform)


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def load_digits_images(size: int = 64) -> tuple[list[Image.Image], list[int], list[str]]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as RGB PIL images upscaled to ``size``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for arr in digits.images:  # [8, 8] values 0..16, ink bright on dark
        pix = (np.asarray(arr, dtype=np.float32) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        images.append(Image.fromarray(pix, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))
    return images, [int(y) for y in digits.target], list(DIGIT_NAMES)


# ----------------------------------------------------------------------------------------------
# Transforms


def build_transform(cfg: PreprocessConfig, train: bool, *, min_scale: float = 0.08, hflip: bool = True) -> Any:
    """The papers' transforms for a backbone's preprocess config (torchvision).

    train: RandomResizedCrop(size, scale=(0.08, 1)) + horizontal flip; test: resize the short
    side to the input size + center crop. Both bicubic (per ``cfg``) with the backbone's mean/std.
    """
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    interp = InterpolationMode(cfg.interpolation)
    norm = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(cfg.size, scale=(min_scale, 1.0), interpolation=interp),
                *([T.RandomHorizontalFlip()] if hflip else []),
                *norm,
            ]
        )
    return T.Compose([T.Resize(min(cfg.size), interpolation=interp), T.CenterCrop(cfg.size), *norm])
