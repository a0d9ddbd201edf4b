"""Open-set figures for the calibrated "unknown" and the class quality check (issue 22).

``python -m bench.openset --bundle DIR --data digits|fashion [--out FILE.json]`` on a bundle with a
calibration sample (``promptdistill demo`` writes one for the digits; the Fashion-MNIST PromptKD
student of ``promptdistill experiment fashion-mnist`` for Fashion-MNIST). Every number is computed
with the service's own modules (service/calibration.py, service/quality.py) on the bundle's image
tower and text side, as the service would for a label set created and grown at runtime:

1. **Open set**: a set of 5 classes (base, then novel); known = test images of those 5, unknown =
   test images of the other 5. AUROC of the top-1 cosine and of the top-1 softmax probability;
   false-accept rate (FAR, unknown images accepted) and acceptance of known images at the
   calibrated 95 % threshold, next to the raw-cosine threshold chosen in hindsight on the test
   images (the one that accepts 95 % of the known ones). Also the naive calibration that counts
   every sample row (not only those the set claims).
2. **Growth**: the set grows from 5 to 10 classes one name at a time; at each version the calibrated
   threshold's acceptance of the test images of the classes in the set.
3. **Duplicate flag**: every class of the 10-class set added again under a case or punctuation
   variant of its name (flag rate), and the other 5 classes added one by one to the 5-class set
   (false flags).
4. **Why a calibrated point misses** (``diagnosis``, cosine): the benchmark's labeled train split (the
   images the bundle's sample was drawn from) stands in for the sample with its labels known. The
   service's weighting on it (the weight it gives images of the set's classes and of the others),
   the threshold with the true labels as weights ("oracle": what a perfect posterior would give),
   the oracle's spread over 200 bootstrap draws of the sample (sample size), and the 5 % quantile of
   the known images' top-1 cosine on train vs test (distribution shift).
5. **Near-duplicate examples** (service/examples.py's rule: cosine >= the 99th percentile of the
   sample's nearest-neighbour cosines): 60 train images each re-encoded (JPEG 90 and 60), halved
   and restored, and enlarged 1.5x, through the bundle's image tower: the share of variants
   flagged against their original, and the share of the labeled train images flagged against
   their nearest *other* train image.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from models.bundle import Bundle, load_bundle
from models.towers import build_image_tower, build_text_side
from service.calibration import Calibrator, ScoreKind, threshold, top1
from service.examples import near_duplicate_cosine
from service.index import adhoc_rank
from service.quality import check_new_classes
from training.benchmark import Benchmark, digits_benchmark, load_benchmark
from training.config import DataCfg
from training.data import build_transform
from training.variants import FASHION_MNIST_ROOT

log = logging.getLogger(__name__)
ACCEPT = 0.95


def _exclaimed(name: str) -> str:
    return name + "!"


VARIANTS: dict[str, Callable[[str], str]] = {
    "Title case": str.title,
    "UPPER CASE": str.upper,
    "trailing '!'": _exclaimed,
}


def load_test(bundle: Bundle, data: str, per_class: int) -> tuple[Benchmark, Any]:
    size = bundle.manifest.image_encoder.preprocess.size[0]
    if data == "digits":
        bench = digits_benchmark(size)
    else:
        cfg = DataCfg(
            kind="fashion_mnist", root=FASHION_MNIST_ROOT, subsample_train=100, subsample_test=per_class, num_workers=0
        )
        bench = load_benchmark(cfg, image_size=size)
    from models.backbone import PreprocessConfig

    pre: PreprocessConfig = bundle.manifest.image_encoder.preprocess.to_config()
    return bench, bench.dataset("test", "all", build_transform(pre, train=False))


@torch.no_grad()
def embed(bundle: Bundle, dataset: Any) -> tuple[np.ndarray, np.ndarray]:
    tower = build_image_tower(bundle).eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=200, shuffle=False)
    embs, labels = [], []
    for pixels, y in loader:
        embs.append(tower(pixels).numpy())
        labels.append(np.asarray(y))
    return np.concatenate(embs).astype(np.float32), np.concatenate(labels)


def scores(emb: np.ndarray, vectors: np.ndarray, scale: float, kind: ScoreKind) -> np.ndarray:
    return top1(adhoc_rank(emb, vectors, scale, 1), kind)


def open_set(
    cal: Calibrator, emb: np.ndarray, labels: np.ndarray, vectors: np.ndarray, known: list[int]
) -> dict[str, Any]:
    """One known set: AUROC, and FAR / acceptance at the calibrated and the hindsight thresholds."""
    assert cal.sample is not None
    is_known = np.isin(labels, known)
    out: dict[str, Any] = {"known": known, "n_known": int(is_known.sum()), "n_unknown": int((~is_known).sum())}
    kinds: tuple[ScoreKind, ...] = ("cosine", "softmax")
    for kind in kinds:
        s = scores(emb, vectors, cal.logit_scale, kind)
        calibrated = cal.scores_for(lambda q: adhoc_rank(q, vectors, cal.logit_scale, 1), kind)
        # the alternatives measured against it: every sample image weighs 1 ("all"), or only the images
        # whose top-1 among set + vocabulary is the set's ("top-1 claimed")
        assert cal.vocabulary is not None
        claimed = (cal.sample @ vectors.T).max(1) >= (cal.sample @ cal.vocabulary.T).max(1) - 1e-5
        hindsight = threshold(s[is_known], ACCEPT)  # accepts 95 % of the known test images
        row: dict[str, Any] = {"auroc": float(roc_auc_score(is_known, s)), "calibration_images": calibrated.rows}
        for name, t in (
            ("calibrated", calibrated.threshold(ACCEPT)),
            ("all_sample_images", threshold(calibrated.scores, ACCEPT)),
            ("top1_claimed_images", threshold(calibrated.scores[claimed], ACCEPT)),
            ("hindsight", hindsight),
        ):
            row[name] = {
                "threshold": t,
                "acceptance_known": float((s[is_known] >= t).mean()),
                "far_unknown": float((s[~is_known] >= t).mean()),
            }
        out[kind] = row
    return out


def growth(
    cal: Calibrator, emb: np.ndarray, labels: np.ndarray, text: Any, names: list[str], order: list[int]
) -> list[dict[str, Any]]:
    """The set grows one name at a time from ``order[:5]``: acceptance of its classes' test images."""
    assert cal.sample is not None
    rows = []
    for n in range(5, len(order) + 1):
        in_set = order[:n]
        vectors = text.class_vectors([names[i] for i in in_set]).numpy()
        point = cal.scores_for(lambda q, v=vectors: adhoc_rank(q, v, cal.logit_scale, 1))  # type: ignore[misc]
        mask = np.isin(labels, in_set)
        s = scores(emb[mask], vectors, cal.logit_scale, "cosine")
        t = point.threshold(ACCEPT)
        rows.append({"classes": n, "threshold": t, "rows": point.rows, "acceptance": float((s >= t).mean())})
    return rows


