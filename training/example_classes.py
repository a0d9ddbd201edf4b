"""``promptdistill experiment example-classes``: classes added from example images vs by name.

On a trained student bundle (the digits demo's, or the Fashion-MNIST one) and its dataset:

- named classes = the first half of the bundle's classes (their shipped text class vectors);
  example classes = the second half, added from ``k`` train images each (k = 1, 5, 16; ``draws``
  random draws per k), as the service builds them (:mod:`models.prototypes`);
- the same example classes added by name (their shipped text vectors) as the reference;
- accuracy on held-out test images of the example classes, and of the named classes, in the mixed
  set of all classes; the named classes alone ("before") for the drop the example classes cost;
- the prototype moved across the modality gap (image centroid of the bundle's in-domain sample:
  the unlabeled train images, labels unused, as a calibration sample holds) vs the plain mean,
  and a name *and* examples combined.

Writes ``OUT/summary.json`` and ``OUT/table.md``. Everything runs on the bundle's own image tower.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from models.bundle import load_bundle
from models.prototypes import Gap, combine, image_prototype
from models.towers import build_image_tower
from training.benchmark import Benchmark, digits_benchmark, load_benchmark
from training.config import Cfg, DataCfg
from training.data import build_transform
from training.evaluate import mean_std, save_json
from training.variants import FASHION_MNIST_ROOT

log = logging.getLogger(__name__)
SAMPLE = 2000  # in-domain images for the image centroid at most (a bundle's calibration sample bound)


class ExampleClassesCfg(Cfg):
    bundle: Path
    dataset: Literal["digits", "fashion-mnist"] = "digits"
    root: Path = FASHION_MNIST_ROOT
    train_per_class: int = Field(default=100, ge=16)  # Fashion-MNIST subsample, as the fashion experiment
    test_per_class: int = Field(default=100, ge=1)
    shots: list[int] = Field(default_factory=lambda: [1, 5, 16])
    draws: int = Field(default=10, ge=1)
    scales: list[float] = Field(default_factory=lambda: [0.75, 0.5])  # smaller class offsets, besides 1
    seed: int = 0


def load_data(cfg: ExampleClassesCfg, image_size: int) -> Benchmark:
    if cfg.dataset == "digits":
        return digits_benchmark(image_size)
    data = DataCfg(
        kind="fashion_mnist", root=cfg.root, subsample_train=cfg.train_per_class,
        subsample_test=cfg.test_per_class, num_workers=0,
    )  # fmt: skip
    return load_benchmark(data, image_size=image_size)


@torch.no_grad()
def embed(tower: Any, ds: Any) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] unit image embeddings and [N] labels of a dataset."""
    loader = torch.utils.data.DataLoader(ds, batch_size=128, shuffle=False)
    feats, labels = [], []
    for x, y in loader:
        feats.append(tower(x).float().numpy())
        labels.append(y.numpy())
    return np.concatenate(feats), np.concatenate(labels)


def accuracy(vectors: np.ndarray, classes: list[int], emb: np.ndarray, labels: np.ndarray, of: list[int]) -> float:
    """Top-1 % of the images whose label is in ``of``, among ``classes`` (rows of ``vectors``)."""
    mask = np.isin(labels, of)
    pred = np.asarray(classes)[(emb[mask] @ vectors.T).argmax(1)]
    return 100.0 * float((pred == labels[mask]).mean())


def run_example_classes(out: str | Path, cfg: ExampleClassesCfg) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_bundle(cfg.bundle)
    tower = build_image_tower(bundle).eval()
    pre = bundle.manifest.image_encoder.preprocess.to_config()
    bench = load_data(cfg, pre.size[0])
    names = [c.name for c in bundle.label_set().classes]
    text = bundle.class_vectors["default"].float().numpy()  # [C, D] in bundle order
    order = [names.index(n) for n in bench.class_names]  # bundle rows in the benchmark's label order
    text = text[order]
    tf = build_transform(pre, train=False)
    train_emb, train_y = embed(tower, bench.dataset("train", "all", tf))
    test_emb, test_y = embed(tower, bench.dataset("test", "all", tf))
    rng = np.random.default_rng(cfg.seed)
    sample = train_emb[rng.permutation(len(train_emb))[:SAMPLE]]  # unlabeled in-domain images
    gaps = {"gap": Gap.between(text, sample), "plain": Gap.between(text, None)}
    # (label, gap, scale of the class offset): Liang et al.'s shift (1), two smaller offsets, the plain mean
    modes = [
        ("gap", gaps["gap"], 1.0),
        *[(f"gap x{s:g}", gaps["gap"], s) for s in cfg.scales],
        ("plain", gaps["plain"], 1.0),
    ]
    half = len(names) // 2
    named, by_example = list(range(half)), list(range(half, len(names)))
    everyone = named + by_example
    result: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "classes": {
            "named": [bench.class_names[i] for i in named],
            "examples": [bench.class_names[i] for i in by_example],
        },
        "gap_norm": float(np.linalg.norm(gaps["gap"].shift)),
        "named_alone": accuracy(text[named], named, test_emb, test_y, named),
        "all_by_name": {
            "example_classes": accuracy(text, everyone, test_emb, test_y, by_example),
            "named_classes": accuracy(text, everyone, test_emb, test_y, named),
        },
        "shots": {},
    }
    for k in cfg.shots:
        runs: dict[str, dict[str, list[float]]] = {}
        for _ in range(cfg.draws):
            picks = {c: rng.choice(np.flatnonzero(train_y == c), size=k, replace=False) for c in by_example}
            for mode, gap, scale in modes:
                protos = [image_prototype(train_emb[picks[c]], gap, scale) for c in by_example]
                variants = {
                    mode: protos,
                    f"name+examples ({mode})": [combine(text[c], p) for c, p in zip(by_example, protos, strict=True)],
                }
                for label, vecs in variants.items():
                    mixed = np.concatenate([text[named], np.stack(vecs)])
                    r = runs.setdefault(label, {"example_classes": [], "named_classes": []})
                    r["example_classes"].append(accuracy(mixed, everyone, test_emb, test_y, by_example))
                    r["named_classes"].append(accuracy(mixed, everyone, test_emb, test_y, named))
        result["shots"][str(k)] = {m: {key: mean_std(v) for key, v in r.items()} for m, r in runs.items()}
        log.info("k=%d: %s", k, {m: round(r["example_classes"]["mean"], 2) for m, r in result["shots"][str(k)].items()})
    save_json(result, out / "summary.json")
    (out / "table.md").write_text(format_table(result))
    return result


def format_table(r: dict[str, Any]) -> str:
    ref = r["all_by_name"]
    lines = [
        f"named classes alone (before): {r['named_alone']:.2f} %; all classes by name: example classes "
        f"{ref['example_classes']:.2f} %, named classes {ref['named_classes']:.2f} %; |gap| {r['gap_norm']:.3f}",
        "",
        "| examples per class | class vector | example classes top-1 % | named classes top-1 % |",
        "|---|---|---|---|",
    ]
    for k, modes in r["shots"].items():
        for mode, v in modes.items():
            e, n = v["example_classes"], v["named_classes"]
            lines.append(f"| {k} | {mode} | {e['mean']:.2f} ± {e['std']:.2f} | {n['mean']:.2f} ± {n['std']:.2f} |")
    return "\n".join(lines) + "\n"
