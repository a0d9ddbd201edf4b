"""Hard-prompt pools used by MoPD as teachers (one frozen-CLIP zero-shot classifier per template).

The per-dataset pools follow the official MoPD code (cheny02/MoPD-TMM, ``CUSTOM_TEMPLATES``):
P = 12 templates = 3 image nouns ("a photo", "a picture", "an image") x 4 phrasings of the CoOp
dataset template — the dataset template itself plus "<noun> of a <thing>, classified as / categorized
as / labeled as {}." The strings are kept verbatim, including the official "a aircraft" and
"a person doing, classified as" oddities, so that results stay comparable with the reference.

Two ablation pools ship as well: the 35-template mixture of task-related and task-unrelated
prompts (``LASP_PROMPTS`` in the official file; it lists "a bad photo of the {}." twice, kept as
is) and 12 nonsense sentences (``NOISY_PROMPTS``, "group A").
"""

from __future__ import annotations

_NOUNS = ("a photo", "a picture", "an image")
_PHRASINGS = ("classified as", "categorized as", "labeled as")


def _family(direct: str, thing: str | None) -> list[str]:
    """3 nouns x (the dataset template + 3 "<noun> of <thing>, <phrasing> {}." variants).

    ``direct`` holds ``NOUN`` where the image noun goes, e.g. "NOUN of a {}, a type of flower.".
    ``thing`` is what the image shows in the labelled variants ("a flower"); None drops the "of".
    """
    out = [direct.replace("NOUN", noun) for noun in _NOUNS]
    for noun in _NOUNS:
        subject = f"{noun} of {thing}" if thing else noun
        out += [f"{subject}, {phrasing} {{}}." for phrasing in _PHRASINGS]
    return out


# The generic family: ImageNet, Caltech101, SUN397 and StanfordCars use it; so do custom datasets.
GENERIC_POOL: list[str] = _family("NOUN of a {}.", None)

DATASET_POOLS: dict[str, list[str]] = {
    "imagenet": GENERIC_POOL,
    "caltech101": GENERIC_POOL,
    "oxford_pets": _family("NOUN of a {}, a type of pet.", "a pet"),
    "stanford_cars": GENERIC_POOL,
    "oxford_flowers": _family("NOUN of a {}, a type of flower.", "a flower"),
    "food101": _family("NOUN of {}, a type of food.", "food"),
    "fgvc_aircraft": _family("NOUN of a {}, a type of aircraft.", "a aircraft"),
    "sun397": GENERIC_POOL,
    "dtd": _family("NOUN of {}, a type of texture.", "a texture"),
    "eurosat": [
        *(f"a centered satellite {n} of {{}}." for n in ("photo", "picture", "image")),
        *(f"a centered satellite {n}, {p} {{}}." for n in ("photo", "picture", "image") for p in _PHRASINGS),
    ],
    "ucf101": _family("NOUN of a person doing {}.", "a person doing"),
}

# Mixture of task-related and task-unrelated prompts (official LASP_PROMPTS, 35 entries).
MIXED_POOL: list[str] = [
    "a photo of a {}, a type of flower.",
    "a photo of a person doing {}.",
    "a centered satellite photo of {}.",
    "a photo of a {}, a type of aircraft.",
    "{} texture.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of a {}.",
    "a photo of many {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a pixelated photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a close-up photo of the {}.",
    "a low resolution photo of a {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
]

# Nonsense sentences that mention the class but say nothing about the image (official group A).
NONSENSE_POOL: list[str] = [
    "a collection of {} floating in the sky",
    "{} wrapped in a mysterious bubble",
    "an unexpected encounter with a {}",
    "a {} hidden among the stars",
    "a vibrant dance of the {}",
    "the laughter of a {} echoing through the forest",
    "a {} emerging from the depths of the ocean",
    "a journey through the pages of a {}",
    "the whispers of a {} in the wind",
    "a {} perched on the edge of a cliff",
    "a {} illuminated by the moonlight",
    "the song of a {} resonating in the mountains",
]