def duplicates(cal: Calibrator, text: Any, names: list[str], order: list[int]) -> dict[str, Any]:
    """Flag rate of re-added classes (name variants) and false flags of genuinely new ones."""
    full = text.class_vectors(names).numpy()

    def check(existing: np.ndarray, existing_names: list[str], new_names: list[str]) -> list[Any]:
        new = text.class_vectors(new_names).numpy()
        return check_new_classes(
            new_names,
            new,
            lambda q, k: adhoc_rank(q, existing, cal.logit_scale, k),
            lambda cid: existing_names[cid],
            lambda ids: existing[list(ids)],
            cal.sample,
            cal.logit_scale,
        )

    out: dict[str, Any] = {}
    for label, variant in VARIANTS.items():
        flagged, detail = 0, []
        for i, name in enumerate(names):
            (c,) = check(full, names, [variant(name)])
            hit = any(n.class_id == i for n in c.flagged)
            flagged += hit
            top = c.neighbours[0]
            detail.append({"name": variant(name), "nearest": top.name, "cosine": top.cosine, "tie_rate": top.tie_rate})
        out[label] = {"flagged": flagged, "of": len(names), "detail": detail}
    false_flags, adds = [], 0
    for start in (order[:5], order[5:]):
        current = list(start)
        for i in [j for j in order if j not in start]:
            existing = full[current]
            (c,) = check(existing, [names[j] for j in current], [names[i]])
            adds += 1
            if c.flagged:
                false_flags.append(
                    {"added": names[i], "flagged_with": [(n.name, n.cosine, n.tie_rate) for n in c.flagged]}
                )
            current.append(i)
    out["new_classes_one_by_one"] = {"adds": adds, "false_flags": len(false_flags), "detail": false_flags}
    return out


