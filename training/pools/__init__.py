"""Hard-prompt pools for MoPD: per-dataset pools, a generic pool, ablation pools, user files.

``resolve_pool(spec)`` is the one entry point: ``spec`` is a benchmark dataset name (any common
spelling: "Flowers102", "oxford_flowers", "OxfordFlowers"), ``generic``, ``mixed``, ``nonsense``,
or the path of a text file with one template per line (each with exactly one ``{}``; blank lines
and lines starting with ``#`` are skipped) or a JSON list of templates.
"""

from __future__ import annotations

import re
from pathlib import Path

from models.class_vectors import validate_templates
from models.listfiles import read_string_list
from training.pools.templates import DATASET_POOLS, GENERIC_POOL, MIXED_POOL, NONSENSE_POOL

__all__ = [
    "DATASET_POOLS",
    "GENERIC_POOL",
    "MIXED_POOL",
    "NAMED_POOLS",
    "NONSENSE_POOL",
    "canonical_dataset",
    "load_pool_file",
    "pool_for_dataset",
    "resolve_pool",
]

NAMED_POOLS: dict[str, list[str]] = {"generic": GENERIC_POOL, "mixed": MIXED_POOL, "nonsense": NONSENSE_POOL}

# Spellings used by CoOp folders, Dassl class names and torchvision, squashed (lower case, no
# separators) -> canonical key of DATASET_POOLS.
_ALIASES: dict[str, str] = {
    "imagenet": "imagenet",
    "caltech101": "caltech101",
    "oxfordpets": "oxford_pets",
    "pets": "oxford_pets",
    "stanfordcars": "stanford_cars",
    "cars": "stanford_cars",
    "oxfordflowers": "oxford_flowers",
    "flowers102": "oxford_flowers",
    "flowers": "oxford_flowers",
    "food101": "food101",
    "fgvcaircraft": "fgvc_aircraft",
    "aircraft": "fgvc_aircraft",
    "sun397": "sun397",
    "dtd": "dtd",
    "describabletextures": "dtd",
    "eurosat": "eurosat",
    "ucf101": "ucf101",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_dataset(name: str) -> str | None:
    """The DATASET_POOLS key for a benchmark dataset name, or None for a custom dataset."""
    return _ALIASES.get(_squash(name))


def pool_for_dataset(name: str) -> list[str]:
    """The 12-template pool of a benchmark dataset; the generic pool for anything else."""
    key = canonical_dataset(name)
    return list(DATASET_POOLS[key] if key else GENERIC_POOL)


def load_pool_file(path: str | Path) -> list[str]:
    """Templates from a user file: one per line (``#`` comments, blanks skipped) or a JSON list."""
    p = Path(path)
    templates = read_string_list(p, "prompt pool file")
    if not templates:
        raise ValueError(f"{p}: no templates (write one per line, each with one '{{}}' for the class name)")
    try:
        return validate_templates(templates)
    except ValueError as e:
        raise ValueError(f"{p}: {e}") from e


def resolve_pool(spec: str, dataset: str | None = None) -> list[str]:
    """Templates for ``spec``: "dataset" (the pool of ``dataset``), a pool name, a dataset, or a file.

    Args:
        spec: "dataset" | "generic" | "mixed" | "nonsense" | a benchmark dataset name | a file path.
        dataset: the training dataset's name, used when ``spec == "dataset"`` (custom -> generic).
    """
    if spec == "dataset":
        return pool_for_dataset(dataset or "custom")
    if spec in NAMED_POOLS:
        return list(NAMED_POOLS[spec])
    if canonical_dataset(spec) is not None:
        return pool_for_dataset(spec)
    if Path(spec).exists():
        return load_pool_file(spec)
    raise ValueError(
        f"unknown prompt pool {spec!r}: use 'dataset', one of {sorted(NAMED_POOLS)}, a benchmark dataset "
        f"name ({', '.join(sorted(DATASET_POOLS))}) or a file with one template per line"
    )
