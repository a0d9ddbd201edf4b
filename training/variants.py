"""Test-only ImageNet variants (domain generalisation) and Fashion-MNIST (an offline benchmark).

ImageNet variants are read the way CoOp's dataset classes (used unchanged by PromptSRC and
PromptKD) read them; class names come from ImageNet's ``classnames.txt`` (``<wnid> <name>``
lines in ImageNet label order):

* ``v2`` (imagenetv2-matched-frequency-format-val): folders ``0`` .. ``999``; folder ``i`` is
  ImageNet class ``i`` (the i-th line of classnames.txt). 1000 classes.
* ``sketch`` (ImageNet-Sketch ``images/``): one folder per wnid, all 1000, sorted.
* ``a`` (ImageNet-A) and ``r`` (ImageNet-R): one folder per wnid for their **200** classes; labels
  are the folders in sorted order, and the index mapping into ImageNet's 1000 is each folder's
  line in classnames.txt (the official code keeps ``[wnid in folders for wnid in classnames]``).

Every variant records that mapping as ``Benchmark.source_ids`` (class i of the variant = row
``source_ids[i]`` of an ImageNet classifier), so an ImageNet bundle is evaluated on exactly its
own rows for those classes.

Fashion-MNIST: the four gzipped IDX files of Debian's ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``, 60,000 train / 10,000 test 28x28 grey images, 10 classes).
"""

from __future__ import annotations

import gzip
import logging
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import DataError, ImageRecord, image_folder_records, prompt_name, read_folder_names

log = logging.getLogger(__name__)

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
# label order of the dataset (its README); "T-shirt/top" keeps its slash, as in the README
FASHION_MNIST_NAMES = [
    "T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]  # fmt: skip


def imagenet_variant_records(
    root: str | Path, variant: str, classnames_file: str | Path
) -> tuple[list[ImageRecord], list[str], list[int]]:
    """(records, class names, source_ids into ImageNet's 1000) of a test-only ImageNet variant."""
    root = Path(root)
    folders = read_folder_names(classnames_file)  # wnid -> name, in ImageNet label order
    wnids = list(folders)
    if variant == "v2":
        rename = {str(i): folders[w] for i, w in enumerate(wnids)}
        present = sorted((d.name for d in root.iterdir() if d.is_dir()), key=lambda n: int(n) if n.isdigit() else -1)
        if present != [str(i) for i in range(len(wnids))]:
            raise DataError(f"{root}: ImageNet-V2 needs folders 0..{len(wnids) - 1} (the matched-frequency format)")
        records, _ = image_folder_records(root, rename)
        # image_folder_records sorts folder names as strings ("10" < "2"): relabel to the numeric id
        records = [ImageRecord(r.path, int(r.path.relative_to(root).parts[0]), r.classname) for r in records]
        names = [prompt_name(folders[w]) for w in wnids]
        return records, names, list(range(len(wnids)))
    if variant not in ("sketch", "a", "r"):
        raise DataError(f"unknown ImageNet variant {variant!r} (v2, sketch, a, r)")
    records, names = image_folder_records(root, folders)
    present = sorted(d.name for d in root.iterdir() if d.is_dir())
    unknown = [f for f in present if f not in folders]
    if unknown:
        raise DataError(f"{root}: folders {unknown[:5]} are not ImageNet wnids of {classnames_file}")
    expected = {"sketch": len(wnids), "a": 200, "r": 200}[variant]
    if len(present) != expected:  # a partial copy still evaluates, on the classes it has
        log.warning("%s: ImageNet-%s has %d class folders, found %d", root, variant.upper(), expected, len(present))
    index = {w: i for i, w in enumerate(wnids)}
    return records, names, [index[f] for f in present]


def _read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file (big-endian magic: 0x0000 0x08 ndim, then the dims) as a uint8 array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: {arr.size} values for shape {dims}")
    return arr.reshape(dims)


def fashion_mnist_split(
    root: str | Path, part: str, size: int, per_class: int | None = None, seed: int = 0
) -> tuple[list[Image.Image], list[int]]:
    """One split (``train`` / ``t10k``) as RGB PIL images resized to ``size``; optionally a seeded
    subsample of ``per_class`` images per class (the same images for every method and seed)."""
    root = Path(root)
    files = [root / f"{part}-images-idx3-ubyte.gz", root / f"{part}-labels-idx1-ubyte.gz"]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST files {missing} are missing (apt-get install dataset-fashion-mnist)")
    stamp = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    images, labels = _split(stamp, size, per_class, seed)
    return list(images), list(labels)


@lru_cache(maxsize=4)
def _split(
    stamp: tuple[tuple[str, int, int], ...], size: int, per_class: int | None, seed: int
) -> tuple[tuple[Image.Image, ...], tuple[int, ...]]:
    """The decoded, resized split, kept in memory: every run of an experiment reads the same split
    (60,000 images take seconds to decode and resize); keyed by the files' path, mtime and size."""
    images, labels = _read_idx(Path(stamp[0][0])), _read_idx(Path(stamp[1][0]))
    if len(images) != len(labels):
        raise DataError(f"{stamp[0][0]}: {len(images)} images but {len(labels)} labels")
    idx = list(range(len(labels)))
    if per_class is not None:
        random.Random(seed).shuffle(idx)
        taken: dict[int, int] = {}
        keep = []
        for i in idx:
            y = int(labels[i])
            if taken.get(y, 0) < per_class:
                taken[y] = taken.get(y, 0) + 1
                keep.append(i)
        idx = sorted(keep)
    out = tuple(
        Image.fromarray(images[i], mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB") for i in idx
    )
    return out, tuple(int(labels[i]) for i in idx)