def run(bundle_dir: Path, data: str, per_class: int = 200) -> dict[str, Any]:
    bundle = load_bundle(bundle_dir)
    if bundle.calibration is None:
        raise SystemExit(f"{bundle_dir} has no calibration sample; re-export it (see models/calibration.py)")
    from service.calibration import bundle_calibrator

    cal = bundle_calibrator(bundle)
    bench, test = load_test(bundle, data, per_class)
    emb, labels = embed(bundle, test)
    text = build_text_side(bundle)
    assert text is not None
    names = list(bench.class_names)
    base, novel = list(range(5)), list(range(5, 10))
    pre = bundle.manifest.image_encoder.preprocess.to_config()
    train = embed(bundle, bench.dataset("train", "all", build_transform(pre, train=False)))
    sets, why = {}, {}
    for label, known in (("base", base), ("novel", novel)):
        vectors = text.class_vectors([names[i] for i in known]).numpy()
        sets[label] = open_set(cal, emb, labels, vectors, known)
        why[label] = diagnosis(cal, train, (emb, labels), vectors, known)
    return {
        "bundle": str(bundle_dir),
        "data": data,
        "class_names": names,
        "calibration": bundle.manifest.calibration.model_dump() if bundle.manifest.calibration else None,
        "logit_scale": cal.logit_scale,
        "n_test": len(labels),
        "open_set": sets,
        "diagnosis": why,
        "near_duplicates": near_duplicates(bundle, bench, train[0]),
        "growth": {
            "base_first": growth(cal, emb, labels, text, names, base + novel),
            "novel_first": growth(cal, emb, labels, text, names, novel + base),
        },
        "duplicates": duplicates(cal, text, names, base + novel),
    }


def diagnosis(
    cal: Calibrator,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    vectors: np.ndarray,
    known: list[int],
    draws: int = 200,
) -> dict[str, Any]:
    """Where a calibrated cosine threshold's error comes from (module docstring, item 4)."""
    (a, ay), (x, xy) = train, test
    labelled = Calibrator(a, cal.vocabulary, cal.logit_scale)  # the service's weighting, labels at hand
    point = labelled.scores_for(lambda q: adhoc_rank(q, vectors, cal.logit_scale, 1))
    own, is_known = np.isin(ay, known), np.isin(xy, known)
    sx = scores(x, vectors, cal.logit_scale, "cosine")

    def at(t: float) -> dict[str, float]:
        return {"threshold": t, "acceptance_known": float((sx[is_known] >= t).mean()),
                "far_unknown": float((sx[~is_known] >= t).mean())}  # fmt: skip

    rng = np.random.default_rng(0)
    boot = [
        float((sx[is_known] >= threshold(point.scores[rng.choice(np.flatnonzero(own), own.sum())], ACCEPT)).mean())
        for _ in range(draws)
    ]
    return {
        "service_weights": at(point.threshold(ACCEPT)),
        "oracle_weights": at(threshold(point.scores[own], ACCEPT)),
        "mean_weight_set_images": float(point.weights[own].mean()),
        "mean_weight_other_images": float(point.weights[~own].mean()),
        "oracle_bootstrap_acceptance": {
            "mean": float(np.mean(boot)),
            "std": float(np.std(boot)),
            "rows": int(own.sum()),
        },
        "known_top1_q05": {"train": threshold(point.scores[own], ACCEPT), "test": threshold(sx[is_known], ACCEPT)},
    }


