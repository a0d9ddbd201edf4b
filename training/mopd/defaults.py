"""Per-dataset MoPD hyper-parameters from the official run script (algorithms.md §2.4)."""

from __future__ import annotations

from dataclasses import dataclass

from training.pools import canonical_dataset


@dataclass(frozen=True)
class DatasetDefaults:
    w: float  # CE weight (MPD gets 1 - w)
    w2: float  # MPS weight
    top_k: int  # teachers kept per image
    epochs: int


DATASET_DEFAULTS: dict[str, DatasetDefaults] = {
    "imagenet": DatasetDefaults(0.8, 0.0005, 3, 25),
    "caltech101": DatasetDefaults(0.8, 0.0005, 3, 100),
    "oxford_pets": DatasetDefaults(0.8, 0.5, 3, 25),
    "stanford_cars": DatasetDefaults(0.8, 0.1, 3, 100),
    "oxford_flowers": DatasetDefaults(0.8, 0.1, 3, 100),
    "food101": DatasetDefaults(0.5, 0.1, 2, 25),
    "fgvc_aircraft": DatasetDefaults(0.8, 0.1, 2, 25),
    "sun397": DatasetDefaults(0.8, 0.1, 2, 25),
    "dtd": DatasetDefaults(0.8, 0.1, 2, 25),
    "eurosat": DatasetDefaults(0.5, 0.1, 2, 100),
    "ucf101": DatasetDefaults(0.5, 0.1, 2, 25),
}

# Custom datasets: not in the official table. The most common row (w 0.8, w2 0.1, k 2, 25 epochs)
# is used; the official code's own fallbacks (w = w2 = 1.0) would disable distillation entirely.
CUSTOM_DEFAULTS = DatasetDefaults(0.8, 0.1, 2, 25)


def defaults_for(dataset: str) -> DatasetDefaults:
    """The §2.4 row of a benchmark dataset (any common spelling), else CUSTOM_DEFAULTS."""
    key = canonical_dataset(dataset)
    return DATASET_DEFAULTS[key] if key else CUSTOM_DEFAULTS
