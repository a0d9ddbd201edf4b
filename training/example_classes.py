"""``promptdistill experiment example-classes``: classes added from example images vs by name.

On a trained student bundle (the digits demo's, or the Fashion-MNIST one) and its dataset:

- named classes = the first half of the bundle's classes (their shipped text class vectors);
  example classes = the second half, added from ``k`` train images each (k = 1, 5, 16; ``draws``
  random draws per k), as the service builds them (:mod:`models.prototypes`);
- the same example classes added by name (their shipped text vectors) as the reference;
- accuracy on held-out test images of the example classes, and of the named classes, in the mixed
  set of all classes; the named classes alone ("before") for the drop the example classes cost;
- the class vector as the service builds it (``standardised``: Liang et al.'s centroid shift plus
  the Z-norm folded into the vector, :mod:`models.prototypes`), Liang et al.'s shift alone
  (``centroid``, also with the class offset scaled), the plain mean, and a name *and* examples
  combined; the in-domain sample is the bundle's calibration sample when it has one (what the service
  uses), else the unlabeled train images (labels unused);
- score-level references that need a per-class bias the service's cosine ranking has not (so not a
  class vector; how far the folded standardisation is from them): every class's scores z-normed over
  the sample, queries centred on the image centroid (Liang et al.'s centring, which subtracts each
  class's mean sample score), and CSLS (Conneau et al., "Word Translation Without Parallel Data",
  ICLR 2018: ``2 cos - r(class)``, ``r`` the mean cosine of the class with its 10 nearest sample images).

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
from models.prototypes import Gap, combine, image_prototype, normalise
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


def accuracy_of_scores(scores: np.ndarray, classes: list[int], labels: np.ndarray, of: list[int]) -> float:
    """Top-1 % of the images whose label is in ``of`` from their scores [N, C] (columns: ``classes``)."""
    mask = np.isin(labels, of)
    pred = np.asarray(classes)[scores[mask].argmax(1)]
    return 100.0 * float((pred == labels[mask]).mean())


def named_to_examples(
    vectors: np.ndarray, n_named: int, emb: np.ndarray, labels: np.ndarray, named: list[int]
) -> float:
    """% of the named classes' images whose top-1 is an example class (rows ``n_named:`` of ``vectors``)."""
    return 100.0 * float(((emb[np.isin(labels, named)] @ vectors.T).argmax(1) >= n_named).mean())


def score_spread(vectors: np.ndarray, sample: np.ndarray) -> dict[str, float]:
    """Mean over class vectors [C, D] of the mean and the standard deviation of their sample cosines."""
    scores = sample @ np.asarray(vectors, dtype=np.float64).T  # [M, C]
    return {"mean": float(scores.mean(0).mean()), "std": float(scores.std(0).mean())}


def score_references(vectors: np.ndarray, sample: np.ndarray, test_emb: np.ndarray) -> dict[str, np.ndarray]:
    """Test scores [N, C] of the class vectors [C, D] under per-class corrections from the sample [M, D]."""
    raw, cohort = test_emb @ vectors.T, sample @ vectors.T  # [N, C], [M, C]
    nearest = np.sort(cohort, axis=0)[-10:].mean(0)  # [C] CSLS's r: mean cosine with the 10 nearest images
    return {
        "score z-norm, every class": (raw - cohort.mean(0)) / cohort.std(0),
        "centred queries": raw - cohort.mean(0),  # (x - image centroid) . v
        "CSLS k=10": 2 * raw - nearest,
    }


