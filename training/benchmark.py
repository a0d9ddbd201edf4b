"""A labeled benchmark (train / test, class names) from a :class:`DataCfg`, ready for base-to-novel.

:func:`load_benchmark` turns any data source into a :class:`Benchmark`, which hands out the
datasets every method needs: k-shot base training sets, the unlabeled train split, and base /
novel test sets relabelled within their subset.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from training.config import DataCfg
from training.data import (
    BaseNovelSplit,
    DataError,
    ImageRecord,
    InMemoryDataset,
    RecordDataset,
    Subset,
    Transform,
    UnlabeledImageFolder,
    check_label_ids,
    class_names_of,
    coop_split_records,
    csv_records,
    few_shot_indices,
    image_folder_records,
    load_digits_images,
    read_folder_names,
    scan_images,
)
from training.variants import FASHION_MNIST_NAMES, fashion_mnist_split, imagenet_variant_records

Item = ImageRecord | Image.Image
Part = Literal["train", "test"]


@dataclass
class Benchmark:
    """Labeled train and test items over ``class_names`` (index = label id)."""

    class_names: list[str]
    train_items: list[Item]
    train_labels: list[int]
    test_items: list[Item]
    test_labels: list[int]
    unlabeled_root: Path | None = None
    # ImageNet variants: class i is class source_ids[i] of ImageNet (the A/R 200-class mapping)
    source_ids: list[int] | None = None
    source_size: int | None = None  # number of classes of the source (ImageNet: 1000)

    def __post_init__(self) -> None:
        check_label_ids(self.train_labels + self.test_labels, len(self.class_names))
        self.split = BaseNovelSplit(tuple(range(len(self.class_names))))

    @property
    def n_base(self) -> int:
        return self.split.m

    def names(self, subset: Subset) -> list[str]:
        """Class names of a subset in relabelled order (base: ids [0, m), new: [m, N))."""
        return [self.class_names[i] for i in self.split.ids(subset)]

    def rows(self, subset: Subset) -> slice:
        """Rows of an all-class matrix (base then novel) that belong to ``subset``."""
        return {"base": slice(0, self.n_base), "new": slice(self.n_base, None), "all": slice(None)}[subset]

    def dataset(self, part: Part, subset: Subset, transform: Transform, shots: int = 0, seed: int = 1) -> Dataset[Any]:
        """Items of ``part`` in ``subset`` with relabelled ids; ``shots`` > 0 samples k per class."""
        items = self.train_items if part == "train" else self.test_items
        labels = self.train_labels if part == "train" else self.test_labels
        idx, new = self.split.select(labels, subset)
        if shots > 0:
            keep = few_shot_indices(new, shots, seed)
            idx, new = [idx[i] for i in keep], [new[i] for i in keep]
        return _make([items[i] for i in idx], new, transform)

    def unlabeled(self, transform: Transform) -> Dataset[Any]:
        """The whole train split (all classes, labels replaced by -1) plus ``unlabeled_root``."""
        parts: list[Dataset[Any]] = [_make(self.train_items, [-1] * len(self.train_items), transform)]
        if self.unlabeled_root is not None:
            parts.append(UnlabeledImageFolder(self.unlabeled_root, transform))
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _make(items: Sequence[Item], labels: Sequence[int], transform: Transform) -> Dataset[Any]:
    if not items:
        raise DataError("no images selected (check the split, the subset and the shots)")
    if isinstance(items[0], ImageRecord):
        recs = [ImageRecord(r.path, y, r.classname) for r, y in zip(items, labels, strict=True)]  # type: ignore[union-attr]
        return RecordDataset(recs, transform)
    return InMemoryDataset(items, labels, transform)  # type: ignore[arg-type]


def _from_records(train: list[ImageRecord], test: list[ImageRecord], cfg: DataCfg) -> Benchmark:
    if cfg.check_images:
        train, _ = scan_images(train)
        test, _ = scan_images(test)
    names = class_names_of(train + test)
    return Benchmark(
        names, list(train), [r.label for r in train], list(test), [r.label for r in test], cfg.unlabeled_root
    )


def digits_benchmark(size: int, test_fraction: float = 0.3, seed: int = 0) -> Benchmark:
    """scikit-learn digits (real handwritten 8x8 images) upscaled to ``size``; stratified split."""
    images, labels, names = load_digits_images(size)
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    train_idx, test_idx = [], []
    for y in sorted(by_class):
        pool = list(by_class[y])
        rng.shuffle(pool)
        cut = round(len(pool) * test_fraction)
        test_idx += pool[:cut]
        train_idx += pool[cut:]
    train_idx.sort()
    test_idx.sort()
    return Benchmark(
        names,
        [images[i] for i in train_idx],
        [labels[i] for i in train_idx],
        [images[i] for i in test_idx],
        [labels[i] for i in test_idx],
    )


def load_benchmark(cfg: DataCfg, image_size: int = 224) -> Benchmark:
    """Build the benchmark a :class:`DataCfg` describes (``image_size``: in-memory sources only)."""
    if cfg.kind == "digits":
        bench = digits_benchmark(image_size, cfg.digits_test_fraction)
        bench.unlabeled_root = cfg.unlabeled_root
        return bench
    if cfg.kind == "image_folder":
        assert cfg.root is not None
        # ImageNet: "n01440764 tench" lines map folder names (as on disk) to class names
        rename = read_folder_names(cfg.classnames_file) if cfg.classnames_file is not None else None
        train, names = image_folder_records(cfg.root / "train", rename)
        test, test_names = image_folder_records(cfg.root / "test", rename)
        if test_names != names:
            raise DataError(f"{cfg.root}: train and test class folders differ")
        return _from_records(train, test, cfg)
    if cfg.kind == "imagenet_variant":
        assert cfg.root is not None and cfg.classnames_file is not None and cfg.variant is not None
        records, names, source_ids = imagenet_variant_records(cfg.root, cfg.variant, cfg.classnames_file)
        if cfg.check_images:
            records, _ = scan_images(records)
        labels = [r.label for r in records]
        n_source = len(read_folder_names(cfg.classnames_file))
        return Benchmark(names, [], [], list(records), labels, cfg.unlabeled_root, source_ids, n_source)
    if cfg.kind == "fashion_mnist":
        assert cfg.root is not None
        train_x, train_y = fashion_mnist_split(cfg.root, "train", image_size, cfg.subsample_train)
        test_x, test_y = fashion_mnist_split(cfg.root, "t10k", image_size, cfg.subsample_test)
        return Benchmark(list(FASHION_MNIST_NAMES), train_x, train_y, test_x, test_y, cfg.unlabeled_root)  # type: ignore[arg-type]
    if cfg.kind == "coop_split":
        assert cfg.root is not None and cfg.split_file is not None
        split = coop_split_records(cfg.split_file, cfg.root)
        return _from_records(split["train"], split["test"], cfg)
    assert cfg.train_csv is not None and cfg.test_csv is not None
    names_list = cfg.classnames_file.read_text().splitlines() if cfg.classnames_file else None
    train = csv_records(cfg.train_csv, cfg.root, names_list)
    test = csv_records(cfg.test_csv, cfg.root, names_list)
    return _from_records(train, test, cfg)