def near_duplicates(bundle: Bundle, bench: Benchmark, train_emb: np.ndarray, n: int = 60) -> dict[str, Any]:
    """Module docstring, item 5: variants of one image flagged vs distinct in-domain images flagged."""
    import io

    from PIL import Image

    from models.backbone import PreprocessConfig

    def jpeg(im: Image.Image, q: int) -> Image.Image:
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=q)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    kinds: dict[str, Callable[[Image.Image], Image.Image]] = {
        "jpeg 90": lambda im: jpeg(im, 90),
        "jpeg 60": lambda im: jpeg(im, 60),
        "half size and back": lambda im: im.resize((im.width // 2, im.height // 2)).resize(im.size),
        "1.5x larger": lambda im: im.resize((im.width * 3 // 2, im.height * 3 // 2)),
    }
    pre: PreprocessConfig = bundle.manifest.image_encoder.preprocess.to_config()
    tf = build_transform(pre, train=False)
    as_rgb: Any = lambda im: im.convert("RGB")  # noqa: E731  (the dataset's items as pictures, untransformed)
    pictures: Any = bench.dataset("train", "all", as_rgb)
    tower = build_image_tower(bundle).eval()
    near = near_duplicate_cosine(bundle.calibration.float().numpy() if bundle.calibration is not None else None)
    assert near is not None
    flagged: dict[str, list[bool]] = {k: [] for k in kinds}
    with torch.no_grad():
        for i in range(min(n, len(pictures))):
            im = pictures[i][0]
            batch = torch.stack([tf(im)] + [tf(f(im)) for f in kinds.values()])
            e = torch.nn.functional.normalize(tower(batch).float(), dim=-1).numpy()
            for k, cos in zip(kinds, e[1:] @ e[0], strict=True):
                flagged[k].append(bool(cos >= near))
    unit = train_emb / np.linalg.norm(train_emb, axis=1, keepdims=True)
    cos = unit @ unit.T
    np.fill_diagonal(cos, -np.inf)
    return {
        "threshold": near,
        "variants_flagged": {k: float(np.mean(v)) for k, v in flagged.items()},
        "variants": n,
        "distinct_flagged": float((cos.max(axis=1) >= near).mean()),
        "distinct_images": len(unit),
    }


def fashion_bundle(out: Path, seed: int = 1) -> Path:
    """The PromptKD student bundle of ``promptdistill experiment fashion-mnist`` (one seed, its default
    sizes), trained here: the experiment's own steps (training/fashion.py), PromptKD only."""
    from training.fashion import STUDENT_CONFIG, TEACHER_CONFIG, FashionCfg, _data, _promptkd, pretrained

    cfg = FashionCfg(seeds=[seed])
    bench = load_benchmark(_data(cfg), image_size=64)
    teacher_bb = pretrained(TEACHER_CONFIG, bench, cfg, out / "pretrained-teacher.safetensors", "teacher")
    student_bb = pretrained(STUDENT_CONFIG, bench, cfg, out / "pretrained-student.safetensors", "student")
    _promptkd(teacher_bb, student_bb, cfg, seed, out / f"seed{seed}")
    return out / f"seed{seed}" / "student" / "bundle"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.openset", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle with a calibration sample")
    parser.add_argument("--train-fashion", type=Path, default=None, help="train the Fashion-MNIST student here first")
    parser.add_argument("--data", choices=("digits", "fashion"), required=True)
    parser.add_argument("--per-class", type=int, default=200, help="fashion: test images per class")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    bundle = fashion_bundle(args.train_fashion) if args.train_fashion else args.bundle
    if bundle is None:
        parser.error("give --bundle or --train-fashion")
    result = run(bundle, args.data, args.per_class)
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