def in_domain_sample(bundle: Any, train_emb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The bundle's calibration sample (the service's), else up to SAMPLE unlabeled train images."""
    if bundle.calibration is not None:
        return normalise(bundle.calibration.float().numpy()), f"bundle calibration sample ({len(bundle.calibration)})"
    picked = train_emb[rng.permutation(len(train_emb))[:SAMPLE]]
    return picked, f"unlabeled train images ({len(picked)})"


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
    sample, sample_source = in_domain_sample(bundle, train_emb, rng)
    liang = Gap.between(text, sample, standardise=False)
    # (label, gap, scale of the class offset): the service's, Liang et al.'s shift (1) and smaller offsets, plain
    modes = [
        ("standardised", Gap.between(text, sample), 1.0),
        ("centroid", liang, 1.0),
        *[(f"centroid x{s:g}", liang, s) for s in cfg.scales],
        ("plain", Gap.between(text, None), 1.0),
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
        "sample": sample_source,
        "gap_norm": float(np.linalg.norm(liang.shift)),
        # how far the sample's image centroid (the gap's estimate) is from the test images' own
        "centroid_error": float(np.linalg.norm(normalise(test_emb).mean(0) - normalise(sample).mean(0))),
        "named_alone": accuracy(text[named], named, test_emb, test_y, named),
        "all_by_name": {
            "example_classes": accuracy(text, everyone, test_emb, test_y, by_example),
            "named_classes": accuracy(text, everyone, test_emb, test_y, named),
            "named_to_examples": named_to_examples(text, half, test_emb, test_y, named),
        },
        # why: the sample cosines of the text vectors (named and example classes) vs the prototypes' (below)
        "text_scores": {"named": score_spread(text[named], sample), "examples": score_spread(text[by_example], sample)},
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
                    r.setdefault("named_to_examples", []).append(
                        named_to_examples(mixed, half, test_emb, test_y, named)
                    )
                    spread = score_spread(np.stack(vecs), sample)
                    r.setdefault("sample_score_std", []).append(spread["std"])
                    r.setdefault("sample_score_mean", []).append(spread["mean"])
                if mode == "centroid":
                    mixed = np.concatenate([text[named], np.stack(protos)])
                    for label, scores in score_references(mixed, sample, test_emb).items():
                        r = runs.setdefault(
                            f"{label} (centroid; score level)", {"example_classes": [], "named_classes": []}
                        )
                        r["example_classes"].append(accuracy_of_scores(scores, everyone, test_y, by_example))
                        r["named_classes"].append(accuracy_of_scores(scores, everyone, test_y, named))
        result["shots"][str(k)] = {m: {key: mean_std(v) for key, v in r.items()} for m, r in runs.items()}
        log.info("k=%d: %s", k, {m: round(r["example_classes"]["mean"], 2) for m, r in result["shots"][str(k)].items()})
    save_json(result, out / "summary.json")
    (out / "table.md").write_text(format_table(result))
    return result


def format_table(r: dict[str, Any]) -> str:
    ref = r["all_by_name"]
    lines = [
        f"named classes alone (before): {r['named_alone']:.2f} %; all classes by name: example classes "
        f"{ref['example_classes']:.2f} %, named classes {ref['named_classes']:.2f} %; |gap| {r['gap_norm']:.3f}; "
        f"in-domain sample: {r.get('sample', 'unlabeled train images')}"
        + (f"; |test image centroid - sample's| {r['centroid_error']:.3f}" if "centroid_error" in r else ""),
        "",
        "| examples per class | class vector | example classes top-1 % | named classes top-1 % |",
        "|---|---|---|---|",
    ]
    for k, modes in r["shots"].items():
        for mode, v in modes.items():
            e, n = v["example_classes"], v["named_classes"]
            lines.append(f"| {k} | {mode} | {e['mean']:.2f} ± {e['std']:.2f} | {n['mean']:.2f} ± {n['std']:.2f} |")
    if "text_scores" in r:
        t = r["text_scores"]
        lines += [
            "",
            f"Why (sample cosines, mean over classes): named text vectors mean {t['named']['mean']:.4f} / std "
            f"{t['named']['std']:.4f}; example classes' text vectors {t['examples']['mean']:.4f} / "
            f"{t['examples']['std']:.4f}; all by name, named images to example classes "
            f"{ref['named_to_examples']:.1f} %",
            "",
            "| examples | class vector | sample cosine mean | sample cosine std | named images -> example classes % |",
            "|---|---|---|---|---|",
        ]
        for k, modes in r["shots"].items():
            for mode, v in modes.items():
                if "sample_score_std" in v and not mode.startswith("name+"):
                    lines.append(
                        f"| {k} | {mode} | {v['sample_score_mean']['mean']:.4f} | {v['sample_score_std']['mean']:.4f} "
                        f"| {v['named_to_examples']['mean']:.1f} |"
                    )
    return "\n".join(lines) + "\n"
